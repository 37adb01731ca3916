//! Helpers for session and audit tests: an operator key made by the real `ssh-keygen`, an
//! allowed_signers file, a config pointing at a private state dir and audit log, and ways to
//! sign grants by hand with `ssh-keygen -Y sign` (for interop and tamper cases).
//!
//! Include next to `mod common;` with `#[path = "common/grants.rs"] mod grants;`.
#![allow(dead_code)]

use super::common::{self, AAP};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Whether the real ssh-keygen can be run; tests that need it print why they skip otherwise.
pub fn have_ssh_keygen() -> bool {
    let ok = Command::new("ssh-keygen")
        .arg("-?")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        common::missing_tool(
            "sessions",
            "ssh-keygen",
            "apt-get install -y openssh-client",
        );
    }
    ok
}

/// Make a key pair with ssh-keygen: `ssh-keygen -t TYPE [-b BITS] -N '' -f PATH`.
pub fn keygen(path: &Path, ty: &str, bits: Option<u32>) {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", ty, "-N", "", "-C", "test-key", "-f"])
        .arg(path);
    if let Some(b) = bits {
        c.args(["-b", &b.to_string()]);
    }
    let o = c.output().expect("run ssh-keygen");
    assert!(o.status.success(), "ssh-keygen -t {ty}: {o:?}");
}

pub fn pubkey(path: &Path) -> String {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    std::fs::read_to_string(PathBuf::from(p))
        .unwrap()
        .trim()
        .to_owned()
}

/// Sign `msg` with `ssh-keygen -Y sign -n NS -f KEY`.
pub fn ssh_sign(key: &Path, ns: &str, msg: &[u8]) -> Vec<u8> {
    let mut child = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", ns, "-f"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "ssh-keygen -Y sign: {o:?}");
    o.stdout
}

/// `ssh-keygen -Y verify -f ALLOWED -I PRINCIPAL -n aap-grant -s SIG < MSG`.
pub fn ssh_verify(allowed: &Path, principal: &str, sig: &Path, msg: &Path) -> Output {
    Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(allowed)
        .args(["-I", principal, "-n", "aap-grant", "-s"])
        .arg(sig)
        .stdin(std::fs::File::open(msg).unwrap())
        .output()
        .unwrap()
}

pub const OPERATOR: &str = "op@example.org";

/// A complete operator setup in a private temp dir, with a broker for the agent-side commands.
///
/// The config names `broker.socket: broker.sock` (next to it) and, unless the test's extra
/// YAML has its own `agents:` section, binds agent `codex` to this test's uid, so that this
/// process is codex to the broker. The broker (`aap broker`, as this uid) is started on the
/// first agent-side command ([`Env::aap`] with `request` or `session check`, and every
/// [`Env::exec`]), and stopped whenever [`Env::write_config`] rewrites the config: like the
/// operator's `systemctl restart aap-broker`, the next agent-side command starts a new one
/// that reads the new config. Its stderr goes to `broker.log`, shown when a test fails.
pub struct Env {
    // Dropped first: the broker before the directory it lives in.
    broker: std::sync::Mutex<Option<aap::broker::Spawned>>,
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub config: PathBuf,
    pub allowed: PathBuf,
    pub state: PathBuf,
    pub audit: PathBuf,
    pub catalog: PathBuf,
}

impl Env {
    /// An ed25519 operator key listed for `aap-grant`, the seed catalog, a fresh state dir.
    pub fn new() -> Env {
        Self::with_extra_config("")
    }

    pub fn with_extra_config(extra: &str) -> Env {
        let dir = common::tempdir();
        let d = dir.path().to_path_buf();
        let key = d.join("op_ed25519");
        keygen(&key, "ed25519", None);
        let allowed = d.join("allowed_signers");
        common::write(
            &allowed,
            format!("{OPERATOR} namespaces=\"aap-grant\" {}\n", pubkey(&key)),
        );
        let catalog = d.join("catalog.yaml");
        common::write(
            &catalog,
            std::fs::read(common::repo().join("policies/agent-capabilities.yaml")).unwrap(),
        );
        let config = d.join("config.yaml");
        let env = Env {
            broker: std::sync::Mutex::new(None),
            key,
            config,
            allowed,
            state: d.join("state"),
            audit: d.join("audit.jsonl"),
            catalog,
            dir,
        };
        env.write_config(extra);
        env
    }

    /// (Re)write the config, with `extra` YAML appended. Without an `agents:` section in
    /// `extra`, agent codex is bound to this test's uid. A running broker is stopped; the next
    /// agent-side command starts one with the new config.
    pub fn write_config(&self, extra: &str) {
        let agents = if extra.lines().any(|l| l.starts_with("agents:")) {
            String::new()
        } else {
            format!("agents:\n  codex:\n    uid: {}\n", aap::sys::uid())
        };
        common::write(
            &self.config,
            format!(
                "catalog: {}\nstate_dir: {}\naudit_log: {}\noperator:\n  allowed_signers: {}\n  signing_key: {}\nbroker:\n  socket: broker.sock\n{agents}{extra}",
                self.catalog.display(),
                self.state.display(),
                self.audit.display(),
                self.allowed.display(),
                self.key.display()
            ),
        );
        self.stop_broker();
    }

