//! The `git-credential` injection form of `forgejo-pat` backings.
//!
//! Two halves:
//! - [`git_config_env`]: what `aap-exec` puts in the child's environment. Git is configured only
//!   through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`: first an empty
//!   `credential.helper`, which clears every helper the user's gitconfig lists (so a `store` or
//!   `cache` helper is never handed the token), then `credential.<proto>://<host>.helper`, which
//!   runs `aap git-credential --host HOST --fd N`. The token sits in the inherited sealed memfd N:
//!   never in the environment, never in argv.
//! - [`answer`]: the credential protocol of that helper. `get` answers only for the capability's
//!   host over https (or http when the host is loopback); `store`, `erase`, anything unknown or
//!   malformed gets no answer.

#![forbid(unsafe_code)]

use crate::error::shell_quote;
use std::ffi::OsString;

/// The username we answer with. Forgejo (like Gitea) takes a token as the Basic-auth password
/// and ignores the username; a username git already has (from the URL) is echoed instead.
pub const DEFAULT_USERNAME: &str = "aap";

/// Largest credential request we read from git; real ones are a few hundred bytes.
pub const MAX_INPUT: usize = 64 * 1024;

/// Whether a `host[:port]` names a loopback address, where plain http is allowed (tests).
pub fn is_loopback(host_port: &str) -> bool {
    crate::source::is_loopback_host(split_host(host_port).0)
}

/// `host[:port]` split; an IPv6 literal keeps its brackets off.
pub(crate) fn split_host(host_port: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host_port.strip_prefix('[') {
        let (h, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (h, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host_port.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host_port, None),
    }
}

/// The protocols the helper answers for on `host`.
pub fn protocols(host: &str) -> &'static [&'static str] {
    if is_loopback(host) {
        &["https", "http"]
    } else {
        &["https"]
    }
}

/// The `GIT_CONFIG_*` variables for the child. `existing` is the caller's environment (entries
/// already counted in a valid `GIT_CONFIG_COUNT` are kept and ours appended after them, so ours
/// win; an invalid count is replaced). `helper_program` is the absolute path of `aap`.
pub fn git_config_env(
    existing: &dyn Fn(&str) -> Option<OsString>,
    helper_program: &str,
    host: &str,
    fd: i32,
) -> Vec<(String, OsString)> {
    let helper = format!(
        "!{} git-credential --host {} --fd {fd}",
        shell_quote(helper_program),
        shell_quote(host)
    );
    let mut entries: Vec<(String, String)> = vec![("credential.helper".into(), String::new())];
    for proto in protocols(host) {
        entries.push((
            format!("credential.{proto}://{host}.helper"),
            helper.clone(),
        ));
    }
    append_config(existing, &entries)
}

/// The `GIT_CONFIG_*` variables of the `http-proxy` form: git's URLs for `host` rewritten to
/// the broker's per-exec `base` (which ends in `/`), and every credential helper reset, so no
/// helper (the caller's or the user's) is asked for anything. `existing` as for
/// [`git_config_env`].
pub fn proxy_config_env(
    existing: &dyn Fn(&str) -> Option<OsString>,
    base: &str,
    host: &str,
) -> Vec<(String, OsString)> {
    // `https://` only, loopback hosts included: the broker forwards over TLS only, so a
    // plain-http URL is not rewritten (git then reaches the host itself, without a token).
    let entries: Vec<(String, String)> = vec![
        ("credential.helper".into(), String::new()),
        (format!("url.{base}.insteadOf"), format!("https://{host}/")),
    ];
    append_config(existing, &entries)
}

/// `entries` as `GIT_CONFIG_KEY_n`/`VALUE_n` after the caller's valid ones, and the new count.
fn append_config(
    existing: &dyn Fn(&str) -> Option<OsString>,
    entries: &[(String, String)],
) -> Vec<(String, OsString)> {
    let start = existing("GIT_CONFIG_COUNT")
        .and_then(|c| c.to_str().and_then(|s| s.trim().parse::<usize>().ok()))
        .filter(|&n| {
            n <= 10_000 && (0..n).all(|i| existing(&format!("GIT_CONFIG_KEY_{i}")).is_some())
        })
        .unwrap_or(0);
    let mut out = Vec::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        out.push((format!("GIT_CONFIG_KEY_{}", start + i), k.into()));
        out.push((format!("GIT_CONFIG_VALUE_{}", start + i), v.into()));
    }
    out.push((
        "GIT_CONFIG_COUNT".into(),
        (start + entries.len()).to_string().into(),
    ));
    out
}

