//! The real servers `aap demo` runs on loopback: a git smart-HTTP server (the real
//! `git http-backend` CGI behind a tiny HTTP/1.1 front that demands the Forgejo token as the
//! Basic-auth password, as Forgejo does) and a real `sshd` with a host key made at demo start.
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
        accept_each(listener, tls, move |conn| {
            let _ = handle(conn, &root, &backend, &token, &r, &s);
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
    /// End the connection: TLS says `close_notify` first, so the peer sees a clean end.
    pub fn close(&mut self) {
        if let Conn::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let tcp = match self {
            Conn::Plain(s) => &*s,
            Conn::Tls(s) => &s.sock,
        };
        let _ = tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// Serve each connection `listener` accepts on a thread of its own (30 s read timeout), over
/// TLS with `tls` when given; `serve` gets the connection, which is closed after it.
pub fn accept_each(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    serve: impl Fn(&mut Conn) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let (serve, tls) = (serve.clone(), tls.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
                let mut conn = match tls {
                    Some(cfg) => match rustls::ServerConnection::new(cfg) {
                        Ok(c) => Conn::Tls(Box::new(rustls::StreamOwned::new(c, tcp))),
                        Err(_) => return,
                    },
                    None => Conn::Plain(tcp),
                };
                serve(&mut conn);
                conn.close();
            });
        }
    });
}

/// Write one HTTP/1.1 answer and close (`extra`: headers, each ending in `\r\n`).
pub fn respond(
    conn: &mut impl Write,
    status: &str,
    extra: &str,
    body: &[u8],
) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
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
}

/// Read one request from `conn` (which may be read past it: one request per connection).
pub fn read_request(conn: impl Read) -> std::io::Result<HttpRequest> {
    let mut reader = BufReader::new(conn).take(MAX_BODY as u64 * 2);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut req = HttpRequest {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = req
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if n > MAX_BODY {
            return Err(bad("body too large"));
        }
        req.body.resize(n, 0);
        reader.read_exact(&mut req.body)?;
    } else if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if req.body.len() + n > MAX_BODY {
                return Err(bad("body too large"));
            }
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(req)
}

/// Answer an authenticated request with `git http-backend` (as CGI, `REMOTE_USER=user`).
pub fn serve_git(
    conn: &mut impl Write,
    req: HttpRequest,
    root: &Path,
    backend: &Path,
    user: &str,
) -> std::io::Result<()> {
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
    match cgi_answer(&out.stdout) {
        Some(a) => respond(conn, &a.status, &a.headers, a.body),
        None => respond(conn, "500 Internal Server Error", "", b"bad cgi\n"),
    }
}

fn handle(
    conn: &mut Conn,
    root: &Path,
    backend: &Path,
    token: &str,
    refused: &AtomicUsize,
    served: &AtomicUsize,
) -> std::io::Result<()> {
    let req = read_request(&mut *conn)?;
    let authorized = req.basic_credentials().is_some_and(|c| {
        c.iter()
            .position(|&b| b == b':')
            .is_some_and(|i| &c[i + 1..] == token.as_bytes())
    });
    if !authorized {
        refused.fetch_add(1, Ordering::Relaxed);
        return respond(
            conn,
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"aap demo forgejo\"\r\n",
            b"a Forgejo token is required\n",
        );
    }
    served.fetch_add(1, Ordering::Relaxed);
    serve_git(conn, req, root, backend, "demo")
}

/// A CGI program's output (`git http-backend`'s) as an HTTP answer.
pub struct CgiAnswer<'a> {
    /// `Status:` (default `200 OK`).
    pub status: String,
    /// The other headers, each as `Name: value\r\n`.
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
