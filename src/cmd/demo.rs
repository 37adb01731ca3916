//! `aap demo`: the quick start, on defaults embedded in the binary. It needs no config, no
//! network beyond loopback, and no secrets of the machine it runs on:
//!
//! 1. validates the embedded seed catalog;
//! 2. starts `aap dev-server` (HTTPS on 127.0.0.1 with a throwaway CA) in this process;
//! 3. makes a throwaway operator key (real ssh-keygen), allowed_signers, config, catalog, state
//!    dir and audit log in a private temp dir;
//! 4. starts a session, runs `aap-exec` with an `env` and an `fd` capability (the child proves
//!    it got the secret without printing it), shows a denial for an unapproved capability and
//!    one after `aap session revoke`;
//! 5. prints the audit log with `aap audit tail` and ends with `aap audit verify`.
//!
//! Every step runs the real `aap`/`aap-exec` binaries, exactly as an operator and an agent would.

#![forbid(unsafe_code)]

use crate::catalog::{Capability, Catalog};
use crate::error::{Error, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The seed catalog, compiled in from `policies/`, its single source.
pub const SEED_CATALOG: &str = include_str!("../../policies/agent-capabilities.yaml");

/// The demo's own catalog: two ways of handing over the dev-server's /app:DB_PASSWORD, and one
/// capability the session will not be granted.
const DEMO_CATALOG: &str = "schema_version: 1
capabilities:
  - id: app-db-env
    description: The app's database password, in an environment variable
    audit_tier: medium
    agents: [codex]
    max_ttl: 1h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
  - id: app-db-file
    description: The app's database password, in a sealed memfd at /dev/fd/N
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: fd, name: DB_PASSWORD_FILE } ]
  - id: forgejo-token
    description: A Forgejo token (not granted in the demo session)
    audit_tier: low
    agents: [codex]
    max_ttl: 8h
    backing: { type: secret, secret: { path: /forgejo, key: FORGEJO_TOKEN } }
    inject: [ { type: env, name: FORGEJO_TOKEN } ]
";

struct Demo {
    dir: PathBuf,
    aap: PathBuf,
    aap_exec: PathBuf,
    /// Every secret value of the dev-server's world, to prove none of them is printed.
    secrets: Vec<String>,
    transcript: String,
}

