//! Issuing grants, top to bottom: the rules a capability must pass to enter one
//! ([`admit`]: catalog, agent, break-glass, TTL), the operator's signing key and principal
//! ([`operator`]), the grant itself ([`new_grant`] for a new session, [`extended`] for
//! capabilities added to one), signing with an in-process check of the result
//! ([`sign_and_verify`]), and storing it together with its audit line ([`store_recorded`]: the
//! store is undone when the log cannot record it). `aap session start` and `approve`
//! (cmd/session.rs) and `aap approve` (cmd/request.rs) parse arguments, call these in that
//! order and print the outcome.

#![forbid(unsafe_code)]

use super::{AllowedSigners, Grant, GrantedCap, SigError, check_reason};
use crate::audit::{Event, Log};
use crate::catalog::{Capability, Catalog, Tier};
use crate::config::Config;
use crate::duration::Dur;
use crate::error::{Error, Kind, Result, shell_quote};
use crate::id::SessionId;
use crate::state::StateDir;
use crate::timefmt::{parse_rfc3339_secs, rfc3339_secs};

/// How far before its signing time a new grant becomes valid: a grant copied to a host whose
/// clock is slightly behind works at once; it allows nothing that was not signed.
const NOT_BEFORE_SKEW: i64 = 60;

/// What a new session is granted.
pub(crate) struct NewSession<'a> {
    pub agent: &'a str,
    /// Admitted already ([`admit`]), in the order asked, without repeats.
    pub caps: &'a [&'a Capability],
    /// The session's length: `--ttl`, else the shortest `max_ttl` of `caps`.
    pub ttl: Dur,
    pub hosts: &'a [String],
    pub reason: Option<&'a str>,
    pub break_glass: bool,
    /// The principal the operator's key signs as ([`operator`]).
    pub operator: String,
}

/// The first grant (seq 1) of session `id`, issued at `now_s`.
pub(crate) fn new_grant(id: &SessionId, s: &NewSession<'_>, now_s: i64) -> Grant {
    let exp = now_s + s.ttl.secs() as i64;
    Grant {
        v: super::GRANT_VERSION,
        session: id.to_string(),
        agent: s.agent.to_owned(),
        operator: s.operator.clone(),
        seq: 1,
        issued_at: rfc3339_secs(now_s),
        not_before: rfc3339_secs(now_s - NOT_BEFORE_SKEW),
        expires_at: rfc3339_secs(exp),
        capabilities: s
            .caps
            .iter()
            .map(|c| GrantedCap {
                id: c.id.clone(),
                approved_at: rfc3339_secs(now_s),
                expires_at: rfc3339_secs(exp),
            })
            .collect(),
        hosts: s.hosts.to_vec(),
        reason: s.reason.map(str::to_owned),
        break_glass: s.break_glass,
    }
}

/// What is added to (or renewed in) a session's grant.
pub(crate) struct Extension<'a> {
    /// Admitted already ([`admit`]).
    pub caps: &'a [&'a Capability],
    /// Each capability's length; without it, its `max_ttl`, cut to what is left of the session
    /// while the session lasts.
    pub ttl: Option<Dur>,
    pub break_glass: bool,
    pub reason: Option<&'a str>,
    pub operator: String,
}

/// `old` (valid until `old_expires_at`) with `x`'s capabilities added or renewed, as the next
/// version (seq + 1) issued at `now_s`. The session ends at the latest of its capabilities'
/// ends, never earlier than before.
pub(crate) fn extended(old: &Grant, old_expires_at: i64, x: &Extension<'_>, now_s: i64) -> Grant {
    let mut grant = old.clone();
    let session_left = old_expires_at - now_s;
    for cap in x.caps {
        let ttl = match x.ttl {
            Some(t) => t.secs() as i64,
            None if session_left > 0 => (cap.max_ttl.secs() as i64).min(session_left),
            None => cap.max_ttl.secs() as i64,
        };
        let entry = GrantedCap {
            id: cap.id.clone(),
            approved_at: rfc3339_secs(now_s),
            expires_at: rfc3339_secs(now_s + ttl),
        };
        match grant.capabilities.iter_mut().find(|g| g.id == cap.id) {
            Some(g) => *g = entry,
            None => grant.capabilities.push(entry),
        }
    }
    let latest = grant
        .capabilities
        .iter()
        .filter_map(|c| parse_rfc3339_secs(&c.expires_at))
        .max()
        .unwrap_or(now_s);
    grant.expires_at = rfc3339_secs(latest.max(old_expires_at));
    grant.seq += 1;
    grant.issued_at = rfc3339_secs(now_s);
    grant.operator = x.operator.clone();
    if x.break_glass {
        grant.break_glass = true;
        if let Some(r) = x.reason {
            grant.reason = Some(r.to_owned());
        }
    }
    grant
}