/// Where git passes `git -c` settings to its subprocesses. Git reads it after
/// `GIT_CONFIG_COUNT`, so a `credential.*` setting in it would undo our reset.
pub const PARAMETERS_VAR: &str = "GIT_CONFIG_PARAMETERS";

/// Whether inherited `GIT_CONFIG_PARAMETERS` hold any `credential.*` setting (then the child
/// does not get them; anything unreadable counts as touching them).
pub fn parameters_touch_credentials(value: Option<&std::ffi::OsStr>) -> bool {
    match value {
        None => false,
        Some(v) => v
            .to_str()
            .is_none_or(|s| s.to_ascii_lowercase().contains("credential")),
    }
}

/// A token that can be written into the credential protocol: no NUL, CR or LF, not empty.
pub fn token_is_sendable(token: &[u8]) -> bool {
    !token.is_empty() && !token.iter().any(|&b| b == 0 || b == b'\n' || b == b'\r')
}

/// The answer to one helper invocation: `action` is git's argument (`get`, `store`, `erase`),
/// `input` what git wrote on stdin, `host` the capability's host. `token` is called only when
/// the request matches, so nothing else ever reads the memfd. Returns the bytes to print (empty
/// for no answer); the buffer holds the token and is wiped on drop.
pub fn answer(
    action: &str,
    input: &[u8],
    host: &str,
    token: &mut dyn FnMut() -> Option<zeroize::Zeroizing<Vec<u8>>>,
) -> zeroize::Zeroizing<Vec<u8>> {
    let none = zeroize::Zeroizing::new(Vec::new());
    if action != "get" || input.len() > MAX_INPUT {
        return none;
    }
    let Ok(text) = std::str::from_utf8(input) else {
        return none;
    };
    let mut protocol = None;
    let mut req_host = None;
    let mut username = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once('=') else {
            return none; // malformed: not key=value
        };
        let slot = match k {
            "protocol" => &mut protocol,
            "host" => &mut req_host,
            "username" => &mut username,
            "url" => {
                // `url=proto://[user@]host[:port]/path`: split it into the parts we need.
                let Some((p, rest)) = v.split_once("://") else {
                    return none;
                };
                let authority = rest.split('/').next().unwrap_or("");
                let (user, hp) = match authority.rsplit_once('@') {
                    Some((u, h)) => (Some(u), h),
                    None => (None, authority),
                };
                if protocol.replace(p).is_some() || req_host.replace(hp).is_some() {
                    return none;
                }
                if let Some(u) = user
                    && username.replace(u).is_some()
                {
                    return none;
                }
                continue;
            }
            _ => continue, // path, wwwauth[], capability[], password, ...: not ours to judge
        };
        if slot.replace(v).is_some() {
            return none; // a key twice: ambiguous, answer nothing
        }
    }
    let (Some(protocol), Some(req_host)) = (protocol, req_host) else {
        return none;
    };
    let proto_ok = protocols(host).contains(&protocol);
    if !proto_ok || !req_host.eq_ignore_ascii_case(host) {
        return none;
    }
    let user = username
        .filter(|u| !u.is_empty() && !u.contains(['\n', '\r', '\0']))
        .unwrap_or(DEFAULT_USERNAME);
    let Some(tok) = token() else {
        return none;
    };
    if !token_is_sendable(&tok) {
        return none;
    }
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(64 + user.len() + tok.len()));
    out.extend_from_slice(b"protocol=");
    out.extend_from_slice(protocol.as_bytes());
    out.extend_from_slice(b"\nhost=");
    out.extend_from_slice(req_host.as_bytes());
    out.extend_from_slice(b"\nusername=");
    out.extend_from_slice(user.as_bytes());
    out.extend_from_slice(b"\npassword=");
    out.extend_from_slice(&tok);
    out.extend_from_slice(b"\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    const TOK: &[u8] = b"fj_token_value";

    fn ask(action: &str, input: &str, host: &str) -> String {
        let mut reads = 0;
        let out = answer(action, input.as_bytes(), host, &mut || {
            reads += 1;
            Some(Zeroizing::new(TOK.to_vec()))
        });
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(reads > 0, !s.is_empty(), "token read without an answer");
        s
    }

    #[test]
    fn answers_get_for_its_host_only() {
        let a = ask(
            "get",
            "protocol=https\nhost=git.example.org\n\n",
            "git.example.org",
        );
        assert_eq!(
            a,
            "protocol=https\nhost=git.example.org\nusername=aap\npassword=fj_token_value\n"
        );
        let a = ask(
            "get",
            "protocol=https\nhost=GIT.example.org\nusername=alice\npath=x/y.git\n",
            "git.example.org",
        );
        assert!(
            a.contains("username=alice\npassword=fj_token_value\n"),
            "{a}"
        );
        let a = ask(
            "get",
            "url=https://bob@git.example.org/o/r.git\n",
            "git.example.org",
        );
        assert!(a.contains("username=bob\n"), "{a}");
        for other in [
            "protocol=https\nhost=evil.example.org\n",
            "protocol=https\nhost=git.example.org:8443\n",
            "protocol=https\nhost=git.example.org.evil\n",
            "protocol=http\nhost=git.example.org\n",
            "protocol=ssh\nhost=git.example.org\n",
            "host=git.example.org\n",
            "protocol=https\n",
            "protocol=https\nhost=git.example.org\nhost=evil.example.org\n",
            "protocol=https\nhost=evil.example.org\nprotocol=https\nhost=git.example.org\n",
            "protocol=https\ngarbage line\nhost=git.example.org\n",
            "",
            "\n",
        ] {
            assert_eq!(ask("get", other, "git.example.org"), "", "{other:?}");
        }
    }

    #[test]
    fn http_only_on_loopback() {
        assert!(
            !ask(
                "get",
                "protocol=http\nhost=127.0.0.1:8080\n",
                "127.0.0.1:8080"
            )
            .is_empty()
        );
        assert!(
            ask(
                "get",
                "protocol=http\nhost=127.0.0.1:8081\n",
                "127.0.0.1:8080"
            )
            .is_empty()
        );
        assert!(!ask("get", "protocol=http\nhost=localhost\n", "localhost").is_empty());
    }

    #[test]
    fn store_erase_and_unknown_do_nothing() {
        let req = "protocol=https\nhost=git.example.org\nusername=aap\npassword=x\n";
        for action in ["store", "erase", "approve", "", "GET", "get "] {
            assert_eq!(ask(action, req, "git.example.org"), "", "{action:?}");
        }
    }

    #[test]
    fn junk_never_panics_and_never_answers_wrongly() {
        // A small deterministic fuzz: random bytes, random splices of valid requests.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pieces: [&[u8]; 9] = [
            b"protocol=https\n",
            b"host=git.example.org\n",
            b"host=evil\n",
            b"=\n",
            b"\n",
            b"\xff\xfe",
            b"url=https://",
            b"username=\r\n",
            b"\0",
        ];
        for _ in 0..20_000 {
            let mut input = Vec::new();
            for _ in 0..(next() % 8) {
                if next() % 3 == 0 {
                    input.push((next() & 0xff) as u8);
                } else {
                    input.extend_from_slice(pieces[(next() % 9) as usize]);
                }
            }
            let out = answer("get", &input, "git.example.org", &mut || {
                Some(Zeroizing::new(TOK.to_vec()))
            });
            if !out.is_empty() {
                let s = std::str::from_utf8(&out).unwrap();
                assert!(
                    s.contains("\nhost=git.example.org\n"),
                    "{s:?} for {input:?}"
                );
                assert!(s.starts_with("protocol=https\n"), "{s:?}");
            }
        }
        let big = vec![b'a'; MAX_INPUT + 1];
        assert!(answer("get", &big, "h", &mut || None).is_empty());
    }

    #[test]
    fn token_with_newline_is_never_sent() {
        let out = answer(
            "get",
            b"protocol=https\nhost=h.example\n",
            "h.example",
            &mut || Some(Zeroizing::new(b"a\npassword=b".to_vec())),
        );
        assert!(out.is_empty());
    }

    #[test]
    fn inherited_git_c_credential_settings_are_detected() {
        use std::ffi::OsStr;
        assert!(!parameters_touch_credentials(None));
        assert!(!parameters_touch_credentials(Some(OsStr::new(
            "'core.editor'='vi'"
        ))));
        assert!(parameters_touch_credentials(Some(OsStr::new(
            "'core.editor'='vi' 'Credential.Helper'='store'"
        ))));
    }

    #[test]
    fn config_env_resets_helpers_then_scopes_ours() {
        let env = git_config_env(&|_| None, "/opt/aap bin/aap", "git.example.org", 5);
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("GIT_CONFIG_COUNT").as_deref(), Some("2"));
        assert_eq!(
            get("GIT_CONFIG_KEY_0").as_deref(),
            Some("credential.helper")
        );
        assert_eq!(get("GIT_CONFIG_VALUE_0").as_deref(), Some(""));
        assert_eq!(
            get("GIT_CONFIG_KEY_1").as_deref(),
            Some("credential.https://git.example.org.helper")
        );
        assert_eq!(
            get("GIT_CONFIG_VALUE_1").as_deref(),
            Some("!'/opt/aap bin/aap' git-credential --host git.example.org --fd 5")
        );
        // Existing entries are kept; ours come after them.
        let existing = |k: &str| match k {
            "GIT_CONFIG_COUNT" => Some("1".into()),
            "GIT_CONFIG_KEY_0" => Some("core.editor".into()),
            _ => None,
        };
        let env = git_config_env(&existing, "/aap", "127.0.0.1:9", 3);
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("GIT_CONFIG_COUNT").as_deref(), Some("4"));
        assert_eq!(
            get("GIT_CONFIG_KEY_1").as_deref(),
            Some("credential.helper")
        );
        assert_eq!(
            get("GIT_CONFIG_KEY_3").as_deref(),
            Some("credential.http://127.0.0.1:9.helper")
        );
        // A bogus count is replaced rather than extended.
        let bogus = |k: &str| (k == "GIT_CONFIG_COUNT").then(|| "x".into());
        let env = git_config_env(&bogus, "/aap", "h", 3);
        assert!(env.iter().any(|(k, v)| k == "GIT_CONFIG_COUNT" && v == "2"));
    }

    #[test]
    fn proxy_env_rewrites_the_host_and_resets_helpers_after_the_callers_entries() {
        let base = "http://127.0.0.1:4711/abcd/";
        let env = proxy_config_env(&|_| None, base, "git.example.org");
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("GIT_CONFIG_COUNT").as_deref(), Some("2"));
        assert_eq!(
            get("GIT_CONFIG_KEY_0").as_deref(),
            Some("credential.helper")
        );
        assert_eq!(get("GIT_CONFIG_VALUE_0").as_deref(), Some(""));
        assert_eq!(
            get("GIT_CONFIG_KEY_1").as_deref(),
            Some("url.http://127.0.0.1:4711/abcd/.insteadOf")
        );
        assert_eq!(
            get("GIT_CONFIG_VALUE_1").as_deref(),
            Some("https://git.example.org/")
        );
        // Loopback hosts get no plain-http rewrite either; a valid caller count is kept.
        let existing = |k: &str| match k {
            "GIT_CONFIG_COUNT" => Some(OsString::from("1")),
            "GIT_CONFIG_KEY_0" => Some(OsString::from("user.name")),
            _ => None,
        };
        let env = proxy_config_env(&existing, base, "127.0.0.1:9");
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("GIT_CONFIG_COUNT").as_deref(), Some("3"));
        assert_eq!(
            get("GIT_CONFIG_KEY_1").as_deref(),
            Some("credential.helper")
        );
        assert_eq!(
            get("GIT_CONFIG_VALUE_2").as_deref(),
            Some("https://127.0.0.1:9/")
        );
        assert!(
            get("GIT_CONFIG_KEY_0").is_none(),
            "the caller's own entry is not rewritten"
        );
    }
}
