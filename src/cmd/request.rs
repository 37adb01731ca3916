//! `aap request` (agent), `aap requests`, `aap approve`, `aap deny` (operator).

#![forbid(unsafe_code)]

use super::session::{Addition, Ctx, add_capabilities, left, print_grant_summary};
use crate::audit::{Event, EventKind, Log, Outcome};
use crate::catalog::Catalog;
use crate::catalog::Tier;
use crate::duration::Dur;
use crate::error::{Error, Result};
use crate::grant::{self, CheckRequest, Denial, check_reason};
use crate::id::RequestId;
use crate::request::{self, REQUEST_VERSION, Request};
use crate::timefmt::{rfc3339_secs, unix_secs};
use serde_json::json;
use std::time::SystemTime;

fn parse_req(s: &str) -> Result<RequestId> {
    RequestId::parse(s)
        .map_err(|e| Error::denied(format!("request id {e}")).hint("use an id from: aap requests"))
}

/// `aap request CAP --reason R`, in the broker: record a pending request for the operator and
/// run `requests.notify`. The agent and uid are the kernel's (through `caller`), and only the
/// broker writes `requests/` and the audit line. Returns the new request's id (`None` when
/// the session already may use CAP, so there is nothing to wait for).
pub fn request_to(
    caller: &super::session::Caller<'_>,
    log: &std::sync::Mutex<Log>,
    cap: &str,
    reason: &str,
    session: Option<String>,
    waiting: bool,
    out: &mut String,
) -> Result<Option<RequestId>> {
    use std::fmt::Write;
    let session = super::session::session_given(session, cap, caller.agent)?;
    check_reason(reason).map_err(|e| {
        Error::config(format!("--reason: {e}"))
            .hint("give one line of plain text, e.g. --reason 'fetch the review branch'")
    })?;
    let cfg = caller.cfg;
    let catalog = Catalog::load(&cfg.catalog.value)?;
    let st = crate::state::StateDir::of(cfg);
    let host = crate::audit::this_host();
    let uid = caller.uid;
    let now = SystemTime::now();
    let now_s = unix_secs(now);
    let req = CheckRequest {
        session: &session,
        capability: cap,
        agent: caller.agent,
        host: &host,
        uid,
    };
    // Only a session that verifies, is not revoked, and runs as the right uid and host may
    // ask; only for a capability that exists, is not break-glass, and its agent may have.
    match grant::check(cfg, &catalog, &req, now) {
        Ok(a) => {
            let _ = writeln!(
                out,
                "already allowed: session {} may use {cap} until {}; nothing to request",
                a.session(),
                a.expires_at_rfc3339()
            );
            return Ok(None);
        }
        Err(Denial::NotGranted { .. } | Denial::Expired { .. }) => {}
        Err(d) => return Err(d.into()),
    }
    let Some(cap_def) = catalog.get(cap) else {
        return Err(catalog.unknown(cap, crate::error::Kind::Config));
    };
    let id = super::session::parse_id(&session)?;
    let signers = grant::allowed_signers(cfg)?;
    let g = grant::load_verified(&st, &signers, &id, now_s)
        .map_err(|e| match e {
            Err(e) => e,
            Ok(e) => e.into_error(&id, "the operator"),
        })?
        .valid;
    let agent = g.grant.agent.clone();
    if cap_def.audit_tier == Tier::Critical {
        return Err(Error::denied(format!(
            "{cap} is critical (break-glass): agents cannot request it"
        ))
        .hint(format!(
            "only the operator grants it: aap session approve {id} --cap {cap} --break-glass --reason '...'"
        )));
    }
    if !cap_def.allows_agent(&agent) {
        return Err(Error::denied(format!(
            "the catalog does not allow agent {agent} to use {cap} (it allows: {})",
            cap_def.agents.join(", ")
        ))
        .hint(format!(
            "see what {agent} may ask for: aap catalog list --agent {agent}"
        )));
    }
    let rid = RequestId::generate(now).map_err(|e| {
        Error::internal(format!("cannot get random bytes for a request id: {e}")).hint("retry")
    })?;
    let ttl = cfg.request_ttl.secs() as i64;
    let r = Request {
        v: REQUEST_VERSION,
        id: rid.to_string(),
        session: id.to_string(),
        agent: agent.clone(),
        capability: cap.to_owned(),
        reason: reason.to_owned(),
        created_at: rfc3339_secs(now_s),
        expires_at: rfc3339_secs(now_s + ttl),
        uid,
        host: host.clone(),
    };
    let dir = st.requests_dir();
    if std::fs::symlink_metadata(&dir).is_err() {
        st.ensure_requests_dir()?;
    }
    let name = format!("{rid}.json");
    crate::state::write_atomic(&dir, &name, &r.to_bytes(), 0o644)?;
    let mut ev = Event::new(EventKind::Request, Outcome::Ok);
    ev.uid = uid;
    ev.session = Some(id.to_string());
    ev.agent = Some(agent);
    ev.capability = Some(cap.to_owned());
    ev.tier = Some(cap_def.audit_tier);
    ev.reason = Some(reason.to_owned());
    if let Err(e) = log.lock().unwrap_or_else(|p| p.into_inner()).append(&ev) {
        let _ = std::fs::remove_file(dir.join(&name));
        return Err(e);
    }
    let _ = writeln!(
        out,
        "request {rid} pending: {cap} for session {id} (expires in {})",
        left(ttl)
    );
    let _ = writeln!(out, "the operator approves it with: aap approve {rid}");
    if let Some(n) = &cfg.request_notify {
        let line = serde_json::to_string(&r).expect("a request always serializes");
        let env = [(
            std::ffi::OsString::from("PATH"),
            std::ffi::OsString::from(&cfg.secure_path),
        )];
        if let Err(why) = crate::exec::breakglass::run_notify(&n.command, n.timeout, &line, &env) {
            tracing::warn!(request = %rid, error = %why, "requests.notify failed");
            eprintln!("aap broker: warning: requests.notify failed for request {rid}: {why}");
            let _ = writeln!(
                out,
                "warning: the operator's notify command failed; tell the operator about request {rid}"
            );
        }
    }
    if !waiting {
        let _ = writeln!(
            out,
            "then check: aap session check {cap}   (or wait: aap request --wait-on {rid})"
        );
    }
    Ok(Some(rid))
}

