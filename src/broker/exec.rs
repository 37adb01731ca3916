//! The broker's side of one `aap-exec`, as the stage calls of [`run`] (the peer and its agent
//! come from the kernel, before this module):
//!
//! [`Run::authorize`] (catalog, session, grant) -> [`Run::judge`] (may it run this command, as
//! which program) -> [`Run::fetch`] (the one secret, into memfds, the broker's ssh agent or
//! its http-proxy) -> [`Run::record_start`] (journal, exec.start, break-glass banner and
//! notify) -> [`Run::deliver_and_watch`] (send, then the wrapper's reports, the connection, the child's
//! pidfd; teardown: revoke, close) -> [`Run::record_end`] (exec.end).
//!
//! Every failure before delivery is a `deny` line and an error to the client; no child exists
//! yet. After delivery the first of "the wrapper reports the end", "the connection closes" and
//! "the child exits" tears down: nothing waits on the wrapper's cooperation.

#![forbid(unsafe_code)]

mod spawn;
pub(super) use spawn::run_as_user;
mod tty;

use super::{Broker, httpproxy, journal, sshagent};
use crate::audit::{Event, EventKind, Outcome};
use crate::catalog::{Backing, Inject};
use crate::error::{Error, Kind, Result};
use crate::exec::{breakglass, command, wrapped};
use crate::grant::{self, Authorized, CheckRequest};
use crate::proto::{BrokerMsg, ClientMsg, Conn, FdUse, ProtoError};
use crate::secret::SecretBytes;
use crate::sys::{self, PeerCred, Ready};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// After the child exits, how long the broker waits for the wrapper's report of its status
/// before it writes `exec.end` without one.
const REPORT_GRACE: Duration = Duration::from_millis(500);

pub struct ExecRequest {
    pub cap: String,
    pub session: Option<String>,
    pub reason: Option<String>,
    /// argv for the audit log (lossy UTF-8).
    pub argv: Vec<String>,
    /// argv[1..] exactly as the client will run them.
    pub args: Vec<OsString>,
    pub program: String,
    pub program_error: Option<crate::proto::ProgramError>,
    pub cwd: String,
    pub nested: Option<String>,
}

impl ExecRequest {
    /// From the fields of an `exec` (or a `check` with a command) message.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cap: String,
        session: Option<String>,
        reason: Option<String>,
        argv: Vec<Vec<u8>>,
        program: String,
        program_error: Option<crate::proto::ProgramError>,
        cwd: String,
        nested: Option<String>,
    ) -> ExecRequest {
        let raw: Vec<OsString> = argv
            .into_iter()
            .map(std::os::unix::ffi::OsStringExt::from_vec)
            .collect();
        ExecRequest {
            cap,
            session,
            reason,
            argv: raw
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            args: raw.into_iter().skip(1).collect(),
            program,
            program_error,
            cwd,
            nested,
        }
    }
}

/// What must be undone when the run ends.
struct Teardown {
    scoped: Option<(
        std::sync::Arc<crate::source::Client>,
        crate::source::AccessToken,
        String,
    )>,
    /// The broker's ssh agent for this run (the `ssh-agent` form).
    agent: Option<sshagent::Handle>,
    /// The broker's http-proxy for this run (the `http-proxy` form).
    proxy: Option<httpproxy::Handle>,
    /// What could not be undone, for exec.end and the agent.
    failure: Option<String>,
}

impl Teardown {
    /// Whether the run still holds something to take back (so the grant is re-checked while
    /// it runs).
    fn holds(&self) -> bool {
        self.scoped.is_some()
            || self.agent.as_ref().is_some_and(|a| !a.stopped())
            || self.proxy.as_ref().is_some_and(|p| !p.stopped())
    }

    /// Undo what the run was given, once; a failure is kept in `failure`.
    fn run(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop();
        }
        if let Some(p) = &self.proxy {
            // Kept (stopped) for its totals in exec.end.
            p.stop();
        }
        let Some((client, token, identity)) = self.scoped.take() else {
            return;
        };
        if let Err(e) = client.revoke(&token) {
            let w = format!(
                "the scoped Infisical token of identity {identity} could not be revoked; it stays valid until it expires ({}s after login): {}",
                token.expires_in(),
                e.message()
            );
            tracing::warn!("{w}");
            self.failure = Some(w);
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.run();
    }
}

/// One `aap-exec`, as the stages the module's header names. Each stage either passes on what
/// the next needs or ends the run with its own audit line (a `deny` before delivery).
///
/// The stages are not inlined into this function: a run holds its thread for the child's whole
/// life, and what stays resident then is this frame and the watch's, not the deep ones of the
/// fetch (which the watch gives back, `sys::release_stack_below_here`).
pub fn run(
    b: &Broker,
    conn: &mut Conn<UnixStream>,
    peer: PeerCred,
    pinned: Option<OwnedFd>,
    agent: &str,
    r: ExecRequest,
) -> Result<()> {
    let run = Run::begin(b, peer, agent, &r)?;
    let (auth, strip) = run.authorize()?;
    let (program, arg0, known) = run.judge(&auth)?;
    let mut given = run.fetch(conn, &auth, known)?;
    if matches!(auth.capability().backing, Backing::WrappedCommand { .. }) {
        // The broker starts it itself; aap-exec never runs it.
        return run.broker_run(conn, pinned.as_ref(), &auth, given, program, arg0);
    }
    // Closed last, after the wrapper is told the end is recorded (`Prepared::take_last`).
    let last = given
        .ssh_agent
        .as_mut()
        .and_then(sshagent::Prepared::take_last);
    let (warning, mut notes, start_owed) = run.record_start(conn, &auth, &program, None)?;
    let delivered = Deliver {
        program,
        arg0,
        strip,
        warning,
        start_owed,
    };
    let (ended, duration, proxied) =
        run.deliver_and_watch(conn, pinned.as_ref(), &auth, given, &delivered, &mut notes)?;
    let recorded = run.record_end(
        conn,
        &auth,
        delivered.program,
        ended,
        notes,
        (duration, proxied),
    );
    drop(last);
    recorded
}

