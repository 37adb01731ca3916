//! The `http-proxy` inject form (issue 13): the broker's per-exec loopback endpoint that adds
//! a `forgejo-pat` token on the wire, so the child never holds the token.
//!
//! For one exec the broker binds `127.0.0.1:0` ([`prepare`], before delivery, so the child's
//! base URL is known) and, from delivery to teardown, serves HTTP/1.1 on it with hyper on a
//! current-thread tokio runtime of its own, on a thread scoped to the exec ([`serve`]):
//!
//! - each accepted connection's peer socket must belong to the exec's agent uid: the kernel
//!   says whose it is (`sock_diag`, [`crate::sys::tcp_socket_uid`]); any other uid, or a lookup
//!   that fails, is closed unserved and audited;
//! - each request must start with `/<prefix>/` (256 random bits, [`policy::Prefix`]); without
//!   it (or in absolute form, for another host) it gets 404 and is audited;
//! - [`policy::judge`] decides what a `read` capability passes; a write gets 403 with the
//!   message git shows;
//! - what passes goes to the capability's host ([`forward`]) with the token added there and
//!   the child's own credentials (`Authorization`, `Cookie`, `Proxy-*`) and hop-by-hop headers
//!   removed; bodies stream both ways.
//!
//! [`Handle::stop`] is the teardown: the runtime ends, which closes the listener and every
//! connection; a connect from then on is refused. The token (a header value that owns a
//! zeroizing buffer) is wiped once the last request holding it is gone.

#![forbid(unsafe_code)]

mod forward;
pub mod policy;

use crate::catalog::Access;
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use policy::Prefix;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

/// Requests served at once for one exec; more wait for a free slot.
const MAX_REQUESTS: usize = 16;
/// Connections open at once for one exec; more are closed unserved.
const MAX_CONNECTIONS: usize = 64;

/// What a capability's proxy serves.
pub struct Spec<'a> {
    pub cap_id: &'a str,
    /// `host[:port]` of the capability's Forgejo.
    pub host: &'a str,
    pub access: Access,
    pub token: &'a SecretBytes,
    pub agent_uid: u32,
    /// A PEM bundle trusted besides the compiled-in roots (the config's `ca_bundle`).
    pub ca_bundle: Option<&'a Path>,
}

/// A bound listener with everything its requests need, not served yet.
pub struct Prepared {
    listener: std::net::TcpListener,
    base: String,
    inner: Arc<forward::Inner>,
    handle: Handle,
    records: mpsc::Receiver<Record>,
}

/// One request (or refused connection), for the audit: never the token, never the prefix.
#[derive(Debug, Clone)]
pub struct Record {
    /// The method; `None` for a connection closed before any request.
    pub method: Option<String>,
    /// The path and query after the prefix; `None` when the request was not routed (it did
    /// not carry the prefix, so its path is not logged: it could hold a near-guess of it).
    pub path: Option<String>,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Why it was refused (a 403, a 404, another uid), if it was.
    pub refused: Option<String>,
}

/// Totals for `exec.end`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub requests: u64,
    pub refused: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    refused: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Stops a proxy; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    stop: Arc<Stop>,
    stats: Arc<Stats>,
}

struct Stop {
    stopped: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Handle {
    pub fn stopped(&self) -> bool {
        self.stop.stopped.load(Ordering::SeqCst)
    }

    /// Tear down, once: no request is forwarded from here on, and the serving thread wakes
    /// and ends its runtime (closing the listener and every connection).
    pub fn stop(&self) {
        if !self.stop.stopped.swap(true, Ordering::SeqCst) {
            self.stop.wake.notify_one();
        }
    }

    /// The totals so far.
    pub fn summary(&self) -> Summary {
        let s = &self.stats;
        Summary {
            requests: s.requests.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            bytes_up: s.bytes_up.load(Ordering::SeqCst),
            bytes_down: s.bytes_down.load(Ordering::SeqCst),
        }
    }
}

/// Bind the listener and make the prefix; the token is copied into a buffer wiped on drop.
pub fn prepare(spec: &Spec<'_>) -> Result<Prepared> {
    let cap = spec.cap_id;
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| {
        Error::internal(format!(
            "cannot listen on 127.0.0.1 for the http-proxy of `{cap}`: {e}"
        ))
        .hint("check that the loopback interface is up: ip addr show lo")
    })?;
    let port = listener.local_addr().map(|a| a.port()).map_err(|e| {
        Error::internal(format!("cannot read the http-proxy's port: {e}"))
            .hint("run the command again")
    })?;
    listener.set_nonblocking(true).map_err(|e| {
        Error::internal(format!(
            "cannot make the http-proxy's listener non-blocking: {e}"
        ))
        .hint("run the command again")
    })?;
    let prefix = Prefix::generate().map_err(|e| {
        Error::internal(format!(
            "cannot read random bytes for the http-proxy's prefix: {e}"
        ))
        .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
    })?;
    let base = prefix.base_url(port);
    let upstream = forward::Upstream::for_host(spec.host, spec.ca_bundle)?;
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(Stop {
        stopped: AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
    });
    let (tx, records) = mpsc::channel();
    let inner = Arc::new(forward::Inner {
        cap_id: cap.to_owned(),
        host: spec.host.to_owned(),
        access: spec.access,
        prefix,
        auth: forward::basic_auth(spec.token)?,
        upstream,
        agent_uid: spec.agent_uid,
        requests: Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS)),
        connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        stats: stats.clone(),
        stop: stop.clone(),
        records: tx,
    });
    Ok(Prepared {
        listener,
        base,
        inner,
        handle: Handle { stop, stats },
        records,
    })
}

impl Prepared {
    /// The child's base URL (`http://127.0.0.1:PORT/PREFIX/`): a secret of the exec while it
    /// lives; never logged.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

/// Serve on threads of `scope` until [`Handle::stop`]: one runs the proxy's runtime, one
/// writes the audit lines (`audit` is called once per [`Record`], in order).
pub fn serve<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    p: Prepared,
    audit: &'env (dyn Fn(Record) + Sync),
) {
    let Prepared {
        listener,
        base: _,
        inner,
        handle,
        records,
    } = p;
    let runner = std::thread::Builder::new()
        .name("aap-httpproxy".into())
        .spawn_scoped(scope, move || forward::run(listener, inner, &handle.stop));
    if let Err(e) = runner {
        tracing::warn!(error = %e, "cannot start the http-proxy's thread; it serves nothing");
        return;
    }
    let writer = std::thread::Builder::new()
        .name("aap-httpproxy-audit".into())
        .spawn_scoped(scope, move || {
            // Ends when the runtime (and every request's sender) is gone.
            for r in records {
                audit(r);
            }
        });
    if let Err(e) = writer {
        tracing::warn!(error = %e, "cannot start the http-proxy's audit thread");
    }
}
