//! The proxy's runtime: the accept loop (the peer's uid), hyper's HTTP/1.1 server for each
//! connection, and the forwarding of each routed request to the capability's host.

#![forbid(unsafe_code)]

use super::policy::{self, Prefix, Verdict};
use super::{Record, Stats, Stop};
use crate::catalog::Access;
use crate::error::{Error, Result};
use crate::exec::gitcred::split_host;
use crate::secret::SecretBytes;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

/// The proxy's time and count bounds: [`Limits::DEFAULT`] always, except in unit tests, which
/// make them small to see each one act.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// How long a connection may take to send a request's headers.
    pub(super) header_timeout: Duration,
    /// How long a body (the child's upload or the host's answer) may send nothing mid-stream
    /// before the request is ended; and how long the child may read nothing of an answer
    /// (the proxy's write to it makes no progress) before its connection is closed.
    pub(super) body_idle: Duration,
    /// Requests forwarded at once for one exec; more wait for a free slot.
    pub(super) max_requests: usize,
    /// Connections open at once for one exec; more are closed unserved.
    pub(super) max_connections: usize,
}

impl Limits {
    pub(super) const DEFAULT: Limits = Limits {
        header_timeout: Duration::from_secs(10),
        body_idle: Duration::from_secs(60),
        max_requests: 16,
        max_connections: 64,
    };
}
/// Largest request head read (hyper's read buffer; its minimum is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in one request.
const MAX_HEADERS: usize = 64;
/// How long reaching the host (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the host may take to start its answer (a large fetch makes its pack first).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest path logged in an `http.request` line.
const MAX_LOGGED_PATH: usize = 512;
/// Refusals of one exec written as `http.request` lines; the rest are only counted.
const MAX_REFUSAL_LINES: u64 = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;
/// A kept-alive connection to the host.
type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// Idle connections to the host kept for the exec's next requests.
const MAX_IDLE: usize = 4;
/// How long a kept connection may take to say it is ready again.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Where routed requests go: the host over TLS, always (loopback hosts too, so the token is
/// never on a wire in the clear, and the tests take the path deployments take).
pub(super) struct Upstream {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl Upstream {
    /// TLS with the compiled-in roots and `ca_bundle`.
    pub(super) fn for_host(host: &str, ca_bundle: Option<&Path>) -> Result<Upstream> {
        let extra = match ca_bundle {
            Some(ca) => crate::source::load_ca_bundle(ca)?,
            None => Vec::new(),
        };
        Upstream::tls(host, extra)
    }

