//! `aap session start|approve|revoke|list|show|check|gc`, and the `--check`/`--list` answers of
//! `aap-exec`.

#![forbid(unsafe_code)]

use crate::audit::{Event, EventKind, Log, Outcome};
use crate::catalog::Catalog;
use crate::cli::SessionCmd;
use crate::config::Config;
use crate::duration::Dur;
use crate::error::{Error, Result, shell_quote};
use crate::grant::RevokedMarker;
use crate::grant::issue::{
    self, admit, check_opt_reason, check_ttl_nonzero, operator, sign_and_verify,
};
use crate::grant::{
    self, AllowedSigners, CheckRequest, Grant, LoadError, Loaded, ValidGrant, is_host, is_kebab,
};
use crate::id::SessionId;
use crate::state::{StateDir, read_state_file};
use crate::sys::LockKind;
use crate::timefmt::{parse_rfc3339_secs, rfc3339_secs, unix_secs};
use serde_json::json;
use std::time::SystemTime;

/// What every session command needs.
pub(crate) struct Ctx {
    pub cfg: Config,
    pub catalog: Catalog,
    pub st: StateDir,
}

/// What an agent asks for instead of running an operator's command (`aap request`, or waiting on
/// one): `None` when the caller may be the operator.
///
/// The caller is an agent's uid (`agents.<name>.uid`) that is neither root nor the owner of the
/// signing key (else the state dir): then it is not the operator, whatever it can read, and is
/// told so at once instead of failing later on a file it may not open.
pub(crate) fn operator_only(
    cfg: &Config,
    what: &str,
    session: Option<&str>,
    caps: &[String],
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let uid = crate::sys::uid();
    if uid == 0 {
        return Ok(());
    }
    let Some(agent) = cfg.agent_for_uid(uid) else {
        return Ok(());
    };
    let owner = cfg
        .operator
        .signing_key
        .as_ref()
        .and_then(|k| std::fs::metadata(k).ok())
        .or_else(|| std::fs::metadata(&cfg.state_dir.value).ok())
        .map(|m| m.uid());
    if owner == Some(uid) {
        return Ok(()); // a single-user machine: the agent's uid is the operator's too
    }
    let in_session = session.map(|s| format!("--session {} ", shell_quote(s)));
    let ask = if in_session.is_none()
        && std::env::var_os("AAP_SESSION").is_none()
        && !caps.is_empty()
    {
        // No session to ask in: the operator starts one.
        format!(
            "the operator starts a session for you: aap session start --agent {agent} {}",
            caps.iter()
                .map(|c| format!("--cap {c}"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    } else if caps.is_empty() {
        "ask the operator; to see what your session has and ask for the rest with aap request: aap-exec --list"
            .to_string()
    } else {
        format!(
            "ask the operator for it instead: {}",
            caps.iter()
                .map(|c| {
                    format!(
                        "aap request {}{c} --reason '...' --wait",
                        in_session.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    Err(Error::denied(format!(
        "{what} is for the operator only: uid {uid} is agent {agent} (agents.{agent}.uid in {}), and only the operator signs and answers grants",
        cfg.describe_file()
    ))
    .hint(ask))
}

impl Ctx {
    pub fn load() -> Result<Ctx> {
        let cfg = Config::load()?;
        let catalog = Catalog::load(&cfg.catalog.value)?;
        let st = StateDir::of(&cfg);
        Ok(Ctx { cfg, catalog, st })
    }
}

pub fn run(cmd: SessionCmd) -> Result<u8> {
    match cmd {
        SessionCmd::Start {
            agent,
            caps,
            ttl,
            hosts,
            reason,
            break_glass,
            json,
        } => start(
            &agent,
            &caps,
            ttl,
            &hosts,
            reason.as_deref(),
            break_glass,
            json,
        ),
        SessionCmd::Approve {
            id,
            caps,
            ttl,
            reason,
            break_glass,
            json,
        } => approve(&id, &caps, ttl, reason.as_deref(), break_glass, json),
        SessionCmd::Import { file, sig } => super::import::import(&file, sig.as_deref()),
        SessionCmd::Revoke { id, reason } => revoke(&id, reason.as_deref()),
        SessionCmd::List {
            all,
            active,
            agent,
            cap,
            json,
        } => list(
            &ListFilter {
                all,
                active,
                agent,
                cap,
            },
            json,
        ),
        SessionCmd::Log { id, json } => super::sessionlog::run(&id, json),
        SessionCmd::Show { id, json } => show(&id, json),
        SessionCmd::Check { session, cap } => crate::client::check("aap", session, &cap, &[]),
        SessionCmd::Gc { retention } => gc(retention),
    }
}

/// Parse a session id given on the command line (exit 77 with the malformed-id hint).
pub(crate) fn parse_id(s: &str) -> Result<SessionId> {
    SessionId::parse(s).map_err(|e| {
        grant::Denial::MalformedId {
            shown: e.shown,
            why: e.why,
        }
        .into()
    })
}

/// Human form of a span: `3h59m`, `0s` when past.
pub(crate) fn left(secs: i64) -> String {
    Dur::from_secs(u64::try_from(secs).unwrap_or(0)).to_string()
}

fn q(s: &str) -> String {
    shell_quote(s)
}

fn start(
    agent: &str,
    caps: &[String],
    ttl: Option<Dur>,
    hosts: &[String],
    reason: Option<&str>,
    break_glass: bool,
    json: bool,
) -> Result<u8> {
    let ctx = Ctx::load()?;
    operator_only(&ctx.cfg, "aap session start", None, caps)?;
    if !is_kebab(agent) {
        return Err(Error::config(format!(
            "agent name {} is not kebab-case (lower-case letters, digits, single hyphens)",
            crate::id::shown(agent)
        ))
        .hint("e.g. --agent codex"));
    }
    check_ttl_nonzero(ttl)?;
    check_opt_reason(reason)?;
    for h in hosts {
        if !is_host(h) {
            return Err(Error::config(format!(
                "--host {} is not a host name",
                crate::id::shown(h)
            ))
            .hint("e.g. --host build1.example.org"));
        }
    }
    let mut ids: Vec<&str> = Vec::new();
    for c in caps {
        if !ids.contains(&c.as_str()) {
            ids.push(c);
        }
    }
    let base = |extra: &str| {
        let caps: String = ids.iter().map(|c| format!(" --cap {c}")).collect();
        let hosts: String = hosts.iter().map(|h| format!(" --host {h}")).collect();
        format!("aap session start --agent {agent}{caps}{hosts} {extra}")
    };
    let mut admitted = Vec::new();
    for c in &ids {
        admitted.push(admit(
            &ctx.catalog,
            agent,
            c,
            ttl,
            break_glass,
            reason,
            &base,
        )?);
    }
    let ttl = ttl.unwrap_or_else(|| {
        admitted
            .iter()
            .map(|c| c.max_ttl)
            .min()
            .expect("at least one --cap")
    });
    let now = SystemTime::now();
    let now_s = unix_secs(now);
    let signers = grant::allowed_signers(&ctx.cfg)?;
    let (key, principal) = operator(&ctx.cfg, &signers, now_s)?;
    let id = SessionId::generate(now).map_err(|e| {
        Error::internal(format!("cannot get random bytes for a session id: {e}")).hint("retry")
    })?;
    let exp = now_s + ttl.secs() as i64;
    let grant = issue::new_grant(
        &id,
        &issue::NewSession {
            agent,
            caps: &admitted,
            ttl,
            hosts,
            reason,
            break_glass,
            operator: principal,
        },
        now_s,
    );
    // Open the log first: if it cannot be written, nothing is signed or stored.
    let mut log = Log::open(&ctx.cfg.audit_log.value)?;
    let (bytes, sig) = sign_and_verify(&ctx.cfg, &signers, &key, &grant, now_s)?;
    let _lock = ctx.st.lock(LockKind::Exclusive)?;
    let mut ev = Event::new(EventKind::SessionStart, Outcome::Ok);
    ev.session = Some(id.to_string());
    ev.agent = Some(agent.to_owned());
    ev.capability = Some(ids.join(","));
    ev.tier = admitted.iter().map(|c| c.audit_tier).max();
    ev.reason = reason.map(str::to_owned);
    issue::store_recorded(&ctx.st, &mut log, &id, (&bytes, &sig), None, &ev)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "session": id.to_string(),
                "agent": agent,
                "capabilities": ids,
                "expires_at": grant.expires_at,
                "operator": grant.operator,
                "break_glass": break_glass,
                "grant": ctx.st.grant_path(&id),
                "signature": ctx.st.sig_path(&id),
            }))
            .expect("json")
        );
    } else {
        println!("export AAP_SESSION={id}");
        eprintln!(
            "aap: session {id} for {agent}: {} until {} ({}), signed by {}",
            ids.join(", "),
            grant.expires_at,
            left(exp - now_s),
            grant.operator
        );
    }
    Ok(0)
}

/// What `add_capabilities` adds, and the event that records it.
pub(crate) struct Addition<'a> {
    pub caps: &'a [String],
    pub ttl: Option<Dur>,
    pub reason: Option<&'a str>,
    pub break_glass: bool,
    /// `session.approve` or `request.approve`, with its reason.
    pub event: EventKind,
    pub event_reason: Option<String>,
    /// For `request.approve`: the agent the request claims; must be the grant's.
    pub expect_agent: Option<&'a str>,
    /// For `request.approve`: the request answered (for hints).
    pub request: Option<&'a str>,
}

/// Re-sign a session's grant with capabilities added (or renewed). The grant must verify
/// first, so a tampered grant is never laundered by a new signature. Atomic for readers;
/// rolled back when the audit log cannot record it.
pub(crate) fn add_capabilities(ctx: &Ctx, id: &SessionId, add: &Addition) -> Result<ValidGrant> {
    check_ttl_nonzero(add.ttl)?;
    check_opt_reason(add.reason)?;
    let now = SystemTime::now();
    let now_s = unix_secs(now);
    let signers = grant::allowed_signers(&ctx.cfg)?;
    let (key, principal) = operator(&ctx.cfg, &signers, now_s)?;
    let mut log = Log::open(&ctx.cfg.audit_log.value)?;
    let _lock = ctx.st.lock(LockKind::Exclusive)?;
    if ctx.st.is_revoked(id).unwrap_or(true) {
        // The hint names the session's agent when its grant still verifies.
        let agent = grant::load_locked(&ctx.st, &signers, id, now_s)
            .map(|g| g.valid.grant.agent)
            .unwrap_or_else(|_| "AGENT".into());
        let caps: String = add.caps.iter().map(|c| format!(" --cap {c}")).collect();
        return Err(
            Error::denied(format!("session {id} is revoked; it cannot be extended")).hint(format!(
                "start a new session: aap session start --agent {agent}{caps}"
            )),
        );
    }
    let old = grant::load_locked(&ctx.st, &signers, id, now_s)
        .map_err(|e| e.into_error(id, "refusing to re-sign it; the operator"))?;
    let agent = old.valid.grant.agent.clone();
    if let Some(claimed) = add.expect_agent {
        if claimed != agent {
            return Err(Error::data(format!(
                "the request names agent {claimed}, but session {id} belongs to {agent}; refusing"
            ))
            .hint(format!(
                "refuse it: aap deny {} --reason 'agent mismatch'; inspect: aap session show {id}",
                add.request.unwrap_or("REQ")
            )));
        }
    }
    let retry = |extra: &str| {
        let caps: String = add.caps.iter().map(|c| format!(" --cap {c}")).collect();
        format!("aap session approve {id}{caps} {extra}")
    };
    let mut admitted = Vec::new();
    for c in add.caps {
        admitted.push(admit(
            &ctx.catalog,
            &agent,
            c,
            add.ttl,
            add.break_glass,
            add.reason,
            &retry,
        )?);
    }
    let grant = issue::extended(
        &old.valid.grant,
        old.valid.expires_at,
        &issue::Extension {
            caps: &admitted,
            ttl: add.ttl,
            break_glass: add.break_glass,
            reason: add.reason,
            operator: principal,
        },
        now_s,
    );
    let valid = grant.clone().validate(id).map_err(|e| {
        Error::internal(format!("aap built an invalid grant: {e}")).hint("report this as a bug")
    })?;
    let (bytes, sig) = sign_and_verify(&ctx.cfg, &signers, &key, &grant, now_s)?;
    let mut ev = Event::new(add.event, Outcome::Ok);
    ev.session = Some(id.to_string());
    ev.agent = Some(agent);
    ev.capability = Some(add.caps.join(","));
    ev.tier = admitted.iter().map(|c| c.audit_tier).max();
    ev.reason = add.event_reason.clone();
    issue::store_recorded(
        &ctx.st,
        &mut log,
        id,
        (&bytes, &sig),
        Some((&old.bytes, &old.sig)),
        &ev,
    )?;
    Ok(valid)
}

fn approve(
    id: &str,
    caps: &[String],
    ttl: Option<Dur>,
    reason: Option<&str>,
    break_glass: bool,
    json: bool,
) -> Result<u8> {
    let ctx = Ctx::load()?;
    operator_only(&ctx.cfg, "aap session approve", Some(id), caps)?;
    let id = parse_id(id)?;
    let v = add_capabilities(
        &ctx,
        &id,
        &Addition {
            caps,
            ttl,
            reason,
            break_glass,
            event: EventKind::SessionApprove,
            event_reason: reason.map(str::to_owned),
            expect_agent: None,
            request: None,
        },
    )?;
    print_grant_summary(&v, json, "approved");
    Ok(0)
}

pub(crate) fn print_grant_summary(v: &ValidGrant, json: bool, verb: &str) {
    let now_s = unix_secs(SystemTime::now());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "session": v.id.to_string(),
                "agent": v.grant.agent,
                "seq": v.grant.seq,
                "expires_at": v.grant.expires_at,
                "capabilities": v.grant.capabilities,
            }))
            .expect("json")
        );
        return;
    }
    println!(
        "{verb}: session {} (agent {}, grant #{}) now has:",
        v.id, v.grant.agent, v.grant.seq
    );
    for (c, e) in &v.caps {
        println!(
            "  {c}  until {} ({} left)",
            rfc3339_secs(*e),
            left(e - now_s)
        );
    }
}

