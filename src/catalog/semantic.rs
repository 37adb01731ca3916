//! Checks the schema cannot express: unique ids, TTL bounds, critical-tier rules, absolute and
//! clean command paths, anchored argv patterns, and an inject form that fits the backing.

#![forbid(unsafe_code)]

use super::Problem;
use super::model::{Backing, CatalogFile, HttpProxy, Inject, Tier};
use crate::duration::Dur;
use std::collections::HashMap;

/// Shortest max_ttl: a grant shorter than a minute is a mistake.
pub const MIN_TTL: Dur = Dur::from_secs(60);
/// Longest max_ttl for tiers below critical: a week.
pub const MAX_TTL: Dur = Dur::from_secs(7 * 24 * 3600);
/// Longest max_ttl for the critical (break-glass) tier.
pub const MAX_TTL_CRITICAL: Dur = Dur::from_secs(3600);

/// Variable names a capability may not inject into: they change how the child (or the dynamic
/// loader, or git, or ssh) behaves, or belong to aap itself.
const RESERVED_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "IFS",
    "ENV",
    "BASH_ENV",
    "CDPATH",
    "PS4",
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERL5OPT",
    "RUBYOPT",
    "NODE_OPTIONS",
];
const RESERVED_PREFIXES: &[&str] = &["LD_", "DYLD_", "GIT_", "AAP_"];