    /// TLS to `host` with the compiled-in roots and `extra`.
    pub(super) fn tls(
        host: &str,
        extra: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Result<Upstream> {
        let (name, _) = split_host(host);
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|_| {
            Error::config(format!(
                "the forgejo-pat host {host:?} is not a valid TLS server name"
            ))
            .hint("set backing.host to the Forgejo's host name, e.g. git.example.org, then: aap catalog check")
        })?;
        // The compiled-in roots and `ca_bundle` both: the bundle may be only Infisical's CA.
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in extra {
            roots.add(cert).map_err(|e| {
                Error::config(format!(
                    "the CA bundle (infisical.ca_bundle) holds a certificate rustls cannot use: {e}"
                ))
                .hint("find the bundle's path and check each certificate in it with openssl x509: aap config show")
            })?;
        }
        let config = crate::source::tls_config(roots).map_err(|e| {
            Error::internal(format!("setting up the http-proxy's TLS: {e}"))
                .hint("report this with the output of: aap --version")
        })?;
        Ok(Upstream {
            config: Arc::new(config),
            name,
        })
    }
}

/// The header that carries the token on the wire, as `cred` says: for Forgejo
/// `Authorization: Basic base64(aap:TOKEN)`, else `NAME: [SCHEME ]TOKEN`. The value owns a
/// zeroizing buffer (wiped when the last request holding it is gone) and is marked sensitive.
pub(super) fn credential(
    cap: &str,
    token: &SecretBytes,
    cred: super::Credential<'_>,
) -> Result<(HeaderName, HeaderValue)> {
    use base64ct::{Base64, Encoding};
    let bad = || {
        Error::config(format!(
            "the secret of `{cap}` cannot be sent in an HTTP header"
        ))
        .hint("check the secret's value in Infisical: it must be one line of printable text")
    };
    let (name, out) = match cred {
        super::Credential::ForgejoBasic => {
            let mut plain = Zeroizing::new(Vec::with_capacity(4 + token.len()));
            plain.extend_from_slice(b"aap:");
            plain.extend_from_slice(token.expose());
            let n = Base64::encoded_len(&plain);
            let mut out = Zeroizing::new(vec![0u8; 6 + n]);
            out[..6].copy_from_slice(b"Basic ");
            Base64::encode(&plain, &mut out[6..]).map_err(|_| bad())?;
            (header::AUTHORIZATION, out)
        }
        super::Credential::Header { name, scheme } => {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::config(format!(
                    "the http-proxy header of `{cap}`, {name:?}, is not a valid header name"
                ))
                .hint(format!(
                    "fix header in the catalog, then: aap catalog check; aap catalog show {cap}"
                ))
            })?;
            let mut out = Zeroizing::new(Vec::with_capacity(
                scheme.map_or(0, |s| s.len() + 1) + token.len(),
            ));
            if let Some(sc) = scheme {
                out.extend_from_slice(sc.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(token.expose());
            (name, out)
        }
    };
    let mut v = HeaderValue::from_maybe_shared(Bytes::from_owner(out)).map_err(|_| bad())?;
    v.set_sensitive(true);
    Ok((name, v))
}

/// What every request of the exec shares.
pub(super) struct Inner {
    pub(super) cap_id: String,
    pub(super) host: String,
    pub(super) access: Access,
    pub(super) prefix: Prefix,
    /// The header the token goes in, and its value.
    pub(super) auth_name: HeaderName,
    pub(super) auth: HeaderValue,
    pub(super) upstream: Upstream,
    pub(super) agent_uid: u32,
    pub(super) audit_first: bool,
    pub(super) limits: Limits,
    pub(super) requests: Arc<Semaphore>,
    pub(super) connections: Arc<Semaphore>,
    pub(super) stats: Arc<Stats>,
    pub(super) stop: Arc<Stop>,
    pub(super) records: mpsc::Sender<Record>,
    /// Idle kept-alive connections to the host (at most [`MAX_IDLE`]).
    pub(super) idle: std::sync::Mutex<Vec<Sender>>,
}

impl Inner {
    fn take_idle(&self) -> Option<Sender> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_idle(&self, s: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !s.is_closed() && idle.len() < MAX_IDLE {
            idle.push(s);
        }
    }

    /// Count a refusal; the first [`MAX_REFUSAL_LINES`] of an exec are also audit lines (any
    /// local user can connect, and must not be able to fill the log). `exec.end` counts all.
    fn refuse(&self, r: Record) {
        let n = self.stats.refused.fetch_add(1, Ordering::SeqCst);
        if n < MAX_REFUSAL_LINES {
            let _ = self.records.send(r);
        }
    }
}

/// The serving thread: a current-thread runtime until [`super::Handle::stop`]; dropping it
/// closes the listener and every connection.
pub(super) fn run(listener: std::net::TcpListener, inner: Arc<Inner>, stop: &Stop) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the http-proxy's runtime; it serves nothing");
            return;
        }
    };
    rt.block_on(async {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => {
                tokio::spawn(accept_loop(l, inner));
            }
            Err(e) => tracing::warn!(error = %e, "the http-proxy cannot use its listener"),
        }
        stop.wake.notified().await;
    });
    drop(rt);
}