fn revoke(id: &str, reason: Option<&str>) -> Result<u8> {
    let cfg = Config::load()?;
    let st = StateDir::of(&cfg);
    let id = parse_id(id)?;
    check_opt_reason(reason)?;
    if st.is_revoked(&id).unwrap_or(false) {
        println!("session {id} is already revoked");
        return Ok(0);
    }
    // The grant's agent and expiry, for the marker and the log; unverified is fine here,
    // because revoking only removes power.
    let decoded = match read_state_file(&st.grant_path(&id)) {
        Ok(b) => Grant::decode(&b, &id).ok(),
        Err(crate::state::ReadError::NotFound) => {
            return Err(Error::denied(format!("no session {id} (no grant file)"))
                .hint("list sessions: aap session list --all"));
        }
        Err(_) => None,
    };
    let now_s = unix_secs(SystemTime::now());
    let marker = RevokedMarker {
        v: 1,
        session: id.to_string(),
        revoked_at: rfc3339_secs(now_s),
        by_uid: crate::sys::uid(),
        reason: reason.map(str::to_owned),
        expires_at: decoded.as_ref().map(|d| d.grant.expires_at.clone()),
    };
    let mut bytes = serde_json::to_vec_pretty(&marker).expect("json");
    bytes.push(b'\n');
    let _lock = st.lock(LockKind::Exclusive)?;
    // Revoke first, log second: a log failure must not keep a session alive.
    crate::state::write_atomic(&st.revoked_dir(), &id.to_string(), &bytes, 0o644)?;
    let mut ev = Event::new(EventKind::SessionRevoke, Outcome::Ok);
    ev.session = Some(id.to_string());
    ev.agent = decoded.as_ref().map(|d| d.grant.agent.clone());
    ev.reason = reason.map(str::to_owned);
    Log::open(&cfg.audit_log.value)
        .and_then(|mut l| l.append(&ev))
        .map_err(|e| {
            let msg = format!(
                "session {id} IS revoked, but the audit log could not record it: {}",
                e.message()
            );
            let err = Error::data(msg);
            match e.hint_text() {
                Some(h) => err.hint(h.to_owned()),
                None => err,
            }
        })?;
    println!("revoked: session {id}; every check of it now denies");
    Ok(0)
}