/// What one run knows about itself before it is authorized: who asks (from the kernel), for
/// what, and its invocation id. Every audit line of the run starts from it.
struct Run<'a> {
    b: &'a Broker,
    peer: PeerCred,
    agent: &'a str,
    r: &'a ExecRequest,
    invocation: String,
}

/// What the client is told to run, besides the descriptors.
struct Deliver {
    program: String,
    arg0: String,
    strip: Vec<String>,
    warning: Option<String>,
    /// `exec.start` is written but its fsync is owed ([`Run::record_start`]): done before the
    /// broker's ssh agent serves its first connection, else by exec.end's fsync.
    start_owed: bool,
}

/// What the fetch stage hands on: what to undo at the end, the memfds and their uses, and the
/// broker's ssh agent for the run.
struct Given {
    teardown: Teardown,
    fds: Vec<OwnedFd>,
    uses: Vec<FdUse>,
    ssh_agent: Option<sshagent::Prepared>,
    /// The broker's http-proxy for the run, bound and not served yet.
    http_proxy: Option<(httpproxy::Prepared, ProxyForm)>,
}

impl<'a> Run<'a> {
    fn begin(b: &'a Broker, peer: PeerCred, agent: &'a str, r: &'a ExecRequest) -> Result<Run<'a>> {
        let invocation = crate::id::InvocationId::generate(SystemTime::now())
            .map_err(|e| {
                Error::internal(format!(
                    "cannot read random bytes for the invocation id: {e}"
                ))
                .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
            })?
            .to_string();
        Ok(Run {
            b,
            peer,
            agent,
            r,
            invocation,
        })
    }

    /// An audit line of this run before it is authorized (a denial).
    fn bare(&self, kind: EventKind, outcome: Outcome) -> Event {
        let mut ev = Event::new(kind, outcome);
        ev.uid = self.peer.uid;
        ev.agent = Some(self.agent.to_owned());
        ev.invocation = Some(self.invocation.clone());
        ev.cwd = Some(self.r.cwd.clone());
        ev.pid = Some(self.peer.pid);
        ev.argv = Some(self.r.argv.clone());
        ev.capability = Some(self.r.cap.chars().take(128).collect());
        ev
    }

    /// An audit line of this run once authorized.
    fn event(&self, kind: EventKind, outcome: Outcome, auth: &Authorized) -> Event {
        let mut ev = Event::for_authorized(kind, outcome, auth);
        ev.uid = self.peer.uid;
        ev.invocation = Some(self.invocation.clone());
        ev.cwd = Some(self.r.cwd.clone());
        ev.pid = Some(self.peer.pid);
        ev.reason = self.r.reason.clone();
        ev.sync = breakglass::applies(auth);
        // argv at every tier: it is not secret (no secret is ever put in argv), and what an
        // agent ran is what the operator reads the log for.
        ev.argv = Some(self.r.argv.clone());
        ev
    }

    /// End an authorized run before delivery: a `deny` line (outcome `denied` or `error`),
    /// then the error to the client.
    fn deny<T>(&self, auth: &Authorized, e: Error) -> Result<T> {
        let outcome = if e.kind() == Kind::Denied {
            Outcome::Denied
        } else {
            Outcome::Error
        };
        let mut ev = self.event(EventKind::Deny, outcome, auth);
        ev.error = Some(e.message().to_string());
        self.b.append(&ev)?;
        Err(e)
    }

    /// Stage 1, authorize: the catalog, the session, the grant (signature, expiry, revocation,
    /// agent, host, uid). Also the variables the child must not inherit, from the same catalog.
    #[inline(never)] // see `run`: its frame is gone before the watch
    fn authorize(&self) -> Result<(Authorized, Vec<String>)> {
        let (b, r, agent) = (self.b, self.r, self.agent);
        let catalog = match b.catalog() {
            Ok(c) => c,
            Err(e) => {
                let mut ev = self.bare(EventKind::Deny, Outcome::Error);
                ev.error = Some(e.message().to_owned());
                b.append(&ev)?;
                return Err(e);
            }
        };
        let Some(session) = r.session.as_deref().filter(|s| !s.is_empty()) else {
            let mut ev = self.bare(EventKind::Deny, Outcome::Denied);
            ev.error = Some("no session: neither --session nor AAP_SESSION is set".into());
            b.append(&ev)?;
            return Err(Error::denied(format!(
                "no session for capability `{}`: neither --session nor AAP_SESSION is set",
                r.cap
            ))
            .hint(format!(
                "the operator starts one, and what it prints sets AAP_SESSION: eval \"$(aap session start --agent {agent} --cap {} --ttl 1h)\"",
                r.cap
            )));
        };
        let host = crate::audit::this_host();
        let req = CheckRequest {
            session,
            capability: &r.cap,
            agent: Some(agent),
            host: &host,
            uid: self.peer.uid,
        };
        let auth = match grant::check(&b.cfg, &catalog, &req, SystemTime::now()) {
            Ok(a) => a,
            Err(denial) => {
                let mut ev = self.bare(EventKind::Deny, Outcome::Denied);
                ev.session = Some(session.chars().take(64).collect());
                ev.error = Some(denial.message());
                b.append(&ev)?;
                return Err(denial.into());
            }
        };
        Ok((auth, strip_list(&b.cfg, &catalog)))
    }

    /// Stage 2, judge the command: may this capability run it, and as which program.
    #[inline(never)] // see `run`: its frame is gone before the watch
    fn judge(&self, auth: &Authorized) -> Result<Judged> {
        match judge_command(&self.b.cfg, auth, self.r) {
            Ok(p) => Ok(p),
            Err(e) => self.deny(auth, e),
        }
    }

    /// Stage 3, fetch and shape: the one secret (or a fresh scoped token), put into sealed
    /// memfds or the broker's ssh agent. The secret's own copy is wiped when this returns.
    #[inline(never)] // see `run`: its frame is gone before the watch
    fn fetch(
        &self,
        conn: &mut Conn<UnixStream>,
        auth: &Authorized,
        known: Option<sshagent::KnownHosts>,
    ) -> Result<Given> {
        let b = self.b;
        // The broker's ssh agent serves on a socket aap-exec makes: asked for now (never
        // before the grant is checked: a denied run makes no socket), so that aap-exec makes
        // it while the key is fetched, and taken once the key is ready.
        let wants_agent = auth
            .capability()
            .inject
            .iter()
            .any(|i| matches!(i, Inject::SshAgent));
        if wants_agent && let Err(e) = ask_agent_socket(conn) {
            return self.deny(auth, e);
        }
        let progress = |line: &str| {
            let _ = conn.send(
                &BrokerMsg::Progress {
                    message: line.to_owned(),
                },
                &[],
            );
        };
        if auth.capability().secret().is_some()
            || matches!(auth.capability().backing, Backing::InfisicalToken { .. })
        {
            let _ = conn.send(
                &BrokerMsg::Stage {
                    waiting_for: "Infisical".into(),
                },
                &[],
            );
        }
        let (mut teardown, secret) = match fetch(b, auth, &progress) {
            Ok(x) => x,
            Err(e) => return self.deny(auth, e),
        };
        let Shaped {
            fds,
            uses,
            agent: mut ssh_agent,
            proxy: http_proxy,
        } = match shape(b, auth, secret.as_ref(), self.peer.uid, known) {
            Ok(x) => x,
            Err(e) => return self.deny(auth, e),
        };
        drop(secret);
        if let Some(a) = ssh_agent.as_mut()
            && let Err(e) = take_agent_socket(conn, a)
        {
            return self.deny(auth, e);
        }
        teardown.agent = ssh_agent.as_ref().map(sshagent::Prepared::handle);
        teardown.proxy = http_proxy.as_ref().map(|(p, _)| p.handle());
        Ok(Given {
            teardown,
            fds,
            uses,
            ssh_agent,
            http_proxy,
        })
    }

    /// Stage 4, record: the journal entry (so a restarted broker can close the run), the
    /// `exec.start` line, then for break-glass the banner and the notify command. Returns the
    /// warning to show the agent, the notes for `exec.end` (a notify that failed but was
    /// allowed), and whether the line's fsync is still owed. A failure here leaves no child and
    /// no open journal entry.
    ///
    /// The fsync of a tier high `exec.start` is owed, not waited for, when the broker itself is
    /// all the run is handed (the `ssh-agent` form, not break-glass): the child then holds
    /// nothing that works without the broker, every use of the key is an `ssh.sign` line that
    /// is on disk before the signature is made (its fsync covers this line too), and the
    /// owed fsync is done when the agent's first connection waits, before it is served (a run
    /// that never connects leaves it to exec.end's fsync, which covers it). Keeps the disk's
    /// wait (about 0.5 ms here) off a short run's way.
    #[inline(never)] // see `run`: its frame is gone before the watch
    fn record_start(
        &self,
        conn: &Conn<UnixStream>,
        auth: &Authorized,
        program: &str,
        run_as: Option<&str>,
    ) -> Result<(Option<String>, Vec<String>, bool)> {
        let b = self.b;
        let mut start = self.event(EventKind::ExecStart, Outcome::Ok, auth);
        start.program = Some(program.to_owned());
        start.run_as = run_as.map(str::to_owned);
        b.journal.add(&journal::Entry {
            invocation: self.invocation.clone(),
            session: auth.session().to_string(),
            agent: self.agent.to_owned(),
            uid: self.peer.uid,
            capability: auth.capability_id().to_owned(),
            pid: self.peer.pid,
        })?;
        let broker_holds_all = {
            let inj = &auth.capability().inject;
            !inj.is_empty() && inj.iter().all(|i| matches!(i, Inject::SshAgent)) && run_as.is_none() // a broker-run command is no `ssh-agent` form
        };
        if broker_holds_all && !breakglass::applies(auth) {
            return match b.append_sync_later(&start) {
                Ok(owed) => Ok((None, Vec::new(), owed)),
                Err(e) => {
                    b.journal.remove(&self.invocation);
                    Err(e)
                }
            };
        }
        let appended = match b.append(&start) {
            Ok(a) => a,
            Err(e) => {
                b.journal.remove(&self.invocation);
                return Err(e);
            }
        };
        drop(start);
        if !breakglass::applies(auth) {
            return Ok((None, Vec::new(), false));
        }
        let text = breakglass::banner(auth, &self.r.argv, &self.invocation);
        // Shown before the notify runs, so the agent sees it even when the use is denied.
        let _ = conn.send(&BrokerMsg::Notice { text }, &[]);
        // Run by the broker, as the broker's user, with an environment of its own: nothing of
        // the agent's (dotfiles, variables) can redirect it.
        let env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), b.cfg.secure_path.clone().into()),
            ("LANG".into(), "C".into()),
        ];
        match breakglass::notify(&b.cfg, &appended.line, &env, &self.r.cap) {
            Ok(None) => Ok((None, Vec::new(), false)),
            Ok(Some(why)) => Ok((
                Some(format!(
                    "the break-glass notify command failed ({why}); continuing because notify.allow_on_failure is true"
                )),
                vec![format!(
                    "the break-glass notify command failed ({why}); allowed by notify.allow_on_failure"
                )],
                false,
            )),
            Err(e) => {
                // No child will exist: the start is answered by a deny line, as for any refusal.
                b.journal.remove(&self.invocation);
                self.deny(auth, e)
            }
        }
    }

    /// Stage 5, deliver and watch: send the descriptors and what to run, serve the ssh agent
    /// if there is one, and wait for the first of the run's ends; then tear down (revoke,
    /// close). Returns how it ended and the run's duration; notes for `exec.end` are added to
    /// `notes`.
    #[inline(never)] // see `run`: its frame is gone before the watch
    fn deliver_and_watch(
        &self,
        conn: &mut Conn<UnixStream>,
        pinned: Option<&OwnedFd>,
        auth: &Authorized,
        given: Given,
        d: &Deliver,
        notes: &mut Vec<String>,
    ) -> Result<(Watched, Duration, Option<httpproxy::Summary>)> {
        let b = self.b;
        let Given {
            mut teardown,
            fds,
            uses,
            ssh_agent,
            http_proxy,
        } = given;
        let deliver = BrokerMsg::Deliver {
            invocation: self.invocation.clone(),
            program: d.program.clone(),
            arg0: d.arg0.clone(),
            strip: d.strip.clone(),
            strip_code_vars: auth.capability().allowed_commands.is_some(),
            fds: uses,
            warning: d.warning.clone(),
            ssh_auth_sock: ssh_agent
                .as_ref()
                .and_then(|a| a.sock())
                .map(|p| p.display().to_string()),
            http_proxy: http_proxy.as_ref().map(|(p, form)| crate::proto::ProxyUse {
                base: p.base_url().to_owned(),
                host: if form.git {
                    p.host().to_owned()
                } else {
                    String::new()
                },
                var: form.var.clone(),
            }),
        };
        let t0 = Instant::now();
        let sent = send_delivery(conn, &deliver, fds);
        // What the watch no longer needs: a held run keeps its thread's memory for the
        // child's life.
        drop(deliver);
        // The owed fsync of exec.start is done when the agent's first connection waits, before
        // it is served; a run that makes none (most) leaves it to exec.end's fsync. When it
        // fails the agent serves nothing (fail closed), and exec.end says why.
        let sync_failed: std::cell::Cell<Option<String>> = std::cell::Cell::new(None);
        let agent_stop = teardown.agent.clone();
        let owed_sync = || {
            if !d.start_owed {
                return true;
            }
            match b.sync_log() {
                Ok(()) => true,
                Err(e) => {
                    sync_failed.set(Some(format!(
                        "exec.start was written but its fsync failed ({}); the ssh agent served nothing",
                        e.message()
                    )));
                    if let Some(h) = &agent_stop {
                        h.stop();
                    }
                    false
                }
            }
        };
        let live = Live { cfg: &b.cfg, auth };
        // The agent's view of the run: the grant, judged again at every signature, and the
        // audit line of each one.
        let ended_now = || live.ended();
        let sign_audit = |pid: u32,
                          outcome: Outcome,
                          seen: &sshagent::policy::Seen,
                          why: Option<String>|
         -> Result<()> {
            let mut ev = self.event(EventKind::SshSign, outcome, auth);
            ev.argv = None;
            ev.pid = Some(pid);
            ev.error = why;
            ev.ssh = Some(crate::audit::SshSign {
                host: seen.host.clone(),
                host_key: seen.host_key.clone(),
                user: seen.user.clone(),
                forwarded: seen.forwarded,
            });
            b.append(&ev).map(|_| ())
        };
        let ctx = sshagent::Ctx {
            ended: &ended_now,
            audit: &sign_audit,
        };
        // One `http.request` line per request at tier medium and up; refusals at every tier.
        let per_request = !matches!(auth.tier(), crate::catalog::Tier::Low);
        let proxy_handle = teardown.proxy.clone();
        let http_audit = |r: httpproxy::Record| {
            if r.refused.is_none() && !per_request {
                return;
            }
            let outcome = if r.refused.is_some() {
                Outcome::Denied
            } else if r.cut.is_some() {
                Outcome::Error
            } else {
                Outcome::Ok
            };
            let phase = if r.before.is_some() {
                Some("start")
            } else if r.completes {
                Some("end")
            } else {
                None
            };
            let mut ev = self.event(EventKind::HttpRequest, outcome, auth);
            ev.argv = None;
            ev.error = r.refused.or(r.cut);
            ev.http = Some(crate::audit::HttpAudit {
                phase,
                method: r.method,
                path: r.path,
                status: r.status,
                bytes_up: Some(r.bytes_up),
                bytes_down: Some(r.bytes_down),
                ..Default::default()
            });
            // At tier high and up this fsyncs before it returns (as for ssh.sign).
            let written = b.append(&ev).map(|_| ());
            let failed = written.as_ref().err().map(|e| e.message().to_owned());
            // A start line's request waits for this answer; when it is the error, that
            // request gets a 503 saying why and the proxy stops itself once it is delivered.
            let told = match r.before {
                Some(ack) => ack.send(written).is_ok(),
                None => false,
            };
            if let Some(e) = failed {
                // Fail closed: a proxy whose requests cannot be recorded serves no more.
                tracing::warn!(error = %e, invocation = %self.invocation, "an http.request line could not be written; the http-proxy is stopped");
                if !told && let Some(h) = &proxy_handle {
                    h.stop();
                }
            }
        };
        let ended = std::thread::scope(|scope| {
            // The agent's threads start with its first connection (most runs make none):
            // until then `watch` polls the listener with the rest.
            let listening = ssh_agent.as_ref().and_then(sshagent::Prepared::poll_fd);
            let mut pending = ssh_agent;
            let mut start = || {
                if let Some(a) = pending.take()
                    && owed_sync()
                {
                    sshagent::serve(scope, a, &ctx);
                }
            };
            if listening.is_none() {
                start(); // no descriptor to poll (or no agent): serve at once
            }
            if let Some((p, _)) = http_proxy {
                httpproxy::serve(scope, p, &http_audit);
            }
            let agent = listening.map(|fd| (fd, &mut start as &mut dyn FnMut()));
            let ended = match sent {
                Ok(()) => watch(conn, self.peer, pinned, &mut teardown, &live, notes, agent),
                Err(e) => Watched::Lost(format!("the wrapper went away before delivery: {e}")),
            };
            // Stops the agent too, so its threads end and the scope can close.
            teardown.run();
            ended
        });
        if let Some(w) = sync_failed.take() {
            notes.push(w);
        }
        if let Some(w) = teardown.failure.take() {
            notes.push(w);
        }
        let proxied = teardown.proxy.take().map(|p| p.summary());
        Ok((ended, t0.elapsed(), proxied))
    }

    /// Stage 6, record the end: `exec.end` with the status the wrapper reported (or
    /// `wrapper-lost`) and what the teardown could not undo; the journal entry closes; the
    /// wrapper is told it is recorded.
    #[inline(never)] // see `run`: its frame is gone before the watch
    fn record_end(
        &self,
        conn: &mut Conn<UnixStream>,
        auth: &Authorized,
        program: String,
        ended: Watched,
        mut notes: Vec<String>,
        (duration, proxied): (Duration, Option<httpproxy::Summary>),
    ) -> Result<()> {
        let b = self.b;
        let mut end = self.event(EventKind::ExecEnd, Outcome::Ok, auth);
        end.program = Some(program);
        end.duration_ms = Some(duration.as_millis() as u64);
        end.http = proxied.map(|p| crate::audit::HttpAudit {
            requests: Some(p.requests),
            refused: Some(p.refused),
            bytes_up: Some(p.bytes_up),
            bytes_down: Some(p.bytes_down),
            ..Default::default()
        });
        match &ended {
            Watched::Reported { code, signal, pid } => {
                end.exit_code = *code;
                end.signal = *signal;
                if let Some(p) = pid {
                    end.pid = Some(*p);
                }
            }
            Watched::Lost(why) => {
                end.outcome = Outcome::WrapperLost;
                notes.insert(0, why.clone());
            }
        }
        if !notes.is_empty() {
            end.error = Some(notes.join("; "));
        }
        // Written before the wrapper is told it is recorded; for tier high and critical its
        // fsync follows the answer: nothing waits on an end line, so neither need the caller.
        let recorded = b.append_sync_later(&end);
        b.journal.remove(&self.invocation);
        let owed = recorded?;
        if matches!(ended, Watched::Reported { .. }) {
            // The agent learns what the teardown could not undo (it is in exec.end too).
            for n in notes.iter().filter(|n| n.contains("could not be revoked")) {
                let _ = conn.send(
                    &BrokerMsg::Progress {
                        message: format!("warning: {n}"),
                    },
                    &[],
                );
            }
            let _ = conn.send(&BrokerMsg::Recorded {}, &[]);
        }
        if owed && let Err(e) = b.sync_log() {
            tracing::warn!(error = %e.message(), invocation = %self.invocation, "exec.end is written but its fsync failed");
        }
        Ok(())
    }
}

