//! The real servers `aap demo` runs on loopback: a git smart-HTTP server (the real
//! `git http-backend` CGI behind a tiny HTTP/1.1 front that demands the Forgejo token as the
//! Basic-auth password and keeps connections alive, as Forgejo does) and a real `sshd` with a host key made at demo start.
//! Both are throwaway: they serve the demo's temp dir and die with it.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest request body the git front reads (a demo clone sends a few hundred bytes).
const MAX_BODY: usize = 1024 * 1024;

/// `git http-backend` on 127.0.0.1, serving the bare repositories under a root.
pub struct GitServer {
    pub port: u16,
    /// `http` or `https`.
    scheme: &'static str,
    /// Requests refused for want of the token.
    pub refused: Arc<AtomicUsize>,
    /// Requests served (the token was sent).
    pub served: Arc<AtomicUsize>,
}

/// The `git-http-backend` of the git on PATH, if both exist.
pub fn http_backend() -> Option<PathBuf> {
    let out = Command::new("git")
        .arg("--exec-path")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("git-http-backend");
    p.is_file().then_some(p)
}

fn git(dir: &Path, home: &Path, args: &[&str]) -> Result<()> {
    let o = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .args(args)
        .output()
        .map_err(|e| {
            Error::internal(format!("cannot run git: {e}")).hint("apt-get install -y git")
        })?;
    if !o.status.success() {
        return Err(Error::internal(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
        .hint("check that git works here: git --version"));
    }
    Ok(())
}

/// Create `root/NAME.git`, a bare repository with one commit holding `README`.
pub fn make_repo(root: &Path, name: &str, readme: &str) -> Result<()> {
    let work = root.join(format!("{name}-work"));
    std::fs::create_dir_all(&work).map_err(|e| {
        Error::internal(format!("cannot create {}: {e}", work.display()))
            .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
    })?;
    git(&work, root, &["init", "-q", "-b", "main"])?;
    std::fs::write(work.join("README"), readme).map_err(|e| {
        Error::internal(format!("cannot write the demo repository: {e}"))
            .hint("check free space in TMPDIR: df -h \"${TMPDIR:-/tmp}\"")
    })?;
    git(&work, root, &["add", "README"])?;
    git(
        &work,
        root,
        &[
            "-c",
            "user.name=aap demo",
            "-c",
            "user.email=demo@aap.invalid",
            "commit",
            "-q",
            "-m",
            "the demo repository",
        ],
    )?;
    let bare = format!("{name}.git");
    let src = work.to_string_lossy().into_owned();
    git(root, root, &["clone", "-q", "--bare", &src, &bare])?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

impl GitServer {
    /// Serve the bare repositories under `root`; every request must carry Basic auth whose
    /// password is `token` (a dev-server test value, never a real secret). With `tls`, over
    /// HTTPS with that config (a certificate of a throwaway CA, see [`crate::devserver::ca`]).
    pub fn start(
        root: &Path,
        backend: PathBuf,
        token: String,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<GitServer> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| {
            Error::internal(format!("cannot listen on 127.0.0.1: {e}"))
                .hint("check that loopback works: ip addr show lo")
        })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let refused = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (r, s) = (refused.clone(), served.clone());
        let root = root.to_path_buf();
        let scheme = if tls.is_some() { "https" } else { "http" };
        accept_each(listener, tls, move |req| {
            handle(req, &root, &backend, &token, &r, &s)
        });
        Ok(GitServer {
            port,
            scheme,
            refused,
            served,
        })
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, repo: &str) -> String {
        format!("{}://127.0.0.1:{}/{repo}", self.scheme, self.port)
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

/// One accepted connection of a loopback test server: plain TCP, or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

impl Conn {
    /// The TCP connection under it.
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }

    /// End the connection: TLS says `close_notify` first, so the peer sees a clean end.
    pub fn close(&mut self) {
        if let Conn::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }
}

/// How long a request may take to arrive once it has started (and an answer to be written).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kept-alive connection may wait for its next request before it is closed.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(15);
/// Largest request line plus headers.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in one request.
const MAX_HEADER_LINES: usize = 100;

/// One answer of a loopback test server. It is written with `Content-Length` (the body is
/// whole), and with `Connection: close` only when the connection ends after it.
pub struct Answer {
    /// `200 OK`, `401 Unauthorized`...
    pub status: String,
    /// More headers, each ending in `\r\n` (never `Content-Length`, `Transfer-Encoding` or
    /// `Connection`: the server frames the answer itself).
    pub headers: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn new(status: &str, headers: &str, body: impl Into<Vec<u8>>) -> Answer {
        Answer {
            status: status.to_owned(),
            headers: headers.to_owned(),
            body: body.into(),
        }
    }
}

/// Serve each connection `listener` accepts on a thread of its own, over TLS with `tls` when
/// given, as HTTP/1.1 with persistent connections (as a real Forgejo does): `serve` answers
/// each request in turn, and the connection stays open for the next one until the client asks
/// to close (`Connection: close`, or HTTP/1.0), closes, sends something that is not a request,
/// or sends nothing for 15 s between requests (30 s within one). Returns the number of
/// connections accepted so far, so tests can tell how many a client opened.
pub fn accept_each(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    serve: impl Fn(HttpRequest) -> Answer + Send + Sync + 'static,
) -> Arc<AtomicUsize> {
    accept_each_with(listener, tls, KEEP_ALIVE_IDLE, serve)
}

/// [`accept_each`] with the keep-alive idle bound given (the unit tests make it short).
fn accept_each_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    idle: Duration,
    serve: impl Fn(HttpRequest) -> Answer + Send + Sync + 'static,
) -> Arc<AtomicUsize> {
    let serve = Arc::new(serve);
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let (serve, tls) = (serve.clone(), tls.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_write_timeout(Some(READ_TIMEOUT));
                // As Forgejo's Go server does on every connection: with Nagle on, an answer
                // written right after TLS 1.3's session tickets waits for their (delayed,
                // 40 ms) ACK on a kept-alive connection.
                let _ = tcp.set_nodelay(true);
                let conn = match tls {
                    Some(cfg) => match rustls::ServerConnection::new(cfg) {
                        Ok(c) => Conn::Tls(Box::new(rustls::StreamOwned::new(c, tcp))),
                        Err(_) => return,
                    },
                    None => Conn::Plain(tcp),
                };
                let mut reader = BufReader::new(conn);
                serve_connection(&mut reader, idle, &*serve);
                reader.get_mut().close();
            });
        }
    });
    accepted
}

