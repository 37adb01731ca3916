//! The broker is the SSH agent of an `ssh-agent` capability: for one exec it holds the key in
//! its own memory (zeroized when dropped) and serves the SSH agent protocol; the key never
//! leaves this process.
//!
//! The socket is `aap-exec`'s: as the agent's uid it makes a fresh 0700 directory of its own
//! with `agent.sock` in it, listens, and hands the listening socket over (`SCM_RIGHTS`,
//! [`Prepared::adopt`]), keeping no copy. The broker takes only a listening `AF_UNIX`
//! `SOCK_STREAM` socket bound to the path `aap-exec` names, and still closes unserved every
//! accepted connection whose peer uid (`SO_PEERCRED`) is not the exec's agent uid.
//! docs/backings.md says why the agent makes the socket and the broker serves it.
//!
//! Each connection is served by a small loop: a 4-byte big-endian length (at most
//! [`MAX_MESSAGE`], OpenSSH's own cap), one message decoded with `ssh-agent-lib`'s protocol
//! types, an answer. Only these are served: listing (our one key), signing (judged by
//! [`policy`], the grant and the lifetime, every time; each one an `ssh.sign` audit line) and
//! `session-bind@openssh.com`. Adding, removing, locking and every other extension get
//! `SSH_AGENT_FAILURE`.
//!
//! [`Handle::stop`] is the teardown: the key is dropped, the listener shut down (a connect to
//! the path is refused from then on), every connection shut down, and the accept loop woken.
//! The threads (scoped to the exec's) then end. The listener's last descriptor is closed after
//! the run is recorded ([`Prepared::take_last`]).

#![forbid(unsafe_code)]

pub mod known_hosts;
pub use known_hosts::KnownHosts;
pub mod policy;

use crate::audit::Outcome;
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use crate::sys::{self, Ready};
use policy::{Binding, Policy, Seen};
use ssh_agent_lib::proto::extension::SessionBind;
use ssh_agent_lib::proto::{Extension, Identity, PublicCredential, Request, Response, SignRequest};
use ssh_encoding::{Decode, Encode};
use ssh_key::PrivateKey;
use ssh_key::public::KeyData;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest agent message served (OpenSSH's ssh-agent refuses larger ones too).
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Connections served at once for one exec (each has a thread).
const MAX_CONNECTIONS: usize = 32;
/// Refused signatures on one connection before it is closed (a client looping on refusals
/// would otherwise fill the audit log as fast as it can ask).
const MAX_REFUSALS: usize = 8;
/// Stack of a connection thread: decoding and signing (RSA included) need little.
const STACK: usize = 512 * 1024;
const SESSION_BIND: &str = "session-bind@openssh.com";
/// `SSH_AGENT_RSA_SHA2_256` and `SSH_AGENT_RSA_SHA2_512` in a sign request's flags.
const RSA_SHA2_256: u32 = 0x02;
const RSA_SHA2_512: u32 = 0x04;

/// The key as the agent signs with it. Both parts are wiped on drop (`ssh-key`'s and `rsa`'s
/// private key types zeroize themselves).
struct HeldKey {
    key: PrivateKey,
    /// For an RSA key, the same key as `rsa` signs with.
    rsa: Option<rsa::RsaPrivateKey>,
}

impl HeldKey {
    fn new(key: PrivateKey) -> Option<HeldKey> {
        let rsa = match key.key_data() {
            ssh_key::private::KeypairData::Rsa(k) => {
                let n = |m: &ssh_key::Mpint| m.as_positive_bytes().map(rsa::BigUint::from_bytes_be);
                let parts = (
                    n(&k.public.n)?,
                    n(&k.public.e)?,
                    n(&k.private.d)?,
                    n(&k.private.p)?,
                    n(&k.private.q)?,
                );
                Some(
                    rsa::RsaPrivateKey::from_components(
                        parts.0,
                        parts.1,
                        parts.2,
                        vec![parts.3, parts.4],
                    )
                    .ok()?,
                )
            }
            _ => None,
        };
        Some(HeldKey { key, rsa })
    }

    /// Sign `data`; `flags` choose the RSA hash (rsa-sha2-512 or -256; SHA-1 `ssh-rsa` is
    /// refused).
    fn sign(
        &self,
        data: &[u8],
        flags: u32,
    ) -> std::result::Result<ssh_key::Signature, &'static str> {
        use signature::{SignatureEncoding, Signer};
        let Some(rsa_key) = &self.rsa else {
            return self.key.try_sign(data).map_err(|_| "signing failed");
        };
        let (hash, bytes) = if flags & RSA_SHA2_512 != 0 {
            let k = rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new(rsa_key.clone());
            (
                ssh_key::HashAlg::Sha512,
                k.try_sign(data).map_err(|_| "signing failed")?.to_vec(),
            )
        } else if flags & RSA_SHA2_256 != 0 {
            let k = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(rsa_key.clone());
            (
                ssh_key::HashAlg::Sha256,
                k.try_sign(data).map_err(|_| "signing failed")?.to_vec(),
            )
        } else {
            return Err("an RSA key signs rsa-sha2-256 or rsa-sha2-512 only, not SHA-1 ssh-rsa");
        };
        ssh_key::Signature::new(ssh_key::Algorithm::Rsa { hash: Some(hash) }, bytes)
            .map_err(|_| "signing failed")
    }
}