async fn accept_loop(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::debug!(error = %e, "http-proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let uid = stream
            .local_addr()
            .and_then(|local| crate::sys::tcp_socket_uid(peer, local));
        let refused = match uid {
            Ok(u) if u == inner.agent_uid => None,
            Ok(u) => Some(format!(
                "a connection from uid {u}, not the agent's uid {}, was closed unserved",
                inner.agent_uid
            )),
            Err(e) => Some(format!(
                "the owner of a connection could not be found ({e}); it was closed unserved"
            )),
        };
        if let Some(why) = refused {
            drop(stream);
            inner.refuse(connection_refusal(why));
            continue;
        }
        let Ok(permit) = inner.connections.clone().try_acquire_owned() else {
            drop(stream);
            inner.refuse(connection_refusal(format!(
                "more than {} connections at once; one was closed unserved",
                inner.limits.max_connections
            )));
            continue;
        };
        tokio::spawn(serve_connection(stream, inner.clone(), permit));
    }
}

fn connection_refusal(why: String) -> Record {
    Record {
        before: None,
        completes: false,
        method: None,
        path: None,
        status: None,
        bytes_up: 0,
        bytes_down: 0,
        refused: Some(why),
        cut: None,
    }
}

/// What one connection's parts tell each other.
#[derive(Default)]
struct ConnState {
    /// Why the request in flight was cut by a bound (an idle body, a child that reads
    /// nothing), for its `http.request` line.
    cut: std::sync::Mutex<Option<String>>,
    /// The proxy ends once this connection is done: it answered the 503 of a start line that
    /// could not be written (fail closed), and that answer must reach the child first.
    end_proxy: std::sync::atomic::AtomicBool,
}

type Note = Arc<ConnState>;

fn set_note(note: &Note, why: String) {
    let mut n = note.cut.lock().unwrap_or_else(|p| p.into_inner());
    if n.is_none() {
        *n = Some(why);
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
) {
    let header_timeout = inner.limits.header_timeout;
    let note: Note = Arc::default();
    let io = WriteIdle::new(stream, inner.limits.body_idle, note.clone());
    let (stop, state) = (inner.stop.clone(), note.clone());
    let svc = hyper::service::service_fn(move |req| handle(inner.clone(), note.clone(), req));
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "http-proxy connection ended with an error");
    }
    // The connection and its slot are gone here; so is the request in flight, whose
    // `http.request` line its last body's drop writes.
    if state.end_proxy.load(Ordering::SeqCst) {
        stop.wake.notify_one();
    }
}

/// The child's side of a connection: a write that makes no progress for `after` (the child
/// keeps the connection open and reads nothing, so its socket buffer stays full) fails, which
/// ends the connection, its request (audited) and both their slots. Reads pass through: the
/// child's silence between requests or mid-upload is the other bounds' business.
struct WriteIdle<T> {
    io: T,
    after: Duration,
    /// Set while writes wait; cleared by any write that goes through.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    note: Note,
}

impl<T> WriteIdle<T> {
    fn new(io: T, after: Duration, note: Note) -> WriteIdle<T> {
        WriteIdle {
            io,
            after,
            stalled: None,
            note,
        }
    }