/// Send the delivery with its descriptors, then close our copies of the memfds (the client
/// holds its own now). Not inlined: the encoding's stack is popped before the watch.
#[inline(never)]
fn send_delivery(
    conn: &Conn<UnixStream>,
    deliver: &BrokerMsg,
    fds: Vec<OwnedFd>,
) -> std::result::Result<(), ProtoError> {
    let fd_refs: Vec<&OwnedFd> = fds.iter().collect();
    conn.send(deliver, &fd_refs)
}

/// Whether the authorized capability may run this command, and as which program (path, argv[0]):
/// nesting, the client's resolution, a wrapped command's argv patterns, `allowed_commands`.
/// The one judgement of a command: the exec path runs it before fetching, and
/// `aap-exec --check CAP -- CMD` runs it alone, so the two never disagree.
pub(super) fn judge_command(
    cfg: &crate::config::Config,
    auth: &Authorized,
    r: &ExecRequest,
) -> Result<Judged> {
    if let Some(outer) = &r.nested
        && !auth.capability().allow_nested
    {
        return Err(Error::denied(format!(
            "aap-exec is already running this process tree (invocation {outer}); nesting `{}` inside it is refused",
            r.cap
        ))
        .hint(format!("run `aap-exec {} -- ...` from the agent's own shell, not from inside another aap-exec child", r.cap)));
    }
    let (program, arg0) = choose_program(cfg, auth, r)?;
    // An ssh agent with no known destination could sign for none: refused before anything is
    // fetched, so that `--check` says so too. What is read is the agent's policy for the run.
    let cap = auth.capability();
    let known = match &cap.backing {
        Backing::SshAgent { hosts, .. }
            if cap.inject.iter().any(|i| matches!(i, Inject::SshAgent)) =>
        {
            Some(sshagent::known_hosts_of(hosts, &known_hosts_files(cfg))?)
        }
        _ => None,
    };
    Ok((program, arg0, known))
}