/// Decode one message body (after its length). The fuzz target calls this.
pub fn decode_request(body: &[u8]) -> std::result::Result<Request, String> {
    let mut r = body;
    let req = Request::decode(&mut r).map_err(|e| e.to_string())?;
    if !r.is_empty() {
        return Err(format!("{} bytes after the message", r.len()));
    }
    Ok(req)
}

/// Read one frame's body; `None` at a clean end of the connection. A length over
/// [`MAX_MESSAGE`] (or 0) is an error: the connection is closed.
pub fn read_frame(s: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("an agent message of {n} bytes (limit {MAX_MESSAGE})"),
        ));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)?;
    Ok(Some(body))
}

fn encode_response(r: &Response) -> Vec<u8> {
    let mut body = Vec::new();
    if r.encode(&mut body).is_err() {
        body.clear();
        let _ = Response::Failure.encode(&mut body);
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// What one exec's agent needs, made before delivery (so a failure is a denial, before any
/// child exists).
pub struct Prepared {
    /// The socket `aap-exec` made and handed over ([`Prepared::adopt`]).
    listener: Option<UnixListener>,
    /// The path it is bound to: the child's `SSH_AUTH_SOCK`.
    sock: Option<PathBuf>,
    /// One more descriptor of it, for [`Prepared::take_last`].
    last: Option<OwnedFd>,
    key: HeldKey,
    public: KeyData,
    policy: Policy,
    cap_id: String,
    agent_uid: u32,
    deadline: Instant,
    handle: Handle,
}

/// What a capability's agent serves.
pub struct Spec<'a> {
    pub cap_id: &'a str,
    pub pem: &'a SecretBytes,
    pub hosts: &'a [String],
    pub allow_forwarding: bool,
    /// The destinations' host keys ([`known_hosts_of`]).
    pub known: KnownHosts,
    pub lifetime: Duration,
    pub agent_uid: u32,
}

/// The host keys of `hosts` in the `ssh_known_hosts` files; an error when none is listed (the
/// agent could then sign for no destination). Judged before anything is fetched, by a run and
/// by `aap-exec --check` alike; a run's agent is prepared with what was read then.
pub fn known_hosts_of(hosts: &[String], known_hosts: &[PathBuf]) -> Result<KnownHosts> {
    let known = known_hosts::KnownHosts::load(known_hosts, hosts);
    if known.is_empty() {
        let files: Vec<String> = known_hosts
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::config(format!(
            "no host key of {} is listed in ssh_known_hosts ({}); the agent could sign for no destination",
            hosts.join(", "),
            if files.is_empty() { "none set".into() } else { files.join(", ") }
        ))
        .hint(crate::exec::hints::no_host_key(hosts, known_hosts)));
    }
    Ok(known)
}

