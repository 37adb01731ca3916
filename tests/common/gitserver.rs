//! A real git smart-HTTP server for tests: a tiny HTTP/1.1 server on 127.0.0.1 (std only, one
//! thread per connection, `Connection: close`) in front of the real `git http-backend` CGI.
//! Every request must carry Basic auth whose password is the token (what Forgejo accepts);
//! the server records every Authorization header it saw, so tests can tell whether a token (or
//! anything) was ever sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

pub struct GitServer {
    pub port: u16,
    /// Decoded `user:password` of every Basic Authorization header received.
    pub seen_auth: Arc<Mutex<Vec<String>>>,
    /// Number of requests answered with the backend (authenticated).
    pub served: Arc<Mutex<usize>>,
}

impl GitServer {
    /// Serve the bare repositories under `root`, requiring `token` as the Basic-auth password.
    pub fn start(root: &Path, token: &str) -> GitServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen_auth = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(0));
        let backend = http_backend();
        let (root, token) = (root.to_path_buf(), token.to_string());
        let (seen, srv) = (seen_auth.clone(), served.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (root, token, backend) = (root.clone(), token.clone(), backend.clone());
                let (seen, srv) = (seen.clone(), srv.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &root, &token, &backend, &seen, &srv);
                });
            }
        });
        GitServer {
            port,
            seen_auth,
            served,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, repo: &str) -> String {
        format!("http://127.0.0.1:{}/{repo}", self.port)
    }

    pub fn saw_token(&self, token: &str) -> bool {
        self.seen_auth
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.contains(token))
    }

    pub fn saw_any_auth(&self) -> bool {
        !self.seen_auth.lock().unwrap().is_empty()
    }

    pub fn served(&self) -> usize {
        *self.served.lock().unwrap()
    }
}

/// The real `git http-backend` of the git on PATH.
pub fn http_backend() -> PathBuf {
    let out = Command::new("git").arg("--exec-path").output().unwrap();
    let p = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("git-http-backend");
    assert!(p.exists(), "no git-http-backend at {}", p.display());
    p
}

/// Create `root/NAME.git`, a bare repository with one commit holding `hello.txt`.
pub fn make_repo(root: &Path, name: &str) {
    let work = root.join(format!("{name}-work"));
    let git = |dir: &Path, args: &[&str]| {
        let o = Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", root)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
    };
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("hello.txt"), "hello from the test server\n").unwrap();
    git(&work, &["add", "hello.txt"]);
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "first",
        ],
    );
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            &format!("{name}.git"),
        ],
    );
    std::fs::remove_dir_all(&work).unwrap();
}

fn respond(conn: &mut TcpStream, status: &str, extra: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    conn.flush()
}

fn handle(
    conn: TcpStream,
    root: &Path,
    token: &str,
    backend: &Path,
    seen: &Mutex<Vec<String>>,
    served: &Mutex<usize>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
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
    let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    // The body: Content-Length or chunked.
    let mut body = Vec::new();
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    // Authentication: Basic with the token as password.
    let creds = header("authorization")
        .and_then(|a| a.strip_prefix("Basic ").map(str::to_string))
        .and_then(|b| aap::devserver::api::b64_decode(&b))
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if let Some(a) = header("authorization") {
        seen.lock()
            .unwrap()
            .push(creds.clone().unwrap_or_else(|| format!("(not basic) {a}")));
    }
    let ok = creds
        .as_deref()
        .and_then(|c| c.split_once(':'))
        .is_some_and(|(_, pw)| pw == token);
    if !ok {
        return respond(
            &mut conn,
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"test forgejo\"\r\n",
            b"token required\n",
        );
    }
    *served.lock().unwrap() += 1;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new(backend);
    cgi.env_clear()
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "test")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HOME", root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(ct) = header("content-type") {
        cgi.env("CONTENT_TYPE", ct);
    }
    if let Some(gp) = header("git-protocol") {
        cgi.env("GIT_PROTOCOL", gp);
    }
    if let Some(ce) = header("content-encoding") {
        cgi.env("HTTP_CONTENT_ENCODING", ce);
    }
    let mut child = cgi.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    // CGI output: headers, a blank line, the body (split as the demo's server does).
    match aap::cmd::demo::servers::cgi_answer(&out.stdout) {
        Some(a) => respond(&mut conn, &a.status, &a.headers, a.body),
        None => respond(&mut conn, "500 Internal Server Error", "", b"bad cgi\n"),
    }
}