/// Where a request stands, for an agent waiting on it.
pub enum WaitState {
    /// Still pending until `expires_at` (Unix seconds).
    Pending { expires_at: i64 },
    /// Approved, and the session's signed grant allows it now: the line to print.
    Approved(String),
}

/// In the broker: the state of request `rid` for `caller`, who must be the uid (and agent)
/// that made it. Denied, expired, unknown or another's request: an error (77, 75 for expired).
/// An approval is reported only when the session's grant verifies and allows the capability
/// now; the answer file alone grants nothing.
pub fn wait_state(caller: &super::session::Caller<'_>, rid: &RequestId) -> Result<WaitState> {
    let cfg = caller.cfg;
    let st = crate::state::StateDir::of(cfg);
    let now = SystemTime::now();
    let now_s = unix_secs(now);
    let not_yours = |uid: u32, cap: &str| {
        Error::denied(format!(
            "request {rid} was made by uid {uid}, not by you (uid {}); an agent waits only on its own requests",
            caller.uid
        ))
        .hint(format!(
            "ask for it yourself: aap request {cap} --reason '...' --wait"
        ))
    };
    let mine = |r: &request::ValidRequest| {
        r.req.uid == caller.uid && caller.agent.is_none_or(|a| a == r.req.agent)
    };
    let answer = request::load_answer(&st, rid).map_err(|e| {
        Error::data(format!("the answer to request {rid} is refused: {e}")).hint(format!(
            "the operator answers it again: aap deny {rid} --reason '...'"
        ))
    })?;
    if let Some((a, r)) = answer {
        if !mine(&r) {
            return Err(not_yours(r.req.uid, &r.req.capability));
        }
        let cap = &r.req.capability;
        match a.verdict {
            request::Verdict::Denied => {
                let why = a.reason.as_deref().unwrap_or("no reason given");
                return Err(Error::denied(format!(
                    "the operator denied request {rid} for {cap}: {why}"
                ))
                .hint(format!(
                    "see what this session may use now: aap-exec --list --session {}",
                    r.req.session
                )));
            }
            request::Verdict::Approved => {
                let catalog = caller.catalog()?;
                let host = crate::audit::this_host();
                let session = r.session.to_string();
                let req = CheckRequest {
                    session: &session,
                    capability: cap,
                    agent: caller.agent,
                    host: &host,
                    uid: caller.uid,
                };
                let a = grant::check(cfg, &catalog, &req, now).map_err(Error::from)?;
                return Ok(WaitState::Approved(format!(
                    "approved: request {rid}; session {session} may use {cap} until {}",
                    a.expires_at_rfc3339()
                )));
            }
        }
    }
    match request::load(&st, rid) {
        Ok(Some(r)) => {
            if !mine(&r) {
                return Err(not_yours(r.req.uid, &r.req.capability));
            }
            if r.expires_at <= now_s {
                return Err(Error::timeout(format!(
                    "request {rid} for {} expired unanswered at {}",
                    r.req.capability, r.req.expires_at
                ))
                .hint(format!(
                    "ask again: aap request --session {} {} --reason '...' --wait",
                    r.session, r.req.capability
                )));
            }
            Ok(WaitState::Pending {
                expires_at: r.expires_at,
            })
        }
        Ok(None) => Err(Error::denied(format!(
            "no request {rid}: it was never made, or it was removed without an answer"
        ))
        .hint("see what your session has, then ask for what it lacks with aap request: aap-exec --list")),
        Err(e) => Err(
            Error::data(format!("request {rid} is refused: {e}")).hint(format!(
                "the operator removes it: aap deny {rid} --reason 'invalid request file'"
            )),
        ),
    }
}