pub(crate) fn check(file: &CatalogFile) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(file.capabilities.len());
    // Each distinct argv pattern is compiled once: large catalogs repeat patterns, and a full
    // compile (not just a syntax check) also catches patterns over the regex size limit.
    let mut compiled: HashMap<&str, Option<String>> = HashMap::new();
    for (i, cap) in file.capabilities.iter().enumerate() {
        let at = |field: &str| format!("/capabilities/{i}{field}");
        let mut push = |pointer: String, message: String, hint: &str| {
            out.push(Problem {
                pointer,
                key: None,
                message,
                hint: Some(hint.to_string()),
            });
        };

        if let Some(&first) = seen.get(cap.id.as_str()) {
            push(
                at("/id"),
                format!("duplicate id; capability #{} already uses it", first + 1),
                "give each capability its own id",
            );
        } else {
            seen.insert(&cap.id, i);
        }

        // TTL bounds.
        let limit = if cap.audit_tier == Tier::Critical {
            MAX_TTL_CRITICAL
        } else {
            MAX_TTL
        };
        if cap.max_ttl > limit {
            push(
                at("/max_ttl"),
                format!(
                    "max_ttl {} exceeds the {} tier's limit of {limit}",
                    cap.max_ttl, cap.audit_tier
                ),
                &format!("set max_ttl: {limit} or less"),
            );
        } else if cap.max_ttl < MIN_TTL {
            push(
                at("/max_ttl"),
                format!("max_ttl {} is shorter than {MIN_TTL}", cap.max_ttl),
                "set max_ttl: 1m or more",
            );
        }

        // Who may have it.
        if cap.audit_tier == Tier::Critical && !cap.agents.is_empty() {
            push(
                at("/agents"),
                format!(
                    "a critical capability may not be granted to agents by default, but it lists {}",
                    cap.agents.join(", ")
                ),
                "set agents: [] (critical capabilities are granted only by the operator, with aap session start --break-glass)",
            );
        }
        if cap.audit_tier != Tier::Critical && cap.agents.is_empty() {
            push(
                at("/agents"),
                "no agent may be granted it (agents is empty), and it is not critical".into(),
                "list the agents that may use it, or make it audit_tier: critical for break-glass only",
            );
        }

        // Backing-specific rules.
        match &cap.backing {
            Backing::SshAgent {
                key_lifetime,
                hosts,
                ..
            } => {
                if hosts.is_empty() {
                    push(
                        at("/backing/hosts"),
                        "an ssh-agent backing needs at least one destination host".into(),
                        "list the hosts the key may be used for",
                    );
                }
                if key_lifetime.secs() == 0 {
                    push(
                        at("/backing/key_lifetime"),
                        "key_lifetime must be longer than 0s".into(),
                        "set key_lifetime: 15m, for example",
                    );
                } else if *key_lifetime > cap.max_ttl {
                    push(
                        at("/backing/key_lifetime"),
                        format!(
                            "key_lifetime {key_lifetime} is longer than max_ttl {}",
                            cap.max_ttl
                        ),
                        &format!("set key_lifetime: {} or less", cap.max_ttl),
                    );
                }
            }
            Backing::WrappedCommand { command, args, .. } => {
                if !is_clean_absolute(command) {
                    push(
                        at("/backing/command"),
                        format!(
                            "command `{command}` must be an absolute path without `.`, `..` or `//`"
                        ),
                        "write the full path, e.g. /usr/bin/systemctl",
                    );
                }
                for (j, pat) in args.iter().enumerate() {
                    let pointer = at(&format!("/backing/args/{j}"));
                    if !pat.starts_with('^') || !pat.ends_with('$') || pat.ends_with("\\$") {
                        push(
                            pointer,
                            format!(
                                "argument pattern #{} is not anchored (it must start with ^ and end with $)",
                                j + 1
                            ),
                            "anchor it, e.g. \"^restart$\"",
                        );
                    } else if let Some(err) = compiled.entry(pat.as_str()).or_insert_with(|| {
                        regex::Regex::new(pat)
                            .err()
                            .map(|e| e.to_string().lines().last().unwrap_or("").to_string())
                    }) {
                        push(
                            pointer,
                            format!("argument pattern #{} is not a valid regex: {err}", j + 1),
                            "fix the pattern (Rust regex syntax)",
                        );
                    }
                }
            }
            _ => {}
        }

        // Inject forms that fit the backing.
        let needs_inject = !matches!(&cap.backing, Backing::WrappedCommand { secret: None, .. });
        if cap.inject.is_empty() && needs_inject {
            push(
                at(""),
                format!(
                    "{} {} backing needs an inject list",
                    super::article(cap.backing.type_name()),
                    cap.backing.type_name()
                ),
                "add inject: with env, fd, git-credential, http-proxy or ssh-agent as fits",
            );
        }
        if !needs_inject && !cap.inject.is_empty() {
            push(
                at("/inject"),
                "this wrapped-command has no secret, so there is nothing to inject".into(),
                "remove inject, or add a secret to the backing",
            );
        }
        // `access` is the proxy's policy: on any other form it would promise what nothing
        // enforces (a read capability whose token can push).
        let proxies = cap
            .inject
            .iter()
            .filter(|i| matches!(i, Inject::HttpProxy(_)))
            .count();
        if cap.access.is_some() && proxies == 0 {
            push(
                at("/access"),
                "access is enforced only by the http-proxy inject form, which this capability does not use".into(),
                "add `- type: http-proxy` to inject (forgejo-pat or secret), or remove access",
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (j, inj) in cap.inject.iter().enumerate() {
            let pointer = at(&format!("/inject/{j}"));
            let fits = matches!(
                (&cap.backing, inj),
                (
                    Backing::ForgejoPat { .. },
                    Inject::GitCredential
                        | Inject::HttpProxy(_)
                        | Inject::Env { .. }
                        | Inject::Fd { .. }
                ) | (Backing::Secret { .. }, Inject::HttpProxy(_))
                    | (Backing::SshAgent { .. }, Inject::SshAgent)
                    | (
                        Backing::InfisicalToken { .. }
                            | Backing::Secret { .. }
                            | Backing::WrappedCommand { .. },
                        Inject::Env { .. } | Inject::Fd { .. }
                    )
            );
            if !fits {
                let allowed = match &cap.backing {
                    Backing::ForgejoPat { .. } => "http-proxy, git-credential, env or fd",
                    Backing::SshAgent { .. } => {
                        "ssh-agent only (a key never goes into env or files)"
                    }
                    Backing::Secret { .. } => "env, fd or http-proxy",
                    _ => "env or fd",
                };
                push(
                    pointer.clone(),
                    format!(
                        "inject type {} does not fit {} {} backing",
                        inj.type_name(),
                        super::article(cap.backing.type_name()),
                        cap.backing.type_name()
                    ),
                    &format!("use {allowed}"),
                );
            }
            let twice = match inj {
                Inject::HttpProxy(_) => cap.inject[..j]
                    .iter()
                    .any(|o| matches!(o, Inject::HttpProxy(_))),
                _ => cap.inject[..j]
                    .iter()
                    .any(|o| o.var_name().is_none() && o == inj),
            };
            if twice {
                push(
                    pointer.clone(),
                    format!("inject type {} is listed twice", inj.type_name()),
                    "list it once",
                );
            }
            if let Inject::HttpProxy(p) = inj {
                for (field, message, hint) in proxy_problems(&cap.backing, p) {
                    push(format!("{pointer}/{field}"), message, &hint);
                }
            }
            if let Some(name) = inj.var_name() {
                let pointer = format!("{pointer}/name");
                if let Some(prev) = names.insert(name, j) {
                    push(
                        pointer.clone(),
                        format!("variable {name} is also set by inject #{}", prev + 1),
                        "use a different variable name",
                    );
                }
                if is_reserved_var(name) {
                    push(
                        pointer,
                        format!("variable {name} is reserved: it changes how the child runs"),
                        "choose a name of your own, e.g. FORGEJO_TOKEN",
                    );
                }
            }
        }
    }
    out
}

/// Request headers an `http-proxy` may not carry the secret in: the proxy sets or removes
/// them itself, or they frame the message (RFC 9110 7.6.1 hop-by-hop, and `Host`,
/// `Content-Length`, `Cookie`, `Expect`), so a catalog cannot smuggle a request through them.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "cookie",
];

