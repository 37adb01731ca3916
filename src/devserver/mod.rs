//! `aap dev-server`: an in-memory server that speaks the subset of Infisical's HTTP API that
//! `aap` uses, shaped like the recordings in `tests/fixtures/infisical-api/`. For tests and the
//! quick start (think `vault server -dev`). It never holds real secrets.
//!
//! Fault knobs (flags, or `POST /_aap/faults` from a loopback peer) add latency, fail requests
//! with 429/500/503, answer like Infisical's rate limiter (500 or 429 with `retry-after`), send
//! malformed or oversized bodies, cut bodies short, and expire tokens.

#![forbid(unsafe_code)]

pub mod api;
pub mod ca;
pub mod http;
pub mod seed;

use crate::error::{Error, Result};
use api::{FaultPatch, Faults, State};
use http::{Request, Response};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use seed::Seed;

/// How to start a dev-server.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub seed: Seed,
    pub tls: bool,
    /// Allow a non-loopback listen address (`--i-know-this-is-not-infisical`).
    pub allow_non_loopback: bool,
    pub faults: Faults,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: Seed::default_seed(),
            tls: false,
            allow_non_loopback: false,
            faults: Faults::default(),
        }
    }
}

/// A running dev-server. Dropping it stops accepting connections and removes the CA directory.
pub struct Handle {
    url: String,
    addr: SocketAddr,
    ca_dir: Option<PathBuf>,
    /// The CA of `ca_dir` (with `tls`), so other loopback servers can share its trust.
    ca: Option<ca::ThrowawayCa>,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl Handle {
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The throwaway CA's PEM file (with `tls`).
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.ca_dir.as_ref().map(|d| d.join("ca.pem"))
    }
    /// The throwaway CA itself (with `tls`): another loopback server that takes a
    /// certificate from it is trusted by whoever trusts [`Handle::ca_path`].
    pub fn ca(&self) -> Option<&ca::ThrowawayCa> {
        self.ca.as_ref()
    }
    pub fn seed(&self) -> &Seed {
        &self.state.seed
    }
    /// Change the fault knobs while it runs.
    pub fn set_faults(&self, patch: FaultPatch) -> Faults {
        self.state.apply(patch)
    }
    pub fn stats(&self) -> api::Stats {
        self.state
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// The one line printed when ready: `ready url=... [ca=...] project_id=...`.
    pub fn ready_line(&self) -> String {
        let mut s = format!("aap dev-server ready url={}", self.url);
        if let Some(ca) = self.ca_path() {
            s.push_str(&format!(" ca={}", ca.display()));
        }
        s.push_str(&format!(" project_id={}", self.state.seed.project_id));
        s
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(d) = &self.ca_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Start a dev-server on a background thread.
pub fn spawn(opts: Options) -> Result<Handle> {
    if !opts.listen.ip().is_loopback() && !opts.allow_non_loopback {
        return Err(Error::config(format!(
            "aap dev-server refuses to listen on {}, which is not a loopback address: it is a test server with no real security",
            opts.listen
        ))
        .hint("listen on loopback: aap dev-server --listen 127.0.0.1:0 (or add --i-know-this-is-not-infisical)"));
    }
    let listener = TcpListener::bind(opts.listen).map_err(|e| {
        Error::config(format!(
            "aap dev-server cannot listen on {}: {e}",
            opts.listen
        ))
        .hint("pick a free port, or let the system choose: aap dev-server --listen 127.0.0.1:0")
    })?;
    let addr = listener.local_addr().map_err(|e| {
        Error::internal(format!("local_addr: {e}"))
            .hint("retry with an explicit address: aap dev-server --listen 127.0.0.1:0")
    })?;
    let (tls, ca_dir, ca) = if opts.tls {
        let (cfg, dir, ca) = tls_setup()?;
        (Some(cfg), Some(dir), Some(ca))
    } else {
        (None, None, None)
    };
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let url = format!(
        "{}://{host}:{}",
        if tls.is_some() { "https" } else { "http" },
        addr.port()
    );
    let state = Arc::new(State::new(opts.seed));
    *state.site_url.lock().unwrap_or_else(|e| e.into_inner()) = url.clone();
    *state.faults.lock().unwrap_or_else(|e| e.into_inner()) = opts.faults;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let state = state.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("dev-server-accept".into())
            .spawn(move || accept_loop(listener, state, tls, stop))
            .map_err(|e| {
                Error::internal(format!("cannot start the dev-server thread: {e}"))
                    .hint("check the process and thread limits: ulimit -u")
            })?;
    }
    Ok(Handle {
        url,
        addr,
        ca_dir,
        ca,
        state,
        stop,
    })
}

fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        state
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connections += 1;
        let state = state.clone();
        let tls = tls.clone();
        let _ = std::thread::Builder::new()
            .name("dev-server-conn".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(75)));
                match tls {
                    Some(cfg) => {
                        let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                            return;
                        };
                        let s = rustls::StreamOwned::new(conn, stream);
                        serve(s, peer, &state, |s| {
                            s.conn.send_close_notify();
                            let _ = s.flush();
                            let _ = s.sock.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    None => serve(stream, peer, &state, |s| {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }),
                }
            });
    }
}

