//! `aap-exec CAP -- CMD [ARG...]`, end to end.
//!
//! argv -> catalog -> session grant -> authorize -> (resolve the program, allowed_commands)
//! -> harden -> fetch -> inject -> audit exec.start -> spawn (signals forwarded) -> wait
//! -> teardown (zeroize, close memfds) -> audit exec.end -> exit with the child's status.
//!
//! Every failure before the child starts leaves an audit line and starts no child. If the audit
//! log cannot be written, nothing runs.

#![forbid(unsafe_code)]

use super::child::{self, Ended};
use super::command;
use super::inject;
use super::{breakglass, wrapped};
use crate::audit::{self, Event, EventKind, Log, Outcome};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Kind, Result, shell_quote};
use crate::grant::{self, Authorized, CheckRequest};
use crate::sys::{self, SignalWatch};
use std::ffi::OsString;
use std::time::{Instant, SystemTime};

/// The marker an `aap-exec` child carries, so a nested `aap-exec` can tell it is nested.
pub const NEST_MARKER: &str = "AAP_EXEC_INVOCATION";

pub struct Invocation {
    pub cap: String,
    pub session: Option<String>,
    pub reason: Option<String>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

/// Run the exec path. Returns the exit code, or does not return when the child died of a signal
/// (the wrapper re-raises it).
pub fn run(inv: Invocation, watch: &SignalWatch) -> Result<u8> {
    let cfg = Config::load_for_agent()?;
    let catalog = Catalog::load_cached(&cfg.catalog.value, &cfg.state_dir.value)?;
    // Opened before any decision, so that every decision is recorded; unwritable means no run.
    let mut log = Log::open(&cfg.audit_log.value)?;
    let invocation = crate::id::InvocationId::generate(SystemTime::now())
        .map_err(|e| {
            Error::internal(format!(
                "cannot read random bytes for the invocation id: {e}"
            ))
            .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
        })?
        .to_string();
    let argv = command::argv_strings(&inv.program, &inv.args);
    // Read once: the audit events record it and the command resolves against it.
    let here = std::env::current_dir();
    let cwd = here
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let cwd_path = here.unwrap_or_else(|_| "/".into());

    // ---- authorize ----
    let Some(session) = inv
        .session
        .clone()
        .or_else(|| std::env::var("AAP_SESSION").ok())
        .filter(|s| !s.is_empty())
    else {
        let mut ev = Event::new(EventKind::Deny, Outcome::Denied);
        ev.capability = Some(inv.cap.clone());
        ev.invocation = Some(invocation);
        ev.error = Some("no session: neither --session nor AAP_SESSION is set".into());
        log.append(&ev)?;
        return Err(Error::denied(format!(
            "no session for capability `{}`: neither --session nor AAP_SESSION is set",
            inv.cap
        ))
        .hint(format!(
            "ask the operator to approve one: aap session start --agent <agent> --cap {} --ttl 1h",
            inv.cap
        )));
    };
    let host = audit::this_host();
    let req = CheckRequest {
        session: &session,
        capability: &inv.cap,
        agent: None,
        host: &host,
        uid: sys::uid(),
    };
    let auth = match grant::check(&cfg, &catalog, &req, SystemTime::now()) {
        Ok(a) => a,
        Err(denial) => {
            let mut ev = Event::new(EventKind::Deny, Outcome::Denied);
            ev.session = Some(session.chars().take(64).collect());
            ev.capability = Some(inv.cap.chars().take(128).collect());
            ev.invocation = Some(invocation);
            ev.error = Some(denial.message());
            ev.cwd = Some(cwd);
            log.append(&ev)?;
            return Err(denial.into());
        }
    };
    let tier_logs_argv = auth.tier() >= crate::catalog::Tier::Medium;
    let break_glass = breakglass::applies(&auth);
    let base_event = |kind: EventKind, outcome: Outcome| {
        let mut ev = Event::for_authorized(kind, outcome, &auth);
        ev.invocation = Some(invocation.clone());
        ev.cwd = Some(cwd.clone());
        ev.pid = Some(std::process::id());
        ev.reason = inv.reason.clone();
        // Every event of a break-glass use is on disk before we go on.
        ev.sync = break_glass;
        if tier_logs_argv || break_glass {
            ev.argv = Some(argv.clone());
        }
        ev
    };
    let deny = |log: &mut Log, e: Error| -> Result<u8> {
        let mut ev = base_event(
            EventKind::Deny,
            if e.kind() == Kind::Denied {
                Outcome::Denied
            } else {
                Outcome::Error
            },
        );
        ev.error = Some(e.message().to_string());
        log.append(&ev)?;
        Err(e)
    };

    // Nesting: an aap-exec child running aap-exec again is refused unless the capability allows it.
    if let Some(outer) = std::env::var_os(NEST_MARKER) {
        if !auth.capability().allow_nested {
            return deny(
                &mut log,
                Error::denied(format!(
                    "aap-exec is already running this process tree (invocation {}); nesting `{}` inside it is refused",
                    outer.to_string_lossy(),
                    inv.cap
                ))
                .hint(format!("run `aap-exec {} -- ...` from the agent's own shell, not from inside another aap-exec child", inv.cap)),
            );
        }
    }

    // ---- which program ----
    let child_path = std::env::var_os("PATH");
    let mut program = match command::resolve(&inv.program, child_path.as_deref(), &cwd_path) {
        Ok(p) => p,
        Err(e) => return deny(&mut log, e),
    };
    if let crate::catalog::Backing::WrappedCommand {
        command: wanted,
        args: patterns,
        ..
    } = &auth.capability().backing
    {
        // Runs the catalog's own absolute program, and only with an allowed argv.
        match wrapped::check(&inv.cap, wanted, patterns, &program, &inv.args) {
            Ok(p) => program = p,
            Err(e) => return deny(&mut log, e),
        }
    }
    // With allowed_commands, what runs is the trusted path that matched, named as allowed.
    let mut arg0 = inv.program.clone();
    let program = match &auth.capability().allowed_commands {
        Some(allowed) => {
            match command::check_allowed(&inv.cap, allowed, &program, &cfg.secure_path) {
                Ok(trusted) => {
                    if let Some(name) = trusted.file_name() {
                        arg0 = name.to_os_string();
                    }
                    trusted
                }
                Err(e) => return deny(&mut log, e),
            }
        }
        None => program,
    };

    // ---- fetch and inject ----
    if let Err(e) = sys::harden_process() {
        return deny(
            &mut log,
            Error::internal(format!(
                "cannot harden the process before fetching a secret: {e}"
            ))
            .hint("check that prctl(2) and setrlimit(2) are allowed here"),
        );
    }
    // Before prepare: helpers started there (ssh-agent, ssh-add) must inherit nothing either.
    if let Err(e) = sys::cloexec_from_3() {
        return deny(
            &mut log,
            Error::internal(format!(
                "cannot mark inherited descriptors close-on-exec: {e}"
            ))
            .hint("check the open descriptors of the caller: ls -l /proc/$$/fd"),
        );
    }
    let mut prepared = match inject::prepare(&cfg, &catalog, &auth) {
        Ok(p) => p,
        Err(e) => return deny(&mut log, e),
    };
    // A ^C or kill that arrived while we were fetching stops us here, before any child exists.
    if let Some(sig) = pending_fatal(watch) {
        drop(prepared);
        let mut ev = base_event(EventKind::Deny, Outcome::Error);
        ev.error = Some(format!(
            "interrupted by signal {sig} before the child started"
        ));
        ev.signal = Some(sig);
        log.append(&ev)?;
        sys::exit_with_signal(sig);
    }

    // ---- run ----
    let mut cmd = std::process::Command::new(&program);
    {
        use std::os::unix::process::CommandExt;
        cmd.arg0(&arg0);
    }
    cmd.args(&inv.args);
    cmd.env_clear();
    let hardened = auth.capability().allowed_commands.is_some();
    cmd.envs(inject::child_env(&cfg, &catalog, &invocation, hardened));
    // Not aap-exec's blocked set: with a pre_exec hook (the fd form) std forks without
    // resetting the mask, and the child could then never be stopped with SIGTERM.
    sys::unblock_signals_in_child(&mut cmd);
    prepared.apply(&mut cmd);

    let mut start = base_event(EventKind::ExecStart, Outcome::Ok);
    start.program = Some(program.display().to_string());
    let appended = match log.append(&start) {
        Ok(a) => a,
        Err(e) => {
            drop(prepared);
            return Err(e);
        }
    };
    // A notify failure let through by notify.allow_on_failure is kept for exec.end.
    let mut notify_failed: Option<String> = None;
    if break_glass {
        eprint!("{}", breakglass::banner(&auth, &argv, &invocation));
        // The notify command is the operator's: it never gets loader or hook variables of the agent.
        let env = inject::child_env(&cfg, &catalog, &invocation, true);
        match breakglass::notify(&cfg, &appended.line, &env, &inv.cap) {
            Ok(None) => {}
            Ok(Some(why)) => {
                eprintln!(
                    "aap-exec: warning: the break-glass notify command failed ({why}); continuing because notify.allow_on_failure is true"
                );
                notify_failed = Some(why);
            }
            Err(e) => {
                drop(cmd);
                drop(prepared);
                return deny(&mut log, e);
            }
        }
    }

    let shown = shell_quote(&inv.program.to_string_lossy());
    let t0 = Instant::now();
    // Signals that arrive between here and the spawn reach no child: collect them and forward
    // them once it exists (a terminal's ^C in this window would otherwise be lost).
    let early = drain_pending(watch);
    let spawned = child::spawn(&mut cmd, &shown);
    drop(cmd); // the Command's copy of the environment goes now, not at the end
    let ended = match spawned {
        Ok(mut ch) => {
            prepared.revoke_login();
            let r = child::supervise(&mut ch, watch, &early);
            // Teardown first: wipe, close, kill the agent and revoke before anything else.
            if let Err(e) = prepared.teardown() {
                eprint!("{}", e.render("aap-exec"));
            }
            r
        }
        Err(e) => {
            drop(prepared);
            Err(e)
        }
    };
    let duration_ms = t0.elapsed().as_millis() as u64;

    let mut end = base_event(EventKind::ExecEnd, Outcome::Ok);
    end.program = Some(program.display().to_string());
    end.duration_ms = Some(duration_ms);
    match &ended {
        Ok(Ended::Exited(c)) => end.exit_code = Some(*c),
        Ok(Ended::Signaled(s)) => end.signal = Some(*s),
        Err(e) => {
            end.outcome = Outcome::Error;
            end.error = Some(e.message().to_string());
        }
    }
    if let Some(why) = notify_failed {
        let note = format!(
            "the break-glass notify command failed ({why}); allowed by notify.allow_on_failure"
        );
        end.error = Some(match end.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note,
        });
    }
    if let Err(e) = log.append(&end) {
        // The child already ran; its status still decides ours, but the operator must know.
        eprint!("{}", e.render("aap-exec"));
    }
    match ended? {
        Ended::Exited(c) => Ok(c.clamp(0, 255) as u8),
        Ended::Signaled(s) => sys::exit_with_signal(s),
    }
}

