//! Operator-signed session grants: the model, signing with `ssh-keygen -Y sign`, in-process
//! verification, and [`check`], the one function that answers "may session S, acting as agent
//! A on host H as uid U, use capability C now?".
//!
//! [`check`] returns an [`Authorized`] value, which only this module can make, or a typed
//! [`Denial`]. Later steps (fetching a secret, running a command) take an `&Authorized`, so no
//! code path reaches them without a check that said yes.

#![forbid(unsafe_code)]

mod denial;
pub(crate) mod issue;
mod model;
mod sign;
pub mod signers;

pub use denial::Denial;
pub use model::{
    GRANT_VERSION, Grant, GrantedCap, MAX_REASON, ValidGrant, check_reason, is_host, is_kebab,
};
pub use sign::{RevokedMarker, operator_key, sign_bytes, store, store_undo};
pub use signers::{AllowedSigners, NAMESPACE, SigError, Verified};

use crate::catalog::{Capability, Catalog, Tier};
use crate::config::Config;
use crate::error::{Error, Result, shell_quote};
use crate::id::SessionId;
use crate::state::{ReadError, StateDir, read_state_file};
use crate::sys::LockKind;
use crate::timefmt::{from_secs, rfc3339_secs, unix_secs};
use std::time::{Duration, SystemTime};

/// What is asked: may `session`, acting as `agent` (when the caller knows it) on `host` as
/// `uid`, use `capability` now?
#[derive(Clone, Copy, Debug)]
pub struct CheckRequest<'a> {
    pub session: &'a str,
    pub capability: &'a str,
    /// The agent the caller claims to be; `None` takes the grant's agent.
    pub agent: Option<&'a str>,
    pub host: &'a str,
    pub uid: u32,
}

/// Proof that a check said yes. Its fields are private and only [`check`] makes one: it has no
/// public constructor, no `Default` and no `Clone`.
#[derive(Debug)]
pub struct Authorized {
    session: SessionId,
    agent: String,
    capability: Capability,
    expires_at: i64,
    break_glass: bool,
    reason: Option<String>,
    hosts: Vec<String>,
    operator: String,
    signer_fingerprint: String,
}

impl Authorized {
    pub fn session(&self) -> SessionId {
        self.session
    }
    pub fn agent(&self) -> &str {
        &self.agent
    }
    pub fn capability_id(&self) -> &str {
        &self.capability.id
    }
    pub fn capability(&self) -> &Capability {
        &self.capability
    }
    pub fn tier(&self) -> Tier {
        self.capability.audit_tier
    }
    /// When this capability stops being usable in this session.
    pub fn expires_at(&self) -> SystemTime {
        from_secs(self.expires_at)
    }
    /// The expiry as RFC 3339 text.
    pub fn expires_at_rfc3339(&self) -> String {
        rfc3339_secs(self.expires_at)
    }
    pub fn break_glass(&self) -> bool {
        self.break_glass
    }
    /// The operator's reason in the grant, if any.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
    /// Hosts the grant is limited to (empty: any host).
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }
    /// The operator principal that signed the grant.
    pub fn operator(&self) -> &str {
        &self.operator
    }
    /// `SHA256:...` of the key that signed the grant.
    pub fn signer_fingerprint(&self) -> &str {
        &self.signer_fingerprint
    }
    /// Time left from now (zero once expired). An ssh-agent key lifetime or a token's
    /// lifetime must not exceed it.
    pub fn remaining(&self) -> Duration {
        self.remaining_at(SystemTime::now())
    }
    /// Time left from `now`.
    pub fn remaining_at(&self, now: SystemTime) -> Duration {
        self.expires_at()
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// A grant read from the state dir whose signature verified against allowed_signers.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub valid: ValidGrant,
    /// The exact signed bytes, and the armored signature.
    pub bytes: Vec<u8>,
    pub sig: Vec<u8>,
    pub signer: Verified,
}