/// Record the operator's answer for an agent that waits on it. A failure is a warning: the
/// answer itself (grant re-signed, or denial logged) stands.
fn write_answer(
    ctx: &Ctx,
    r: &request::ValidRequest,
    verdict: request::Verdict,
    reason: Option<&str>,
) {
    let a = request::Answer {
        v: REQUEST_VERSION,
        request: r.req.clone(),
        verdict,
        reason: reason.map(str::to_owned),
        answered_at: rfc3339_secs(unix_secs(SystemTime::now())),
    };
    let res = ctx.st.ensure_answers_dir().and_then(|()| {
        crate::state::write_atomic(
            &ctx.st.answers_dir(),
            &format!("{}.json", r.id),
            &a.to_bytes(),
            0o644,
        )
    });
    if let Err(e) = res {
        eprintln!(
            "aap: warning: an agent waiting on request {} will not learn the answer: {}",
            r.id,
            e.message()
        );
    }
}

/// Pending, unexpired requests, oldest first, and a warning for each invalid one.
pub(crate) fn pending(
    st: &crate::state::StateDir,
    now_s: i64,
) -> Result<(Vec<request::ValidRequest>, Vec<String>)> {
    let ids = request::list_ids(st).map_err(|e| {
        Error::unavailable(format!("cannot list {}: {e}", st.requests_dir().display()))
            .hint("check permissions: aap config show")
    })?;
    let (mut rows, mut warnings) = (Vec::new(), Vec::new());
    for id in ids {
        match request::load(st, &id) {
            Ok(Some(r)) if r.expires_at > now_s => rows.push(r),
            Ok(_) => {}
            Err(e) => warnings.push(format!("skipping request {id}: {e}")),
        }
    }
    Ok((rows, warnings))
}