/// Parse the key and read the known hosts; the socket comes later ([`Prepared::adopt`]).
pub fn prepare(spec: Spec<'_>) -> Result<Prepared> {
    let cap = spec.cap_id;
    if spec.lifetime.is_zero() {
        return Err(Error::denied(format!(
            "the grant for `{cap}` has less than a second left, too little for an ssh key"
        ))
        .hint(crate::exec::hints::grant_ran_out(cap)));
    }
    let key = PrivateKey::from_openssh(spec.pem.expose()).map_err(|_| {
        Error::config(format!(
            "the secret of `{cap}` is not an unencrypted OpenSSH private key"
        ))
        .hint(format!(
            "store the key as `ssh-keygen -t ed25519 -N ''` writes it, then: aap catalog show {cap}"
        ))
    })?;
    if key.is_encrypted() {
        return Err(Error::config(format!(
            "the ssh key of `{cap}` is passphrase-protected; the broker cannot use it"
        ))
        .hint("store it without a passphrase: ssh-keygen -p -N '' -f KEY, then update the secret in Infisical"));
    }
    let public = key.public_key().key_data().clone();
    let key = HeldKey::new(key).ok_or_else(|| {
        Error::config(format!("the RSA key of `{cap}` is malformed")).hint(format!(
            "check the key: ssh-keygen -y -f KEY; then aap catalog show {cap}"
        ))
    })?;
    let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| {
        Error::internal(format!("cannot make a socket pair: {e}"))
            .hint("check the broker's descriptor limit: ulimit -n")
    })?;
    let handle = Handle {
        inner: Arc::new(Inner {
            stopped: AtomicBool::new(false),
            key: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            wake_tx: Mutex::new(Some(wake_tx)),
            wake_rx,
            listener: Mutex::new(None),
        }),
    };
    Ok(Prepared {
        listener: None,
        sock: None,
        last: None,
        key,
        public,
        policy: Policy {
            hosts: spec.hosts.to_vec(),
            allow_forwarding: spec.allow_forwarding,
            known: spec.known,
        },
        cap_id: cap.to_owned(),
        agent_uid: spec.agent_uid,
        deadline: Instant::now() + spec.lifetime,
        handle,
    })
}

impl Prepared {
    /// Take the listening socket `aap-exec` sent, said to be bound to `claimed`: it must be a
    /// listening Unix stream socket bound to that absolute path, or it is refused (and closed).
    pub fn adopt(&mut self, fd: OwnedFd, claimed: &str) -> Result<()> {
        let cap = &self.cap_id;
        let refuse = |why: String| {
            Error::denied(format!(
                "the ssh agent socket aap-exec sent for `{cap}` is refused: {why}"
            ))
            .hint("run aap-exec of the same release as the broker (aap-exec --version; aap --version), unmodified")
        };
        let listener = sys::unix_listener(fd).map_err(|e| refuse(e.to_string()))?;
        let bound = listener
            .local_addr()
            .map_err(|e| refuse(format!("its address cannot be read ({e})")))?;
        let Some(path) = bound.as_pathname().filter(|p| p.is_absolute()) else {
            return Err(refuse(
                "it is not bound to an absolute path in the file system".into(),
            ));
        };
        if path != Path::new(claimed) {
            return Err(refuse(format!(
                "it is bound to {}, not to {claimed}, the path aap-exec named",
                path.display()
            )));
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| refuse(format!("it cannot be made non-blocking ({e})")))?;
        let second = listener.try_clone().map_err(|e| {
            Error::internal(format!("cannot duplicate the ssh agent socket: {e}"))
                .hint("check the broker's descriptor limit: ulimit -n")
        })?;
        let last = listener.try_clone().map_err(|e| {
            Error::internal(format!("cannot duplicate the ssh agent socket: {e}"))
                .hint("check the broker's descriptor limit: ulimit -n")
        })?;
        *lock(&self.handle.inner.listener) = Some(second);
        self.last = Some(OwnedFd::from(last));
        self.sock = Some(path.to_path_buf());
        self.listener = Some(listener);
        Ok(())
    }

    /// Another descriptor of the adopted listener, to poll for a first connection before
    /// [`serve`] starts the agent's threads.
    pub fn poll_fd(&self) -> Option<OwnedFd> {
        let l = self.listener.as_ref()?.try_clone().ok()?;
        Some(OwnedFd::from(l))
    }

    /// The listener's last descriptor, for the caller to close once the run is over and the
    /// wrapper told so. Closing the last one frees the socket's inode in the file system of its
    /// path (once `aap-exec` has unlinked it), which on a journalling file system such as ext4
    /// takes a journal transaction, about 0.2 ms: that is done after the wrapper is answered,
    /// not on its way. Serving stops at [`Handle::stop`] all the same (the listener is shut
    /// down there, and a connect to a shut-down listener is refused).
    pub fn take_last(&mut self) -> Option<OwnedFd> {
        self.last.take()
    }