/// The judged command: the program to run, its argv[0], and for an `ssh-agent` form the host
/// keys of its destinations (read once, when judged).
pub(super) type Judged = (String, String, Option<sshagent::KnownHosts>);

/// The `ssh_known_hosts` files: the system file when the config names none, never the agent's
/// `~/.ssh`.
fn known_hosts_files(cfg: &crate::config::Config) -> Vec<PathBuf> {
    if cfg.ssh_known_hosts.is_empty() {
        vec![PathBuf::from("/etc/ssh/ssh_known_hosts")]
    } else {
        cfg.ssh_known_hosts.clone()
    }
}

fn choose_program(
    cfg: &crate::config::Config,
    auth: &Authorized,
    r: &ExecRequest,
) -> Result<(String, String)> {
    if let Some(pe) = &r.program_error {
        let e = Error::new(Kind::from_exit_code(pe.code), pe.message.clone());
        return Err(match &pe.hint {
            Some(h) => e.hint(h.clone()),
            None => e,
        });
    }
    let resolved = PathBuf::from(&r.program);
    if !resolved.is_absolute() {
        return Err(Error::new(
            Kind::NotFound,
            format!(
                "the client resolved the command to {:?}, not an absolute path",
                r.program
            ),
        )
        .hint(
            "use aap-exec of the same release as the broker: aap-exec --version; aap --version",
        ));
    }
    let mut program = resolved;
    let args = &r.args;
    if let Backing::WrappedCommand {
        command: wanted,
        args: patterns,
        ..
    } = &auth.capability().backing
    {
        program = wrapped::check(&r.cap, wanted, patterns, &program, args)?;
    }
    let mut arg0 = r.argv.first().cloned().unwrap_or_default();
    if let Some(allowed) = &auth.capability().allowed_commands {
        let trusted = command::check_allowed(&r.cap, allowed, &program, &cfg.secure_path)?;
        if let Some(name) = trusted.file_name() {
            arg0 = name.to_string_lossy().into_owned();
        }
        program = trusted;
    }
    let shown = program.display().to_string();
    let program = program.into_os_string().into_string().map_err(|_| {
        Error::new(
            Kind::NotFound,
            format!("the program path {shown} is not UTF-8"),
        )
        .hint("install the program under a UTF-8 path")
    })?;
    Ok((program, arg0))
}