/// A grant file's status for `list` and `show`.
struct Status {
    id: SessionId,
    label: &'static str,
    detail: Option<String>,
    grant: Option<ValidGrant>,
    loaded: Option<Loaded>,
}

fn status_of(st: &StateDir, signers: &AllowedSigners, id: SessionId, now_s: i64) -> Status {
    let revoked = st.is_revoked(&id).unwrap_or(true);
    let mut s = Status {
        id,
        label: "active",
        detail: None,
        grant: None,
        loaded: None,
    };
    match grant::load_verified(st, signers, &id, now_s) {
        Ok(l) => {
            s.grant = Some(l.valid.clone());
            if revoked {
                s.label = "revoked";
            } else if now_s < l.valid.not_before {
                s.label = "not-yet-valid";
            } else if now_s >= l.valid.expires_at {
                s.label = "expired";
            }
            s.loaded = Some(l);
        }
        Err(e) => {
            s.label = if revoked { "revoked" } else { "invalid" };
            s.detail = Some(match e {
                Err(e) => e.message().to_owned(),
                Ok(LoadError::NotFound) => "no grant file".into(),
                Ok(LoadError::BadGrant(w)) => format!("bad grant: {w}"),
                Ok(LoadError::BadSignature(w)) => format!("bad signature: {w}"),
                Ok(LoadError::NotAllowed(w)) => format!("signer not allowed: {w}"),
            });
            // Show what the file claims, marked unverified.
            if let Ok(b) = read_state_file(&st.grant_path(&id)) {
                s.grant = Grant::decode(&b, &id).ok();
            }
        }
    }
    s
}