/// Whether `s` is an HTTP token (RFC 9110 5.6.2): what a header name and an auth scheme are.
pub(crate) fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What is wrong with an `http-proxy` inject on `backing`: (field, message, hint) each.
fn proxy_problems(backing: &Backing, p: &HttpProxy) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    match (backing, &p.host) {
        (Backing::ForgejoPat { .. }, Some(_)) => out.push((
            "host",
            "a forgejo-pat backing names the host itself; the http-proxy inject may not".into(),
            "remove host from the inject (backing.host is where the proxy forwards)".into(),
        )),
        (Backing::Secret { .. }, None) => out.push((
            "host",
            "an http-proxy for a secret backing needs the host it forwards to".into(),
            "add host: api.example.org (host[:port], reached over HTTPS) to the inject".into(),
        )),
        _ => {}
    }
    match &p.header {
        None if matches!(backing, Backing::Secret { .. }) => out.push((
            "header",
            "an http-proxy for a secret backing needs the header the secret goes in".into(),
            "add header: Authorization (and scheme: Bearer, if the API wants one) to the inject"
                .into(),
        )),
        None if p.scheme.is_some() => out.push((
            "scheme",
            "scheme is the start of the header's value, but no header is named".into(),
            "add header: Authorization to the inject, or remove scheme".into(),
        )),
        Some(h) if !is_http_token(h) => out.push((
            "header",
            format!("header {h:?} is not a valid HTTP header name"),
            "use letters, digits and -, e.g. header: X-Api-Key".into(),
        )),
        Some(h) => {
            let lower = h.to_ascii_lowercase();
            if FORBIDDEN_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
                out.push((
                    "header",
                    format!("header {h} frames the request or is the proxy's own; a secret may not go in it"),
                    "use the header the API reads the token from, e.g. header: Authorization"
                        .into(),
                ));
            }
        }
        None => {}
    }
    if let Some(sc) = &p.scheme
        && !is_http_token(sc)
    {
        out.push((
            "scheme",
            format!("scheme {sc:?} is not one word of letters and digits"),
            "use e.g. scheme: Bearer or scheme: token".into(),
        ));
    }
    out
}

fn is_reserved_var(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    RESERVED_VARS.contains(&upper.as_str())
        || RESERVED_PREFIXES.iter().any(|p| upper.starts_with(p))
}

