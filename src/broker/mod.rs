//! `aap broker`: the service that decides, fetches, records and tears down, as its own user.
//!
//! `aap-exec` (the agent's uid) is only its client. The broker knows each caller from the kernel
//! (`SO_PEERCRED`, pinned with a pidfd), maps the uid to at most one agent
//! (`agents.<name>.uid`), and holds everything the agent must not: the Infisical identities,
//! the grants and catalog it reads, the audit log it alone writes.
//!
//! One thread per connection, each with a small stack, taken from a few that wait in `accept`;
//! at most `broker.max_connections_per_uid` connections per uid, and a client that has not sent its
//! whole first request within `broker.first_frame_timeout` (default 5 s) is dropped. A hostile
//! client gets an error and the broker keeps serving everyone else. docs/broker.md has the
//! protocol and the limits.

#![forbid(unsafe_code)]

mod exec;
pub mod httpproxy;
pub mod journal;
pub mod sshagent;

use crate::audit::Log;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Kind, Result, quote_path};
use crate::proto::{BrokerMsg, ClientMsg, Conn, ProtoError, VERSION};
use crate::sys::PeerCred;
use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
/// Stack of each connection thread (virtual; only touched pages cost memory). The catalog
/// compile and the TLS handshake of an unoptimized build need more than 256 KiB.
const CONN_STACK: usize = 2 * 1024 * 1024;
/// Connection threads kept waiting in `accept` when the broker is idle.
const IDLE_THREADS: usize = 4;

/// The listening socket and how many connection threads wait on it.
struct Pool {
    listener: UnixListener,
    idle: Mutex<usize>,
}

pub struct Broker {
    cfg: Config,
    log: Mutex<Log>,
    catalog: Mutex<Option<(CatalogStamp, Arc<Catalog>)>>,
    conns: Mutex<HashMap<u32, u32>>,
    journal: journal::Journal,
    /// One Infisical client for every exec: its pool and its cached tokens (one per identity).
    infisical: Option<Arc<crate::source::Client>>,
}

/// What identifies one version of the catalog file without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct CatalogStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_ns: i64,
}

/// `aap broker [--socket PATH]`: serve until killed.
pub fn main(socket: Option<PathBuf>) -> Result<u8> {
    // First, while this process has one thread: listen_fd removes LISTEN_* from the
    // environment, which is only sound before any other thread exists (an HTTP client may
    // start some).
    let activated = crate::sys::listen_fd().map_err(|e| {
        Error::config(format!("cannot use the socket systemd passed: {e}"))
            .hint("check the unit: systemctl cat aap-broker.socket")
    })?;
    // Also before any thread: every thread inherits the blocked stop signals.
    let stop = crate::sys::SignalWatch::install_stop().map_err(|e| {
        Error::internal(format!("cannot block the stop signals: {e}"))
            .hint("check that signalfd(2) is allowed here (seccomp)")
    })?;
    let cfg = Config::load()?;
    let broker = Arc::new(Broker::new(cfg)?);
    let listener = match activated {
        Some(l) => {
            eprintln!("aap broker: listening on the socket systemd passed (socket activation)");
            l
        }
        None => {
            let path = socket.unwrap_or_else(|| broker.cfg.broker.socket.value.clone());
            let l = bind(&path)?;
            eprintln!("aap broker: listening on {}", path.display());
            l
        }
    };
    broker.serve(listener, &stop)
}