pub(crate) fn session_ids(st: &StateDir) -> Result<Vec<SessionId>> {
    let dir = st.grants_dir();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(
                Error::unavailable(format!("cannot list {}: {e}", dir.display())).hint(format!(
                    "check permissions: ls -ld {}",
                    q(&dir.to_string_lossy())
                )),
            );
        }
    };
    let mut ids = Vec::new();
    for e in rd.flatten() {
        if let Some(stem) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".grant"))
        {
            if let Ok(id) = SessionId::parse(stem) {
                ids.push(id);
            }
        }
    }
    ids.sort();
    Ok(ids)
}

fn status_json(s: &Status, now_s: i64) -> serde_json::Value {
    let g = s.grant.as_ref();
    json!({
        "session": s.id.to_string(),
        "status": s.label,
        "detail": s.detail,
        "verified": s.loaded.is_some(),
        "agent": g.map(|g| g.grant.agent.clone()),
        "operator": g.map(|g| g.grant.operator.clone()),
        "signer": s.loaded.as_ref().map(|l| l.signer.fingerprint.clone()),
        "seq": g.map(|g| g.grant.seq),
        "expires_at": g.map(|g| g.grant.expires_at.clone()),
        "left_secs": g.map(|g| (g.expires_at - now_s).max(0)),
        "break_glass": g.map(|g| g.grant.break_glass),
        "hosts": g.map(|g| g.grant.hosts.clone()),
        "reason": g.and_then(|g| g.grant.reason.clone()),
        "capabilities": g.map(|g| g.caps.iter().map(|(c, e)| json!({
            "id": c, "expires_at": rfc3339_secs(*e), "left_secs": (e - now_s).max(0)
        })).collect::<Vec<_>>()),
    })
}