fn is_clean_absolute(p: &str) -> bool {
    // Split by hand: Path::components() silently drops `.` segments.
    p.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert!(is_clean_absolute("/usr/bin/systemctl"));
        for bad in [
            "usr/bin/x",
            "/usr/../bin/x",
            "/usr/./x",
            "/usr//x",
            "/usr/bin/",
        ] {
            assert!(!is_clean_absolute(bad), "{bad}");
        }
    }

    /// The catalog error for one capability with `backing` and `inject` (YAML flow), or `None`
    /// when it loads.
    fn proxy_catalog(backing: &str, inject: &str) -> Option<String> {
        let text = format!(
            "schema_version: 1\ncapabilities:\n  - id: api\n    description: d\n    audit_tier: low\n    agents: [codex]\n    max_ttl: 1h\n    backing: {backing}\n    inject: [ {inject} ]\n"
        );
        crate::catalog::Catalog::from_text(&text, "cat.yaml")
            .err()
            .map(|e| e.render("aap"))
    }

    const SECRET: &str = "{ type: secret, secret: { path: /app, key: K } }";
    const FORGEJO: &str =
        "{ type: forgejo-pat, host: git.example.org, secret: { path: /f, key: K } }";

    #[test]
    fn http_proxy_settings_load_and_default_as_before() {
        assert_eq!(proxy_catalog(FORGEJO, "{ type: http-proxy }"), None);
        assert_eq!(
            proxy_catalog(
                FORGEJO,
                "{ type: http-proxy, name: GITEA_URL, header: Authorization, scheme: token }"
            ),
            None
        );
        assert_eq!(
            proxy_catalog(
                SECRET,
                "{ type: http-proxy, host: \"api.example.org:8443\", name: API_URL, header: X-Api-Key }"
            ),
            None
        );
        let p = HttpProxy::default();
        assert_eq!(p.url_var(), "FORGEJO_URL");
    }

    #[test]
    fn hostile_http_proxy_settings_are_refused_with_a_hint() {
        for (backing, inject, says) in [
            (
                SECRET,
                "{ type: http-proxy, header: X-Api-Key }",
                "needs the host",
            ),
            (
                SECRET,
                "{ type: http-proxy, host: api.example.org }",
                "needs the header",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, host: other.example.org }",
                "names the host itself",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, scheme: Bearer }",
                "no header is named",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: Host }",
                "frames the request",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: content-length }",
                "frames the request",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: Transfer-Encoding }",
                "frames the request",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: Connection }",
                "frames the request",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: Proxy-Authorization }",
                "frames the request",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: \"X-Key: a\" }",
                "header",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: \"X\\r\\nHost\" }",
                "header",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, header: X-K, scheme: \"Bearer x\" }",
                "scheme",
            ),
            (
                FORGEJO,
                "{ type: http-proxy, name: LD_PRELOAD }",
                "reserved",
            ),
            (FORGEJO, "{ type: http-proxy, name: GIT_DIR }", "reserved"),
            (FORGEJO, "{ type: http-proxy, name: PATH }", "reserved"),
            (FORGEJO, "{ type: http-proxy, name: \"A=B\" }", "name"),
            (
                FORGEJO,
                "{ type: http-proxy }, { type: http-proxy, name: OTHER_URL }",
                "listed twice",
            ),
            (
                FORGEJO,
                "{ type: http-proxy }, { type: env, name: FORGEJO_URL }",
                "also set by inject #1",
            ),
        ] {
            let e = proxy_catalog(backing, inject)
                .unwrap_or_else(|| panic!("{inject} on {backing} was accepted"));
            assert!(e.contains(says), "{inject}: {e}");
            assert!(e.contains("hint:"), "{inject}: {e}");
        }
    }

    #[test]
    fn http_tokens() {
        for ok in ["Authorization", "X-Api-Key", "token", "Bearer"] {
            assert!(is_http_token(ok), "{ok}");
        }
        for bad in ["", "X Key", "X:K", "a\r\nb", "é"] {
            assert!(!is_http_token(bad), "{bad}");
        }
    }

    #[test]
    fn reserved_vars() {
        assert!(is_reserved_var("LD_PRELOAD"));
        assert!(is_reserved_var("path"));
        assert!(is_reserved_var("GIT_ASKPASS"));
        assert!(!is_reserved_var("FORGEJO_TOKEN"));
    }
}
