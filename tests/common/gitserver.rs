//! A real git smart-HTTP server for tests: a tiny HTTP/1.1 server on 127.0.0.1 (std only, one
//! thread per connection, kept alive between requests as a real Forgejo does) in front of the
//! real `git http-backend` CGI,
//! over plain HTTP or, with [`GitServer::start_tls`], over HTTPS with a certificate of a
//! throwaway CA. Every request must carry Basic auth whose password is the token (what Forgejo
//! accepts); the server records every Authorization header it saw, so tests can tell whether a
//! token (or anything) was ever sent.

use aap::cmd::demo::servers::{self, Answer, HttpRequest};
use aap::devserver::ca::ThrowawayCa;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct GitServer {
    pub port: u16,
    /// `http` or `https`.
    scheme: &'static str,
    /// Decoded `user:password` of every Basic Authorization header received.
    pub seen_auth: Arc<Mutex<Vec<String>>>,
    /// Number of requests answered with the backend (authenticated).
    pub served: Arc<Mutex<usize>>,
    /// Every request received, answered with the backend or refused.
    requests: Arc<AtomicUsize>,
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
}

impl GitServer {
    /// Serve the bare repositories under `root` over plain HTTP, requiring `token` as the
    /// Basic-auth password.
    pub fn start(root: &Path, token: &str) -> GitServer {
        Self::serve(root, token, None)
    }

    /// The same over HTTPS, with a certificate for 127.0.0.1 from `ca`.
    pub fn start_tls(root: &Path, token: &str, ca: &ThrowawayCa) -> GitServer {
        Self::serve(root, token, Some(ca.server_config("test forgejo").unwrap()))
    }

    fn serve(root: &Path, token: &str, tls: Option<Arc<rustls::ServerConfig>>) -> GitServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen_auth = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(0));
        let backend = http_backend();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (root, token) = (root.to_path_buf(), token.to_string());
        let requests = Arc::new(AtomicUsize::new(0));
        let (seen, srv, reqs) = (seen_auth.clone(), served.clone(), requests.clone());
        let connections = servers::accept_each(listener, tls, move |req| {
            reqs.fetch_add(1, Ordering::SeqCst);
            handle(req, &root, &token, &backend, &seen, &srv)
        });
        GitServer {
            port,
            scheme,
            seen_auth,
            served,
            requests,
            connections,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, repo: &str) -> String {
        format!("{}://127.0.0.1:{}/{repo}", self.scheme, self.port)
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

    /// Requests received so far, served or refused.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
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

/// The demo's git server pieces (src/cmd/demo/servers.rs), with the tests' own bookkeeping:
/// every `Authorization` seen is recorded, and only the token as Basic password is served.
fn handle(
    req: HttpRequest,
    root: &Path,
    token: &str,
    backend: &Path,
    seen: &Mutex<Vec<String>>,
    served: &Mutex<usize>,
) -> Answer {
    let creds = req
        .basic_credentials()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if let Some(a) = req.header("authorization") {
        seen.lock()
            .unwrap()
            .push(creds.clone().unwrap_or_else(|| format!("(not basic) {a}")));
    }
    let ok = creds
        .as_deref()
        .and_then(|c| c.split_once(':'))
        .is_some_and(|(_, pw)| pw == token);
    if !ok {
        return Answer::new(
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"test forgejo\"\r\n",
            "token required\n",
        );
    }
    *served.lock().unwrap() += 1;
    servers::serve_git(req, root, backend, "test")
}
