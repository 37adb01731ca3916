//! What the proxy lets through. Pure functions of the request line: no I/O, so each rule is
//! tested alone.

#![forbid(unsafe_code)]

use crate::catalog::Access;

/// Bytes of randomness in a per-exec prefix (256 bits).
pub const PREFIX_BYTES: usize = 32;

/// A per-exec path prefix: 256 random bits, as 64 lower-case hex digits. It is a capability of
/// its own (whoever knows it may use the endpoint while the exec lives), so it is never logged.
pub struct Prefix(String);

impl Prefix {
    /// A fresh prefix from getrandom(2).
    pub fn generate() -> std::io::Result<Prefix> {
        Ok(Prefix(crate::sys::random_hex(PREFIX_BYTES)?))
    }

    /// The child's base URL for a listener on `port` (ends in `/`).
    pub fn base_url(&self, port: u16) -> String {
        format!("http://127.0.0.1:{port}/{}/", self.0)
    }

    /// The path (with its query) after `/<prefix>`, starting with `/`; `None` when the request
    /// does not carry this prefix as its whole first segment. Compared in constant time.
    pub fn route<'a>(&self, path_and_query: &'a str) -> Option<&'a str> {
        let rest = path_and_query.strip_prefix('/')?;
        let p = self.0.as_bytes();
        let head = rest.as_bytes().get(..p.len())?;
        let same = head.iter().zip(p).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        let tail = rest.get(p.len()..)?;
        (same && tail.starts_with('/')).then_some(tail)
    }
}

impl std::fmt::Debug for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prefix(<redacted>)")
    }
}

/// What the policy says about one routed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// 403, with the body git shows the user.
    ReadOnly,
    /// 405: a method the proxy forwards for no capability (`TRACE` would echo the token the
    /// proxy added back to the child).
    Method,
}

/// Methods forwarded at all; any other is refused whatever the access.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// The content type of git's fetch request (`git-upload-pack`), the one POST a read passes.
const UPLOAD_PACK_REQUEST: &str = "application/x-git-upload-pack-request";

/// Whether a capability with `access` may send `method` to `path_and_query` (after the
/// prefix), the request's `Content-Type` being `content_type`.
///
/// `read` passes what git's fetch sends and any other GET/HEAD:
/// - GET/HEAD, unless a `service` parameter (percent-decoded, as the host decodes it) names
///   anything but `git-upload-pack`;
/// - POST only in git's smart-HTTP shape: `.../OWNER/REPO/git-upload-pack`, no query, git's
///   upload-pack content type, and no segment before the repository's that is `api` or starts
///   with `_`. A suffix alone would pass Forgejo's contents API
///   (`POST /api/v1/repos/o/r/contents/x/git-upload-pack` writes a file) and its web editor
///   (`/o/r/_new/BRANCH/...`); Forgejo reserves both names for users and organisations.
pub fn judge(
    access: Access,
    method: &str,
    path_and_query: &str,
    content_type: Option<&str>,
) -> Verdict {
    if !METHODS.contains(&method) {
        return Verdict::Method;
    }
    if access == Access::Write {
        return Verdict::Pass;
    }
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    if !plain_path(path) {
        // A path the host might read differently than we do (dot segments, an encoded slash
        // or dot, a backslash) could turn a passed read into a write there.
        return Verdict::ReadOnly;
    }
    let Some(params) = decoded_query(query) else {
        return Verdict::ReadOnly; // an escape we cannot read the way the host would
    };
    if params
        .iter()
        .any(|(k, v)| k == "service" && v != "git-upload-pack")
    {
        return Verdict::ReadOnly;
    }
    match method {
        "GET" | "HEAD" => Verdict::Pass,
        "POST"
            if query.is_empty()
                && is_upload_pack_request(content_type)
                && is_git_fetch_path(path) =>
        {
            Verdict::Pass
        }
        _ => Verdict::ReadOnly,
    }
}

/// `Content-Type: application/x-git-upload-pack-request` (any case, parameters ignored).
fn is_upload_pack_request(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(UPLOAD_PACK_REQUEST))
    })
}

/// `/[BASE/...]OWNER/REPO/git-upload-pack` (or `/REPO/git-upload-pack`): non-empty
/// segments, and none before the repository's is `api` or starts with `_`.
fn is_git_fetch_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let [before @ .., _repo, last] = segs.as_slice() else {
        return false;
    };
    *last == "git-upload-pack"
        && segs.iter().all(|s| !s.is_empty())
        && before
            .iter()
            .all(|s| !s.eq_ignore_ascii_case("api") && !s.starts_with('_'))
}

/// The query's parameters, keys and values percent-decoded (`+` is a space), as a form
/// parser reads them; `None` when an escape is malformed or decodes to something that is not
/// UTF-8.
fn decoded_query(query: &str) -> Option<Vec<(String, String)>> {
    use crate::urlenc::decode_strict;
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((decode_strict(k, true)?, decode_strict(v, true)?))
        })
        .collect()
}