    /// The path the child gets as `SSH_AUTH_SOCK`, once a socket is adopted.
    pub fn sock(&self) -> Option<&Path> {
        self.sock.as_deref()
    }

    /// The handle that stops it (for the exec's teardown).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

/// Stops an agent; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

struct Inner {
    stopped: AtomicBool,
    /// The key, from [`serve`] until [`Handle::stop`].
    key: Mutex<Option<HeldKey>>,
    /// A clone of every connection being served, to shut it down at stop.
    conns: Mutex<Vec<(u64, UnixStream)>>,
    active: AtomicUsize,
    /// Dropped at stop: `wake_rx` becomes readable and the accept loop ends.
    wake_tx: Mutex<Option<UnixStream>>,
    wake_rx: UnixStream,
    /// A second descriptor of the listening socket, shut down at stop: from that moment a
    /// connect is refused, without waiting for the accept loop to close its own.
    listener: Mutex<Option<UnixListener>>,
}

impl Handle {
    pub fn stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Tear down, once: the key goes (zeroized), the listening socket is shut down (a connect
    /// to its path is refused from here on; the path and its directory are `aap-exec`'s to
    /// remove), every connection is shut down, and the accept loop wakes and closes its
    /// descriptor of the listener.
    pub fn stop(&self) {
        let i = &self.inner;
        if i.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        drop(lock(&i.key).take());
        if let Some(l) = lock(&i.listener).take() {
            let _ = sys::shut_down(&l);
        }
        drop(lock(&i.wake_tx).take());
        for (_, c) in lock(&i.conns).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends one `ssh.sign` line: the connecting process's pid, the outcome, what was seen, the
/// refusal's reason.
pub type AuditSign<'a> = dyn Fn(u32, Outcome, &Seen, Option<String>) -> Result<()> + Sync + 'a;

/// What the exec tells the agent about each signature: whether its grant still holds, and
/// where its audit lines go.
pub struct Ctx<'a> {
    /// Why the exec's grant no longer holds (revoked, expired), if it does not.
    pub ended: &'a (dyn Fn() -> Option<String> + Sync),
    /// Append one `ssh.sign` line (pid of the connecting process, outcome, what was seen,
    /// the refusal's reason); an error refuses the signature.
    pub audit: &'a AuditSign<'a>,
}

/// Serve on threads of `scope` until [`Handle::stop`] or the lifetime ends.
pub fn serve<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    p: Prepared,
    ctx: &'env Ctx<'env>,
) {
    let Prepared {
        listener,
        sock: _,
        last: _,
        key,
        public,
        policy,
        cap_id,
        agent_uid,
        deadline,
        handle,
    } = p;
    let Some(listener) = listener else {
        // Nothing to serve on: the key goes now.
        handle.stop();
        return;
    };
    *lock(&handle.inner.key) = Some(key);
    if handle.stopped() {
        drop(lock(&handle.inner.key).take());
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("aap-ssh-agent".into())
        .spawn_scoped(scope, move || {
            let shared = Arc::new(Conn {
                public,
                policy,
                cap_id,
                deadline,
                handle: handle.clone(),
            });
            accept_loop(scope, &listener, agent_uid, &shared, ctx);
            // The lifetime ended (or stop was called): nothing is served any more.
            handle.stop();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the ssh agent thread");
    }
}

/// What every connection of one exec shares.
struct Conn {
    public: KeyData,
    policy: Policy,
    cap_id: String,
    deadline: Instant,
    handle: Handle,
}

fn accept_loop<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    listener: &UnixListener,
    agent_uid: u32,
    shared: &Arc<Conn>,
    ctx: &'env Ctx<'env>,
) {
    let inner = &shared.handle.inner;
    let mut next_id = 0u64;
    loop {
        if shared.handle.stopped() {
            return;
        }
        let left = shared.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        match sys::wait_readable(&[listener.as_fd(), inner.wake_rx.as_fd()], ms.max(1)) {
            Ok(Ready::Fd(0)) => {}
            Ok(Ready::Fd(_)) => return, // woken: stopped
            Ok(Ready::Timeout) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the ssh agent cannot wait for connections");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // Stopped: the listener was shut down under us.
            Err(_) if shared.handle.stopped() => return,
            Err(e) => {
                tracing::warn!(error = %e, "the ssh agent's accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = match sys::peer_cred(&stream) {
            Ok(p) if p.uid == agent_uid => p,
            Ok(p) => {
                tracing::warn!(
                    uid = p.uid,
                    pid = p.pid,
                    want = agent_uid,
                    "ssh agent connection from another uid refused"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ssh agent connection without credentials refused");
                continue;
            }
        };
        if inner.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!(
                pid = peer.pid,
                "ssh agent connection refused: {MAX_CONNECTIONS} already open"
            );
            continue;
        }
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        {
            let mut conns = lock(&inner.conns);
            if shared.handle.stopped() {
                return;
            }
            conns.push((id, clone));
        }
        inner.active.fetch_add(1, Ordering::SeqCst);
        let shared2 = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("aap-ssh-conn".into())
            .stack_size(STACK)
            .spawn_scoped(scope, move || {
                serve_conn(stream, peer.pid, &shared2, ctx);
                let inner = &shared2.handle.inner;
                lock(&inner.conns).retain(|(i, _)| *i != id);
                inner.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start an ssh agent connection thread");
            lock(&inner.conns).retain(|(i, _)| *i != id);
            inner.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One connection's state.
#[derive(Default)]
struct Session {
    bindings: Vec<Binding>,
    bind_failed: bool,
    refusals: usize,
}

fn serve_conn(mut s: UnixStream, pid: u32, c: &Conn, ctx: &Ctx<'_>) {
    let mut st = Session::default();
    loop {
        let body = match read_frame(&mut s) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, pid, "ssh agent connection closed");
                return;
            }
        };
        if c.handle.stopped() {
            return;
        }
        let resp = match decode_request(&body) {
            Ok(req) => answer(req, pid, c, ctx, &mut st),
            Err(e) => {
                tracing::debug!(error = %e, pid, "undecodable ssh agent message");
                Response::Failure
            }
        };
        if s.write_all(&encode_response(&resp)).is_err() || st.refusals >= MAX_REFUSALS {
            return;
        }
    }
}

fn answer(req: Request, pid: u32, c: &Conn, ctx: &Ctx<'_>, st: &mut Session) -> Response {
    match req {
        Request::RequestIdentities => {
            // The grant is judged at each signature (so a refusal is audited with its reason);
            // the lifetime here too, as OpenSSH's agent drops an expired key from the list.
            let live = !c.handle.stopped() && Instant::now() < c.deadline;
            Response::IdentitiesAnswer(if live {
                vec![Identity {
                    credential: PublicCredential::Key(c.public.clone()),
                    comment: format!("aap capability {}", c.cap_id),
                }]
            } else {
                Vec::new()
            })
        }
        Request::SignRequest(r) => sign(r, pid, c, ctx, st),
        Request::Extension(e) if e.name == SESSION_BIND => session_bind(&e, st),
        // Adding, removing, locking, smartcards, and every other extension.
        _ => Response::Failure,
    }
}

fn session_bind(e: &Extension, st: &mut Session) -> Response {
    let checked = match e.parse_message::<SessionBind>() {
        Ok(Some(b)) => b
            .verify_signature()
            .map(|()| b)
            .map_err(|_| "the host key's signature of the session id does not verify".to_string()),
        _ => Err("malformed session-bind@openssh.com".to_string()),
    };
    let bound = checked.and_then(|b| {
        policy::bind(
            &mut st.bindings,
            Binding {
                host_key: b.host_key,
                session_id: b.session_id,
                forwarded: b.is_forwarding,
            },
        )
    });
    match bound {
        Ok(()) => Response::Success,
        Err(why) => {
            tracing::debug!("session-bind refused: {why}");
            st.bind_failed = true;
            Response::Failure
        }
    }
}

fn sign(r: SignRequest, pid: u32, c: &Conn, ctx: &Ctx<'_>, st: &mut Session) -> Response {
    let mut seen = Seen::default();
    let verdict = (|| {
        if r.credential != PublicCredential::Key(c.public.clone()) {
            return Err("the request names a key this agent does not hold".to_string());
        }
        if let Some(why) = (ctx.ended)() {
            return Err(why);
        }
        if Instant::now() >= c.deadline {
            return Err(
                "the key's lifetime (min of key_lifetime and the grant's remaining time) has ended"
                    .into(),
            );
        }
        let host = policy::decide(
            &c.policy,
            &st.bindings,
            st.bind_failed,
            &c.public,
            &r.data,
            &mut seen,
        )?;
        if matches!(c.public, KeyData::Rsa(_)) && r.flags & (RSA_SHA2_512 | RSA_SHA2_256) == 0 {
            return Err(
                "an RSA key signs rsa-sha2-256 or rsa-sha2-512 only, not SHA-1 ssh-rsa".into(),
            );
        }
        Ok(host)
    })();
    if let Err(why) = verdict {
        st.refusals += 1;
        let _ = (ctx.audit)(pid, Outcome::Denied, &seen, Some(why));
        return Response::Failure;
    }
    let signed = {
        let key = lock(&c.handle.inner.key);
        match key.as_ref() {
            Some(k) => k.sign(&r.data, r.flags),
            None => Err("the agent was torn down"),
        }
    };
    match signed {
        Ok(sig) => match (ctx.audit)(pid, Outcome::Ok, &seen, None) {
            Ok(()) => Response::SignResponse(sig),
            // No audit line, no signature.
            Err(_) => Response::Failure,
        },
        Err(why) => {
            let _ = (ctx.audit)(pid, Outcome::Error, &seen, Some(why.into()));
            Response::Failure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each key type the agent holds signs, and the signature verifies with its public key
    /// (keys made by the real ssh-keygen, as an operator stores them).
    #[test]
    fn ed25519_ecdsa_and_rsa_keys_sign() {
        let dir = std::env::temp_dir().join(format!("aap-sshagent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (t, bits) in [
            ("ed25519", None),
            ("ecdsa", Some("256")),
            ("rsa", Some("2048")),
        ] {
            let path = dir.join(t);
            let _ = std::fs::remove_file(&path);
            let mut c = std::process::Command::new("ssh-keygen");
            c.args(["-q", "-t", t, "-N", "", "-C", "", "-f"]).arg(&path);
            if let Some(b) = bits {
                c.args(["-b", b]);
            }
            match c.status() {
                Ok(s) => assert!(s.success(), "ssh-keygen -t {t}"),
                Err(_) => {
                    eprintln!(
                        "SKIPPED: ssh-keygen is not installed (apt-get install -y openssh-client)"
                    );
                    return;
                }
            }
            let pem = SecretBytes::from_slice(&std::fs::read(&path).unwrap());
            let key = PrivateKey::from_openssh(pem.expose()).unwrap();
            let public = key.public_key().clone();
            let held = HeldKey::new(key).unwrap();
            let data = b"an SSH_MSG_USERAUTH_REQUEST, say";
            for flags in [RSA_SHA2_512, RSA_SHA2_256] {
                let sig = held
                    .sign(data, flags)
                    .unwrap_or_else(|e| panic!("{t}: {e}"));
                signature::Verifier::verify(&public, data, &sig)
                    .unwrap_or_else(|e| panic!("{t} {flags}: {e}"));
                if t == "rsa" {
                    let want = if flags == RSA_SHA2_512 {
                        "rsa-sha2-512"
                    } else {
                        "rsa-sha2-256"
                    };
                    assert_eq!(sig.algorithm().as_str(), want);
                }
                // The answer encodes.
                let mut out = Vec::new();
                Response::SignResponse(sig).encode(&mut out).unwrap();
                assert_eq!(out[0], 14);
            }
            if t == "rsa" {
                assert!(held.sign(data, 0).is_err(), "SHA-1 ssh-rsa was signed");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn frames_are_capped_and_exact() {
        let mut ok: &[u8] = &[0, 0, 0, 1, 11];
        assert_eq!(read_frame(&mut ok).unwrap(), Some(vec![11]));
        let mut empty: &[u8] = &[];
        assert_eq!(read_frame(&mut empty).unwrap(), None);
        for bad in [
            &[0u8, 0, 0, 0][..],
            &[0, 4, 0, 1, 0],
            &[255, 255, 255, 255],
            &[0, 0, 0, 5, 1],
        ] {
            let mut r = bad;
            assert!(read_frame(&mut r).is_err(), "{bad:?}");
        }
        assert!(decode_request(&[11]).is_ok());
        assert!(decode_request(&[11, 0]).is_err()); // trailing byte
        assert!(decode_request(&[]).is_err());
        assert!(decode_request(&[99]).is_err());
    }
}