    /// `r` of a write: progress resets the bound; waiting past it is an error.
    fn bounded<R>(
        &mut self,
        r: std::task::Poll<std::io::Result<R>>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::future::Future;
        use std::task::Poll;
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let after = self.after;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let why = format!(
                    "the child read nothing of the answer for {} ms; its connection was closed",
                    after.as_millis()
                );
                set_note(&self.note, why.clone());
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteIdle<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteIdle<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(r, cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // Only a write that takes bytes is progress: a flush of a TCP stream is always ready.
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The 503 for a request whose `http_phase: start` line could not be written: what failed
/// (the audit log's own error) and the next step, as `aap` prints them.
fn unwritable_start_line(why: Option<Error>) -> Response<Body> {
    let (what, hint) = match &why {
        Some(e) => (e.message(), e.hint_text()),
        None => ("the broker's audit writer has stopped", None),
    };
    let e = Error::unavailable(format!(
        "the broker cannot write this request's audit line ({what}), so the request was not sent"
    ))
    .hint(hint.unwrap_or("ask the operator to check the audit log: aap audit verify"));
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, e.render("aap"));
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn logged_path(p: &str) -> String {
    let mut end = p.len().min(MAX_LOGGED_PATH);
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    p[..end].to_owned()
}

async fn handle(
    inner: Arc<Inner>,
    note: Note,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_owned();
    let not_found = |why: &str| {
        inner.refuse(Record {
            before: None,
            completes: false,
            method: Some(method.clone()),
            path: None,
            status: Some(404),
            bytes_up: 0,
            bytes_down: 0,
            refused: Some(why.to_owned()),
            cut: None,
        });
        Ok(text(
            StatusCode::NOT_FOUND,
            "aap: no such endpoint of this exec's proxy\n".into(),
        ))
    };
    if inner.stop.stopped.load(Ordering::SeqCst) {
        return not_found("the exec has ended");
    }
    // Origin form only: an absolute URL names a host of the child's choice.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return not_found("a request for another host");
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let Some(rest) = inner.prefix.route(&pq).map(str::to_owned) else {
        return not_found("a request without this exec's prefix");
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let refusal = match policy::judge(inner.access, &method, &rest, content_type) {
        Verdict::Pass => None,
        Verdict::ReadOnly => Some((
            StatusCode::FORBIDDEN,
            "a write through a read capability",
            policy::read_only_message(&inner.cap_id),
        )),
        Verdict::Method => Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "a method the proxy does not forward",
            policy::method_message(&method),
        )),
    };
    if let Some((status, why, body)) = refusal {
        inner.refuse(Record {
            before: None,
            completes: false,
            method: Some(method),
            path: Some(logged_path(&rest)),
            status: Some(status.as_u16()),
            bytes_up: 0,
            bytes_down: 0,
            refused: Some(why.into()),
            cut: None,
        });
        return Ok(text(status, body));
    }
    // Waits for a free slot: at most `limits.max_requests` are forwarded at once.
    let Ok(permit) = inner.requests.clone().acquire_owned().await else {
        return not_found("the exec has ended");
    };
    let path = logged_path(&rest);
    if inner.audit_first {
        // On disk before the token is used: the writer answers once it is fsync'd.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = inner.records.send(Record {
            before: Some(tx),
            completes: false,
            method: Some(method.clone()),
            path: Some(path.clone()),
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            refused: None,
            cut: None,
        });
        let failed = match sent {
            Err(_) => Some(None),
            Ok(()) => match rx.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Some(e)),
                Err(_) => Some(None),
            },
        };
        if let Some(why) = failed {
            // Not sent: a refusal, though of the broker's own making. Fail closed: nothing
            // more is forwarded, and the proxy ends once this answer has reached the child.
            inner.stop.stopped.store(true, Ordering::SeqCst);
            note.end_proxy.store(true, Ordering::SeqCst);
            inner.stats.refused.fetch_add(1, Ordering::SeqCst);
            return Ok(unwritable_start_line(why));
        }
        if inner.stop.stopped.load(Ordering::SeqCst) {
            // Another request's line failed, or the exec ended, while this one's was written.
            return not_found("the exec has ended");
        }
    }
    // Counted as forwarded from here: it goes to the host (a 502 if the host cannot be reached).
    inner.stats.requests.fetch_add(1, Ordering::SeqCst);
    let log = Arc::new(ReqLog {
        inner: inner.clone(),
        method,
        path,
        status: AtomicU16::new(0),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        sender: std::sync::Mutex::new(None),
        note,
        _permit: permit,
    });
    match forward(&inner, req, &rest, &log).await {
        Ok(r) => {
            log.status.store(r.status().as_u16(), Ordering::SeqCst);
            Ok(r)
        }
        Err(why) => {
            log.status.store(502, Ordering::SeqCst);
            Ok(text(
                StatusCode::BAD_GATEWAY,
                format!("aap: the proxy could not reach {}: {why}\n", inner.host),
            ))
        }
    }
}

