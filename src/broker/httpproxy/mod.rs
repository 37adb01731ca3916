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

/// What a capability's proxy serves.
pub struct Spec<'a> {
    pub cap_id: &'a str,
    /// `host[:port]` of the capability's Forgejo.
    pub host: &'a str,
    pub access: Access,
    pub token: &'a SecretBytes,
    /// How the token goes on the wire.
    pub credential: Credential<'a>,
    pub agent_uid: u32,
    /// A PEM bundle trusted besides the compiled-in roots (the config's `ca_bundle`).
    pub ca_bundle: Option<&'a Path>,
    /// Write (and fsync) a line before each request is forwarded, as for `ssh.sign` (tier high
    /// and critical): the token is not used on the wire before its use is on disk.
    pub audit_first: bool,
}

/// The header a forwarded request carries the secret in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `Authorization: Basic base64("aap:" + token)`, as Forgejo takes a token.
    ForgejoBasic,
    /// `NAME: SCHEME SECRET`, or `NAME: SECRET` without a scheme (the catalog's `header` and
    /// `scheme`, checked to be HTTP tokens and not a framing header).
    Header {
        name: &'a str,
        scheme: Option<&'a str>,
    },
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
#[derive(Debug)]
pub struct Record {
    /// Set on the line written before a request is forwarded (with [`Spec::audit_first`]):
    /// the writer answers `Ok` once the line is on disk, and the request waits for it. With
    /// no answer, or the error that kept the line off the disk, it is not forwarded: the
    /// child gets a 503 saying why, and the proxy stops once that answer is delivered.
    pub before: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    /// Whether this line completes one written before (the request's status and bytes).
    pub completes: bool,
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
    /// Why a forwarded request was cut short by a bound, if it was: the child's upload or the
    /// host's answer sent nothing for `body_idle`, or the child read nothing of the answer
    /// for as long.
    pub cut: Option<String>,
}

/// Totals for `exec.end`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Requests forwarded to the host (one the host could not be reached for, a 502, too).
    pub requests: u64,
    /// Every refusal of any kind: a request answered 403 or 404 (or 503 when its audit line
    /// could not be written), and a connection closed unserved (another uid, over the cap).
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

    /// Tear down: no request is forwarded from here on, and the serving thread wakes and ends
    /// its runtime (closing the listener and every connection). Again is harmless.
    pub fn stop(&self) {
        self.stop.stopped.store(true, Ordering::SeqCst);
        self.stop.wake.notify_one();
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
    prepare_with(
        spec,
        forward::Upstream::for_host(spec.host, spec.ca_bundle)?,
        forward::Limits::DEFAULT,
    )
}