/// The requests of one connection, in turn, until it is to be closed.
fn serve_connection(
    reader: &mut BufReader<Conn>,
    idle: Duration,
    serve: &(dyn Fn(HttpRequest) -> Answer + Send + Sync),
) {
    let mut first = true;
    loop {
        // Between requests: wait up to the idle bound for the next one to start.
        let wait = if first { READ_TIMEOUT } else { idle };
        first = false;
        if reader.get_ref().tcp().set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match reader.fill_buf() {
            Ok([]) | Err(_) => return, // closed, or idle too long
            Ok(_) => {}
        }
        if reader
            .get_ref()
            .tcp()
            .set_read_timeout(Some(READ_TIMEOUT))
            .is_err()
        {
            return;
        }
        let req = match read_request(reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    let a = Answer::new("400 Bad Request", "", format!("{e}\n"));
                    let _ = write_answer(reader.get_mut(), &a, true, false);
                }
                return;
            }
        };
        let close = req.wants_close();
        let head = req.method == "HEAD";
        let answer = serve(req);
        if write_answer(reader.get_mut(), &answer, close, head).is_err() || close {
            return;
        }
    }
}

/// Write one HTTP/1.1 answer, framed by `Content-Length`; with `close`, say the connection
/// ends after it. The answer to a HEAD request has no body (its length is still given).
pub fn write_answer(
    conn: &mut impl Write,
    a: &Answer,
    close: bool,
    head: bool,
) -> std::io::Result<()> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Length: {}\r\n{connection}{}\r\n",
        a.status,
        a.body.len(),
        a.headers
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(&a.body);
    }
    conn.write_all(&out)?;
    conn.flush()
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// One HTTP request as git sends it: the request line, headers (names lower-cased) and the
/// body (`Content-Length` or chunked, at most 1 MiB).
pub struct HttpRequest {
    pub method: String,
    pub target: String,
    /// `HTTP/1.1`, `HTTP/1.0`.
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded `user:password` of a Basic `Authorization` header.
    pub fn basic_credentials(&self) -> Option<Vec<u8>> {
        self.header("authorization")?
            .strip_prefix("Basic ")
            .and_then(crate::devserver::api::b64_decode)
    }