/// What `aap session list` shows.
pub(crate) struct ListFilter {
    pub all: bool,
    pub active: bool,
    pub agent: Option<String>,
    pub cap: Option<String>,
}

fn list(f: &ListFilter, json_out: bool) -> Result<u8> {
    let cfg = Config::load()?;
    let st = StateDir::of(&cfg);
    let signers = grant::allowed_signers(&cfg)?;
    let now_s = unix_secs(SystemTime::now());
    let this_host = crate::audit::this_host();
    let rows: Vec<Status> = session_ids(&st)?
        .into_iter()
        .map(|id| status_of(&st, &signers, id, now_s))
        .filter(|s| match (f.active, f.all) {
            (true, _) => s.label == "active",
            (false, true) => true,
            (false, false) => matches!(s.label, "active" | "not-yet-valid"),
        })
        .filter(|s| {
            f.agent
                .as_deref()
                .is_none_or(|a| s.grant.as_ref().is_some_and(|g| g.grant.agent == a))
        })
        .filter(|s| {
            f.cap.as_deref().is_none_or(|c| {
                s.grant.as_ref().is_some_and(|g| {
                    g.caps
                        .iter()
                        .any(|(id, e)| id == c && (f.all || *e > now_s))
                })
            })
        })
        .collect();
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|s| {
                let mut v = status_json(s, now_s);
                v["other_host"] = json!(s.grant.as_ref().is_some_and(|g| {
                    !g.grant.hosts.is_empty() && !g.grant.hosts.contains(&this_host)
                }));
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(0);
    }
    if rows.is_empty() {
        let mut what = String::from(if f.all && !f.active { "" } else { "active " });
        if let Some(a) = &f.agent {
            what.push_str(&format!("{a} "));
        }
        let with = f
            .cap
            .as_deref()
            .map(|c| format!(" with {c}"))
            .unwrap_or_default();
        println!("no {what}sessions{with} in {}", st.grants_dir().display());
        return Ok(0);
    }
    println!(
        "{:<26}  {:<13}  {:<12}  {:>8}  {:<20}  {:<20}  {:<40}  REASON",
        "SESSION", "STATUS", "AGENT", "LEFT", "SIGNED BY", "HOSTS", "CAPABILITIES"
    );
    for s in &rows {
        let (agent, leftt, caps, by, hosts, reason) = match &s.grant {
            Some(g) => (
                g.grant.agent.clone(),
                left(g.expires_at - now_s),
                g.caps
                    .iter()
                    .map(|(c, e)| {
                        if *e <= now_s {
                            format!("{c}(expired)")
                        } else {
                            c.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                if s.loaded.is_some() {
                    g.grant.operator.clone()
                } else {
                    "(unverified)".into()
                },
                if g.grant.hosts.is_empty() {
                    "any".to_string()
                } else if g.grant.hosts.contains(&this_host) {
                    g.grant.hosts.join(",")
                } else {
                    format!("{}(not this host)", g.grant.hosts.join(","))
                },
                g.grant
                    .reason
                    .as_deref()
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(|| "-".into()),
            ),
            None => (
                "?".into(),
                "-".into(),
                "?".into(),
                "(unverified)".into(),
                "?".into(),
                "-".into(),
            ),
        };
        println!(
            "{:<26}  {:<13}  {:<12}  {:>8}  {:<20}  {:<20}  {:<40}  {reason}",
            s.id, s.label, agent, leftt, by, hosts, caps
        );
    }
    Ok(0)
}

fn show(id: &str, json_out: bool) -> Result<u8> {
    let cfg = Config::load()?;
    let st = StateDir::of(&cfg);
    let id = parse_id(id)?;
    let signers = grant::allowed_signers(&cfg)?;
    let now_s = unix_secs(SystemTime::now());
    let s = status_of(&st, &signers, id, now_s);
    if s.grant.is_none() && s.loaded.is_none() && s.detail.as_deref() == Some("no grant file") {
        return Err(Error::denied(format!("no session {id} (no grant file)"))
            .hint("list sessions: aap session list --all"));
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&status_json(&s, now_s)).expect("json")
        );
    } else {
        println!("session:    {id}");
        println!("status:     {}", s.label);
        match &s.loaded {
            Some(l) => println!(
                "signature:  good ({} key {}, principal {}, {} line {})",
                l.signer.algorithm,
                l.signer.fingerprint,
                l.signer.principal,
                signers.origin(),
                l.signer.line
            ),
            None => println!(
                "signature:  DOES NOT VERIFY: {}",
                s.detail.as_deref().unwrap_or("unknown")
            ),
        }
        if let Some(g) = &s.grant {
            let mark = if s.loaded.is_some() {
                ""
            } else {
                "  (unverified claim)"
            };
            println!("agent:      {}{mark}", g.grant.agent);
            println!("operator:   {}{mark}", g.grant.operator);
            println!("grant:      #{} issued {}", g.grant.seq, g.grant.issued_at);
            println!(
                "valid:      {} .. {} ({} left)",
                g.grant.not_before,
                g.grant.expires_at,
                left(g.expires_at - now_s)
            );
            println!(
                "hosts:      {}",
                if g.grant.hosts.is_empty() {
                    "any".to_string()
                } else {
                    g.grant.hosts.join(", ")
                }
            );
            if g.grant.break_glass {
                println!("break-glass: yes");
            }
            if let Some(r) = &g.grant.reason {
                println!("reason:     {r}");
            }
            println!("capabilities:");
            for c in &g.grant.capabilities {
                let e = parse_rfc3339_secs(&c.expires_at).unwrap_or(0);
                println!(
                    "  {}  approved {}  until {} ({} left)",
                    c.id,
                    c.approved_at,
                    c.expires_at,
                    left(e - now_s)
                );
            }
        }
        if s.label == "revoked" {
            if let Ok(b) = read_state_file(&st.revoked_path(&id)) {
                if let Ok(m) = serde_json::from_slice::<RevokedMarker>(&b) {
                    println!(
                        "revoked:    {} by uid {}{}",
                        m.revoked_at,
                        m.by_uid,
                        m.reason.map(|r| format!(": {r}")).unwrap_or_default()
                    );
                }
            }
        }
    }
    if s.loaded.is_none() {
        return Err(Error::data(format!(
            "the grant of session {id} does not verify: {}",
            s.detail.unwrap_or_default()
        ))
        .hint(format!(
            "revoke it and start a new one: aap session revoke {id}"
        )));
    }
    Ok(0)
}

/// Who asks, as the broker knows them: the config, the agent the kernel-reported uid maps to,
/// and that uid. Nothing here comes from the client.
pub struct Caller<'a> {
    pub cfg: &'a Config,
    pub agent: Option<&'a str>,
    pub uid: u32,
    /// The broker's cached catalog, when it has one.
    pub catalog: Option<std::sync::Arc<Catalog>>,
}

