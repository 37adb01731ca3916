//! A complete, private aap installation for exec-path tests: a running `aap dev-server`, a
//! throwaway operator key made by the real ssh-keygen, allowed_signers, a catalog, a config, a
//! state dir and an audit log, all under one temp dir.

use super::*;
use std::process::{Command, Output};

/// Capabilities every world has. All read /app:DB_PASSWORD of the dev-server's built-in seed.
pub const CATALOG: &str = "schema_version: 1
capabilities:
  - id: db-env
    description: DB password in an env var
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
  - id: db-fd
    description: DB password in a sealed memfd
    audit_tier: high
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: fd, name: DB_PASSWORD_FILE } ]
  - id: db-low
    description: DB password, low tier
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
  - id: db-sh-only
    description: DB password, only for /bin/sh-like programs named sh
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [sh]
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
  - id: db-nested
    description: DB password, usable inside another aap-exec
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    allow_nested: true
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
  - id: missing-secret
    description: A secret the dev-server does not have
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: NOPE } }
    inject: [ { type: env, name: NOPE } ]
  - id: claude-only
    description: For another agent
    audit_tier: low
    agents: [claude]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
";

/// The value of /app:DB_PASSWORD in the dev-server's built-in seed.
pub const DB_PASSWORD: &str = "app-db-pass-s3cr3t";

pub struct World {
    // Dropped in order: the broker before the dev-server and the directory.
    pub broker: Option<aap::broker::Spawned>,
    pub server: DevServer,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl World {
    /// A world whose dev-server serves HTTPS with its throwaway CA.
    pub fn new() -> World {
        Self::with(&["--tls"], "")
    }

    /// `server_args` for `aap dev-server`; `infisical_extra`: indented lines added to the
    /// config's `infisical:` section (e.g. `  timeout: 1s\n`).
    pub fn with(server_args: &[&str], infisical_extra: &str) -> World {
        let dir = tempdir();
        let d = dir.path();
        let server = DevServer::start(d, server_args);
        let (client_id, client_secret) = seed_identity("reader");
        let inst = aap::cmd::demo::Installation {
            url: &server.url,
            ca: server.ca.as_deref(),
            project_id: &server.project_id,
            client_id: &client_id,
            client_secret: &client_secret,
            catalog: CATALOG,
            infisical_extra,
        };
        let config = aap::cmd::demo::write_installation(d, &inst).expect("write the installation");
        let mut w = World {
            broker: None,
            dir,
            server,
            config,
        };
        w.start_broker();
        w
    }

    /// (Re)start this world's broker, as this test's uid, on `<dir>/broker.sock`; its stderr
    /// goes to `<dir>/broker.log`.
    pub fn start_broker(&mut self) {
        self.broker = None;
        let d = self.dir.path();
        self.broker = Some(
            aap::broker::Spawned::start(
                Path::new(AAP),
                &self.config,
                &d.join("broker.sock"),
                Some(&d.join("broker.log")),
            )
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(d.join("broker.log")).unwrap_or_default();
                panic!("start the broker: {}\n{log}", e.render("test"))
            }),
        );
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `aap ARGS` in this world.
    pub fn aap(&self, args: &[&str]) -> Command {
        let mut c = cmd(AAP, self.path());
        c.env("AAP_CONFIG", &self.config).args(args);
        c
    }

    /// `aap ARGS` in this world, run from `bin` (e.g. [`agent_bins`]'s copy, for another uid).
    pub fn aap_from(&self, bin: &Path, args: &[&str]) -> Command {
        let mut c = cmd(bin.to_str().expect("UTF-8 path"), self.path());
        c.env("AAP_CONFIG", &self.config).args(args);
        c
    }

    /// `aap-exec ARGS` in this world (no session set).
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = cmd(AAP_EXEC, self.path());
        c.env("AAP_CONFIG", &self.config).args(args);
        c
    }

    /// `aap-exec --session ID CAP -- ARGV...`.
    pub fn exec_in(&self, session: &str, cap: &str, argv: &[&str]) -> Command {
        let mut c = self.exec(&["--session", session, cap, "--"]);
        c.args(argv);
        c
    }

    /// Start a session for codex with `caps`; returns its id.
    pub fn session(&self, caps: &[&str]) -> String {
        let mut args = vec!["session", "start", "--agent", "codex", "--ttl", "1h"];
        for c in caps {
            args.push("--cap");
            args.push(c);
        }
        let o = run(&mut self.aap(&args));
        assert_eq!(code(&o), 0, "session start: {}", stderr(&o));
        let out = stdout(&o);
        out.trim()
            .strip_prefix("export AAP_SESSION=")
            .unwrap_or_else(|| panic!("unexpected output {out:?}"))
            .to_string()
    }

    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn audit_verify(&self) -> Output {
        run(&mut self.aap(&["audit", "verify", "audit.jsonl"]))
    }

    /// Number of audit events of `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.audit_lines()
            .iter()
            .filter(|l| l["event"] == kind)
            .count()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // A failing test shows what the broker said.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.path().join("broker.log")).unwrap_or_default();
            eprintln!("---- broker.log ----\n{log}----");
        }
    }
}