/// The capability's secret (or scoped token), fetched through the proof of authorization.
fn fetch(
    b: &Broker,
    auth: &Authorized,
    progress: &dyn Fn(&str),
) -> Result<(Teardown, Option<SecretBytes>)> {
    let mut t = Teardown {
        scoped: None,
        agent: None,
        proxy: None,
        failure: None,
    };
    if let Backing::InfisicalToken { identity, .. } = &auth.capability().backing {
        let client = b.infisical_client()?;
        let id = crate::source::Identity::named(&b.cfg, identity)?;
        // A fresh token, not the cache's: it is handed on and revoked at teardown.
        let token = client.login(&id)?;
        let value = SecretBytes::from_slice(token.expose());
        t.scoped = Some((client, token, identity.clone()));
        return Ok((t, Some(value)));
    }
    let Some(secret) = auth.capability().secret() else {
        return Ok((t, None));
    };
    let inf = b.cfg.infisical()?;
    let identity = crate::source::Identity::for_agent(&b.cfg, auth.agent())?;
    // The agent identity's token is cached in the shared client: one secret read per exec.
    let value = b
        .infisical_client()?
        .fetch(&identity, secret, &inf.environment, progress)?;
    Ok((t, Some(value)))
}

/// What the shape stage makes: the memfds to send and how the client uses each, the broker's
/// ssh agent and http-proxy for the run.
struct Shaped {
    fds: Vec<OwnedFd>,
    uses: Vec<FdUse>,
    agent: Option<sshagent::Prepared>,
    proxy: Option<(httpproxy::Prepared, ProxyForm)>,
}