/// Store a signed grant and append its audit line; when the line cannot be written, the store
/// is undone (back to `previous`, the grant and signature it replaced, or to nothing), so no
/// grant exists that the log does not show. The caller holds the state lock.
pub(crate) fn store_recorded(
    st: &StateDir,
    log: &mut Log,
    id: &SessionId,
    signed: (&[u8], &[u8]),
    previous: Option<(&[u8], &[u8])>,
    ev: &Event,
) -> Result<()> {
    super::store(st, id, signed.0, signed.1)?;
    if let Err(e) = log.append(ev) {
        let _ = super::store_undo(st, id, previous);
        return Err(e);
    }
    Ok(())
}

/// The rules a capability must pass to enter a grant for `agent`: in the catalog, allowed for
/// the agent (or critical with --break-glass and --reason), TTL within max_ttl.
pub(crate) fn admit<'c>(
    catalog: &'c Catalog,
    agent: &str,
    cap_id: &str,
    ttl: Option<Dur>,
    break_glass: bool,
    reason: Option<&str>,
    retry: &dyn Fn(&str) -> String,
) -> Result<&'c Capability> {
    let cap = catalog
        .get(cap_id)
        .ok_or_else(|| catalog.unknown(cap_id, Kind::Config))?;
    if cap.audit_tier == Tier::Critical {
        if !break_glass || reason.is_none() {
            return Err(Error::denied(format!(
                "{cap_id} is critical: it is granted only as break-glass, with --break-glass and a --reason"
            ))
            .hint(retry("--break-glass --reason '...'")));
        }
    } else if !cap.allows_agent(agent) {
        return Err(Error::denied(format!(
            "the catalog does not allow agent {agent} to use {cap_id} (it allows: {})",
            cap.agents.join(", ")
        ))
        .hint(format!(
            "pick a capability for {agent}: aap catalog list --agent {agent}"
        )));
    }
    if let Some(t) = ttl {
        if t > cap.max_ttl {
            return Err(Error::denied(format!(
                "--ttl {t} is longer than {cap_id}'s max_ttl of {}",
                cap.max_ttl
            ))
            .hint(retry(&format!(
                "--ttl {}{}",
                cap.max_ttl,
                kept_flags(break_glass, reason)
            ))));
        }
    }
    Ok(cap)
}

/// The flags a retry must keep: `--break-glass` and the `--reason` as given.
fn kept_flags(break_glass: bool, reason: Option<&str>) -> String {
    let mut s = String::new();
    if break_glass {
        s.push_str(" --break-glass");
    }
    match reason {
        Some(r) => s.push_str(&format!(" --reason {}", shell_quote(r))),
        None if break_glass => s.push_str(" --reason '...'"),
        None => {}
    }
    s
}

pub(crate) fn check_ttl_nonzero(ttl: Option<Dur>) -> Result<()> {
    if ttl.is_some_and(|t| t.secs() == 0) {
        return Err(Error::config("--ttl 0s grants nothing")
            .hint("give a positive duration, e.g. --ttl 30m"));
    }
    Ok(())
}

pub(crate) fn check_opt_reason(reason: Option<&str>) -> Result<()> {
    if let Some(r) = reason {
        check_reason(r).map_err(|e| {
            Error::config(format!("--reason: {e}"))
                .hint("give one line of plain text, e.g. --reason 'deploy the hotfix'")
        })?;
    }
    Ok(())
}