    /// Bind `agent` (alone) to this test's uid, so that this process is `agent` to the broker.
    pub fn be_agent(&self, agent: &str) {
        self.write_config(&format!(
            "agents:\n  {agent}:\n    uid: {}\n",
            aap::sys::uid()
        ));
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("broker.sock")
    }

    /// Start this env's broker unless it runs already.
    pub fn ensure_broker(&self) {
        let mut b = self.broker.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_some() {
            return;
        }
        let log = self.path().join("broker.log");
        *b = Some(
            aap::broker::Spawned::start(Path::new(AAP), &self.config, &self.socket(), Some(&log))
                .unwrap_or_else(|e| {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("start the broker: {}\n{text}", e.render("test"))
                }),
        );
    }

    /// Stop this env's broker (SIGKILL), if one runs.
    pub fn stop_broker(&self) {
        let old = self.broker.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
    }

    /// The broker's pid, if one runs.
    pub fn broker_pid(&self) -> Option<u32> {
        self.broker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|b| b.pid())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `aap ARGS` with AAP_CONFIG set and a clean environment. For the agent-side commands
    /// that are broker clients (`aap request`, `aap session check`) the broker is started first.
    pub fn aap(&self, args: &[&str]) -> Command {
        if matches!(args, ["request", ..] | ["session", "check", ..]) {
            self.ensure_broker();
        }
        let mut c = common::cmd(AAP, self.path());
        c.env("AAP_CONFIG", &self.config).args(args);
        c
    }

    /// `aap-exec ARGS` (a broker client: the broker is started first).
    pub fn exec(&self, args: &[&str]) -> Command {
        self.ensure_broker();
        let mut c = common::cmd(common::AAP_EXEC, self.path());
        c.env("AAP_CONFIG", &self.config).args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        common::run(&mut self.aap(args))
    }

    /// `aap session start` that must succeed; returns the session id.
    pub fn start(&self, args: &[&str]) -> String {
        let mut a = vec!["session", "start"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        assert_eq!(common::code(&o), 0, "start failed: {}", common::stderr(&o));
        let out = common::stdout(&o);
        let id = out
            .trim()
            .strip_prefix("export AAP_SESSION=")
            .unwrap_or_else(|| panic!("unexpected output {out:?}"))
            .to_owned();
        assert_eq!(id.len(), 26, "{id}");
        id
    }

    /// `aap session check --session ID CAP`.
    pub fn check(&self, id: &str, cap: &str) -> Output {
        self.run(&["session", "check", "--session", id, cap])
    }

    pub fn grant_path(&self, id: &str) -> PathBuf {
        self.state.join("grants").join(format!("{id}.grant"))
    }
    pub fn sig_path(&self, id: &str) -> PathBuf {
        self.state.join("grants").join(format!("{id}.grant.sig"))
    }

    /// Store hand-made grant bytes and a signature for `id`.
    pub fn put_grant(&self, id: &str, grant: &[u8], sig: &[u8]) {
        std::fs::create_dir_all(self.state.join("grants")).unwrap();
        std::fs::write(self.grant_path(id), grant).unwrap();
        std::fs::write(self.sig_path(id), sig).unwrap();
    }

    pub fn load_config(&self) -> aap::config::Config {
        aap::config::Config::load_path(&self.config).unwrap()
    }
    pub fn load_catalog(&self) -> aap::catalog::Catalog {
        aap::catalog::Catalog::load(&self.catalog).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A failing test shows what the broker said.
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.path().join("broker.log")) {
                eprintln!("---- broker.log ----\n{log}----");
            }
        }
    }
}

/// A fresh canonical session id.
pub fn new_id() -> String {
    aap::id::SessionId::generate(std::time::SystemTime::now())
        .unwrap()
        .to_string()
}

pub fn rfc(secs: i64) -> String {
    aap::timefmt::rfc3339_secs(secs)
}

pub fn now_secs() -> i64 {
    aap::timefmt::unix_secs(std::time::SystemTime::now())
}

/// Grant JSON as aap writes it, with times relative to now (seconds).
pub fn grant_json(
    id: &str,
    agent: &str,
    caps: &[&str],
    nbf: i64,
    exp: i64,
    hosts: &[&str],
) -> String {
    let now = now_secs();
    let g = aap::grant::Grant {
        v: 1,
        session: id.to_owned(),
        agent: agent.to_owned(),
        operator: OPERATOR.to_owned(),
        seq: 1,
        issued_at: rfc(now),
        not_before: rfc(now + nbf),
        expires_at: rfc(now + exp),
        capabilities: caps
            .iter()
            .map(|c| aap::grant::GrantedCap {
                id: (*c).to_owned(),
                approved_at: rfc(now),
                expires_at: rfc(now + exp),
            })
            .collect(),
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        reason: None,
        break_glass: false,
    };
    String::from_utf8(g.to_bytes()).unwrap()
}