/// How the child is pointed at its http-proxy.
struct ProxyForm {
    /// The variable the base URL goes in.
    var: String,
    /// Whether git's URLs for the host are rewritten to it (a Forgejo).
    git: bool,
}

fn shape(
    b: &Broker,
    auth: &Authorized,
    secret: Option<&SecretBytes>,
    agent_uid: u32,
    mut known: Option<sshagent::KnownHosts>,
) -> Result<Shaped> {
    let cfg = &b.cfg;
    let cap = auth.capability();
    let mut fds = Vec::new();
    let mut uses = Vec::new();
    let mut agent = None;
    let mut proxy = None;
    let need = |what: &str| {
        secret.ok_or_else(|| {
            Error::config(format!("capability `{}` injects {what} but has no secret", cap.id))
                .hint(format!(
                    "give the capability a secret in the catalog, then: aap catalog check; aap catalog show {}",
                    cap.id
                ))
        })
    };
    let memfd_named = |name: &std::ffi::CStr, s: &SecretBytes| {
        sys::sealed_memfd(name, s.expose()).map_err(|e| {
            Error::internal(format!("cannot create the memfd for `{}`: {e}", cap.id))
                .hint("memfd_create(2) needs Linux 3.17+; check seccomp filters")
        })
    };
    let memfd = |s: &SecretBytes| memfd_named(c"aap-secret", s);
    for inj in &cap.inject {
        match inj {
            Inject::Env { name } => {
                let s = need(name)?;
                if s.expose().contains(&0) {
                    return Err(Error::config(format!(
                        "the secret for `{}` contains a NUL byte, which an environment variable cannot hold",
                        cap.id
                    ))
                    .hint(format!("use the fd form for it in the catalog (inject: - type: fd, name: {name}_FILE)")));
                }
                fds.push(memfd(s)?);
                uses.push(FdUse::Env { name: name.clone() });
            }
            Inject::Fd { name } => {
                fds.push(memfd(need(name)?)?);
                uses.push(FdUse::Fd { name: name.clone() });
            }
            Inject::GitCredential => {
                let Backing::ForgejoPat { host, .. } = &cap.backing else {
                    return Err(Error::config(format!(
                        "capability `{}` injects git-credential, which needs a forgejo-pat backing",
                        cap.id
                    ))
                    .hint(format!("aap catalog show {}", cap.id)));
                };
                let s = need("git-credential")?;
                if !crate::exec::gitcred::token_is_sendable(s.expose()) {
                    return Err(Error::config(format!(
                        "the token for `{}` is empty or contains a line break or NUL, which the git credential protocol cannot carry",
                        cap.id
                    ))
                    .hint("store the token in Infisical as a single line without a trailing newline"));
                }
                // The helper reads only a memfd of this name (cmd/gitcredential.rs).
                fds.push(memfd_named(c"aap-git-token", s)?);
                uses.push(FdUse::GitCredential { host: host.clone() });
            }
            Inject::HttpProxy(form) => {
                // Forgejo: the backing's host, git pointed at it; a secret: the inject's host.
                let (host, git) = match (&cap.backing, &form.host) {
                    (Backing::ForgejoPat { host, .. }, _) => (host, true),
                    (Backing::Secret { .. }, Some(host)) => (host, false),
                    _ => {
                        return Err(Error::config(format!(
                            "capability `{}` injects http-proxy, which needs a forgejo-pat backing or a secret backing with the inject's host",
                            cap.id
                        ))
                        .hint(format!("aap catalog check; aap catalog show {}", cap.id)));
                    }
                };
                if proxy.is_some() {
                    continue; // listed twice: one proxy
                }
                let credential = match &form.header {
                    Some(name) => httpproxy::Credential::Header {
                        name,
                        scheme: form.scheme.as_deref(),
                    },
                    None => httpproxy::Credential::ForgejoBasic,
                };
                // No descriptor and no token for aap-exec: the broker keeps it.
                proxy = Some((
                    httpproxy::prepare(&httpproxy::Spec {
                        cap_id: &cap.id,
                        host,
                        access: cap.access.unwrap_or_default(),
                        token: need("http-proxy")?,
                        credential,
                        agent_uid,
                        ca_bundle: cfg.infisical.as_ref().and_then(|i| i.ca_bundle.as_deref()),
                        audit_first: auth.tier() >= crate::catalog::Tier::High,
                    })?,
                    ProxyForm {
                        var: form.url_var().to_owned(),
                        git,
                    },
                ));
            }
            Inject::SshAgent => {
                let Backing::SshAgent {
                    key_lifetime,
                    hosts,
                    allow_forwarding,
                    ..
                } = &cap.backing
                else {
                    return Err(Error::config(format!(
                        "capability `{}` injects ssh-agent but its backing is {}",
                        cap.id,
                        cap.backing.type_name()
                    ))
                    .hint(format!("aap catalog show {}", cap.id)));
                };
                if agent.is_some() {
                    continue; // listed twice: one agent
                }
                let s = need("ssh-agent")?;
                let lifetime = Duration::from_secs(key_lifetime.secs()).min(auth.remaining());
                // Read when the command was judged; read here only if it was not.
                let known = match known.take() {
                    Some(k) => k,
                    None => sshagent::known_hosts_of(hosts, &known_hosts_files(cfg))?,
                };
                agent = Some(sshagent::prepare(sshagent::Spec {
                    cap_id: &cap.id,
                    pem: s,
                    hosts,
                    allow_forwarding: *allow_forwarding,
                    known,
                    lifetime,
                    agent_uid,
                })?);
            }
        }
    }
    Ok(Shaped {
        fds,
        uses,
        agent,
        proxy,
    })
}