/// One forwarded request; written to the audit when its last body is done with.
struct ReqLog {
    inner: Arc<Inner>,
    method: String,
    path: String,
    status: AtomicU16,
    up: AtomicU64,
    down: AtomicU64,
    /// The connection the request went on: kept for the next one once this one is done.
    sender: std::sync::Mutex<Option<Sender>>,
    /// Why a bound cut the request, if one did (its connection's note).
    note: Note,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ReqLog {
    fn drop(&mut self) {
        let sender = self
            .sender
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let cut = self
            .note
            .cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(s) = sender
            && cut.is_none()
        {
            self.inner.put_idle(s);
        }
        let status = self.status.load(Ordering::SeqCst);
        let _ = self.inner.records.send(Record {
            before: None,
            completes: self.inner.audit_first,
            method: Some(std::mem::take(&mut self.method)),
            path: Some(std::mem::take(&mut self.path)),
            status: (status != 0).then_some(status),
            bytes_up: self.up.load(Ordering::SeqCst),
            bytes_down: self.down.load(Ordering::SeqCst),
            refused: None,
            cut,
        });
    }
}

/// Headers never passed on either way: hop-by-hop ones (RFC 9110 7.6.1), the child's own
/// credentials and proxy headers, and `Expect` (the body streams through as it comes).
fn dropped(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "authorization"
            | "cookie"
            | "set-cookie"
            | "expect"
    ) || n.starts_with("proxy-")
}

/// `from` without what [`dropped`] names and without what its `Connection` header names.
fn filtered(from: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (k, v) in from {
        if !dropped(k) && !named.iter().any(|n| n == k.as_str()) {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

async fn forward(
    inner: &Inner,
    req: Request<Incoming>,
    rest: &str,
    log: &Arc<ReqLog>,
) -> std::result::Result<Response<Body>, String> {
    let (parts, body) = req.into_parts();
    let up_log = log.clone();
    let body = body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            let n = d.len() as u64;
            up_log.up.fetch_add(n, Ordering::SeqCst);
            up_log.inner.stats.bytes_up.fetch_add(n, Ordering::SeqCst);
        }
        f
    });
    let idle = inner.limits.body_idle;
    let mut out =
        Request::new(Idle::new(body, idle, log.note.clone(), "the upload").boxed_unsync());
    *out.method_mut() = parts.method;
    *out.uri_mut() = rest
        .parse()
        .map_err(|_| "the request's path is not a valid URI".to_string())?;
    let mut headers = filtered(&parts.headers);
    let host = HeaderValue::from_str(&inner.host)
        .map_err(|_| "the host is not a valid Host header".to_string())?;
    headers.insert(header::HOST, host);
    headers.insert(inner.auth_name.clone(), inner.auth.clone());
    *out.headers_mut() = headers;

    let (resp, sender) = send(inner, out).await?;
    *log.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    let (mut parts, body) = resp.into_parts();
    parts.headers = filtered(&parts.headers);
    let down_log = log.clone();
    let body = body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            let n = d.len() as u64;
            down_log.down.fetch_add(n, Ordering::SeqCst);
            down_log
                .inner
                .stats
                .bytes_down
                .fetch_add(n, Ordering::SeqCst);
        }
        f
    });
    let body = Idle::new(body, idle, log.note.clone(), "the host's answer").boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// A body that ends with an error when its source sends nothing for `after` (from its start
/// or its last frame): a stalled upload or answer ends its request rather than holding a
/// request slot, a connection and the exec's runtime forever.
struct Idle<B> {
    inner: B,
    after: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Where the request's line learns why it ended, and what this body is.
    note: Note,
    what: &'static str,
}

impl<B> Idle<B> {
    fn new(inner: B, after: Duration, note: Note, what: &'static str) -> Idle<B> {
        Idle {
            inner,
            after,
            timer: Box::pin(tokio::time::sleep(after)),
            note,
            what,
        }
    }
}