/// Every pending signal but SIGCHLD.
fn drain_pending(watch: &SignalWatch) -> Vec<i32> {
    let mut out = Vec::new();
    while let Ok(Some(c)) = watch.try_next() {
        if c.signo != libc::SIGCHLD {
            out.push(c.signo);
        }
    }
    out
}

/// A terminating signal that is pending (SIGWINCH and SIGCHLD are not).
fn pending_fatal(watch: &SignalWatch) -> Option<i32> {
    while let Ok(Some(c)) = watch.try_next() {
        if c.signo != libc::SIGWINCH && c.signo != libc::SIGCHLD {
            return Some(c.signo);
        }
    }
    None
}

/// For an `infisical-token` backing: log in as the capability's scoped identity (a key of the
/// config's `identities:`) and return the client and the token, which the caller revokes when
/// the child has exited. Takes the proof of authorization like [`fetch_authorized`].
pub fn scoped_token_authorized(
    cfg: &Config,
    auth: &Authorized,
) -> Result<Option<(crate::source::Client, crate::source::AccessToken)>> {
    let crate::catalog::Backing::InfisicalToken { identity, .. } = &auth.capability().backing
    else {
        return Ok(None);
    };
    let inf = cfg.infisical()?;
    let id = crate::source::Identity::named(cfg, identity)?;
    let client = crate::source::Client::new(inf)?;
    let token = client.login(&id)?;
    Ok(Some((client, token)))
}

/// The client holding the agent's cached login token, which the caller revokes
/// ([`crate::source::Client::revoke_cached`]).
pub type LoginToken = crate::source::Client;

/// Fetch the capability's secret. The only caller of the Infisical client on the exec path;
/// it takes the proof of authorization, and the secret reference comes from that proof.
pub fn fetch_authorized(
    cfg: &Config,
    auth: &Authorized,
) -> Result<Option<(crate::secret::SecretBytes, Option<LoginToken>)>> {
    let Some(secret) = auth.capability().secret() else {
        return Ok(None);
    };
    let inf = cfg.infisical()?;
    let identity = crate::source::Identity::for_agent(cfg, auth.agent())?;
    let client = crate::source::Client::new(inf)?;
    let value = client.fetch(&identity, secret, &inf.environment, &|line| {
        eprintln!("aap-exec: {line}")
    })?;
    // The agent's own login token is never handed on; the caller revokes it (right after the
    // spawn, so the round trip overlaps the child; on any error path, when it is dropped).
    Ok(Some((value, Some(client))))
}