/// Why a grant could not be loaded and verified.
#[derive(Clone, Debug)]
pub enum LoadError {
    NotFound,
    BadGrant(String),
    BadSignature(String),
    NotAllowed(String),
}

impl LoadError {
    /// As an operator-facing error (for `approve`, `request`, `show`): exit 77 for a missing
    /// session, 65 for grant data that does not verify.
    pub fn into_error(self, id: &SessionId, what_next: &str) -> Error {
        match self {
            LoadError::NotFound => Error::denied(format!("no session {id} (no grant file)"))
                .hint("list sessions: aap session list --all"),
            LoadError::BadGrant(w) => Error::data(format!("the grant of session {id} is refused: {w}"))
                .hint(format!("{what_next}: aap session revoke {id}, then start a new session")),
            LoadError::BadSignature(w) => Error::data(format!("the grant of session {id} has a bad signature: {w}"))
                .hint(format!("{what_next}: aap session revoke {id}, then start a new session")),
            LoadError::NotAllowed(w) => Error::data(format!("the grant of session {id} is signed by a key that may not sign grants: {w}"))
                .hint("add the operator key to operator.allowed_signers with namespaces=\"aap-grant\" (see: aap config show)"),
        }
    }
}

/// The allowed_signers file named by the config.
pub fn allowed_signers(cfg: &Config) -> Result<AllowedSigners> {
    let path = cfg.operator.allowed_signers.as_ref().ok_or_else(|| {
        Error::config(format!(
            "operator.allowed_signers is not set in {}",
            cfg.describe_file()
        ))
        .hint("add `operator: { allowed_signers: /etc/aap/allowed_signers }` to the config; see: aap config show")
    })?;
    AllowedSigners::load(path)
}

fn load_once(
    st: &StateDir,
    signers: &AllowedSigners,
    id: &SessionId,
    now: i64,
) -> std::result::Result<Loaded, LoadError> {
    let gpath = st.grant_path(id);
    let bytes = read_state_file(&gpath).map_err(|e| match e {
        ReadError::NotFound => LoadError::NotFound,
        e => LoadError::BadGrant(format!("{} {}", gpath.display(), e.describe())),
    })?;
    let spath = st.sig_path(id);
    let sig = read_state_file(&spath).map_err(|e| {
        LoadError::BadSignature(format!(
            "the signature file {} {}",
            spath.display(),
            e.describe()
        ))
    })?;
    let parsed = signers::parse_sig(&sig).map_err(sig_err)?;
    signers::verify_crypto_cached(&bytes, &sig, &parsed).map_err(sig_err)?;
    let valid = Grant::decode(&bytes, id).map_err(LoadError::BadGrant)?;
    let signer = signers
        .allowed(&parsed, &valid.grant.operator, now)
        .map_err(sig_err)?;
    Ok(Loaded {
        valid,
        bytes,
        sig,
        signer,
    })
}

fn sig_err(e: SigError) -> LoadError {
    match e {
        SigError::Bad(w) => LoadError::BadSignature(w),
        SigError::NotAllowed(w) => LoadError::NotAllowed(w),
    }
}

/// Read and verify the grant of `id`.
///
/// Writers rename the new signature into place before the new grant, so the only mixed pair a
/// lock-free reader can see is an old grant with a new signature, which fails verification.
/// On such a failure we read again under a shared state lock, which writers hold exclusively
/// across both renames: a torn read can deny nothing that is granted.
pub fn load_verified(
    st: &StateDir,
    signers: &AllowedSigners,
    id: &SessionId,
    now: i64,
) -> std::result::Result<Loaded, std::result::Result<LoadError, Error>> {
    match load_once(st, signers, id, now) {
        Err(LoadError::BadSignature(_)) => {
            let _guard = st.lock(LockKind::Shared).map_err(Err)?;
            load_once(st, signers, id, now).map_err(Ok)
        }
        r => r.map_err(Ok),
    }
}