/// Serve requests on one connection until it closes.
fn serve<S: Read + Write>(
    stream: S,
    peer: Option<SocketAddr>,
    state: &State,
    close: impl Fn(&mut S),
) {
    let mut r = BufReader::new(stream);
    loop {
        let req = match http::read_request(&mut r) {
            Ok(Some(q)) => q,
            _ => return,
        };
        let site = state
            .site_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let keep = req.keep_alive();
        let w = r.get_mut();
        if req.path().starts_with("/_aap/") {
            let resp = admin(state, &req, peer);
            if http::write_response(w, &resp, &site).is_err() {
                return;
            }
        } else {
            state
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .requests += 1;
            match answer(state, &req) {
                Outcome::Normal(resp) => {
                    if http::write_response(w, &resp, &site).is_err() {
                        return;
                    }
                }
                Outcome::CutShort(resp) => {
                    let mut out = http::head(&resp, &site, Some(resp.body.len()));
                    out.extend_from_slice(&resp.body[..resp.body.len() / 2]);
                    let _ = w.write_all(&out);
                    let _ = w.flush();
                    close(w);
                    return;
                }
                Outcome::Huge => {
                    let resp = Response::json(200, Vec::new());
                    let mut out = http::head(&resp, &site, None);
                    let chunk = vec![b' '; 64 * 1024];
                    let _ = w.write_all(&out);
                    out.clear();
                    for _ in 0..32 {
                        let _ = w.write_all(format!("{:x}\r\n", chunk.len()).as_bytes());
                        if w.write_all(&chunk).is_err() || w.write_all(b"\r\n").is_err() {
                            return;
                        }
                    }
                    let _ = w.write_all(b"0\r\n\r\n");
                    let _ = w.flush();
                }
            }
        }
        if !keep {
            close(r.get_mut());
            return;
        }
    }
}

enum Outcome {
    Normal(Response),
    CutShort(Response),
    Huge,
}

/// Apply the fault knobs around the API.
fn answer(state: &State, req: &Request) -> Outcome {
    let (latency, fail, malformed, cut, huge) = {
        let mut f = state.faults.lock().unwrap_or_else(|e| e.into_inner());
        let fail = if f.rate_limit_next > 0 {
            f.rate_limit_next -= 1;
            Some(State::rate_limited(
                f.rate_limit_status.unwrap_or(500),
                f.retry_after.unwrap_or(58),
            ))
        } else if f.fail_next > 0 {
            f.fail_next -= 1;
            Some(State::failure(f.fail_status.unwrap_or(503), f.retry_after))
        } else {
            None
        };
        let take = |n: &mut u32| {
            if fail.is_none() && *n > 0 {
                *n -= 1;
                true
            } else {
                false
            }
        };
        let huge = take(&mut f.huge_body_next);
        let malformed = !huge && take(&mut f.malformed_next);
        let cut = !huge && !malformed && take(&mut f.close_mid_body_next);
        (f.latency_ms, fail, malformed, cut, huge)
    };
    if latency > 0 {
        std::thread::sleep(Duration::from_millis(latency));
    }
    let injected = fail.is_some() || malformed || cut || huge;
    if injected {
        state
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .faults_injected += 1;
    }
    if let Some(resp) = fail {
        return Outcome::Normal(resp);
    }
    if huge {
        return Outcome::Huge;
    }
    if malformed {
        return Outcome::Normal(Response::json(
            200,
            b"{\"secret\":{\"secretKey\":\"X\",\"secretValue\":<html>oops".to_vec(),
        ));
    }
    let resp = state.handle(req);
    if cut {
        Outcome::CutShort(resp)
    } else {
        Outcome::Normal(resp)
    }
}