fn prepare_with(
    spec: &Spec<'_>,
    upstream: forward::Upstream,
    limits: forward::Limits,
) -> Result<Prepared> {
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
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(Stop {
        stopped: AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
    });
    let (tx, records) = mpsc::channel();
    let (auth_name, auth) = forward::credential(cap, spec.token, spec.credential)?;
    let inner = Arc::new(forward::Inner {
        cap_id: cap.to_owned(),
        host: spec.host.to_owned(),
        access: spec.access,
        prefix,
        auth_name,
        auth,
        upstream,
        agent_uid: spec.agent_uid,
        audit_first: spec.audit_first,
        limits,
        requests: Arc::new(tokio::sync::Semaphore::new(limits.max_requests)),
        connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
        stats: stats.clone(),
        stop: stop.clone(),
        records: tx,
        idle: std::sync::Mutex::new(Vec::new()),
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

    /// The capability's host (`host[:port]`) that requests go to.
    pub fn host(&self) -> &str {
        &self.inner.host
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    /// A throwaway CA's server config and the CA certificate a client must trust.
    fn test_ca() -> (
        Arc<rustls::ServerConfig>,
        rustls::pki_types::CertificateDer<'static>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let ca = crate::devserver::ca::ThrowawayCa::generate("http-proxy test CA").unwrap();
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap();
        (ca.server_config("test forgejo").unwrap(), cert)
    }

    /// A one-request HTTPS server on 127.0.0.1 with a throwaway CA (its certificate is
    /// returned): it answers 200 with the request head it received as the body.
    fn tls_server() -> (
        u16,
        rustls::pki_types::CertificateDer<'static>,
        std::thread::JoinHandle<String>,
    ) {
        let (cfg, ca_cert) = test_ca();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tls.read(&mut b).unwrap() == 1 {
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nSet-Cookie: s=1\r\nConnection: close\r\n\r\n{head}",
                head.len()
            );
            tls.write_all(answer.as_bytes()).unwrap();
            tls.conn.send_close_notify();
            let _ = tls.flush();
            head
        });
        (port, ca_cert, t)
    }

    /// One raw request to the proxy (`path` after the base URL), with the child's own
    /// credentials in it; the whole answer.
    fn get(base: &str, path: &str) -> String {
        let rest = base.strip_prefix("http://").unwrap();
        let (hp, prefix) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(hp).unwrap();
        write!(
            s,
            "GET /{prefix}{path} HTTP/1.1\r\nHost: {hp}\r\nAuthorization: token child-own\r\nCookie: c=1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// A proxy whose host nothing listens on (port 9; a forwarded request would be a 502).
    fn unreachable_proxy(token: &SecretBytes, limits: forward::Limits) -> (Prepared, String) {
        let up = forward::Upstream::tls("localhost", Vec::new()).unwrap();
        proxy_with(9, up, token, limits)
    }

    fn proxy(port: u16, upstream: forward::Upstream, token: &SecretBytes) -> (Prepared, String) {
        proxy_with(port, upstream, token, forward::Limits::DEFAULT)
    }

    fn proxy_with(
        port: u16,
        upstream: forward::Upstream,
        token: &SecretBytes,
        limits: forward::Limits,
    ) -> (Prepared, String) {
        proxy_audited(port, upstream, token, limits, false)
    }

    /// [`proxy_with`], with [`Spec::audit_first`] as given (tier high and critical).
    fn proxy_audited(
        port: u16,
        upstream: forward::Upstream,
        token: &SecretBytes,
        limits: forward::Limits,
        audit_first: bool,
    ) -> (Prepared, String) {
        let host = format!("localhost:{port}");
        let spec = Spec {
            cap_id: "forgejo-test",
            host: &host,
            access: Access::Read,
            token,
            credential: Credential::ForgejoBasic,
            agent_uid: crate::sys::uid(),
            ca_bundle: None,
            audit_first,
        };
        let p = prepare_with(&spec, upstream, limits).unwrap();
        let base = p.base_url().to_owned();
        (p, base)
    }

    #[test]
    fn forwards_over_tls_with_the_token_and_without_the_childs_credentials() {
        let (port, ca, seen) = tls_server();
        let token = SecretBytes::from_slice(b"tok-123");
        let up = forward::Upstream::tls("localhost", vec![ca]).unwrap();
        let (p, base) = proxy(port, up, &token);
        let handle = p.handle();
        let records = Mutex::new(Vec::new());
        let audit = |r: Record| records.lock().unwrap().push(r);
        let answer = std::thread::scope(|s| {
            serve(s, p, &audit);
            let a = get(&base, "demo.git/info/refs?service=git-upload-pack");
            handle.stop();
            a
        });
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("set-cookie"),
            "{answer}"
        );
        let head = seen.join().unwrap();
        let lower = head.to_ascii_lowercase();
        assert!(
            head.starts_with("GET /demo.git/info/refs?service=git-upload-pack HTTP/1.1\r\n"),
            "{head}"
        );
        // base64("aap:tok-123")
        assert!(
            head.contains("authorization: Basic YWFwOnRvay0xMjM=\r\n"),
            "{head}"
        );
        assert!(
            lower.contains(&format!("host: localhost:{port}\r\n")),
            "{head}"
        );
        assert!(
            !head.contains("child-own") && !lower.contains("cookie"),
            "{head}"
        );
        assert!(
            !head.contains(base.rsplit('/').nth(1).unwrap()),
            "the prefix went upstream"
        );
        let s = handle.summary();
        assert_eq!((s.requests, s.refused), (1, 0));
        assert!(s.bytes_down > 0);
        let r = records.lock().unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, Some(200));
        assert_eq!(
            r[0].path.as_deref(),
            Some("/demo.git/info/refs?service=git-upload-pack")
        );
    }

    /// A request head over the bound (16 KiB) is refused by hyper (431) before any routing:
    /// it is not counted and never reaches the host.
    #[test]
    fn an_oversized_head_is_refused_before_routing() {
        let token = SecretBytes::from_slice(b"tok-123");
        let (p, base) = unreachable_proxy(&token, forward::Limits::DEFAULT);
        let handle = p.handle();
        let audit = |_r: Record| {};
        let answer = std::thread::scope(|s| {
            serve(s, p, &audit);
            let rest = base.strip_prefix("http://").unwrap();
            let (hp, prefix) = rest.split_once('/').unwrap();
            let mut c = std::net::TcpStream::connect(hp).unwrap();
            let big = "x".repeat(32 * 1024);
            let _ = write!(
                c,
                "GET /{prefix}demo.git/info/refs HTTP/1.1\r\nHost: {hp}\r\nX-Big: {big}\r\n\r\n"
            );
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            handle.stop();
            out
        });
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert_eq!(handle.summary().requests, 0);
    }

    /// What a [`test_host`] saw: connections accepted, requests in flight now and at most.
    #[derive(Default)]
    struct HostSeen {
        conns: std::sync::atomic::AtomicUsize,
        in_flight: std::sync::atomic::AtomicUsize,
        max_in_flight: std::sync::atomic::AtomicUsize,
        /// `/hold/` requests wait until this is set.
        release: AtomicBool,
        /// `/big-answer` answers begun.
        big: std::sync::atomic::AtomicUsize,
    }

    /// Size of a `/big-answer` body: far more than the socket buffers between the host, the
    /// proxy and the child hold.
    const BIG: u64 = 64 * 1024 * 1024;

    /// A test host's answer body: `Zeros(n)` is n zero bytes, made 64 KiB at a time as they
    /// are read; `Stalls` sends one frame and then nothing, ever (a host that stalls
    /// mid-answer).
    enum TestBody {
        Zeros(u64),
        Stalls { sent: bool },
    }

    impl http_body::Body for TestBody {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<bytes::Bytes>, Self::Error>>>
        {
            static CHUNK: [u8; 64 * 1024] = [0; 64 * 1024];
            let frame = match &mut *self {
                TestBody::Zeros(0) => return std::task::Poll::Ready(None),
                TestBody::Zeros(left) => {
                    let n = (*left).min(CHUNK.len() as u64);
                    *left -= n;
                    &CHUNK[..n as usize]
                }
                TestBody::Stalls { sent: true } => return std::task::Poll::Pending,
                TestBody::Stalls { sent } => {
                    *sent = true;
                    &b"partial"[..]
                }
            };
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                frame,
            )))))
        }
    }

    /// A keep-alive HTTPS host on its own thread. A path with `/hold/` waits for
    /// [`HostSeen::release`]; `/stall-answer` sends 7 of 100 bytes and stalls; `/big-answer`
    /// sends [`BIG`] bytes as fast as they are read; anything else
    /// reads the whole request body and answers `ok`. Returns its port, what it saw and the CA
    /// certificate to trust.
    fn test_host() -> (
        u16,
        Arc<HostSeen>,
        rustls::pki_types::CertificateDer<'static>,
    ) {
        use http_body_util::BodyExt;
        let (cfg, ca_cert) = test_ca();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(HostSeen::default());
        let counted = seen.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                loop {
                    let (c, _) = l.accept().await.unwrap();
                    counted.conns.fetch_add(1, Ordering::SeqCst);
                    let (acceptor, seen) = (acceptor.clone(), counted.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(c).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let seen = seen.clone();
                                async move {
                                    let path = req.uri().path().to_owned();
                                    let body: forward_test::AnyBody = if path.contains("/hold/") {
                                        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
                                        while !seen.release.load(Ordering::SeqCst) {
                                            tokio::time::sleep(std::time::Duration::from_millis(
                                                10,
                                            ))
                                            .await;
                                        }
                                        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                                        forward_test::full(b"ok")
                                    } else if path.ends_with("/big-answer") {
                                        seen.big.fetch_add(1, Ordering::SeqCst);
                                        let mut r = http::Response::new(
                                            TestBody::Zeros(BIG).boxed_unsync(),
                                        );
                                        r.headers_mut().insert(
                                            http::header::CONTENT_LENGTH,
                                            http::HeaderValue::from(BIG),
                                        );
                                        return Ok::<_, std::convert::Infallible>(r);
                                    } else if path.ends_with("/stall-answer") {
                                        let mut r = http::Response::new(
                                            TestBody::Stalls { sent: false }.boxed_unsync(),
                                        );
                                        r.headers_mut().insert(
                                            http::header::CONTENT_LENGTH,
                                            http::HeaderValue::from_static("100"),
                                        );
                                        return Ok::<_, std::convert::Infallible>(r);
                                    } else {
                                        let _ = req.into_body().collect().await;
                                        forward_test::full(b"ok")
                                    };
                                    Ok(http::Response::new(body))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        (port, seen, ca_cert)
    }

    mod forward_test {
        use http_body_util::BodyExt;
        pub type AnyBody =
            http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;
        pub fn full(b: &'static [u8]) -> AnyBody {
            http_body_util::Full::new(bytes::Bytes::from_static(b)).boxed_unsync()
        }
    }

    /// A proxy to [`test_host`] at `port` (trusting `ca`) with `limits`, served on a thread of
    /// `scope` until its handle is stopped.
    fn proxy_to_test_host<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        port: u16,
        ca: rustls::pki_types::CertificateDer<'static>,
        limits: forward::Limits,
        token: &'env SecretBytes,
    ) -> (Handle, String) {
        let up = forward::Upstream::tls("localhost", vec![ca]).unwrap();
        let (p, base) = proxy_with(port, up, token, limits);
        let handle = p.handle();
        serve(scope, p, &|_r: Record| {});
        (handle, base)
    }

    /// Stops the proxy when dropped, so a failing assertion (a panic) inside a thread scope
    /// ends the serving thread and the test fails instead of hanging on the scope's join.
    struct StopOnDrop(Handle);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.stop();
        }
    }

    /// A raw connection to the proxy of `base` with a read timeout of `secs`; the prefix.
    fn connect(base: &str, secs: u64) -> (std::net::TcpStream, String, String) {
        let rest = base.strip_prefix("http://").unwrap();
        let (hp, prefix) = rest.split_once('/').unwrap();
        let c = std::net::TcpStream::connect(hp).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(secs)))
            .unwrap();
        (c, hp.to_owned(), prefix.to_owned())
    }

    /// Read `c` to its end; an error (the read timeout) fails the test with `what`.
    fn read_to_end(c: &mut std::net::TcpStream, what: &str) -> String {
        let mut out = Vec::new();
        if let Err(e) = c.read_to_end(&mut out) {
            panic!(
                "{what}: still open ({e}) after {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    const SMALL: forward::Limits = forward::Limits {
        header_timeout: std::time::Duration::from_millis(300),
        body_idle: std::time::Duration::from_millis(300),
        max_requests: 2,
        max_connections: 2,
    };

    /// Send `request` (`{hp}` and `{prefix}` filled in) through a proxy with [`SMALL`] limits to
    /// a [`test_host`]; what `answer` reads back, and how long until then.
    fn through_small_proxy(
        request: &str,
        answer: impl FnOnce(&mut std::net::TcpStream) -> String,
    ) -> (String, std::time::Duration) {
        let (port, _seen, ca) = test_host();
        let token = SecretBytes::from_slice(b"tok-123");
        std::thread::scope(|s| {
            let (handle, base) = proxy_to_test_host(s, port, ca, SMALL, &token);
            let _stop = StopOnDrop(handle.clone());
            let (mut c, hp, prefix) = connect(&base, 10);
            let t0 = std::time::Instant::now();
            let request = request.replace("{hp}", &hp).replace("{prefix}", &prefix);
            c.write_all(request.as_bytes()).unwrap();
            let got = answer(&mut c);
            let took = t0.elapsed();
            handle.stop();
            (got, took)
        })
    }

    #[test]
    fn a_read_capability_refuses_writes_shaped_like_a_fetch_and_trace_before_the_host() {
        let (port, seen, ca) = test_host();
        let token = SecretBytes::from_slice(b"tok-123");
        std::thread::scope(|s| {
            let (handle, base) = proxy_to_test_host(s, port, ca, SMALL, &token);
            let _stop = StopOnDrop(handle.clone());
            let send = |req: &str, what: &str| {
                let (mut c, hp, prefix) = connect(&base, 10);
                let req = req.replace("{hp}", &hp).replace("{prefix}", &prefix);
                c.write_all(req.as_bytes()).unwrap();
                read_to_end(&mut c, what)
            };
            let upload_pack = "Content-Type: application/x-git-upload-pack-request\r\n";
            for (req, want) in [
                // Forgejo's contents API would write the file x/git-upload-pack.
                (
                    format!("POST /{{prefix}}api/v1/repos/o/r/contents/x/git-upload-pack HTTP/1.1\r\nHost: {{hp}}\r\n{upload_pack}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
                    "HTTP/1.1 403",
                ),
                (
                    "GET /{prefix}demo.git/info/refs?service=git%2Dreceive-pack HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\n\r\n".to_owned(),
                    "HTTP/1.1 403",
                ),
                (
                    "TRACE /{prefix}demo.git/HEAD HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\n\r\n".to_owned(),
                    "HTTP/1.1 405",
                ),
            ] {
                let got = send(&req, "a refused request");
                assert!(got.starts_with(want), "{req}: {got}");
            }
            assert_eq!(seen.conns.load(Ordering::SeqCst), 0, "the host was reached");
            // git's own fetch request still goes through.
            let got = send(
                &format!(
                    "POST /{{prefix}}demo.git/git-upload-pack HTTP/1.1\r\nHost: {{hp}}\r\n{upload_pack}Content-Length: 2\r\nConnection: close\r\n\r\nok"
                ),
                "a fetch",
            );
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
            assert_eq!(seen.conns.load(Ordering::SeqCst), 1);
            handle.stop();
        });
    }

    #[test]
    fn an_upload_that_stalls_mid_body_ends_its_request_within_the_idle_bound() {
        // 10 of 100 bytes, then nothing: the host waits for 90 more that never come.
        let (head, took) = through_small_proxy(
            "POST /{prefix}demo.git/git-upload-pack HTTP/1.1\r\nHost: {hp}\r\nContent-Type: application/x-git-upload-pack-request\r\nContent-Length: 100\r\n\r\n0123456789",
            |c| {
                let mut head = [0u8; 12];
                let n = c
                    .read(&mut head)
                    .unwrap_or_else(|e| panic!("no answer to a stalled upload: {e}"));
                String::from_utf8_lossy(&head[..n]).into_owned()
            },
        );
        assert_eq!(head, "HTTP/1.1 502");
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn an_answer_that_stalls_mid_body_ends_within_the_idle_bound() {
        let (answer, took) = through_small_proxy(
            "GET /{prefix}demo.git/stall-answer HTTP/1.1\r\nHost: {hp}\r\n\r\n",
            |c| read_to_end(c, "a stalled answer"),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\npartial"),
            "cut after the 7 bytes: {answer}"
        );
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    /// A child that sends its request and then reads nothing, keeping the connection open,
    /// while the host sends far more than the socket buffers hold: the proxy's writes to it
    /// stall, and after `body_idle` (300 ms here) its connection is closed and its request
    /// audited with why. With one connection slot and one request slot, a new request is
    /// served once they are free again; were there no bound, it never would be (each new
    /// connection closed unserved), and the child, reading at last, would get all 64 MiB.
    #[test]
    fn a_child_that_reads_nothing_of_an_answer_is_cut_off_within_the_idle_bound() {
        let (port, seen, ca) = test_host();
        let token = SecretBytes::from_slice(b"tok-123");
        let limits = forward::Limits {
            max_requests: 1,
            max_connections: 1,
            ..SMALL
        };
        let records = Mutex::new(Vec::new());
        let audit = |r: Record| records.lock().unwrap().push(r);
        let (took, got, after) = std::thread::scope(|s| {
            let up = forward::Upstream::tls("localhost", vec![ca]).unwrap();
            let (p, base) = proxy_with(port, up, &token, limits);
            let handle = p.handle();
            let _stop = StopOnDrop(handle.clone());
            serve(s, p, &audit);
            let (mut stuck, hp, prefix) = connect(&base, 10);
            write!(
                stuck,
                "GET /{prefix}demo.git/big-answer HTTP/1.1\r\nHost: {hp}\r\n\r\n"
            )
            .unwrap();
            let t0 = std::time::Instant::now();
            while seen.big.load(Ordering::SeqCst) == 0 {
                assert!(t0.elapsed().as_secs() < 5, "the host never got the request");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Until the stuck connection is gone, a new one finds no slot and is closed
            // (reset, as it had sent its request).
            let try_get = || {
                let (mut c, hp, prefix) = connect(&base, 10);
                let mut out = String::new();
                let _ = write!(
                    c,
                    "GET /{prefix}demo.git/info/refs?after HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\n\r\n"
                );
                let _ = c.read_to_string(&mut out);
                out
            };
            let after = loop {
                let a = try_get();
                if !a.is_empty() {
                    break a;
                }
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(5),
                    "no slot came free in 5 s: the child that reads nothing still holds it"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            let took = t0.elapsed();
            // The stuck child reads at last: what the buffers held, then the end (a read timeout
            // here means the connection was still open).
            let got = read_to_end(&mut stuck, "the child that read nothing");
            handle.stop();
            (took, got, after)
        });
        assert!(
            after.starts_with("HTTP/1.1 200") && after.ends_with("ok"),
            "{after}"
        );
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
        assert!(
            got.starts_with("HTTP/1.1 200"),
            "{}",
            &got[..got.len().min(200)]
        );
        assert!(
            (got.len() as u64) < BIG,
            "the whole answer came: the connection was never cut"
        );
        let r = records.lock().unwrap();
        let big = r
            .iter()
            .find(|r| r.path.as_deref() == Some("/demo.git/big-answer"))
            .expect("no audit record for the cut request");
        assert_eq!(big.status, Some(200));
        assert!(big.refused.is_none(), "{big:?}");
        assert!(
            big.cut
                .as_deref()
                .is_some_and(|c| c.contains("the child read nothing of the answer for 300 ms")),
            "{big:?}"
        );
        assert!(big.bytes_down < BIG, "{big:?}");
    }

    /// Tier high: the request's `http_phase: start` line must be on disk before it goes out.
    /// When the writer answers with the error that kept it off (here the error an unwritable
    /// log gives), the child gets a 503 that says what failed and what to do, the host sees
    /// nothing (not even a connection), the refusal is counted, and the proxy stops (fail
    /// closed): the next connect is refused.
    #[test]
    fn a_request_whose_start_line_cannot_be_written_gets_503_and_never_reaches_the_host() {
        let (port, seen, ca) = test_host();
        let token = SecretBytes::from_slice(b"tok-123");
        let starts = std::sync::atomic::AtomicUsize::new(0);
        let audit = |r: Record| {
            if let Some(ack) = r.before {
                starts.fetch_add(1, Ordering::SeqCst);
                let _ = ack.send(Err(Error::data(
                    "cannot write the audit log /l: No space left on device (os error 28); nothing was done",
                )
                .hint("check the disk and the file: df -h /l; ls -l /l")));
            }
        };
        let (answer, handle, still_listening) = std::thread::scope(|s| {
            let up = forward::Upstream::tls("localhost", vec![ca]).unwrap();
            let (p, base) = proxy_audited(port, up, &token, forward::Limits::DEFAULT, true);
            let handle = p.handle();
            let _stop = StopOnDrop(handle.clone());
            serve(s, p, &audit);
            let answer = get(&base, "demo.git/info/refs?service=git-upload-pack");
            // Nobody stops it here: it must end by itself, so a connect is soon refused.
            let hp = base
                .strip_prefix("http://")
                .unwrap()
                .split('/')
                .next()
                .unwrap();
            let t0 = std::time::Instant::now();
            let mut listening = true;
            while listening && t0.elapsed() < std::time::Duration::from_secs(5) {
                listening = std::net::TcpStream::connect(hp).is_ok();
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (answer, handle.clone(), listening)
        });
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.ends_with(
                "\r\n\r\naap: error: the broker cannot write this request's audit line (cannot write the audit log /l: No space left on device (os error 28); nothing was done), so the request was not sent\n\
                 aap: hint: check the disk and the file: df -h /l; ls -l /l\n"
            ),
            "{answer}"
        );
        assert!(!answer.contains("tok-123"), "{answer}");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(seen.conns.load(Ordering::SeqCst), 0, "the host was reached");
        let sum = handle.summary();
        assert_eq!((sum.requests, sum.refused), (0, 1), "{sum:?}");
        assert!(
            !still_listening,
            "the proxy still listened 5 s after a start line failed"
        );
    }

    #[test]
    fn a_head_that_never_ends_is_closed_after_the_header_timeout() {
        let token = SecretBytes::from_slice(b"tok-123");
        let (p, base) = unreachable_proxy(&token, SMALL);
        let handle = p.handle();
        std::thread::scope(|s| {
            let _stop = StopOnDrop(handle.clone());
            serve(s, p, &|_r: Record| {});
            let (mut c, hp, prefix) = connect(&base, 10);
            let t0 = std::time::Instant::now();
            write!(
                c,
                "GET /{prefix}demo.git/info/refs HTTP/1.1\r\nHost: {hp}\r\n"
            )
            .unwrap();
            let answer = read_to_end(&mut c, "a head that never ends");
            let took = t0.elapsed();
            handle.stop();
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
                "{answer}"
            );
            assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
        });
        assert_eq!(handle.summary().requests, 0);
    }

    #[test]
    fn a_head_with_too_many_header_lines_is_refused() {
        let token = SecretBytes::from_slice(b"tok-123");
        let (p, base) = unreachable_proxy(&token, forward::Limits::DEFAULT);
        let handle = p.handle();
        std::thread::scope(|s| {
            let _stop = StopOnDrop(handle.clone());
            serve(s, p, &|_r: Record| {});
            let (mut c, hp, prefix) = connect(&base, 10);
            // 100 short lines: far below the byte bound, over the line bound (64).
            let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
            let _ = write!(
                c,
                "GET /{prefix}demo.git/info/refs HTTP/1.1\r\nHost: {hp}\r\n{many}\r\n"
            );
            let answer = read_to_end(&mut c, "too many header lines");
            handle.stop();
            assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        });
        assert_eq!(handle.summary().requests, 0);
    }

    #[test]
    fn no_more_than_the_cap_of_requests_are_forwarded_at_once() {
        let (port, seen, ca) = test_host();
        let token = SecretBytes::from_slice(b"tok-123");
        // Only the request cap is small: three connections, each with one request.
        let limits = forward::Limits {
            max_requests: 2,
            ..forward::Limits::DEFAULT
        };
        let answers: Vec<String> = std::thread::scope(|s| {
            let (handle, base) = proxy_to_test_host(s, port, ca, limits, &token);
            let _stop = StopOnDrop(handle.clone());
            let clients: Vec<_> = (0..3)
                .map(|i| {
                    let base = base.clone();
                    s.spawn(move || get(&base, &format!("demo.git/hold/{i}")))
                })
                .collect();
            let t0 = std::time::Instant::now();
            while seen.in_flight.load(Ordering::SeqCst) < 2 && t0.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Time for a third to arrive, were it let through.
            std::thread::sleep(std::time::Duration::from_millis(500));
            let held = seen.in_flight.load(Ordering::SeqCst);
            // Released before any assertion, so a failure cannot leave the clients hanging.
            seen.release.store(true, Ordering::SeqCst);
            assert_eq!(held, 2, "requests at the host at once");
            let a = clients.into_iter().map(|c| c.join().unwrap()).collect();
            handle.stop();
            a
        });
        for a in &answers {
            assert!(a.starts_with("HTTP/1.1 200") && a.ends_with("ok"), "{a}");
        }
        assert_eq!(seen.max_in_flight.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_connection_over_the_cap_is_closed_unserved_and_counted() {
        let token = SecretBytes::from_slice(b"tok-123");
        let mut limits = SMALL;
        limits.header_timeout = forward::Limits::DEFAULT.header_timeout;
        let (p, base) = unreachable_proxy(&token, limits);
        let handle = p.handle();
        std::thread::scope(|s| {
            let _stop = StopOnDrop(handle.clone());
            serve(s, p, &|_r: Record| {});
            // Two idle connections hold both slots (their heads have 10 s to come).
            let _held: Vec<_> = (0..2).map(|_| connect(&base, 10).0).collect();
            // The accept loop takes them in order: the third finds no slot and is closed (an
            // open one would hit the 5 s read timeout).
            let (mut c, ..) = connect(&base, 5);
            assert_eq!(read_to_end(&mut c, "a connection over the cap"), "");
            let t0 = std::time::Instant::now();
            while handle.summary().refused == 0 && t0.elapsed().as_secs() < 5 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            handle.stop();
        });
        assert_eq!(handle.summary().refused, 1);
    }

    #[test]
    fn requests_of_an_exec_share_a_kept_alive_connection_to_the_host() {
        let (port, seen, ca) = test_host();
        let token = SecretBytes::from_slice(b"tok-123");
        let up = forward::Upstream::tls("localhost", vec![ca]).unwrap();
        let (p, base) = proxy(port, up, &token);
        let handle = p.handle();
        let audit = |_r: Record| {};
        let answers: Vec<String> = std::thread::scope(|s| {
            serve(s, p, &audit);
            let a = (0..3)
                .map(|i| get(&base, &format!("demo.git/info/refs?n={i}")))
                .collect();
            handle.stop();
            a
        });
        for a in &answers {
            assert!(a.starts_with("HTTP/1.1 200") && a.ends_with("ok"), "{a}");
        }
        assert_eq!(handle.summary().requests, 3);
        assert_eq!(
            seen.conns.load(Ordering::SeqCst),
            1,
            "each request opened its own"
        );
    }

    #[test]
    fn an_untrusted_host_certificate_is_a_502_and_no_token_is_sent() {
        let (port, _ca, seen) = tls_server();
        let token = SecretBytes::from_slice(b"tok-123");
        // Only the compiled-in roots: the throwaway CA is not among them.
        let up = forward::Upstream::tls("localhost", Vec::new()).unwrap();
        let (p, base) = proxy(port, up, &token);
        let handle = p.handle();
        let audit = |_r: Record| {};
        let answer = std::thread::scope(|s| {
            serve(s, p, &audit);
            let a = get(&base, "demo.git/info/refs?service=git-upload-pack");
            handle.stop();
            a
        });
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(
            answer.contains("aap: the proxy could not reach localhost:"),
            "{answer}"
        );
        assert!(!answer.contains("tok-123"));
        // The server's handshake failed: it never read a request.
        assert!(seen.join().is_err());
    }
}