    /// Whether the client asked for the connection to end after this request: a
    /// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`.
    pub fn wants_close(&self) -> bool {
        let has = |token: &str| {
            self.headers
                .iter()
                .filter(|(n, _)| n == "connection")
                .flat_map(|(_, v)| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        has("close") || (self.version != "HTTP/1.1" && !has("keep-alive"))
    }
}

/// One line of at most `max` bytes (its `\r\n` or `\n` removed); `None` at the end of input.
fn read_line(r: &mut impl BufRead, max: usize) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > max {
            bad("a line too long")
        } else {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut mid-line")
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad("a line that is not UTF-8"))
}

/// Read one request from `r`, its body whole (`Content-Length` or chunked, at most 1 MiB),
/// so that what follows in `r` is the next request of the connection. `None` when the input
/// ends before a request starts.
pub fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<HttpRequest>> {
    let mut budget = MAX_HEAD;
    let mut line = |r: &mut dyn BufRead| -> std::io::Result<Option<String>> {
        let l = read_line(&mut &mut *r, budget)?;
        budget -= l.as_ref().map_or(0, |l| l.len() + 1).min(budget);
        Ok(l)
    };
    let Some(request_line) = line(r)? else {
        return Ok(None);
    };
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not an HTTP request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not HTTP/1.x"));
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let h = line(r)?.ok_or_else(|| bad("the headers never ended"))?;
        if h.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADER_LINES {
            return Err(bad("too many header lines"));
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| bad("a header without a colon"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut req = HttpRequest {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let size = read_line(r, 1024)?.ok_or_else(|| bad("the body never ended"))?;
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("a bad chunk size"))?;
            if n == 0 {
                // Trailers, if any, up to the blank line that ends the body; they count
                // against the head's bound, as more header lines would.
                while !line(r)?
                    .ok_or_else(|| bad("the body never ended"))?
                    .is_empty()
                {}
                break;
            }
            if req.body.len() + n > MAX_BODY {
                return Err(bad("a body over 1 MiB"));
            }
            let at = req.body.len();
            req.body.resize(at + n, 0);
            r.read_exact(&mut req.body[at..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(bad("a chunk without its CRLF"));
            }
        }
    } else if let Some(v) = req.header("content-length") {
        let n: usize = v.parse().map_err(|_| bad("a bad Content-Length"))?;
        if n > MAX_BODY {
            return Err(bad("a body over 1 MiB"));
        }
        req.body.resize(n, 0);
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

/// Answer an authenticated request with `git http-backend` (as CGI, `REMOTE_USER=user`). Its
/// whole output is read, so the answer has a `Content-Length`.
pub fn serve_git(req: HttpRequest, root: &Path, backend: &Path, user: &str) -> Answer {
    match run_cgi(req, root, backend, user) {
        Ok(out) => match cgi_answer(&out) {
            Some(a) => Answer::new(&a.status, &a.headers, a.body),
            None => Answer::new("500 Internal Server Error", "", "bad cgi\n"),
        },
        Err(e) => Answer::new(
            "500 Internal Server Error",
            "",
            format!("cannot run git http-backend: {e}\n"),
        ),
    }
}

fn run_cgi(req: HttpRequest, root: &Path, backend: &Path, user: &str) -> std::io::Result<Vec<u8>> {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let mut cgi = Command::new(backend);
    cgi.env_clear()
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &req.method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", req.body.len().to_string())
        .env("HOME", root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (h, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("git-protocol", "GIT_PROTOCOL"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(v) = req.header(h) {
            cgi.env(var, v);
        }
    }
    let mut child = cgi.spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| bad("no stdin"))?;
    let body = req.body;
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    Ok(out.stdout)
}

fn handle(
    req: HttpRequest,
    root: &Path,
    backend: &Path,
    token: &str,
    refused: &AtomicUsize,
    served: &AtomicUsize,
) -> Answer {
    let authorized = req.basic_credentials().is_some_and(|c| {
        c.iter()
            .position(|&b| b == b':')
            .is_some_and(|i| &c[i + 1..] == token.as_bytes())
    });
    if !authorized {
        refused.fetch_add(1, Ordering::Relaxed);
        return Answer::new(
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"aap demo forgejo\"\r\n",
            "a Forgejo token is required\n",
        );
    }
    served.fetch_add(1, Ordering::Relaxed);
    serve_git(req, root, backend, "demo")
}

/// A CGI program's output (`git http-backend`'s) as an HTTP answer.
pub struct CgiAnswer<'a> {
    /// `Status:` (default `200 OK`).
    pub status: String,
    /// The other headers, each as `Name: value\r\n`, without those that frame the answer
    /// (`Content-Length`, `Transfer-Encoding`, `Connection`).
    pub headers: String,
    pub body: &'a [u8],
}

/// Split CGI output into headers and body at the first blank line (CRLF or LF); `None` when
/// there is none.
pub fn cgi_answer(raw: &[u8]) -> Option<CgiAnswer<'_>> {
    let (end, sep) = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut status = "200 OK".to_string();
    let mut headers = String::new();
    for l in head.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("status") {
                status = v.trim().to_string();
            } else if ["content-length", "transfer-encoding", "connection"]
                .iter()
                .any(|f| k.trim().eq_ignore_ascii_case(f))
            {
                // The server frames the answer itself (`git http-backend` sends a
                // Content-Length for the files of the dumb protocol).
            } else {
                headers.push_str(&format!("{}: {}\r\n", k.trim(), v.trim()));
            }
        }
    }
    Some(CgiAnswer {
        status,
        headers,
        body: &raw[end + sep..],
    })
}

/// The `sshd` of this machine, if OpenSSH's server is installed.
pub fn find_sshd() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A real sshd on 127.0.0.1 with a host key made now, accepting `authorized_key` for the user
/// running the demo; killed (by its pid) on drop.
pub struct Sshd {
    child: Child,
    pub port: u16,
    /// `ssh-ed25519 AAAA...` of its host key.
    pub host_key: String,
    pub log: PathBuf,
}

/// `ssh-keygen -t ed25519` into `path` (no passphrase); returns the public key line.
pub fn keygen(path: &Path, comment: &str) -> Result<String> {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| {
            Error::internal(format!("cannot run ssh-keygen: {e}"))
                .hint("apt-get install -y openssh-client")
        })?;
    if !st.success() {
        return Err(
            Error::internal(format!("ssh-keygen could not make {}", path.display()))
                .hint("ssh-keygen -t ed25519 -f /tmp/test-key"),
        );
    }
    let pubkey = std::fs::read_to_string(path.with_extension("pub")).map_err(|e| {
        Error::internal(format!("cannot read {}.pub: {e}", path.display()))
            .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
    })?;
    Ok(pubkey.trim().to_string())
}