pub fn run() -> Result<u8> {
    println!("== 1. the seed capability catalog (embedded from policies/agent-capabilities.yaml)");
    let cat = Catalog::from_text(SEED_CATALOG, "policies/agent-capabilities.yaml")?;
    println!(
        "policies/agent-capabilities.yaml: ok, {} capabilities",
        cat.len()
    );
    let caps: Vec<&Capability> = cat.capabilities().iter().collect();
    super::catalog::print_list(&caps, false);

    let exe = std::env::current_exe().map_err(|e| {
        Error::internal(format!("cannot find this program's path: {e}"))
            .hint("run the demo from the built binary: ./target/release/aap demo")
    })?;
    let aap_exec = exe.with_file_name("aap-exec");
    if !aap_exec.exists() {
        return Err(Error::new(
            crate::error::Kind::NotFound,
            format!("aap-exec is not next to {}", exe.display()),
        )
        .hint("build both binaries: cargo build --release, then run ./target/release/aap demo"));
    }

    println!("\n== 2. aap dev-server: an in-memory Infisical on 127.0.0.1 (HTTPS, throwaway CA)");
    let seed = crate::devserver::Seed::default_seed();
    let reader = seed
        .identities
        .iter()
        .find(|i| i.name == "reader")
        .cloned()
        .ok_or_else(|| Error::internal("the built-in dev-server seed has no `reader` identity").hint("this is a bug in aap (the embedded seed is broken); report it with: aap dev-server --help"))?;
    let secrets: Vec<String> = seed.secrets.iter().map(|s| s.value.clone()).collect();
    let project_id = seed.project_id.clone();
    let server = crate::devserver::spawn(crate::devserver::Options {
        tls: true,
        seed,
        ..Default::default()
    })?;
    println!("{}", server.url());

    let tmp = tempdir()?;
    let mut d = Demo {
        dir: tmp.path.clone(),
        aap: exe.clone(),
        aap_exec,
        secrets,
        transcript: String::new(),
    };
    println!(
        "\n== 3. a throwaway operator key, config, catalog, state dir and audit log in {}",
        d.dir.display()
    );
    d.setup(
        server.url(),
        server.ca_path().as_deref(),
        &project_id,
        &reader,
    )?;
    println!(
        "\n== 3b. aap broker: decides, fetches and audits for aap-exec (here as your own user; on a real host as user aap)"
    );
    let broker = crate::broker::Spawned::start(
        &d.aap,
        &d.dir.join("config.yaml"),
        &d.dir.join("broker.sock"),
        None,
    )?;
    println!("listening on {}", broker.socket.display());

    println!(
        "\n== 4. the operator approves a session for agent codex (grant signed with ssh-keygen -Y sign)"
    );
    let out = d.step(
        &d.aap_cmd(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "app-db-env",
            "--cap",
            "app-db-file",
            "--ttl",
            "30m",
            "--reason",
            "aap demo",
        ]),
        Some(0),
    )?;
    let session = out
        .lines()
        .find_map(|l| l.strip_prefix("export AAP_SESSION="))
        .map(str::to_string)
        .ok_or_else(|| Error::internal("`aap session start` printed no export line").hint("run the step by hand to see why: AAP_LOG=debug aap session start --agent codex --cap app-db-env"))?;

    println!("\n== 5. the agent runs commands through aap-exec (AAP_SESSION={session})");
    let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    d.step(
        &d.exec_cmd(
            &session,
            "app-db-env",
            &sh("echo \"child: DB_PASSWORD is set (${#DB_PASSWORD} bytes); not printing it\""),
        ),
        Some(0),
    )?;
    d.step(
        &d.exec_cmd(&session, "app-db-file", &sh("echo \"child: reading $DB_PASSWORD_FILE -> $(wc -c < \"$DB_PASSWORD_FILE\") bytes; DB_PASSWORD in env: ${DB_PASSWORD:-no}\"")),
        Some(0),
    )?;

    println!("\n== 6. denials: a capability the session was not granted, then a revoked session");
    d.step(
        &d.exec_cmd(&session, "forgejo-token", &sh("echo never printed")),
        Some(77),
    )?;
    d.step(
        &d.aap_cmd(&["session", "revoke", &session, "--reason", "demo over"]),
        Some(0),
    )?;
    d.step(
        &d.exec_cmd(&session, "app-db-env", &sh("echo never printed")),
        Some(77),
    )?;

    println!("\n== 7. the audit log: every decision, hash-chained");
    d.step(&d.aap_cmd(&["audit", "tail", "-n", "20"]), Some(0))?;
    d.step(&d.aap_cmd(&["audit", "verify"]), Some(0))?;

    // The proof the demo is about: no secret value was printed anywhere above.
    for s in &d.secrets {
        let probe = s
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= 12)
            .max_by_key(|l| l.len())
            .unwrap_or(s);
        if d.transcript.contains(probe) {
            return Err(
                Error::internal("a secret value appeared in the demo's output")
                    .hint("this is a bug in aap; please report it"),
            );
        }
    }
    println!(
        "\n== done: the children got the secret, no secret value appeared in any output above, and the audit log verifies."
    );
    drop(broker);
    drop(server);
    Ok(0)
}

impl Demo {
    fn setup(
        &mut self,
        url: &str,
        ca: Option<&Path>,
        project_id: &str,
        reader: &crate::devserver::seed::SeedIdentity,
    ) -> Result<()> {
        let inst = Installation {
            url,
            ca,
            project_id,
            client_id: &reader.client_id,
            client_secret: &reader.client_secret,
            catalog: DEMO_CATALOG,
            infisical_extra: "",
        };
        let config = write_installation(&self.dir, &inst)?;
        println!("{}", read(&config)?.trim_end());
        Ok(())
    }

    fn aap_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.aap);
        c.args(args);
        self.env(&mut c);
        c
    }

    fn exec_cmd(&self, session: &str, cap: &str, argv: &[String]) -> Command {
        let mut c = Command::new(&self.aap_exec);
        c.arg(cap).arg("--").args(argv).env("AAP_SESSION", session);
        self.env(&mut c);
        c
    }

    fn env(&self, c: &mut Command) {
        c.current_dir(&self.dir)
            .env("AAP_CONFIG", self.dir.join("config.yaml"))
            .env_remove("AAP_LOG");
        for v in [
            "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID",
            "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET",
            "AAP_SESSION",
        ] {
            if !c.get_envs().any(|(k, _)| k == v) {
                c.env_remove(v);
            }
        }
    }

    /// Print the command line, run it, print its output; `want` is the expected exit code.
    fn step(&mut self, cmd: &Command, want: Option<i32>) -> Result<String> {
        let mut line = format!(
            "$ {}",
            cmd.get_program()
                .to_string_lossy()
                .rsplit('/')
                .next()
                .unwrap_or("")
        );
        for a in cmd.get_args() {
            line.push(' ');
            line.push_str(&crate::error::shell_quote(&a.to_string_lossy()));
        }
        println!("{line}");
        let mut run = Command::new(cmd.get_program());
        run.args(cmd.get_args()).current_dir(&self.dir);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => run.env(k, v),
                None => run.env_remove(k),
            };
        }
        let out = run.output().map_err(|e| {
            Error::internal(format!("cannot run {line}: {e}"))
                .hint("check that the binaries are built: cargo build --release")
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        print!("{stdout}{stderr}");
        let code = out.status.code().unwrap_or(-1);
        println!("(exit {code})");
        self.transcript.push_str(&stdout);
        self.transcript.push_str(&stderr);
        if want.is_some_and(|w| w != code) {
            return Err(Error::internal(format!(
                "demo step `{line}` exited {code}, expected {}",
                want.unwrap_or(0)
            ))
            .hint(format!(
                "run it by hand with AAP_CONFIG={}/config.yaml AAP_LOG=debug",
                self.dir.display()
            )));
        }
        Ok(stdout)
    }
}

