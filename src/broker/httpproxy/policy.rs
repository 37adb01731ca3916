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
}

/// Whether a capability with `access` may send `method` to `path_and_query` (after the prefix).
/// `read` passes git's fetch (the upload-pack advertisement and its POST) and any other
/// GET/HEAD, except the receive-pack advertisement that starts a push.
pub fn judge(access: Access, method: &str, path_and_query: &str) -> Verdict {
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
    let service = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("service="))
        .unwrap_or("");
    match method {
        "GET" | "HEAD" if service == "git-receive-pack" => Verdict::ReadOnly,
        "GET" | "HEAD" => Verdict::Pass,
        "POST" if path.ends_with("/git-upload-pack") => Verdict::Pass,
        _ => Verdict::ReadOnly,
    }
}

/// Whether `path` means the same to every server: no `.` or `..` segment, no backslash, no
/// percent-encoded dot, slash or backslash.
fn plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    !path.contains('\\')
        && !["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
        && !path.split('/').any(|seg| seg == "." || seg == "..")
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

    #[test]
    fn read_passes_fetches_and_refuses_pushes() {
        let r = Access::Read;
        for (m, path) in [
            ("GET", "/demo.git/info/refs?service=git-upload-pack"),
            ("POST", "/demo.git/git-upload-pack"),
            ("GET", "/api/v1/repos/a/b"),
            ("HEAD", "/demo.git/HEAD"),
        ] {
            assert_eq!(judge(r, m, path), Verdict::Pass, "{m} {path}");
        }
        for (m, path) in [
            ("GET", "/demo.git/info/refs?service=git-receive-pack"),
            ("GET", "/demo.git/info/refs?x=1&service=git-receive-pack"),
            ("POST", "/demo.git/git-receive-pack"),
            ("POST", "/api/v1/repos/a/b/issues"),
            ("PUT", "/demo.git/git-upload-pack"),
            ("DELETE", "/api/v1/repos/a/b"),
            ("PATCH", "/api/v1/repos/a/b"),
            ("POST", "/api/v1/repos/a/b/issues/../../git-upload-pack"),
            ("POST", "/api/v1/repos/a/b/issues/%2e%2e/git-upload-pack"),
            ("POST", "/api/v1/repos/a/b/issues%2F/git-upload-pack"),
            ("POST", "/demo.git\\..\\x/git-upload-pack"),
            ("GET", "/demo.git/./info/refs?service=git-upload-pack"),
        ] {
            assert_eq!(judge(r, m, path), Verdict::ReadOnly, "{m} {path}");
            assert_eq!(judge(Access::Write, m, path), Verdict::Pass, "{m} {path}");
        }
        assert_eq!(
            read_only_message("forgejo-pat-read"),
            "aap: forgejo-pat-read is read-only; ask for a write capability\n"
        );
    }
}
