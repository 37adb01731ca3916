//! Shared helpers for the integration tests: run the real binaries in a private temp dir with a
//! clean, controlled environment.
#![allow(dead_code)]

pub mod catgen;
pub mod follow;
pub mod sshd;
pub mod tmux;
pub mod world;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const AAP: &str = env!("CARGO_BIN_EXE_aap");
pub const AAP_EXEC: &str = env!("CARGO_BIN_EXE_aap-exec");

/// The repository root (where Cargo.toml is).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command for one of our binaries with an environment that cannot pick up the machine's
/// config: HOME and XDG_CONFIG_HOME point into `dir`, AAP_* are cleared.
pub fn cmd(bin: &str, dir: &Path) -> Command {
    let mut c = Command::new(bin);
    c.current_dir(dir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join(".config"))
        .env("TMPDIR", dir);
    c
}

/// Record that `test` skipped (part of) itself, and why: printed on the real stderr, and
/// appended to `$AAP_TEST_SKIP_LOG` when set, so that `scripts/test-all.sh` can count and list
/// every skip in its summary instead of counting the test as a silent pass.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {why}");
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Some(log) = std::env::var_os("AAP_TEST_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            // One write(2) with O_APPEND: lines of parallel tests never interleave.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// Whether this is the full run (`scripts/test-all.sh` sets `AAP_TEST_FULL=1`), where a missing
/// local tool is a failure, not a skip.
pub fn full_run() -> bool {
    std::env::var_os("AAP_TEST_FULL").is_some_and(|v| v == "1")
}

/// A local tool a test needs (`sshd`, `ssh-keygen`, `git`, ...) is missing. In the full run this
/// fails the test; otherwise the test skips, saying so (see [`skip`]). Returns so the caller can
/// `return` early.
pub fn missing_tool(test: &str, tool: &str, install: &str) {
    let why = format!("{tool} is not installed ({install}; scripts/test-all.sh installs it)");
    assert!(
        !full_run(),
        "{test}: {why}: in the full run a missing tool is a failure, not a skip"
    );
    skip(test, &why);
}

/// Copies of `aap` and `aap-exec` that another uid can execute wherever the checkout is: a clone
/// under `/root`, or in any 0700 directory, cannot be traversed by other uids, so the built
/// binaries under `target/` are out of their reach. The copies live in a directory of mode 0755
/// in the system temp dir, which is removed (with them) on drop.
pub struct AgentBins {
    _dir: tempfile::TempDir,
    pub aap: PathBuf,
    pub aap_exec: PathBuf,
}

pub fn agent_bins() -> AgentBins {
    use std::os::unix::fs::PermissionsExt;
    let base = std::env::temp_dir();
    // Every directory above the copies must be searchable by other uids.
    let mut p = Some(base.as_path());
    while let Some(d) = p {
        let mode = std::fs::metadata(d)
            .expect("stat the temp dir")
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode {mode:o}) is not searchable by other uids; cross-uid tests need a temp dir they can reach: unset TMPDIR or point it at /tmp",
            d.display()
        );
        p = d.parent();
    }
    let dir = tempfile::Builder::new()
        .prefix("aap-bins-")
        .tempdir_in(&base)
        .expect("temp dir for the binaries");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = |from: &str, name: &str| {
        let to = dir.path().join(name);
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {from}: {e}"));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        to
    };
    let aap = copy(AAP, "aap");
    let aap_exec = copy(AAP_EXEC, "aap-exec");
    AgentBins {
        _dir: dir,
        aap,
        aap_exec,
    }
}

/// Run and capture, asserting nothing about the result. A failed `aap` or `aap-exec` that
/// printed hints has them followed and judged first when `AAP_TEST_FOLLOW_HINTS=1`
/// ([`follow`]): a hint that does not work fails the test here.
pub fn run(c: &mut Command) -> Output {
    let o = c.output().expect("spawn test binary");
    follow::after(c, &o);
    o
}

/// What a successful `aap session log ID` printed, and its lines of events labelled `label`
/// (`imported`, `proxied request`, ...).
pub fn story_lines(o: &Output, label: &str) -> (String, Vec<String>) {
    assert_eq!(code(o), 0, "session log: {}", stderr(o));
    let story = stdout(o);
    let marked = format!("  {label}  ");
    let lines = story
        .lines()
        .filter(|l| l.contains(&marked))
        .map(str::to_owned)
        .collect();
    (story, lines)
}

/// What `aap-exec` said of a run or a check, for comparing the two: its stderr without the
/// "waiting for ..." progress lines a loaded machine may add to either.
pub fn verdict(o: &Output) -> String {
    stderr(o)
        .lines()
        .filter(|l| !l.contains(": waiting for "))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A private temp dir (0700), removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aap-test-")
        .tempdir()
        .expect("tempdir")
}

/// Write a file with mode 0644 (operator files must not be group/world-writable).
pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Exit code, panicking with stderr when the process was killed by a signal.
pub fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {o:?}"))
}

// ---- Infisical dev-server helpers (issue 4) ---------------------------------------------------

/// A running `aap dev-server` process, killed (by its own pid) on drop.
pub struct DevServer {
    pub child: std::process::Child,
    pub url: String,
    pub ca: Option<PathBuf>,
    pub project_id: String,
}