/// How long `aap-exec` has to make the agent socket and send it.
const AGENT_SOCKET_DEADLINE: Duration = Duration::from_secs(5);

fn agent_socket_lost(e: ProtoError) -> Error {
    Error::unavailable(format!("aap-exec did not send the ssh agent socket: {e}")).hint(
        "run the command again; if it repeats, install aap and aap-exec of the same release as the broker",
    )
}

/// Ask `aap-exec` for the socket of the broker's ssh agent: it makes a 0700 directory of its
/// own, as the agent's uid, and listens there.
fn ask_agent_socket(conn: &Conn<UnixStream>) -> Result<()> {
    conn.send(&BrokerMsg::AgentSocket {}, &[])
        .map_err(agent_socket_lost)
}

/// Take the listening socket `aap-exec` sent in answer to [`ask_agent_socket`] (asked for
/// whenever the capability injects `ssh-agent`, the only case with a [`sshagent::Prepared`]).
fn take_agent_socket(conn: &mut Conn<UnixStream>, a: &mut sshagent::Prepared) -> Result<()> {
    let lost = agent_socket_lost;
    let body = conn
        .recv_by(Instant::now() + AGENT_SOCKET_DEADLINE)
        .map_err(lost)?;
    let refused = |why: String| {
        Error::denied(format!(
            "the ssh agent socket aap-exec sent is refused: {why}"
        ))
        .hint("install aap and aap-exec of the same release as the broker (aap-exec --version; aap --version)")
    };
    let path = match crate::proto::decode::<ClientMsg>(&body) {
        Ok(ClientMsg::AgentSocket { path }) => path,
        Ok(_) => return Err(refused("aap-exec answered with another message".into())),
        Err(e) => return Err(refused(e.to_string())),
    };
    let mut fds = conn.take_fds(1).map_err(|e| refused(e.to_string()))?;
    let Some(fd) = fds.pop() else {
        return Err(refused("no descriptor came with it".into()));
    };
    a.adopt(fd, &path)
}

/// Variables the child must never inherit from the caller: every variable the catalog
/// injects anywhere, the Infisical identity variables, and the config's `secret_env`.
fn strip_list(cfg: &crate::config::Config, catalog: &crate::catalog::Catalog) -> Vec<String> {
    let mut out: Vec<String> = [
        "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID",
        "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET",
        "INFISICAL_TOKEN",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for cap in catalog.capabilities() {
        for inj in &cap.inject {
            if let Some(n) = inj.var_name() {
                out.push(n.to_owned());
            }
        }
    }
    out.extend(cfg.secret_env.iter().cloned());
    out.sort();
    out.dedup();
    out
}

enum Watched {
    Reported {
        code: Option<i32>,
        signal: Option<i32>,
        pid: Option<u32>,
    },
    Lost(String),
}

/// What a running exec is still judged against: its grant.
struct Live<'a> {
    cfg: &'a crate::config::Config,
    auth: &'a Authorized,
}

impl Live<'_> {
    /// Why the run's grant no longer holds, if it does not: revoked or expired.
    fn ended(&self) -> Option<String> {
        if SystemTime::now() >= self.auth.expires_at() {
            return Some(format!(
                "the grant expired at {} while the child ran",
                self.auth.expires_at_rfc3339()
            ));
        }
        let st = crate::state::StateDir::of(self.cfg);
        match st.is_revoked(&self.auth.session()) {
            Ok(false) => None,
            Ok(true) => Some(format!(
                "session {} was revoked while the child ran",
                self.auth.session()
            )),
            Err(e) => Some(format!(
                "cannot tell whether session {} is revoked ({e})",
                self.auth.session()
            )),
        }
    }
}

/// How long after delivery the wrapper has to report the child it started. A wrapper that is
/// stopped (or lies) before it does gets its run torn down: the broker cannot watch a child it
/// was never told about.
const STARTED_DEADLINE: Duration = Duration::from_secs(5);
/// How often a run holding something revocable (a scoped token) re-checks its grant.
const RECHECK: Duration = Duration::from_secs(1);
/// Until the child is known, how often the broker looks for it among the wrapper's children
/// itself (a stopped or lying wrapper never reports it).
const FIND_CHILD: Duration = Duration::from_millis(100);

/// How long a run lasts before its connection thread gives back the pages of stack that the
/// fetch and the delivery touched and that the watch no longer uses. A thread holds its run for
/// the child's whole life; without this each held run keeps ~20 KiB of dead stack resident
/// (1,000 held runs: ~20 MiB). Short runs never pay the system call.
const TRIM_AFTER: Duration = Duration::from_millis(50);