impl Sshd {
    pub fn start(sshd: &Path, dir: &Path, authorized_key: &str) -> Result<Sshd> {
        let fail = |what: String| {
            Error::internal(format!("demo sshd: {what}"))
                .hint("check that OpenSSH's server runs here: /usr/sbin/sshd -t")
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        if crate::sys::uid() == 0 {
            let _ = std::fs::create_dir_all("/run/sshd"); // its privilege-separation dir
        }
        let host_key = keygen(&dir.join("host_key"), "aap-demo-host")?;
        let host_key: String = host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let ak = dir.join("authorized_keys");
        std::fs::write(&ak, format!("{authorized_key}\n"))
            .map_err(|e| fail(format!("{}: {e}", ak.display())))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| fail(format!("no free port on 127.0.0.1: {e}")))?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowAgentForwarding no\n\
                 LogLevel VERBOSE\n",
                hk = dir.join("host_key").display(),
                pid = dir.join("sshd.pid").display(),
                ak = ak.display(),
            ),
        )
        .map_err(|e| fail(format!("{}: {e}", config.display())))?;
        let log = dir.join("sshd.log");
        let logf =
            std::fs::File::create(&log).map_err(|e| fail(format!("{}: {e}", log.display())))?;
        let mut child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", sshd.display())))?;
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t.elapsed() > Duration::from_secs(10) || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "it did not listen on 127.0.0.1:{port}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Sshd {
            child,
            port,
            host_key,
            log,
        })
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A plain-HTTP [`accept_each_with`] server that answers each request with
    /// `METHOD TARGET BODY-LENGTH` and records what it served; its address, the connections
    /// it accepted, and what it served.
    fn echo_server(idle: Duration) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let accepted = accept_each_with(l, None, idle, move |req| {
            let line = format!("{} {} {}", req.method, req.target, req.body.len());
            record.lock().unwrap().push(line.clone());
            Answer::new("200 OK", "X-Test: 1\r\n", format!("{line}\n"))
        });
        (addr, accepted, seen)
    }

    /// One answer read off `r` as a client would: the head, then as many body bytes as its
    /// `Content-Length` says (none for a HEAD). Panics when the connection ends first.
    fn answer(r: &mut BufReader<TcpStream>, head_only: bool) -> (String, String) {
        let mut head = String::new();
        loop {
            let mut l = String::new();
            assert!(
                r.read_line(&mut l).unwrap() > 0,
                "the connection ended mid-answer: {head}"
            );
            head.push_str(&l);
            if l == "\r\n" {
                break;
            }
        }
        let n: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("an answer without Content-Length")
            .parse()
            .unwrap();
        let mut body = vec![0; if head_only { 0 } else { n }];
        r.read_exact(&mut body).unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    #[test]
    fn requests_are_answered_in_turn_on_one_connection_until_the_client_closes_it() {
        let (addr, accepted, seen) = echo_server(KEEP_ALIVE_IDLE);
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        // A body by length, then one chunked with a trailer, sent in one write: the server must
        // read each body whole and keep what follows for the next request.
        c.write_all(
            b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
              POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .unwrap();
        let (head, body) = answer(&mut r, false);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
        assert!(head.contains("X-Test: 1\r\n"), "{head}");
        assert_eq!(body, "POST /a 5\n");
        let (_, body) = answer(&mut r, false);
        assert_eq!(body, "POST /b 7\n");
        // A HEAD gets the length and no body: the next answer must start right after the head.
        c.write_all(b"HEAD /c HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, body) = answer(&mut r, true);
        assert!(head.contains("Content-Length: 10\r\n"), "{head}");
        assert_eq!(body, "");
        c.write_all(b"GET /d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (head, body) = answer(&mut r, false);
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert_eq!(body, "GET /d 0\n");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "more after the last answer: {rest:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["POST /a 5", "POST /b 7", "HEAD /c 0", "GET /d 0"]
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "connections accepted");
    }

    #[test]
    fn an_http_1_0_request_is_answered_and_its_connection_closed() {
        let (addr, accepted, _) = echo_server(KEEP_ALIVE_IDLE);
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /old HTTP/1.0\r\n\r\n").unwrap();
        let mut all = String::new();
        c.read_to_string(&mut all).unwrap();
        assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
        assert!(all.contains("Connection: close\r\n"), "{all}");
        assert!(all.ends_with("\r\n\r\nGET /old 0\n"), "{all}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_kept_connection_is_closed_after_the_idle_bound() {
        let (addr, _, seen) = echo_server(Duration::from_millis(200));
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        c.write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(answer(&mut r, false).1, "GET /a 0\n");
        let t0 = Instant::now();
        let mut rest = Vec::new();
        // A read timeout (the connection still open after 10 s) fails here.
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_body_over_the_bound_or_a_bad_request_gets_400_and_the_connection_ends() {
        let (addr, _, seen) = echo_server(KEEP_ALIVE_IDLE);
        for request in [
            format!(
                "POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            ),
            "POST /bad HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_owned(),
            "nonsense\r\n\r\n".to_owned(),
        ] {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(request.as_bytes()).unwrap();
            let mut all = String::new();
            c.read_to_string(&mut all).unwrap();
            assert!(all.starts_with("HTTP/1.1 400 "), "{request:?}: {all}");
            assert!(all.contains("Connection: close\r\n"), "{all}");
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn cgi_framing_headers_are_left_to_the_server() {
        let raw =
            b"Status: 404 Not Found\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nnot";
        let a = cgi_answer(raw).unwrap();
        assert_eq!(a.status, "404 Not Found");
        assert_eq!(a.headers, "Content-Type: text/plain\r\n");
        assert_eq!(a.body, b"not");
    }
}