/// What a throwaway installation points at.
pub struct Installation<'a> {
    pub url: &'a str,
    pub ca: Option<&'a Path>,
    pub project_id: &'a str,
    /// The agent `codex`'s machine identity.
    pub client_id: &'a str,
    pub client_secret: &'a str,
    /// Catalog YAML.
    pub catalog: &'a str,
    /// Indented lines added to the config's `infisical:` section (e.g. `  timeout: 1s\n`).
    pub infisical_extra: &'a str,
}

/// Write a complete throwaway aap installation into `dir` (used by the demo, the tests and the
/// benchmarks): an operator key made by the real `ssh-keygen` (`operator`, principal
/// `operator@aap`), `allowed_signers`, `catalog.yaml`, the identity files of agent `codex`
/// (`identity/client_id`, `identity/client_secret` mode 0600), and `config.yaml` with
/// `state/` and `audit.jsonl` beside it. Returns the config's path.
pub fn write_installation(dir: &Path, i: &Installation<'_>) -> Result<PathBuf> {
    let key = dir.join("operator");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "operator@aap", "-f"])
        .arg(&key)
        .status()
        .map_err(|e| {
            Error::internal(format!("cannot run ssh-keygen: {e}"))
                .hint("apt-get install -y openssh-client")
        })?;
    if !st.success() {
        return Err(
            Error::internal("ssh-keygen could not make the operator key")
                .hint("ssh-keygen -t ed25519 -f /tmp/test-key"),
        );
    }
    let pubkey = read(&key.with_extension("pub"))?;
    write(
        &dir.join("allowed_signers"),
        &format!("operator@aap namespaces=\"aap-grant\" {pubkey}"),
        0o644,
    )?;
    write(&dir.join("catalog.yaml"), i.catalog, 0o644)?;
    write(&dir.join("identity/client_id"), i.client_id, 0o644)?;
    write(&dir.join("identity/client_secret"), i.client_secret, 0o600)?;
    let ca_line =
        i.ca.map(|c| format!("  ca_bundle: {}\n", c.display()))
            .unwrap_or_default();
    let config = format!(
        "catalog: catalog.yaml\nstate_dir: state\naudit_log: audit.jsonl\noperator:\n  allowed_signers: allowed_signers\n  signing_key: operator\n\
         infisical:\n  url: {}\n  project_id: {}\n{ca_line}{}broker:\n  socket: broker.sock\nagents:\n  codex:\n    uid: {}\n    client_id_file: identity/client_id\n    client_secret_file: identity/client_secret\n",
        i.url,
        i.project_id,
        i.infisical_extra,
        crate::sys::uid()
    );
    let path = dir.join("config.yaml");
    write(&path, &config, 0o644)?;
    Ok(path)
}

/// A private temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let mut r = [0u8; 8];
        crate::sys::random_bytes(&mut r).map_err(|e| {
            Error::internal(format!("no randomness: {e}"))
                .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
        })?;
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let p = base.join(format!("aap-demo-{name}"));
        let mut b = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        if b.create(&p).is_ok() {
            return Ok(TempDir { path: p });
        }
    }
    Err(Error::internal(format!(
        "cannot create a private directory in {}",
        base.display()
    ))
    .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\""))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| {
            Error::internal(format!("cannot create {}: {e}", p.display()))
                .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
        })?;
    }
    std::fs::write(path, text).map_err(|e| {
        Error::internal(format!("cannot write {}: {e}", path.display()))
            .hint("check free space in TMPDIR: df -h \"${TMPDIR:-/tmp}\"")
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        Error::internal(format!("cannot chmod {}: {e}", path.display()))
            .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::internal(format!("cannot read {}: {e}", path.display()))
            .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
    })
}