/// `aap requests [--json]`: pending, unexpired requests, oldest first.
pub fn list(json_out: bool) -> Result<u8> {
    let cfg = crate::config::Config::load()?;
    let st = crate::state::StateDir::of(&cfg);
    let now_s = unix_secs(SystemTime::now());
    let (rows, warnings) = pending(&st, now_s)?;
    for w in warnings {
        eprintln!("aap: warning: {w}");
    }
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.req.id, "session": r.req.session, "agent": r.req.agent,
                    "capability": r.req.capability, "reason": r.req.reason,
                    "created_at": r.req.created_at, "expires_at": r.req.expires_at,
                    "uid": r.req.uid, "host": r.req.host,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no pending requests");
        return Ok(0);
    }
    println!(
        "{:<26}  {:<26}  {:<10}  {:<28}  {:>7}  {:>7}  REASON",
        "REQUEST", "SESSION", "AGENT", "CAPABILITY", "AGE", "EXPIRES"
    );
    for r in &rows {
        println!(
            "{:<26}  {:<26}  {:<10}  {:<28}  {:>7}  {:>7}  {}",
            r.req.id,
            r.req.session,
            r.req.agent,
            r.req.capability,
            left(now_s - r.created_at),
            left(r.expires_at - now_s),
            r.req.reason
        );
    }
    println!("approve: aap approve REQUEST [--ttl D]   refuse: aap deny REQUEST --reason '...'");
    Ok(0)
}

fn load_pending(ctx: &Ctx, id: &RequestId) -> Result<request::ValidRequest> {
    match request::load(&ctx.st, id) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(Error::denied(format!("no pending request {id}"))
            .hint("list pending requests: aap requests")),
        Err(e) => Err(
            Error::data(format!("request {id} is refused: {e}")).hint(format!(
                "remove it: aap deny {id} --reason 'invalid request file'"
            )),
        ),
    }
}

/// `aap approve REQ [--ttl D] [--reason R]`.
pub fn approve(req: &str, ttl: Option<Dur>, reason: Option<&str>) -> Result<u8> {
    let ctx = Ctx::load()?;
    super::session::operator_only(&ctx.cfg, "aap approve", None, &[])?;
    let rid = parse_req(req)?;
    let v = approve_one(&ctx, &rid, ttl, reason)?;
    print_grant_summary(&v, false, "approved");
    Ok(0)
}