impl DevServer {
    /// Start `aap dev-server` with extra args and wait for its ready line.
    pub fn start(dir: &Path, args: &[&str]) -> DevServer {
        use std::io::BufRead;
        let mut c = cmd(AAP, dir);
        c.arg("dev-server")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().expect("spawn aap dev-server");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
        };
        let url = field("url").unwrap_or_else(|| panic!("no url in ready line {line:?}"));
        DevServer {
            url,
            ca: field("ca").map(PathBuf::from),
            project_id: field("project_id").unwrap(),
            child,
        }
    }

    fn agent(&self) -> ureq::Agent {
        let mut b = ureq::Agent::config_builder().http_status_as_error(false);
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).unwrap();
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i.unwrap() {
                    ureq::tls::PemItem::Certificate(c) => Some(c),
                    _ => None,
                })
                .collect();
            b = b.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
                    .build(),
            );
        }
        b.build().into()
    }

    /// Send a raw request; returns (status, headers, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let url = format!("{}{}", self.url, path);
        let agent = self.agent();
        let resp = if method == "POST" {
            let mut r = agent.post(&url).header("content-type", "application/json");
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.send(
                serde_json::to_vec(body.unwrap_or(&serde_json::Value::Null))
                    .unwrap()
                    .as_slice(),
            )
        } else {
            let mut r = agent.get(&url);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.call()
        }
        .expect("dev-server answers");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp.into_body().read_to_vec().unwrap();
        (status, headers, body)
    }

    /// Change fault knobs through the admin endpoint.
    pub fn faults(&self, patch: serde_json::Value) {
        let (s, _, b) = self.request("POST", "/_aap/faults", None, Some(&patch));
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }

    pub fn stats(&self) -> serde_json::Value {
        let (s, _, b) = self.request("GET", "/_aap/stats", None, None);
        assert_eq!(s, 200);
        serde_json::from_slice(&b).unwrap()
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(ca) = &self.ca
            && let Some(d) = ca.parent()
        {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The built-in seed's identities: (name, client id, client secret).
pub fn seed_identity(name: &str) -> (String, String) {
    let text = std::fs::read_to_string(repo().join("src/devserver/default-seed.yaml")).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let i = v["identities"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|i| i["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no identity {name}"));
    (
        i["client_id"].as_str().unwrap().to_string(),
        i["client_secret"].as_str().unwrap().to_string(),
    )
}

/// Every secret value of the built-in seed (for leak checks).
pub fn seed_secret_values() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("src/devserver/default-seed.yaml")).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out: Vec<String> = v["secrets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|s| s["value"].as_str().unwrap().to_string())
        .collect();
    for i in v["identities"].as_sequence().unwrap() {
        out.push(i["client_secret"].as_str().unwrap().to_string());
    }
    out
}

/// Write a config for agent `codex` using seed identity `identity` against `server`, with the
/// client id/secret files (secret mode 0600) in `dir`. Returns the config path.
pub fn infisical_config(dir: &Path, server: &DevServer, identity: &str, extra: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let (id, secret) = seed_identity(identity);
    let ids = dir.join("identity");
    std::fs::create_dir_all(&ids).unwrap();
    write(&ids.join("client_id"), format!("{id}\n"));
    std::fs::write(ids.join("client_secret"), format!("{secret}\n")).unwrap();
    std::fs::set_permissions(
        ids.join("client_secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let ca = server
        .ca
        .as_ref()
        .map(|c| format!("  ca_bundle: {}\n", c.display()))
        .unwrap_or_default();
    let cfg = format!(
        "infisical:\n  url: {}\n  project_id: {}\n{ca}{extra}agents:\n  codex:\n    client_id_file: identity/client_id\n    client_secret_file: identity/client_secret\n",
        server.url, server.project_id
    );
    let p = dir.join("config.yaml");
    write(&p, cfg);
    p
}

/// Assert that none of `secrets` appears in `text` or in any file under `dir`.
pub fn assert_no_leak(secrets: &[String], text: &str, dir: &Path) {
    for s in secrets {
        // Multi-line values: also look for their longest line.
        let probes: Vec<&str> = std::iter::once(s.as_str())
            .chain(
                s.lines()
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----")),
            )
            .collect();
        for p in &probes {
            assert!(!text.contains(p), "secret leaked into output: {text}");
        }
        for entry in walk(dir) {
            let Ok(bytes) = std::fs::read(&entry) else {
                continue;
            };
            let content = String::from_utf8_lossy(&bytes);
            for p in &probes {
                if entry.ends_with("identity/client_secret") && s.trim() == content.trim() {
                    continue; // the identity's own secret file, written by the test
                }
                assert!(
                    !content.contains(p),
                    "secret leaked into {}",
                    entry.display()
                );
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Assert exit code `want` and that stderr contains `needle`; either failure prints stderr.
pub fn assert_fails(o: &Output, want: i32, needle: impl AsRef<str>) {
    let err = stderr(o);
    assert_eq!(code(o), want, "{err}");
    assert!(
        err.contains(needle.as_ref()),
        "expected {:?} in: {err}",
        needle.as_ref()
    );
}