impl Caller<'_> {
    pub(crate) fn catalog(&self) -> Result<std::sync::Arc<Catalog>> {
        match &self.catalog {
            Some(c) => Ok(std::sync::Arc::clone(c)),
            None => Ok(std::sync::Arc::new(Catalog::load(&self.cfg.catalog.value)?)),
        }
    }
}

/// The session a request names; the client resolved `--session`/`$AAP_SESSION` already.
pub(crate) fn session_given(
    session: Option<String>,
    cap: &str,
    agent: Option<&str>,
) -> Result<String> {
    match session.filter(|s| !s.is_empty()) {
        Some(s) => Ok(s),
        None => Err(Error::denied("no session: AAP_SESSION is not set and --session was not given")
            .hint(format!(
                "the operator starts one, and what it prints sets AAP_SESSION: eval \"$(aap session start --agent {} --cap {cap})\"",
                agent.unwrap_or("AGENT")
            ))),
    }
}

/// `aap session check` / `aap-exec --check`, in the broker: one line into `out`, 0 or 77.
pub fn check_to(
    caller: &Caller<'_>,
    session: Option<String>,
    cap: &str,
    out: &mut String,
) -> Result<grant::Authorized> {
    use std::fmt::Write;
    let session = session_given(session, cap, caller.agent)?;
    let catalog = caller.catalog()?;
    let host = crate::audit::this_host();
    let now = SystemTime::now();
    let req = CheckRequest {
        session: &session,
        capability: cap,
        agent: caller.agent,
        host: &host,
        uid: caller.uid,
    };
    let a = grant::check(caller.cfg, &catalog, &req, now)?;
    let _ = writeln!(
        out,
        "allowed: session {} (agent {}) may use {} (tier {}) until {} ({} left){}",
        a.session(),
        a.agent(),
        a.capability_id(),
        a.tier(),
        a.expires_at_rfc3339(),
        Dur::from_secs(a.remaining_at(now).as_secs()),
        if a.break_glass() { ", BREAK-GLASS" } else { "" }
    );
    Ok(a)
}

