//! Why a check said no: one variant per reason, each with a one-line message and a hint that is
//! the exact command that would allow it.

#![forbid(unsafe_code)]

use crate::error::{Error, Kind};
use std::fmt;

/// How a capability the session lacks could be added to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grantable {
    /// `aap session approve SESSION --cap CAP`.
    Approve,
    /// Critical: only with `--break-glass --reason`.
    BreakGlass,
    /// The catalog does not list the session's agent for it: no approval can add it.
    NotForAgent,
}

/// A typed "no" from [`crate::grant::check`]. Every variant denies; none is a warning.
#[derive(Debug)]
pub enum Denial {
    /// The session id is not a canonical ULID (`../x`, a path, NUL bytes, too long...).
    MalformedId { shown: String, why: &'static str },
    /// No grant file exists for this session.
    NoSuchSession {
        session: String,
        agent: Option<String>,
        capability: String,
    },
    /// The grant file is unusable: a symlink, a FIFO, too large, or JSON that is not a valid
    /// grant (unknown fields, duplicate keys, another session's id...).
    BadGrant {
        session: String,
        why: String,
        capability: String,
        /// The caller's agent, else the one the grant names (unverified: only for the hint).
        agent: Option<String>,
    },
    /// The signature is missing, malformed, for another namespace or does not match.
    BadSignature {
        session: String,
        why: String,
        capability: String,
        /// The caller's agent, else the one the grant names (unverified: only for the hint).
        agent: Option<String>,
    },
    /// The signature is sound but its key may not sign grants (allowed_signers).
    SignerNotAllowed {
        session: String,
        why: String,
        capability: String,
        agent: String,
    },
    /// The session, or the capability within it, has expired.
    Expired {
        session: String,
        agent: String,
        capability: String,
        at: String,
        whole_session: bool,
    },
    /// The grant's `not_before` is still in the future.
    NotYetValid {
        session: String,
        from: String,
        now: String,
    },
    /// `<state>/revoked/<session>` exists.
    Revoked {
        session: String,
        agent: Option<String>,
        capability: String,
        detail: Option<String>,
    },
    /// The grant does not list the capability.
    NotGranted {
        session: String,
        agent: String,
        capability: String,
        granted: Vec<String>,
        /// How the operator could add it (what the hint says).
        how: Grantable,
    },
    /// The capability is not in the catalog (any more).
    NotInCatalog {
        session: String,
        capability: String,
        granted: bool,
        catalog: String,
        hint: String,
    },
    /// The catalog no longer lets the grant's agent use the capability (or it became critical
    /// and the grant is not a break-glass grant).
    CatalogForbids {
        session: String,
        agent: String,
        capability: String,
        why: String,
    },
    /// The caller says it is another agent than the one the grant is for.
    AgentMismatch {
        session: String,
        grant_agent: String,
        caller: String,
        capability: String,
    },
    /// The grant is limited to other hosts.
    HostMismatch {
        session: String,
        agent: String,
        host: String,
        allowed: Vec<String>,
        capability: String,
    },
    /// The config maps the agent to a uid, and the caller runs as another.
    UidNotAllowed {
        session: String,
        agent: String,
        uid: u32,
        expected: u32,
    },
    /// No answer could be computed (unreadable state, broken config): denied, with the cause.
    Unavailable(Error),
}

impl Denial {
    /// A short stable name for the kind, for `--json` output and tests.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Denial::MalformedId { .. } => "malformed-id",
            Denial::NoSuchSession { .. } => "no-such-session",
            Denial::BadGrant { .. } => "bad-grant",
            Denial::BadSignature { .. } => "bad-signature",
            Denial::SignerNotAllowed { .. } => "signer-not-allowed",
            Denial::Expired { .. } => "expired",
            Denial::NotYetValid { .. } => "not-yet-valid",
            Denial::Revoked { .. } => "revoked",
            Denial::NotGranted { .. } => "not-granted",
            Denial::NotInCatalog { .. } => "not-in-catalog",
            Denial::CatalogForbids { .. } => "catalog-forbids",
            Denial::AgentMismatch { .. } => "agent-mismatch",
            Denial::HostMismatch { .. } => "host-mismatch",
            Denial::UidNotAllowed { .. } => "uid-not-allowed",
            Denial::Unavailable(_) => "unavailable",
        }
    }

    /// One line saying what was denied and why.
    pub fn message(&self) -> String {
        match self {
            Denial::MalformedId { shown, why } => {
                format!("denied: session id {shown} is malformed: {why}")
            }
            Denial::NoSuchSession { session, .. } => {
                format!("denied: no session {session} (no grant file for it)")
            }
            Denial::BadGrant { session, why, .. } => {
                format!("denied: the grant of session {session} is refused: {why}")
            }
            Denial::BadSignature { session, why, .. } => {
                format!("denied: bad signature on the grant of session {session}: {why}")
            }
            Denial::SignerNotAllowed { session, why, .. } => format!(
                "denied: the grant of session {session} is signed by a key that may not sign grants: {why}"
            ),
            Denial::Expired {
                session,
                capability,
                at,
                whole_session,
                ..
            } => {
                if *whole_session {
                    format!("denied: session {session} expired at {at}")
                } else {
                    format!("denied: {capability} in session {session} expired at {at}")
                }
            }
            Denial::NotYetValid { session, from, now } => format!(
                "denied: session {session} is not valid before {from} (this host's clock says {now})"
            ),
            Denial::Revoked {
                session, detail, ..
            } => match detail {
                Some(d) => format!("denied: session {session} was revoked ({d})"),
                None => format!("denied: session {session} was revoked"),
            },
            Denial::NotGranted {
                session,
                agent,
                capability,
                granted,
                ..
            } => format!(
                "denied: session {session} (agent {agent}) is not granted {capability}; it has {}",
                if granted.is_empty() {
                    "nothing".to_string()
                } else {
                    granted.join(", ")
                }
            ),
            Denial::NotInCatalog {
                session,
                capability,
                granted,
                catalog,
                ..
            } => {
                if *granted {
                    format!(
                        "denied: {capability} is granted to session {session} but is no longer in the catalog {catalog}"
                    )
                } else {
                    format!("denied: {capability} is not in the catalog {catalog}")
                }
            }
            Denial::CatalogForbids {
                capability, why, ..
            } => format!("denied: the catalog does not allow {capability} here: {why}"),
            Denial::AgentMismatch {
                session,
                grant_agent,
                caller,
                ..
            } => {
                format!("denied: session {session} belongs to agent {grant_agent}, not to {caller}")
            }
            Denial::HostMismatch {
                session,
                host,
                allowed,
                ..
            } => format!(
                "denied: session {session} is limited to host(s) {}, and this is {host}",
                allowed.join(", ")
            ),
            Denial::UidNotAllowed {
                session,
                agent,
                uid,
                expected,
            } => format!(
                "denied: session {session} is for agent {agent}, which the config binds to uid {expected}; this process runs as uid {uid}"
            ),
            Denial::Unavailable(e) => format!("denied: cannot check the session: {}", e.message()),
        }
    }

    /// The exact next command: usually what the operator would run to allow it.
    pub fn hint(&self) -> String {
        let start = |agent: Option<&str>, cap: &str| {
            format!(
                "the operator starts a session: aap session start --agent {} --cap {cap}",
                agent.unwrap_or("AGENT")
            )
        };
        match self {
            Denial::MalformedId { .. } => {
                "use the id printed by `aap session start` (export AAP_SESSION=...); list sessions: aap session list".into()
            }
            Denial::NoSuchSession {
                agent, capability, ..
            } => start(agent.as_deref(), capability),
            Denial::BadGrant {
                session,
                capability,
                agent,
                ..
            }
            | Denial::BadSignature {
                session,
                capability,
                agent,
                ..
            } => match agent {
                Some(agent) => format!(
                    "inspect it: aap session show {session}; then the operator revokes it and starts a new one: aap session revoke {session} && aap session start --agent {agent} --cap {capability}"
                ),
                None => format!(
                    "inspect it: aap session show {session}; then the operator revokes it: aap session revoke {session}, and starts a new one for its agent"
                ),
            },
            Denial::SignerNotAllowed {
                capability, agent, ..
            } => format!(
                "add the operator's key to operator.allowed_signers with namespaces=\"aap-grant\", or sign a new grant with an allowed key: aap session start --agent {agent} --cap {capability}"
            ),
            Denial::Expired {
                session,
                capability,
                ..
            } => format!("aap session approve {session} --cap {capability}"),
            Denial::NotYetValid { .. } => {
                "wait until then, or fix this host's clock (compare: date -u)".into()
            }
            Denial::Revoked {
                agent, capability, ..
            } => format!(
                "revoked sessions stay revoked; {}",
                start(agent.as_deref(), capability)
            ),
            Denial::NotGranted {
                session,
                agent,
                capability,
                how,
                ..
            } => match how {
                Grantable::Approve => format!(
                    "ask the operator for it: aap request --session {session} {capability} --reason '...' --wait   (the operator adds it with: aap session approve {session} --cap {capability})"
                ),
                Grantable::BreakGlass => format!(
                    "only as break-glass, by the operator: aap session approve {session} --cap {capability} --break-glass --reason '...'"
                ),
                Grantable::NotForAgent => format!(
                    "the catalog does not let agent {agent} have {capability}; see what it may use: aap catalog list --agent {agent}"
                ),
            },
            Denial::NotInCatalog { hint, .. } => hint.clone(),
            Denial::CatalogForbids { .. } => {
                "the operator edits the capability's agents in the catalog, then runs: aap catalog check".into()
            }
            Denial::AgentMismatch { caller, .. } => format!(
                "use {caller}'s own session (its AAP_SESSION), for what {caller} may use: aap catalog list --agent {caller}"
            ),
            Denial::HostMismatch {
                agent,
                host,
                capability,
                ..
            } => format!(
                "aap session start --agent {agent} --cap {capability} --host {host}"
            ),
            Denial::UidNotAllowed { agent, expected, .. } => format!(
                "run the agent as uid {expected}, or change agents.{agent}.uid in the config (see: aap config show)"
            ),
            Denial::Unavailable(e) => e
                .hint_text()
                .unwrap_or("check the configuration: aap config show")
                .to_owned(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Denial {}

impl From<Denial> for Error {
    fn from(d: Denial) -> Error {
        let (message, hint) = (d.message(), d.hint());
        match d {
            // A broken config or state keeps its own exit code (78, 65, 69...): still a "no".
            Denial::Unavailable(e) => Error::new(e.kind(), message).hint(hint),
            _ => Error::new(Kind::Denied, message).hint(hint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denial_is_one_line_with_a_hint_and_exit_77() {
        let s = || "01JD0000000000000000000000".to_string();
        let c = || "forgejo-pat-read".to_string();
        let all = vec![
            Denial::MalformedId {
                shown: "\"../x\"".into(),
                why: "an id is a 26-character ULID",
            },
            Denial::NoSuchSession {
                session: s(),
                agent: None,
                capability: c(),
            },
            Denial::BadGrant {
                session: s(),
                why: "x".into(),
                capability: c(),
                agent: None,
            },
            Denial::BadSignature {
                session: s(),
                why: "x".into(),
                capability: c(),
                agent: Some("codex".into()),
            },
            Denial::SignerNotAllowed {
                session: s(),
                why: "x".into(),
                capability: c(),
                agent: "codex".into(),
            },
            Denial::Expired {
                session: s(),
                agent: "codex".into(),
                capability: c(),
                at: "t".into(),
                whole_session: true,
            },
            Denial::NotYetValid {
                session: s(),
                from: "t".into(),
                now: "n".into(),
            },
            Denial::Revoked {
                session: s(),
                agent: Some("codex".into()),
                capability: c(),
                detail: None,
            },
            Denial::NotGranted {
                session: s(),
                agent: "codex".into(),
                capability: c(),
                granted: vec![],
                how: Grantable::Approve,
            },
            Denial::NotInCatalog {
                session: s(),
                capability: c(),
                granted: true,
                catalog: "cat.yaml".into(),
                hint: "aap catalog list".into(),
            },
            Denial::CatalogForbids {
                session: s(),
                agent: "codex".into(),
                capability: c(),
                why: "x".into(),
            },
            Denial::AgentMismatch {
                session: s(),
                grant_agent: "codex".into(),
                caller: "claude".into(),
                capability: c(),
            },
            Denial::HostMismatch {
                session: s(),
                agent: "codex".into(),
                host: "h".into(),
                allowed: vec!["b".into()],
                capability: c(),
            },
            Denial::UidNotAllowed {
                session: s(),
                agent: "codex".into(),
                uid: 1,
                expected: 2,
            },
        ];
        let mut kinds = std::collections::HashSet::new();
        for d in all {
            assert!(kinds.insert(d.kind_name()));
            let (m, h) = (d.message(), d.hint());
            assert!(m.starts_with("denied: ") && !m.contains('\n'), "{m}");
            assert!(!h.is_empty() && !h.contains('\n'), "{h}");
            let e: Error = d.into();
            assert_eq!(e.exit_code(), 77);
            assert_eq!(e.hint_text(), Some(h.as_str()));
        }
        let d = Denial::NotGranted {
            session: s(),
            agent: "codex".into(),
            capability: c(),
            granted: vec![],
            how: Grantable::Approve,
        };
        assert_eq!(
            d.hint(),
            "ask the operator for it: aap request --session 01JD0000000000000000000000 forgejo-pat-read --reason '...' --wait   (the operator adds it with: aap session approve 01JD0000000000000000000000 --cap forgejo-pat-read)"
        );
        let e: Error =
            Denial::Unavailable(Error::config("allowed_signers:3: bad").hint("fix it")).into();
        assert_eq!(e.exit_code(), 78);
        assert_eq!(
            e.message(),
            "denied: cannot check the session: allowed_signers:3: bad"
        );
        assert_eq!(e.hint_text(), Some("fix it"));
    }
}
