//! Issuing grants: the rules a capability must pass to enter one (catalog, agent, break-glass,
//! TTL), the operator's signing key and principal, and signing with an in-process check of the
//! result. `aap session start` and `approve` (cmd/session.rs) and `aap approve`
//! (cmd/request.rs) call these; storing is `sign::store`.

#![forbid(unsafe_code)]

use super::{AllowedSigners, Grant, SigError, check_reason};
use crate::catalog::{Capability, Catalog, Tier};
use crate::config::Config;
use crate::duration::Dur;
use crate::error::{Error, Kind, Result, shell_quote};

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