/// Listen on `path`: its directory is created when missing; a stale socket nobody answers on is
/// replaced, a live one (another broker) is an error. Anyone may connect: the kernel tells us
/// who they are, and unknown uids are refused per request.
fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && std::fs::symlink_metadata(dir).is_err()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::config(format!("cannot create {}: {e}", dir.display()))
                .hint(format!("install -d -m 0755 {}", quote_path(dir)))
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(Error::config(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ))
            .hint(format!(
                "move it away or choose another broker.socket: ls -l {}",
                quote_path(path)
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::config(format!(
                "another broker is already listening on {}",
                path.display()
            ))
            .hint(format!(
                "stop it first: systemctl stop aap-broker.socket aap-broker (see what listens with fuser -v {p}), or give this broker another path with --socket",
                p = quote_path(path)
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| {
        Error::config(format!("cannot listen on {}: {e}", path.display())).hint(format!(
            "check the directory and its owner: ls -ld {}",
            quote_path(path.parent().unwrap_or(Path::new("/")))
        ))
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    Ok(l)
}

impl Broker {
    /// The shared Infisical client, or the config's error when it has no `infisical:` section.
    fn infisical_client(&self) -> Result<Arc<crate::source::Client>> {
        match &self.infisical {
            Some(c) => Ok(c.clone()),
            None => self
                .cfg
                .infisical()
                .and_then(|inf| Ok(Arc::new(crate::source::Client::new(inf)?))),
        }
    }

    pub fn new(cfg: Config) -> Result<Broker> {
        crate::sys::harden_process().map_err(|e| {
            Error::internal(format!("cannot harden the broker process: {e}"))
                .hint("check that prctl(2) and setrlimit(2) are allowed here")
        })?;
        check_limits(&cfg)?;
        check_agents(&cfg)?;
        check_identities(&cfg)?;
        let mut log = Log::open(&cfg.audit_log.value)?;
        let journal = journal::Journal::open(&cfg.state_dir.value);
        let recovered = journal.recover(&mut log)?;
        if recovered > 0 {
            eprintln!(
                "aap broker: recorded exec.end (outcome unknown) for {recovered} run(s) the previous broker never saw end"
            );
        }
        let infisical = match &cfg.infisical {
            Some(inf) => Some(Arc::new(crate::source::Client::new(inf)?)),
            None => None,
        };
        Ok(Broker {
            cfg,
            log: Mutex::new(log),
            catalog: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            journal,
            infisical,
        })
    }

    /// Serve until killed. Connection threads accept for themselves (the kernel hands each
    /// connection to one waiting thread: no hand-off between threads on the way in), and a
    /// thread that has finished a connection goes back to accepting. A thread that takes a
    /// connection when no other is waiting starts one more first, so a long run (every exec
    /// holds its thread while the child lives) never delays the next caller; beyond
    /// [`IDLE_THREADS`] waiting threads, a finished one exits.
    ///
    /// The first thread waits for SIGTERM, SIGINT or SIGHUP, then revokes the access tokens
    /// the broker holds for agent identities (so none outlives the broker) and exits 0. Runs
    /// still open end with the process: their children keep running, and the next broker
    /// records their `exec.end` (outcome `unknown`) from the journal.
    fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        stop: &crate::sys::SignalWatch,
    ) -> Result<u8> {
        let pool = Arc::new(Pool {
            listener,
            idle: Mutex::new(0),
        });
        for _ in 0..IDLE_THREADS {
            Arc::clone(&self).start_worker(&pool);
        }
        let signo = loop {
            match stop.next(-1) {
                Ok(Some(c)) => break c.signo,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stop signals");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        eprintln!(
            "aap broker: stopping (signal {signo}); revoking the Infisical access tokens it holds"
        );
        if let Some(client) = &self.infisical
            && let Err(e) = client.revoke_cached()
        {
            eprintln!(
                "aap broker: warning: {}; such a token stays valid until it expires",
                e.message()
            );
        }
        Ok(0)
    }

    fn start_worker(self: Arc<Self>, pool: &Arc<Pool>) {
        let pool = Arc::clone(pool);
        *pool.idle.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let spawned = std::thread::Builder::new()
            .name("aap-conn".into())
            .stack_size(CONN_STACK)
            .spawn({
                let pool = Arc::clone(&pool);
                move || self.worker(&pool)
            });
        if let Err(e) = spawned {
            *pool.idle.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }

    /// One connection thread: accept, serve, and go back to accepting while few others wait.
    fn worker(self: Arc<Self>, pool: &Arc<Pool>) {
        loop {
            let stream = match pool.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // EMFILE and friends: do not spin.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let last = {
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                *idle -= 1;
                *idle == 0
            };
            if last {
                Arc::clone(&self).start_worker(pool);
            }
            self.connection(stream);
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if *idle >= IDLE_THREADS {
                return;
            }
            *idle += 1;
        }
    }

    /// The catalog, re-read only when the file changed.
    fn catalog(&self) -> Result<Arc<Catalog>> {
        use std::os::unix::fs::MetadataExt;
        let path = &self.cfg.catalog.value;
        let stamp = std::fs::metadata(path).ok().map(|m| CatalogStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
        });
        let mut cached = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(s), Some((have, cat))) = (stamp, cached.as_ref())
            && s == *have
        {
            return Ok(Arc::clone(cat));
        }
        let cat = Arc::new(Catalog::load_cached(path, &self.cfg.state_dir.value)?);
        if let Some(s) = stamp {
            *cached = Some((s, Arc::clone(&cat)));
        }
        Ok(cat)
    }

    fn append(&self, ev: &crate::audit::Event) -> Result<crate::audit::Appended> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(ev)
    }

    /// Append without waiting for the disk; whether an fsync is owed ([`Broker::sync_log`]).
    fn append_sync_later(&self, ev: &crate::audit::Event) -> Result<bool> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append_sync_later(ev)
            .map(|(_, owed)| owed)
    }

    /// fsync the audit log: what [`Broker::append_sync_later`] left owed. Not under the log's
    /// lock: the next run's append does not wait for this disk flush (its own fsync, if its
    /// tier needs one, does).
    fn sync_log(&self) -> Result<()> {
        let (file, path) = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_handle()?;
        crate::audit::Log::sync_file(&file, &path)
    }

    /// Take one of `uid`'s connection slots; `None` when it holds the maximum already.
    fn take_slot(&self, uid: u32) -> Option<Slot<'_>> {
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_insert(0);
        if *n >= self.cfg.broker.max_connections_per_uid {
            tracing::debug!(uid, open = *n, "connection slot refused");
            return None;
        }
        *n += 1;
        tracing::debug!(uid, open = *n, "connection slot taken");
        Some(Slot { broker: self, uid })
    }

    fn connection(&self, stream: UnixStream) {
        let peer = match crate::sys::peer_cred(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer's credentials; dropped");
                return;
            }
        };
        let mut conn = Conn::new(stream);
        let Some(_slot) = self.take_slot(peer.uid) else {
            let e = Error::unavailable(format!(
                "uid {} already has {} connections open to the broker",
                peer.uid, self.cfg.broker.max_connections_per_uid
            ))
            .hint("wait for some of its aap-exec runs to end, or raise broker.max_connections_per_uid in the config");
            let _ = send_error(&conn, &e);
            return;
        };
        // Pin the peer: its pid names this process, not a later one with the same number.
        let pinned = crate::sys::pidfd_open(peer.pid).ok();
        let timeout = self.cfg.broker.first_frame_timeout;
        let deadline = Instant::now() + Duration::from_secs(timeout.secs());
        let _ = conn
            .sock()
            .set_read_timeout(Some(Duration::from_secs(timeout.secs())));
        let body = match conn.recv_by(deadline) {
            Ok(b) => b,
            Err(ProtoError::Closed) => return,
            Err(ProtoError::Deadline) => {
                tracing::info!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "no request in time; dropped"
                );
                let _ = send_error(
                    &conn,
                    &Error::unavailable(format!(
                        "no whole request within {timeout} of connecting; the broker closed the connection"
                    ))
                    .hint("use aap-exec, which sends its request at once; the limit is broker.first_frame_timeout in the config"),
                );
                return;
            }
            Err(e) => {
                tracing::info!(uid = peer.uid, pid = peer.pid, error = %e, "bad first message");
                let _ = send_error(&conn, &unreadable(&e));
                return;
            }
        };
        let msg = match crate::proto::decode::<ClientMsg>(&body) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(uid = peer.uid, pid = peer.pid, error = %e, "bad first message");
                let err = match crate::proto::claimed_version(&body) {
                    Some(v) if v != u64::from(VERSION) => version_mismatch(v),
                    _ => unreadable(&e),
                };
                let _ = send_error(&conn, &err);
                return;
            }
        };
        // Clients send no descriptors; any that came are closed now, not held for the run.
        if let Err(ProtoError::Fds { got, .. }) = conn.take_fds(0) {
            let _ = send_error(
                &conn,
                &Error::config(format!(
                    "the request came with {got} descriptor(s); the broker accepts none from clients"
                ))
                .hint("use aap-exec of the same release as the broker: aap-exec --version; aap --version"),
            );
            return;
        }
        if let Err(e) = self.dispatch(&mut conn, peer, pinned, msg) {
            let _ = send_error(&conn, &e);
        }
    }

    fn dispatch(
        &self,
        conn: &mut Conn<UnixStream>,
        peer: PeerCred,
        pinned: Option<std::os::fd::OwnedFd>,
        msg: ClientMsg,
    ) -> Result<()> {
        let hello = match &msg {
            ClientMsg::Exec { hello, .. }
            | ClientMsg::Check { hello, .. }
            | ClientMsg::List { hello, .. }
            | ClientMsg::RunAs { hello }
            | ClientMsg::Request { hello, .. }
            | ClientMsg::RequestWait { hello, .. } => hello,
            ClientMsg::Started { .. }
            | ClientMsg::Ended { .. }
            | ClientMsg::AgentSocket { .. }
            | ClientMsg::Stdio { .. }
            | ClientMsg::Continued { .. }
            | ClientMsg::Signal { .. } => {
                return Err(Error::config(
                    "the first message to the broker must be a request, not a report",
                )
                .hint("send requests through aap-exec of the same release as the broker: aap-exec --version; aap --version"));
            }
        };
        if hello.version != VERSION {
            return Err(version_mismatch(u64::from(hello.version)));
        }
        // Not an agent's request: whoever may connect may ask (doctor runs as the operator).
        if let ClientMsg::RunAs { .. } = msg {
            return self.run_as_report(conn);
        }
        let agent = match self.agent_of(peer) {
            Ok(a) => a,
            Err(e) => {
                let mut ev = crate::audit::Event::new(
                    crate::audit::EventKind::Deny,
                    crate::audit::Outcome::Denied,
                );
                ev.uid = peer.uid;
                ev.pid = Some(peer.pid);
                if let ClientMsg::Exec { cap, .. }
                | ClientMsg::Check { cap, .. }
                | ClientMsg::Request { cap, .. } = &msg
                {
                    ev.capability = Some(cap.chars().take(128).collect());
                }
                ev.error = Some(e.message().to_owned());
                self.append(&ev)?;
                return Err(e);
            }
        };
        match msg {
            ClientMsg::Exec {
                cap,
                session,
                reason,
                argv,
                program,
                program_error,
                cwd,
                nested,
                ..
            } => {
                let req = exec::ExecRequest::new(
                    cap,
                    session,
                    reason,
                    argv,
                    program,
                    program_error,
                    cwd,
                    nested,
                );
                exec::run(self, conn, peer, pinned, &agent, req)
            }
            ClientMsg::Check {
                cap,
                session,
                command,
                ..
            } => {
                let caller = self.caller(peer, &agent);
                let mut out = String::new();
                let auth = crate::cmd::session::check_to(&caller, session.clone(), &cap, &mut out)?;
                if let Some(c) = command {
                    let req = exec::ExecRequest::new(
                        cap,
                        session,
                        None,
                        c.argv,
                        c.program,
                        c.program_error,
                        c.cwd,
                        c.nested,
                    );
                    let (program, arg0, _) = exec::judge_command(&self.cfg, &auth, &req)?;
                    use std::fmt::Write;
                    let _ = writeln!(
                        out,
                        "allowed: {} would run {program} (argv[0] {arg0:?})",
                        crate::cmd::audit::argv_text(&req.argv)
                    );
                }
                send_done(conn, 0, out)
            }
            ClientMsg::List { session, json, .. } => {
                let caller = self.caller(peer, &agent);
                let mut out = String::new();
                let code = crate::cmd::session::list_to(&caller, session, json, &mut out)?;
                send_done(conn, code, out)
            }
            ClientMsg::Request {
                cap,
                session,
                reason,
                wait,
                timeout_secs,
                ..
            } => {
                let caller = self.caller(peer, &agent);
                let mut out = String::new();
                let rid = crate::cmd::request::request_to(
                    &caller, &self.log, &cap, &reason, session, wait, &mut out,
                )?;
                match rid {
                    Some(rid) if wait => {
                        conn.send(&BrokerMsg::Notice { text: out }, &[])
                            .map_err(|e| lost(&e))?;
                        self.wait_request(conn, &caller, &rid, timeout_secs)
                    }
                    _ => send_done(conn, 0, out),
                }
            }
            ClientMsg::RequestWait {
                request,
                timeout_secs,
                ..
            } => {
                let caller = self.caller(peer, &agent);
                let rid = crate::id::RequestId::parse(&request).map_err(|e| {
                    Error::denied(format!("request id {e}"))
                        .hint("use the 26-character id that `aap request` printed on its `request ... pending` line, with aap request --wait-on")
                })?;
                self.wait_request(conn, &caller, &rid, timeout_secs)
            }
            ClientMsg::RunAs { .. } => self.run_as_report(conn),
            ClientMsg::Started { .. }
            | ClientMsg::Ended { .. }
            | ClientMsg::AgentSocket { .. }
            | ClientMsg::Stdio { .. }
            | ClientMsg::Continued { .. }
            | ClientMsg::Signal { .. } => Ok(()),
        }
    }

    /// Answer a waiting client: `Pending` about once a second while the request is pending,
    /// then the verdict. Polls the state dir (two small reads per 200 ms). A client that went
    /// away ends the wait (the next heartbeat fails).
    fn wait_request(
        &self,
        conn: &mut Conn<UnixStream>,
        caller: &crate::cmd::session::Caller<'_>,
        rid: &crate::id::RequestId,
        timeout_secs: Option<u64>,
    ) -> Result<()> {
        use crate::cmd::request::{WaitState, wait_state};
        let started = Instant::now();
        let _ = conn.sock().set_write_timeout(Some(Duration::from_secs(10)));
        let mut last_beat: Option<Instant> = None;
        loop {
            match wait_state(caller, rid)? {
                WaitState::Approved(line) => return send_done(conn, 0, format!("{line}\n")),
                WaitState::Pending { expires_at } => {
                    let now_s = crate::timefmt::unix_secs(std::time::SystemTime::now());
                    let to_expiry = u64::try_from(expires_at - now_s).unwrap_or(0);
                    let waited = started.elapsed().as_secs();
                    let left = match timeout_secs {
                        Some(t) if t <= waited => {
                            return Err(Error::timeout(format!(
                                "request {rid} is still pending after {}; the operator has not answered",
                                crate::duration::Dur::from_secs(t)
                            ))
                            .hint(format!("wait again: aap request --wait-on {rid}")));
                        }
                        Some(t) => (t - waited).min(to_expiry),
                        None => to_expiry,
                    };
                    if last_beat.is_none_or(|b| b.elapsed() >= Duration::from_secs(1)) {
                        let beat = BrokerMsg::Pending {
                            request: rid.to_string(),
                            left_secs: left,
                        };
                        if conn.send(&beat, &[]).is_err() {
                            return Ok(());
                        }
                        last_beat = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn caller<'a>(&'a self, peer: PeerCred, agent: &'a str) -> crate::cmd::session::Caller<'a> {
        crate::cmd::session::Caller {
            cfg: &self.cfg,
            agent: Some(agent),
            uid: peer.uid,
            catalog: None,
        }
    }

    /// The agent that `peer`'s uid is, from the config alone.
    fn agent_of(&self, peer: PeerCred) -> Result<String> {
        match self.cfg.agent_for_uid(peer.uid) {
            Some(a) => Ok(a.to_owned()),
            None => Err(Error::denied(format!(
                "uid {} is not an agent: no `agents.<name>.uid: {}` in {}",
                peer.uid,
                peer.uid,
                self.cfg.describe_file()
            ))
            .hint(format!(
                "the operator adds `uid: {}` under the agent's entry in {}, then restarts the broker (systemctl restart aap-broker)",
                peer.uid,
                self.cfg.describe_file()
            ))),
        }
    }
}

struct Slot<'a> {
    broker: &'a Broker,
    uid: u32,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut m = self.broker.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            tracing::debug!(uid = self.uid, open = *n, "connection slot freed");
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// A request of another protocol version than ours.
fn version_mismatch(theirs: u64) -> Error {
    Error::config(format!(
        "aap-exec speaks broker protocol {theirs}, this broker speaks {VERSION}"
    ))
    .hint("install aap and aap-exec of the same release, then restart the broker")
}

/// A first message that is not a request of ours (garbage, too large, unknown fields).
fn unreadable(e: &ProtoError) -> Error {
    Error::config(format!("the broker could not read the request: {e}"))
        .hint("use aap-exec of the same version as the broker: aap-exec --version; aap --version")
}

fn send_error(conn: &Conn<UnixStream>, e: &Error) -> std::result::Result<(), ProtoError> {
    conn.send(
        &BrokerMsg::Error {
            code: e.exit_code(),
            message: e.message().to_owned(),
            hint: e.hint_text().map(str::to_owned),
        },
        &[],
    )
}

impl Broker {
    /// The answer to [`ClientMsg::RunAs`]: for each wrapped-command capability, whether this
    /// process can start it as its `run_as` user (the very check a use makes first).
    fn run_as_report(&self, conn: &mut Conn<UnixStream>) -> Result<()> {
        let catalog = self.catalog()?;
        let checks: Vec<crate::proto::RunAsCheck> = catalog
            .capabilities()
            .iter()
            .filter_map(|cap| {
                let crate::catalog::Backing::WrappedCommand { run_as, .. } = &cap.backing else {
                    return None;
                };
                let shown = run_as
                    .clone()
                    .unwrap_or_else(|| format!("uid {}", crate::sys::euid()));
                let error = exec::run_as_user(&cap.id, &cap.backing)
                    .err()
                    .map(|e| (e.message().to_owned(), e.hint_text().map(str::to_owned)));
                Some(crate::proto::RunAsCheck {
                    cap: cap.id.clone(),
                    run_as: shown,
                    error,
                })
            })
            .collect();
        let out = serde_json::to_string(&checks).map_err(|e| {
            Error::internal(format!("cannot encode the run_as checks: {e}"))
                .hint("report it: aap --version")
        })?;
        send_done(conn, 0, out)
    }
}

fn send_done(conn: &Conn<UnixStream>, code: u8, stdout: String) -> Result<()> {
    conn.send(&BrokerMsg::Done { code, stdout }, &[])
        .map_err(|e| lost(&e))
}

/// The client went away mid-answer.
fn lost(e: &ProtoError) -> Error {
    Error::new(Kind::Unavailable, format!("the client went away: {e}"))
        .hint("run the command again")
}

/// The broker's own limits, in range.
fn check_limits(cfg: &Config) -> Result<()> {
    use crate::config::MAX_FIRST_FRAME_TIMEOUT;
    let t = cfg.broker.first_frame_timeout;
    if t.secs() == 0 || t > MAX_FIRST_FRAME_TIMEOUT {
        return Err(Error::config(format!(
            "broker.first_frame_timeout {t} in {} is out of range (1s to {MAX_FIRST_FRAME_TIMEOUT})",
            cfg.describe_file()
        ))
        .hint("remove it for the default of 5s, or write e.g. `first_frame_timeout: 10s` under broker:"));
    }
    if cfg.broker.max_connections_per_uid == 0 {
        return Err(Error::config(format!(
            "broker.max_connections_per_uid is 0 in {}: no client could connect",
            cfg.describe_file()
        ))
        .hint("remove it for the default of 1024, or set a positive number"));
    }
    Ok(())
}

/// Every agent needs its uid: the broker maps peers by it.
fn check_agents(cfg: &Config) -> Result<()> {
    let file = cfg.describe_file();
    for (name, a) in &cfg.agents {
        let Some(uid) = a.uid else {
            return Err(Error::config(format!(
                "agent {name} in {file} has no uid; the broker knows agents only by their uid"
            ))
            .hint(format!(
                "add `uid: N` (N: id -u of the agent's user) under agents.{name} in {file}"
            )));
        };
        let same: Vec<&str> = cfg
            .agents
            .iter()
            .filter(|(_, b)| b.uid == Some(uid))
            .map(|(n, _)| n.as_str())
            .collect();
        if same.len() > 1 {
            return Err(Error::config(format!(
                "agents {} in {file} share uid {uid}; the broker could not tell them apart",
                same.join(" and ")
            ))
            .hint("give each agent its own Unix user, then its uid in the config"));
        }
    }
    Ok(())
}

/// Every identity file must be the broker's to read and no agent's.
fn check_identities(cfg: &Config) -> Result<()> {
    let agent_uids: Vec<u32> = cfg.agents.values().filter_map(|a| a.uid).collect();
    let me = crate::sys::uid();
    for (what, f) in cfg.client_secret_files() {
        if let Some(why) = exposed_to_agents(f, &agent_uids, me) {
            return Err(Error::config(format!(
                "{what} {} {why}; an agent that can read it can log in to Infisical as that identity without the broker",
                f.display()
            ))
            .hint(format!(
                "chown {1}: {0} && chmod 0400 {0}   (as the operator; {1} is the broker's user)",
                quote_path(f),
                broker_user_name()
            )));
        }
    }
    Ok(())
}

/// The broker's own user name (for hints), or its uid.
fn broker_user_name() -> String {
    let me = crate::sys::uid();
    match crate::sys::user_groups(me) {
        Ok(Some((name, _))) => name,
        _ => me.to_string(),
    }
}

/// Why an agent uid could read `f`, if one could (owner, group or everyone).
fn exposed_to_agents(f: &Path, agents: &[u32], broker_uid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(f).ok()?;
    let mode = m.mode();
    if agents.contains(&m.uid()) && m.uid() != broker_uid {
        return Some(format!("is owned by agent uid {}", m.uid()));
    }
    if mode & 0o004 != 0 {
        return Some(format!(
            "is readable by any local user (mode {:o})",
            mode & 0o777
        ));
    }
    if mode & 0o040 != 0 {
        for &uid in agents {
            if uid == broker_uid {
                continue;
            }
            if let Ok(Some((_, groups))) = crate::sys::user_groups(uid)
                && groups.contains(&m.gid())
            {
                return Some(format!(
                    "is readable by group {} (mode {:o}), which agent uid {uid} is in",
                    m.gid(),
                    mode & 0o777
                ));
            }
        }
    }
    None
}

/// A broker started as a child process (`aap broker --socket PATH`), for `aap demo` and the
/// tests; killed and reaped on drop.
pub struct Spawned {
    child: std::process::Child,
    pub socket: PathBuf,
}

impl Spawned {
    /// Start `aap` (the binary at `aap`) as a broker with `config`, and wait until its socket
    /// answers. Its stderr goes to `log` when given.
    pub fn start(aap: &Path, config: &Path, socket: &Path, log: Option<&Path>) -> Result<Spawned> {
        let mut cmd = std::process::Command::new(aap);
        cmd.arg("broker")
            .arg("--socket")
            .arg(socket)
            .env_clear()
            .env("AAP_CONFIG", config)
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if let Some(v) = std::env::var_os("AAP_LOG") {
            cmd.env("AAP_LOG", v);
        }
        match log {
            Some(p) => {
                let f = std::fs::File::create(p).map_err(|e| {
                    Error::internal(format!("cannot create {}: {e}", p.display()))
                        .hint(format!("ls -ld {}", quote_path(p.parent().unwrap_or(p))))
                })?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(std::process::Stdio::null());
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::internal(format!("cannot start {} broker: {e}", aap.display()))
                .hint(format!("ls -l {}", quote_path(aap)))
        })?;
        let t0 = std::time::Instant::now();
        loop {
            if UnixStream::connect(socket).is_ok() {
                return Ok(Spawned {
                    child,
                    socket: socket.to_path_buf(),
                });
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(
                    Error::internal(format!("the broker exited at start ({st})")).hint(format!(
                        "run it by hand to see why: AAP_CONFIG={} {} broker --socket {}",
                        quote_path(config),
                        quote_path(aap),
                        quote_path(socket)
                    )),
                );
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(
                    Error::internal("the broker did not listen within 20 s").hint(
                        "check the machine's load, then run it by hand: aap broker --socket PATH",
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited (reaped here).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kill it now (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}