impl<B> http_body::Body for Idle<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.after;
                this.timer.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let why = format!(
                        "{} sent nothing for {} ms; the request was ended",
                        this.what,
                        this.after.as_millis()
                    );
                    set_note(&this.note, why.clone());
                    Poll::Ready(Some(Err(why.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Send `req` to the host: on an idle kept-alive connection when one takes it (a request a
/// connection did not take is sent on the next, so nothing is sent twice), else on a fresh one.
/// Returns the answer and the connection, to be kept once the answer is read.
async fn send(
    inner: &Inner,
    mut req: Request<Body>,
) -> std::result::Result<(Response<Incoming>, Sender), String> {
    let timed_out = || format!("no answer within {} s", RESPONSE_TIMEOUT.as_secs());
    while let Some(mut s) = inner.take_idle() {
        match tokio::time::timeout(READY_TIMEOUT, s.ready()).await {
            Ok(Ok(())) => {}
            _ => continue, // closed, or still busy: dropped
        }
        match tokio::time::timeout(RESPONSE_TIMEOUT, s.try_send_request(req)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(resp)) => return Ok((resp, s)),
            Ok(Err(mut e)) => match e.take_message() {
                Some(back) => req = back,
                None => return Err(format!("{}", e.error())),
            },
        }
    }
    let mut s = connect(inner).await?;
    let resp = tokio::time::timeout(RESPONSE_TIMEOUT, s.send_request(req))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| format!("{e}"))?;
    Ok((resp, s))
}

/// A fresh HTTP/1.1 connection to the host (TCP, then TLS), driven by a task of its own for
/// as long as it lives.
async fn connect(inner: &Inner) -> std::result::Result<Sender, String> {
    let (name, port) = split_host(&inner.host);
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((name, port.unwrap_or(443))),
    )
    .await
    .map_err(|_| format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()))?
    .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let up = &inner.upstream;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(up.config.clone()).connect(up.name.clone(), tcp),
    )
    .await
    .map_err(|_| format!("no TLS handshake within {} s", CONNECT_TIMEOUT.as_secs()))?
    .map_err(|e| format!("TLS: {e}"))?;
    handshake(tls).await
}

async fn handshake<T>(io: T) -> std::result::Result<Sender, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "http-proxy upstream connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_and_headers_are_filtered() {
        assert_eq!(split_host("git.example.org"), ("git.example.org", None));
        assert_eq!(split_host("127.0.0.1:3000"), ("127.0.0.1", Some(3000)));
        assert_eq!(split_host("[::1]:3000"), ("::1", Some(3000)));
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "token child"),
            ("cookie", "a=b"),
            ("proxy-authorization", "x"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/x-git-upload-pack-request"),
            ("git-protocol", "version=2"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let f = filtered(&h);
        let names: Vec<&str> = f.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "git-protocol"]);
    }

    #[test]
    fn the_auth_header_is_basic_with_the_token_and_redacted() {
        let basic = |t: &[u8]| {
            credential(
                "c",
                &SecretBytes::from_slice(t),
                super::super::Credential::ForgejoBasic,
            )
        };
        let (n, v) = basic(b"tok").unwrap();
        assert_eq!(n, header::AUTHORIZATION);
        assert_eq!(v.as_bytes(), b"Basic YWFwOnRvaw==");
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains("YWFw"));
        assert!(basic(b"a\nb").is_ok());
    }

    #[test]
    fn a_named_header_carries_the_scheme_and_the_secret_and_refuses_a_line_break() {
        let named = |t: &[u8], scheme| {
            credential(
                "c",
                &SecretBytes::from_slice(t),
                super::super::Credential::Header {
                    name: "X-Api-Key",
                    scheme,
                },
            )
        };
        let (n, v) = named(b"k-1", Some("Bearer")).unwrap();
        assert_eq!(n.as_str(), "x-api-key");
        assert_eq!(v.as_bytes(), b"Bearer k-1");
        assert!(v.is_sensitive());
        assert_eq!(named(b"k-1", None).unwrap().1.as_bytes(), b"k-1");
        let e = named(b"k\r\nHost: evil", None).unwrap_err();
        assert!(!e.message().contains("evil"), "{}", e.message());
    }
}