/// `aap-exec --list`, in the broker: what this session may use now, and until when.
pub fn list_to(
    caller: &Caller<'_>,
    session: Option<String>,
    json_out: bool,
    out: &mut String,
) -> Result<u8> {
    use std::fmt::Write;
    let session = session_given(session, "CAP", caller.agent)?;
    let cfg = caller.cfg;
    let catalog = caller.catalog()?;
    let id = parse_id(&session)?;
    let st = StateDir::of(cfg);
    let signers = grant::allowed_signers(cfg)?;
    let now = SystemTime::now();
    let now_s = unix_secs(now);
    let host = crate::audit::this_host();
    fn req_for<'a>(
        session: &'a str,
        c: &'a str,
        caller: &Caller<'a>,
        host: &'a str,
    ) -> CheckRequest<'a> {
        CheckRequest {
            session,
            capability: c,
            agent: caller.agent,
            host,
            uid: caller.uid,
        }
    }
    let loaded = match grant::load_verified(&st, &signers, &id, now_s) {
        Ok(l) => l,
        Err(Err(e)) => return Err(e),
        // Let `check` produce the typed denial and its hint.
        Err(Ok(_)) => {
            return Err(
                grant::check(cfg, &catalog, &req_for(&session, "CAP", caller, &host), now)
                    .err()
                    .map_or_else(
                        || {
                            Error::denied(format!("session {id} cannot be read"))
                                .hint(format!("see what is wrong with it: aap session show {id}"))
                        },
                        Error::from,
                    ),
            );
        }
    };
    if let Some(agent) = caller.agent
        && loaded.valid.grant.agent != agent
    {
        // Another agent's session: say no more about it than that.
        return Err(
            grant::check(cfg, &catalog, &req_for(&session, "CAP", caller, &host), now)
                .err()
                .map_or_else(
                    || {
                        Error::denied(format!("session {id} is not agent {agent}'s")).hint(
                            "list your own session's capabilities: aap-exec --list --session \"$AAP_SESSION\"",
                        )
                    },
                    Error::from,
                ),
        );
    }
    let mut any = false;
    let mut rows = Vec::new();
    if !json_out {
        let _ = writeln!(
            out,
            "session {id} (agent {}), signed by {}:",
            loaded.valid.grant.agent, loaded.signer.principal
        );
    }
    for (c, _) in &loaded.valid.caps {
        match grant::check(cfg, &catalog, &req_for(&session, c, caller, &host), now) {
            Ok(a) => {
                any = true;
                let left_s = a.remaining_at(now).as_secs();
                if json_out {
                    rows.push(json!({
                        "id": c, "usable": true, "tier": a.tier().as_str(),
                        "expires_at": a.expires_at_rfc3339(), "left_secs": left_s,
                        "break_glass": a.break_glass(),
                        "allowed_commands": a.capability().allowed_commands,
                    }));
                } else {
                    let _ = writeln!(
                        out,
                        "  {c}  usable until {} ({} left), tier {}",
                        a.expires_at_rfc3339(),
                        Dur::from_secs(left_s),
                        a.tier()
                    );
                }
            }
            Err(d) => {
                if json_out {
                    rows.push(json!({"id": c, "usable": false, "why": d.message()}));
                } else {
                    let _ = writeln!(out, "  {c}  not usable: {}", d.message());
                }
            }
        }
    }
    if json_out {
        let v = json!({
            "session": id.to_string(),
            "agent": loaded.valid.grant.agent,
            "signed_by": loaded.signer.principal,
            "expires_at": loaded.valid.grant.expires_at,
            "capabilities": rows,
        });
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v).expect("json"));
    }
    Ok(if any { 0 } else { 77 })
}