/// Sign `grant`, check the signature in-process against allowed_signers, and return both.
pub(crate) fn sign_and_verify(
    cfg: &Config,
    signers: &AllowedSigners,
    key: &std::path::Path,
    grant: &Grant,
    now_s: i64,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let bytes = grant.to_bytes();
    let sig = super::sign_bytes(key, &bytes)?;
    if let Err(e) = signers.verify(&bytes, &sig, &grant.operator, now_s) {
        let why = match e {
            SigError::Bad(w) | SigError::NotAllowed(w) => w,
        };
        return Err(Error::config(format!(
            "the signature made with {} does not verify against {}: {why}",
            key.display(),
            signers.origin()
        ))
        .hint(format!(
            "make operator.signing_key and operator.allowed_signers agree (see: aap config show); config: {}",
            cfg.describe_file()
        )));
    }
    Ok((bytes, sig))
}

/// The signing key and the principal it signs as.
pub(crate) fn operator(
    cfg: &Config,
    signers: &AllowedSigners,
    now_s: i64,
) -> Result<(std::path::PathBuf, String)> {
    let (key, pubkey) = super::operator_key(cfg)?;
    let principal = signers.principal_for(&pubkey, now_s).map_err(|why| {
        let pubtext = ssh_key::PublicKey::from(pubkey.clone())
            .to_openssh()
            .unwrap_or_else(|_| "KEYTYPE BASE64".into());
        Error::config(format!(
            "the operator key {} cannot sign grants: {why}",
            key.display()
        ))
        .hint(format!(
            "add a line to {}: operator@example.org namespaces=\"aap-grant\" {pubtext}",
            shell_quote(signers.origin())
        ))
    })?;
    Ok((key, principal))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = "schema_version: 1
capabilities:
  - id: short
    description: one hour at most
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: secret, secret: { path: /app, key: A } }
    inject: [ { type: env, name: A } ]
  - id: long
    description: eight hours at most
    audit_tier: low
    agents: [codex]
    max_ttl: 8h
    backing: { type: secret, secret: { path: /app, key: B } }
    inject: [ { type: env, name: B } ]
";

    fn ends(g: &Grant, id: &str) -> i64 {
        let c = g.capabilities.iter().find(|c| c.id == id).expect("granted");
        parse_rfc3339_secs(&c.expires_at).expect("rfc3339")
    }

    #[test]
    fn a_new_grant_and_its_extensions() {
        let cat = Catalog::from_text(CATALOG, "test").expect("catalog");
        let short = cat.get("short").unwrap();
        let long = cat.get("long").unwrap();
        let id = SessionId::generate(std::time::SystemTime::now()).unwrap();
        let now = 1_800_000_000;
        let hosts = vec!["build1".to_string()];
        let g = new_grant(
            &id,
            &NewSession {
                agent: "codex",
                caps: &[short],
                ttl: Dur::parse("30m").unwrap(),
                hosts: &hosts,
                reason: Some("fix the build"),
                break_glass: false,
                operator: "op@example.org".into(),
            },
            now,
        );
        assert_eq!(g.seq, 1);
        assert_eq!(g.session, id.to_string());
        assert_eq!(ends(&g, "short"), now + 1800);
        assert_eq!(
            parse_rfc3339_secs(&g.not_before),
            Some(now - NOT_BEFORE_SKEW)
        );
        assert_eq!(g.hosts, hosts);
        g.clone().validate(&id).expect("a valid grant");

        // Ten minutes later, `long` without --ttl: cut to what is left of the session (20m).
        let later = now + 600;
        let x = extended(
            &g,
            now + 1800,
            &Extension {
                caps: &[long],
                ttl: None,
                break_glass: false,
                reason: None,
                operator: "op2@example.org".into(),
            },
            later,
        );
        assert_eq!(x.seq, 2);
        assert_eq!(x.operator, "op2@example.org");
        assert_eq!(ends(&x, "long"), now + 1800);
        assert_eq!(ends(&x, "short"), now + 1800, "untouched");
        // With --ttl 2h: `short` renewed for 2h moves the session's end; an old end never
        // comes earlier.
        let y = extended(
            &x,
            now + 1800,
            &Extension {
                caps: &[short],
                ttl: Some(Dur::parse("2h").unwrap()),
                break_glass: false,
                reason: None,
                operator: "op@example.org".into(),
            },
            later,
        );
        assert_eq!(y.seq, 3);
        assert_eq!(y.capabilities.len(), 2, "renewed in place, not added twice");
        assert_eq!(ends(&y, "short"), later + 7200);
        assert_eq!(parse_rfc3339_secs(&y.expires_at), Some(later + 7200));
        y.validate(&id).expect("a valid grant");
    }
}