/// Approve one request: re-sign its session's grant, record the answer, remove the request.
pub(crate) fn approve_one(
    ctx: &Ctx,
    rid: &RequestId,
    ttl: Option<Dur>,
    reason: Option<&str>,
) -> Result<crate::grant::ValidGrant> {
    let rid = *rid;
    if let Some(r) = reason {
        check_reason(r).map_err(|e| {
            Error::config(format!("--reason: {e}")).hint("give one line of plain text")
        })?;
    }
    let r = load_pending(ctx, &rid)?;
    let now_s = unix_secs(SystemTime::now());
    if r.expires_at <= now_s {
        return Err(Error::denied(format!(
            "request {rid} expired at {}",
            r.req.expires_at
        ))
        .hint(format!(
            "the agent can ask again (aap request {} --reason '...'), or approve directly: aap session approve {} --cap {}",
            r.req.capability, r.session, r.req.capability
        )));
    }
    // Only the broker writes `requests/`, with the agent the kernel told it. A request file
    // owned by anyone but the directory's owner, or in a directory others may write, is not
    // the broker's and is refused as a forgery.
    {
        use std::os::unix::fs::MetadataExt;
        let stat = |p: &std::path::Path| {
            std::fs::symlink_metadata(p).map_err(|e| {
                Error::data(format!("cannot stat {}: {e}", p.display()))
                    .hint("list pending requests: aap requests")
            })
        };
        let dir = stat(&ctx.st.requests_dir())?;
        let file = stat(&ctx.st.request_path(&rid))?;
        if dir.mode() & 0o022 != 0 {
            return Err(Error::denied(format!(
                "{} is writable by others (mode {:o}), so request {rid} may be forged; refusing it",
                ctx.st.requests_dir().display(),
                dir.mode() & 0o7777
            ))
            .hint(format!(
                "chmod 0750 {} (only the broker writes requests now), then ask the agent to request again",
                crate::error::quote_path(&ctx.st.requests_dir())
            )));
        }
        if file.uid() != dir.uid() {
            return Err(Error::denied(format!(
                "request {rid} is owned by uid {}, not by the broker (uid {}, the owner of requests/); refusing a forged request",
                file.uid(),
                dir.uid()
            ))
            .hint(format!("aap deny {rid} --reason 'forged: file owned by uid {}'", file.uid())));
        }
    }
    let caps = [r.req.capability.clone()];
    let event_reason = match reason {
        Some(op) => format!("request {rid}: {} (operator: {op})", r.req.reason),
        None => format!("request {rid}: {}", r.req.reason),
    };
    let v = add_capabilities(
        ctx,
        &r.session,
        &Addition {
            caps: &caps,
            ttl,
            reason: None,
            break_glass: false,
            event: EventKind::RequestApprove,
            event_reason: Some(event_reason),
            expect_agent: Some(&r.req.agent),
            request: Some(&r.req.id),
        },
    )?;
    // The grant is signed and logged; the request is answered (the answer first, so that a
    // waiting agent never finds neither).
    write_answer(ctx, &r, request::Verdict::Approved, reason);
    let _ = std::fs::remove_file(ctx.st.request_path(&rid));
    Ok(v)
}

/// `aap deny REQ [--reason R]`.
pub fn deny(req: &str, reason: Option<&str>) -> Result<u8> {
    let ctx = Ctx::load()?;
    super::session::operator_only(&ctx.cfg, "aap deny", None, &[])?;
    let rid = parse_req(req)?;
    deny_one(&ctx, &rid, reason)?;
    println!("denied: request {rid}");
    Ok(0)
}

/// Deny one request: log it, record the answer, remove the request.
pub(crate) fn deny_one(ctx: &Ctx, rid: &RequestId, reason: Option<&str>) -> Result<()> {
    let rid = *rid;
    if let Some(r) = reason {
        check_reason(r).map_err(|e| {
            Error::config(format!("--reason: {e}")).hint("give one line of plain text")
        })?;
    }
    let path = ctx.st.request_path(&rid);
    let loaded = request::load(&ctx.st, &rid);
    if let Ok(None) = loaded {
        return Err(Error::denied(format!("no pending request {rid}"))
            .hint("list pending requests: aap requests"));
    }
    let mut log = Log::open(&ctx.cfg.audit_log.value)?;
    let mut ev = Event::new(EventKind::RequestDeny, Outcome::Ok);
    match &loaded {
        Ok(Some(r)) => {
            ev.session = Some(r.req.session.clone());
            ev.agent = Some(r.req.agent.clone());
            ev.capability = Some(r.req.capability.clone());
            ev.tier = ctx.catalog.get(&r.req.capability).map(|c| c.audit_tier);
        }
        _ => ev.error = Some("the request file was invalid".into()),
    }
    ev.reason = Some(match reason {
        Some(r) => format!("request {rid}: {r}"),
        None => format!("request {rid}"),
    });
    log.append(&ev)?;
    if let Ok(Some(r)) = &loaded {
        write_answer(ctx, r, request::Verdict::Denied, reason);
    }
    std::fs::remove_file(&path).map_err(|e| {
        Error::unavailable(format!("cannot remove {}: {e}", path.display()))
            .hint("check the requests directory's permissions: aap config show")
    })?;
    Ok(())
}