/// Whether `path` means the same to every server: no `.` or `..` segment, no backslash, no
/// percent-encoded dot, slash or backslash.
fn plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    !path.contains('\\')
        && !["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
        && !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// The 405 body for a method the proxy never forwards.
pub fn method_message(method: &str) -> String {
    format!(
        "aap: error: the proxy does not forward {method} requests\naap: hint: send it as one of {}\n",
        METHODS.join(", ")
    )
}

/// The 403 body for a refused write: git prints a plain-text error body to the user.
pub fn read_only_message(cap: &str) -> String {
    format!("aap: {cap} is read-only; ask for a write capability\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_random_and_routed_only_whole() {
        let p = Prefix::generate().unwrap();
        let q = Prefix::generate().unwrap();
        assert_ne!(p.0, q.0);
        assert_eq!(p.0.len(), 2 * PREFIX_BYTES);
        let base = p.base_url(4711);
        let path = base.strip_prefix("http://127.0.0.1:4711").unwrap();
        assert_eq!(
            p.route(&format!("{path}demo.git/info/refs?service=git-upload-pack")),
            Some("/demo.git/info/refs?service=git-upload-pack")
        );
        assert_eq!(q.route(&format!("{path}demo.git/info/refs")), None);
        assert_eq!(p.route("/demo.git/info/refs"), None);
        assert_eq!(p.route(&format!("/{}", p.0)), None);
        assert_eq!(p.route(&format!("/{}x/a", p.0)), None);
        assert_eq!(p.route(&format!("/{}/a", &p.0[..63])), None);
        assert_eq!(p.route(""), None);
        assert_eq!(p.route(&format!("/{}\u{e9}/a", &p.0[..63])), None);
        assert!(!format!("{p:?}").contains(&p.0));
    }

    const GIT: Option<&str> = Some("application/x-git-upload-pack-request");

    #[test]
    fn read_passes_fetches_and_refuses_pushes() {
        let r = Access::Read;
        for (m, path, ct) in [
            ("GET", "/demo.git/info/refs?service=git-upload-pack", None),
            ("GET", "/o/r.git/info/refs?service=git%2Dupload-pack", None),
            ("POST", "/demo.git/git-upload-pack", GIT),
            ("POST", "/owner/repo.git/git-upload-pack", GIT),
            ("POST", "/owner/api/git-upload-pack", GIT),
            ("POST", "/forgejo/owner/repo/git-upload-pack", GIT),
            (
                "POST",
                "/o/r.git/git-upload-pack",
                Some("Application/X-Git-Upload-Pack-Request; x=1"),
            ),
            ("GET", "/api/v1/repos/a/b", None),
            ("HEAD", "/demo.git/HEAD", None),
        ] {
            assert_eq!(judge(r, m, path, ct), Verdict::Pass, "{m} {path}");
        }
        for (m, path, ct) in [
            ("GET", "/demo.git/info/refs?service=git-receive-pack", None),
            (
                "GET",
                "/demo.git/info/refs?x=1&service=git-receive-pack",
                None,
            ),
            // The host decodes the query (Go's form parser); so does the policy.
            (
                "GET",
                "/demo.git/info/refs?service=git%2Dreceive-pack",
                None,
            ),
            (
                "GET",
                "/demo.git/info/refs?servic%65=git-receive-pack",
                None,
            ),
            (
                "GET",
                "/demo.git/info/refs?service=git-upload-pack&service=git-receive-pack",
                None,
            ),
            ("GET", "/demo.git/info/refs?service=%zz", None),
            ("GET", "/demo.git/info/refs?service=%+1", None),
            ("POST", "/demo.git/git-receive-pack", GIT),
            ("POST", "/api/v1/repos/a/b/issues", None),
            // Forgejo's contents API: a POST under contents/ writes the file it names.
            ("POST", "/api/v1/repos/o/r/contents/x/git-upload-pack", GIT),
            (
                "POST",
                "/forgejo/api/v1/repos/o/r/contents/git-upload-pack",
                GIT,
            ),
            // Its web editor.
            ("POST", "/o/r/_new/main/x/git-upload-pack", GIT),
            // Forgejo's push-to-create reads `service` on any route.
            (
                "POST",
                "/o/new.git/git-upload-pack?service=git-receive-pack",
                GIT,
            ),
            ("POST", "/o/r.git/git-upload-pack?x=1", GIT),
            ("POST", "/o/r.git/git-upload-pack", None),
            ("POST", "/o/r.git/git-upload-pack", Some("application/json")),
            ("POST", "/git-upload-pack", GIT),
            ("POST", "/o//git-upload-pack", GIT),
            ("PUT", "/demo.git/git-upload-pack", GIT),
            ("DELETE", "/api/v1/repos/a/b", None),
            ("PATCH", "/api/v1/repos/a/b", None),
            (
                "POST",
                "/api/v1/repos/a/b/issues/../../git-upload-pack",
                GIT,
            ),
            (
                "POST",
                "/api/v1/repos/a/b/issues/%2e%2e/git-upload-pack",
                GIT,
            ),
            ("POST", "/api/v1/repos/a/b/issues%2F/git-upload-pack", GIT),
            ("POST", "/demo.git\\..\\x/git-upload-pack", GIT),
            ("GET", "/demo.git/./info/refs?service=git-upload-pack", None),
        ] {
            assert_eq!(judge(r, m, path, ct), Verdict::ReadOnly, "{m} {path}");
            assert_eq!(
                judge(Access::Write, m, path, ct),
                Verdict::Pass,
                "{m} {path}"
            );
        }
        // TRACE would echo the Authorization the proxy adds; neither access forwards it.
        for m in ["TRACE", "TRACK", "CONNECT", "PROPFIND", "get"] {
            for a in [Access::Read, Access::Write] {
                assert_eq!(judge(a, m, "/demo.git/HEAD", None), Verdict::Method, "{m}");
            }
        }
        assert_eq!(
            read_only_message("forgejo-pat-read"),
            "aap: forgejo-pat-read is read-only; ask for a write capability\n"
        );
    }
}