/// `/_aap/faults` (GET, POST) and `/_aap/stats` (GET), from loopback peers only.
fn admin(state: &State, req: &Request, peer: Option<SocketAddr>) -> Response {
    let json = |v: &dyn erased::Ser| Response::json(200, v.to_vec());
    if !peer.is_some_and(|p| p.ip().is_loopback()) {
        return Response::json(
            403,
            br#"{"statusCode":403,"message":"the admin endpoint answers loopback peers only","error":"Forbidden"}"#.to_vec(),
        );
    }
    match (req.method.as_str(), req.path()) {
        ("GET", "/_aap/faults") => json(&*state.faults.lock().unwrap_or_else(|e| e.into_inner())),
        ("POST", "/_aap/faults") => match serde_json::from_slice::<FaultPatch>(&req.body) {
            Ok(p) => json(&state.apply(p)),
            Err(e) => Response::json(
                400,
                serde_json::to_vec(&serde_json::json!({
                    "statusCode": 400, "error": "BadRequest",
                    "message": format!("bad fault patch: {e}"),
                }))
                .unwrap_or_default(),
            ),
        },
        ("GET", "/_aap/stats") => json(&*state.stats.lock().unwrap_or_else(|e| e.into_inner())),
        _ => Response::json(
            404,
            br#"{"statusCode":404,"message":"admin routes: GET/POST /_aap/faults, GET /_aap/stats","error":"Not Found"}"#.to_vec(),
        ),
    }
}

mod erased {
    pub trait Ser {
        fn to_vec(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_vec(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

/// A throwaway CA and a server certificate for localhost/127.0.0.1/::1, the CA certificate
/// written to a fresh directory of mode 0755 (file 0644): the CA is not secret, and every uid
/// the server serves (an agent's child with a scoped token, say) must be able to read it to
/// trust the server; only its creator can write there, so nobody else can swap it. The CA's key
/// is never written.
fn tls_setup() -> Result<(Arc<rustls::ServerConfig>, PathBuf, ca::ThrowawayCa)> {
    let ca = ca::ThrowawayCa::generate("aap dev-server throwaway CA")?;
    let cfg = ca.server_config("aap dev-server")?;
    let dir = ca_dir()?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem())
        .and_then(|()| std::fs::set_permissions(&ca_path, std::fs::Permissions::from_mode(0o644)))
        .map_err(|e| {
            Error::internal(format!("cannot write {}: {e}", ca_path.display()))
                .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
        })?;
    Ok((cfg, dir, ca))
}

/// A new 0755 directory under `$TMPDIR` (whatever the umask): readable by all, writable by its
/// creator only.
fn ca_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let r = api::random_bytes::<6>();
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let p = base.join(format!("aap-dev-ca-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(
                    |e| {
                        Error::internal(format!("cannot chmod {}: {e}", p.display()))
                            .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
                    },
                )?;
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot create a directory under {}: {e}",
                    base.display()
                ))
                .hint("set TMPDIR to a writable directory"));
            }
        }
    }
    Err(Error::internal("cannot create a unique CA directory")
        .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\""))
}

/// `aap dev-server`: start, print the ready line, serve until SIGINT/SIGTERM/SIGHUP, then remove
/// the throwaway CA directory and exit 0.
pub fn run(opts: Options) -> Result<u8> {
    // Before any thread exists, so that every server thread inherits the mask.
    crate::sys::block_termination_signals().map_err(|e| {
        Error::internal(format!("cannot block termination signals: {e}"))
            .hint("check that signal masks can be set here (seccomp), then: aap dev-server")
    })?;
    let handle = spawn(opts)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", handle.ready_line())
        .and_then(|()| out.flush())
        .map_err(|e| {
            Error::internal(format!("cannot write the ready line: {e}"))
                .hint("stdout is closed; run it with stdout open: aap dev-server | cat")
        })?;
    drop(out);
    eprintln!(
        "aap dev-server: NOT Infisical and NOT for real secrets; in-memory, test identities only (docs/infisical.md). Stop with Ctrl-C."
    );
    let sig = crate::sys::wait_for_termination().map_err(|e| {
        Error::internal(format!("waiting for a signal failed: {e}"))
            .hint(format!("stop it by its pid: kill {}", std::process::id()))
    })?;
    tracing::debug!(signal = sig, "dev-server stopping");
    drop(handle);
    Ok(0)
}