/// The wrapper's children, from the kernel (`/proc/PID/task/PID/children`).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Wait for the first of: the wrapper's end report, the connection closing, the child exiting.
/// When the child exits first, tear down at once, then give the wrapper a moment to report
/// the status.
fn watch(
    conn: &mut Conn<UnixStream>,
    peer: PeerCred,
    peer_fd: Option<&OwnedFd>,
    teardown: &mut Teardown,
    live: &Live<'_>,
    notes: &mut Vec<String>,
    // The ssh agent's listener, and what starts serving it once a connection waits.
    mut agent: Option<(OwnedFd, &mut dyn FnMut())>,
) -> Watched {
    let _ = conn.sock().set_read_timeout(Some(Duration::from_secs(5)));
    let mut child: Option<(u32, OwnedFd)> = None;
    let mut child_gone_at: Option<Instant> = None;
    let delivered = Instant::now();
    let mut trimmed = false;
    loop {
        // Only a run that still holds something revocable needs the clock.
        if teardown.holds() && child_gone_at.is_none() {
            if child.is_none() {
                // Do not wait to be told: find the child among the wrapper's own children.
                child = children_of(peer.pid)
                    .into_iter()
                    .find_map(|pid| pin_child(pid, peer).ok().map(|fd| (pid, fd)));
            }
            if child.is_none() && delivered.elapsed() >= STARTED_DEADLINE {
                notes.push(format!(
                    "the wrapper did not report the child's start within {} s; the run was torn down",
                    STARTED_DEADLINE.as_secs()
                ));
                teardown.run();
            } else if let Some(why) = live.ended() {
                notes.push(format!("{why}; the run was torn down"));
                teardown.run();
            }
        }
        if !conn.has_buffered() {
            let timeout = match child_gone_at {
                Some(t) => {
                    let left = REPORT_GRACE.saturating_sub(t.elapsed());
                    if left.is_zero() {
                        return Watched::Lost(
                            "the child exited and the wrapper did not report its status".into(),
                        );
                    }
                    left.as_millis() as i32
                }
                None if teardown.holds() && child.is_none() => FIND_CHILD.as_millis() as i32,
                None if teardown.holds() => RECHECK.as_millis() as i32,
                None => -1,
            };
            // The connection, the wrapper process itself (its pidfd: a wrapper that handed its
            // end of the socket to another process and exited is gone all the same), and the
            // child.
            let mut fds = vec![conn.sock().as_fd()];
            let mut watched_child = false;
            if child_gone_at.is_none() {
                if let Some(p) = peer_fd {
                    fds.push(p.as_fd());
                }
                if let Some((_, pidfd)) = &child {
                    fds.push(pidfd.as_fd());
                    watched_child = true;
                }
            }
            let child_at = watched_child.then(|| fds.len() - 1);
            let agent_at = match &agent {
                Some((fd, _)) if child_gone_at.is_none() => {
                    fds.push(fd.as_fd());
                    Some(fds.len() - 1)
                }
                _ => None,
            };
            // A run that outlives a moment gives back the stack its fetch used (see
            // `TRIM_AFTER`): wake once for that.
            let timeout = if trimmed {
                timeout
            } else {
                let left = TRIM_AFTER.saturating_sub(delivered.elapsed()).as_millis() as i32;
                if timeout < 0 { left } else { timeout.min(left) }
            };
            match sys::wait_readable(&fds, timeout) {
                Ok(Ready::Fd(0)) => {}
                Ok(Ready::Fd(i)) if Some(i) == agent_at => {
                    if let Some((_, start)) = agent.take() {
                        start();
                    }
                    continue;
                }
                Ok(Ready::Fd(i)) => {
                    // The child (or the wrapper) is gone: revoke and close now, whatever the
                    // wrapper does; then a moment for its report.
                    if Some(i) != child_at {
                        tracing::debug!(pid = peer.pid, "the wrapper process exited");
                    }
                    child_gone_at = Some(Instant::now());
                    teardown.run();
                    continue;
                }
                Ok(Ready::Timeout) => {
                    if !trimmed && delivered.elapsed() >= TRIM_AFTER {
                        trimmed = true;
                        if let Err(e) = sys::release_stack_below_here() {
                            tracing::debug!(error = %e, "cannot release the thread's unused stack");
                        }
                    }
                    continue;
                }
                Err(e) => return Watched::Lost(format!("cannot watch the run: {e}")),
            }
        }
        match conn.recv::<ClientMsg>() {
            Ok(ClientMsg::Started { pid }) => match &child {
                // Found already among the wrapper's children (or reported twice).
                Some((known, _)) if *known == pid => {}
                Some((known, _)) => {
                    tracing::warn!(
                        pid,
                        known,
                        "the wrapper reported another child; keeping ours"
                    )
                }
                None => match pin_child(pid, peer) {
                    Ok(fd) => child = Some((pid, fd)),
                    Err(why) => {
                        tracing::warn!(pid, peer = peer.pid, "reported child not accepted: {why}")
                    }
                },
            },
            Ok(ClientMsg::Ended { code, signal }) => {
                return Watched::Reported {
                    code,
                    signal,
                    pid: child.as_ref().map(|(p, _)| *p),
                };
            }
            Ok(_) => {
                return Watched::Lost("the wrapper sent a message out of order".into());
            }
            Err(ProtoError::Closed) => {
                return Watched::Lost(
                    "the wrapper's connection closed before it reported how the child ended".into(),
                );
            }
            Err(e) => return Watched::Lost(format!("the wrapper's report was unreadable: {e}")),
        }
    }
}

/// A pidfd for the child the wrapper reported, once it is shown to be the wrapper's own child
/// running as the wrapper's uid (else a wrapper could name any process of its uid, or none).
fn pin_child(pid: u32, peer: PeerCred) -> std::result::Result<OwnedFd, String> {
    let fd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ppid: Option<u32> = after.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    if ppid != Some(peer.pid) {
        return Err(format!(
            "its parent is {ppid:?}, not the wrapper {}",
            peer.pid
        ));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let uid: Option<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|s| s.parse().ok());
    if uid != Some(peer.uid) {
        return Err(format!("it runs as uid {uid:?}, not {}", peer.uid));
    }
    Ok(fd)
}