fn gc(retention: Dur) -> Result<u8> {
    let cfg = Config::load()?;
    let st = StateDir::of(&cfg);
    let mut log = Log::open(&cfg.audit_log.value)?;
    let now_s = unix_secs(SystemTime::now());
    let keep = retention.secs() as i64;
    let _lock = st.lock(LockKind::Exclusive)?;
    let (mut sessions, mut markers, mut requests, mut temps, mut kept_invalid) = (0, 0, 0, 0, 0);
    let remove = |p: &std::path::Path| match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(
            Error::unavailable(format!("cannot remove {}: {e}", p.display())).hint(format!(
                "check permissions: ls -l {}",
                q(&p.to_string_lossy())
            )),
        ),
    };
    for id in session_ids(&st)? {
        let Ok(bytes) = read_state_file(&st.grant_path(&id)) else {
            kept_invalid += 1;
            continue;
        };
        let Ok(g) = Grant::decode(&bytes, &id) else {
            kept_invalid += 1;
            continue;
        };
        let revoked_at = read_state_file(&st.revoked_path(&id))
            .ok()
            .and_then(|b| serde_json::from_slice::<RevokedMarker>(&b).ok())
            .and_then(|m| parse_rfc3339_secs(&m.revoked_at));
        let ended = match revoked_at {
            Some(r) => r.min(g.expires_at),
            None => g.expires_at,
        };
        if ended + keep < now_s {
            remove(&st.grant_path(&id))?;
            remove(&st.sig_path(&id))?;
            sessions += 1;
        }
    }
    // Revocation markers outlive their grants until the grant would have expired anyway.
    if let Ok(rd) = std::fs::read_dir(st.revoked_dir()) {
        for e in rd.flatten() {
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| SessionId::parse(n).ok())
            else {
                continue;
            };
            if std::fs::symlink_metadata(st.grant_path(&id)).is_ok() {
                continue;
            }
            let exp = read_state_file(&st.revoked_path(&id))
                .ok()
                .and_then(|b| serde_json::from_slice::<RevokedMarker>(&b).ok())
                .and_then(|m| m.expires_at)
                .and_then(|e| parse_rfc3339_secs(&e));
            if exp.is_some_and(|e| e + keep < now_s) && remove(&st.revoked_path(&id))? {
                markers += 1;
            }
        }
    }
    for rid in crate::request::list_ids(&st).unwrap_or_default() {
        let expired = match crate::request::load(&st, &rid) {
            Ok(Some(r)) => r.expires_at <= now_s,
            Ok(None) => false,
            // An unreadable or invalid request is removed once older than the retention.
            Err(_) => rid.timestamp_ms() as i64 / 1000 + keep < now_s,
        };
        if expired && remove(&st.request_path(&rid))? {
            requests += 1;
        }
    }
    // Answers are read only while an agent waits; keep them for the retention, like grants.
    if let Ok(rd) = std::fs::read_dir(st.answers_dir()) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(rid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| crate::id::RequestId::parse(n).ok())
            else {
                continue;
            };
            if rid.timestamp_ms() as i64 / 1000 + keep < now_s && remove(&e.path())? {
                requests += 1;
            }
        }
    }
    for dir in [
        st.grants_dir(),
        st.revoked_dir(),
        st.requests_dir(),
        st.answers_dir(),
    ] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .is_some_and(|m| unix_secs(m) + 3600 < now_s);
                if e.file_name().to_string_lossy().starts_with(".tmp-") && old && remove(&e.path())?
                {
                    temps += 1;
                }
            }
        }
    }
    let summary = format!(
        "removed {sessions} session(s), {markers} revocation marker(s), {requests} expired request(s), {temps} stale temporary file(s); retention {retention}"
    );
    let mut ev = Event::new(EventKind::SessionGc, Outcome::Ok);
    ev.reason = Some(summary.clone());
    log.append(&ev)?;
    println!("{summary}");
    if kept_invalid > 0 {
        println!("kept {kept_invalid} unreadable grant file(s); see: aap session list --all");
    }
    Ok(0)
}