/// Read and verify the grant of `id` while the caller holds the exclusive state lock (no writer
/// can be mid-way, so no retry; taking the shared lock here would wait for ourselves).
pub fn load_locked(
    st: &StateDir,
    signers: &AllowedSigners,
    id: &SessionId,
    now: i64,
) -> std::result::Result<Loaded, LoadError> {
    load_once(st, signers, id, now)
}

/// Read the revocation marker's detail ("at 2026-..., by uid 0: reason"), best effort.
fn revoked_detail(st: &StateDir, id: &SessionId) -> Option<String> {
    let bytes = read_state_file(&st.revoked_path(id)).ok()?;
    let m: crate::grant::sign::RevokedMarker = serde_json::from_slice(&bytes).ok()?;
    let mut s = format!("at {}", m.revoked_at);
    if let Some(r) = m.reason {
        if check_reason(&r).is_ok() {
            s.push_str(": ");
            s.push_str(&r);
        }
    }
    Some(s)
}

/// May this session use this capability now? The one answer every later step relies on.
///
/// Order: the id's form, revocation, the grant file, its signature and signer, then agent,
/// uid, validity window, host, and finally the capability against the grant and the catalog.
/// Every error path is a [`Denial`]; none allows.
pub fn check(
    cfg: &Config,
    catalog: &Catalog,
    req: &CheckRequest,
    now: SystemTime,
) -> std::result::Result<Authorized, Denial> {
    let now_s = unix_secs(now);
    let id = SessionId::parse(req.session).map_err(|e| Denial::MalformedId {
        shown: e.shown,
        why: e.why,
    })?;
    let session = id.to_string();
    // Messages and hints quote an id that is not a plain catalog id, so hostile input never
    // reaches a terminal raw.
    let cap_id = if is_kebab(req.capability) {
        req.capability.to_owned()
    } else {
        crate::id::shown(req.capability)
    };
    let st = StateDir::of(cfg);
    match st.is_revoked(&id) {
        Ok(false) => {}
        Ok(true) => {
            // The agent's name is only for the hint; the grant need not verify for that.
            let agent = req.agent.map(str::to_owned).or_else(|| {
                read_state_file(&st.grant_path(&id))
                    .ok()
                    .and_then(|b| Grant::decode(&b, &id).ok())
                    .map(|g| g.grant.agent)
            });
            return Err(Denial::Revoked {
                session,
                agent,
                capability: cap_id,
                detail: revoked_detail(&st, &id),
            });
        }
        Err(e) => {
            return Err(Denial::Unavailable(
                Error::unavailable(format!("cannot tell whether session {id} is revoked: {e}"))
                    .hint(format!(
                        "check the state directory: ls -la {}",
                        shell_quote(&st.revoked_dir().to_string_lossy())
                    )),
            ));
        }
    }
    let signers = allowed_signers(cfg).map_err(Denial::Unavailable)?;
    // For a hint only: the caller's agent, else the one the grant names, verified or not.
    let hint_agent = || {
        req.agent.map(str::to_owned).or_else(|| {
            read_state_file(&st.grant_path(&id))
                .ok()
                .and_then(|b| Grant::decode(&b, &id).ok())
                .map(|g| g.grant.agent)
        })
    };
    let loaded = match load_verified(&st, &signers, &id, now_s) {
        Ok(l) => l,
        Err(Err(e)) => return Err(Denial::Unavailable(e)),
        Err(Ok(e)) => {
            return Err(match e {
                LoadError::NotFound => Denial::NoSuchSession {
                    session,
                    agent: req.agent.map(str::to_owned),
                    capability: cap_id,
                },
                LoadError::BadGrant(why) => Denial::BadGrant {
                    session,
                    why,
                    capability: cap_id,
                    agent: hint_agent(),
                },
                LoadError::BadSignature(why) => Denial::BadSignature {
                    session,
                    why,
                    capability: cap_id,
                    agent: hint_agent(),
                },
                LoadError::NotAllowed(why) => Denial::SignerNotAllowed {
                    session,
                    why,
                    capability: cap_id,
                    agent: req.agent.unwrap_or("AGENT").to_owned(),
                },
            });
        }
    };
    let g = &loaded.valid;
    let agent = g.grant.agent.clone();
    if let Some(caller) = req.agent {
        if caller != agent {
            return Err(Denial::AgentMismatch {
                session,
                grant_agent: agent,
                caller: caller.to_owned(),
                capability: cap_id,
            });
        }
    }
    if let Some(expected) = cfg.agents.get(&agent).and_then(|a| a.uid) {
        if expected != req.uid {
            return Err(Denial::UidNotAllowed {
                session,
                agent,
                uid: req.uid,
                expected,
            });
        }
    }
    if now_s < g.not_before {
        return Err(Denial::NotYetValid {
            session,
            from: g.grant.not_before.clone(),
            now: rfc3339_secs(now_s),
        });
    }
    if now_s >= g.expires_at {
        return Err(Denial::Expired {
            session,
            agent,
            capability: cap_id,
            at: g.grant.expires_at.clone(),
            whole_session: true,
        });
    }
    if !g.grant.hosts.is_empty()
        && !g
            .grant
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(req.host))
    {
        return Err(Denial::HostMismatch {
            session,
            agent,
            host: req.host.to_owned(),
            allowed: g.grant.hosts.clone(),
            capability: cap_id,
        });
    }
    let granted = g.cap_expiry(req.capability);
    let Some(cap) = catalog.get(req.capability) else {
        let hint = catalog
            .unknown(req.capability, crate::error::Kind::Denied)
            .hint_text()
            .unwrap_or("list what exists: aap catalog list")
            .to_owned();
        return Err(Denial::NotInCatalog {
            session,
            capability: crate::id::shown(req.capability),
            granted: granted.is_some(),
            catalog: catalog.origin().to_owned(),
            hint,
        });
    };
    let Some(cap_exp) = granted else {
        let how = if cap.audit_tier == crate::catalog::Tier::Critical {
            denial::Grantable::BreakGlass
        } else if cap.allows_agent(&agent) {
            denial::Grantable::Approve
        } else {
            denial::Grantable::NotForAgent
        };
        return Err(Denial::NotGranted {
            session,
            agent,
            capability: cap_id,
            granted: g.caps.iter().map(|(c, _)| c.clone()).collect(),
            how,
        });
    };
    // The catalog bounds every use: if max_ttl was lowered after signing, the grant ends
    // earlier (max_ttl after its approval), whatever the grant says.
    let cap_exp = match g.cap_approved(req.capability) {
        Some(approved) => cap_exp.min(approved.saturating_add(cap.max_ttl.secs() as i64)),
        None => cap_exp,
    };
    if now_s >= cap_exp {
        return Err(Denial::Expired {
            session,
            agent,
            capability: cap_id,
            at: rfc3339_secs(cap_exp),
            whole_session: false,
        });
    }
    if cap.audit_tier == Tier::Critical {
        if !g.grant.break_glass {
            return Err(Denial::CatalogForbids {
                session,
                agent,
                capability: cap_id,
                why: "it is critical (break-glass only), and this grant is not a break-glass grant"
                    .into(),
            });
        }
    } else if !cap.allows_agent(&agent) {
        return Err(Denial::CatalogForbids {
            session,
            agent: agent.clone(),
            capability: cap_id,
            why: format!(
                "its agents are [{}], which no longer include {agent}",
                cap.agents.join(", ")
            ),
        });
    }
    Ok(Authorized {
        session: id,
        agent,
        capability: cap.clone(),
        expires_at: cap_exp,
        break_glass: g.grant.break_glass,
        reason: g.grant.reason.clone(),
        hosts: g.grant.hosts.clone(),
        operator: loaded.signer.principal,
        signer_fingerprint: loaded.signer.fingerprint,
    })
}
