//! `aap demo`: the quick start, on defaults embedded in the binary. It needs no config, no
//! network beyond loopback, and no secrets of the machine it runs on. It runs the five
//! capabilities of the seed catalog, as they are (only the Forgejo host points at loopback):
//!
//! 1. validates the embedded seed catalog;
//! 2. makes a throwaway ssh key (in memory) and starts `aap dev-server` (HTTPS on
//!    127.0.0.1 with a throwaway CA) in this process, on the built-in world with its ssh keys
//!    replaced by that key;
//! 3. starts a real `git http-backend` behind a token check and, when OpenSSH's server is
//!    installed, a real `sshd` (host key made now), both on 127.0.0.1;
//! 4. writes a throwaway operator key, allowed_signers, config, catalog, state dir and audit
//!    log in a private temp dir, and starts `aap broker`;
//! 5. approves a session, then the agent clones through `forgejo-pat-read`, runs ssh through
//!    `ssh-vps1000-iskra-readonly`, and reads /app (but not /forgejo) with the scoped token of
//!    `infisical-secrets-read-scoped`; `ssh-rs2000-platform-host-agent`, not granted, is denied,
//!    and so is everything after `aap session revoke`;
//! 6. break-glass: `break-glass-full-access` with its banner and the notify command;
//! 7. prints the audit log with `aap audit tail` and ends with `aap audit verify`.
//!
//! Every step runs the real `aap`/`aap-exec` binaries, exactly as an operator and an agent would.

#![forbid(unsafe_code)]

pub mod servers;

use crate::catalog::{Capability, Catalog};
use crate::error::{Error, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The seed catalog, compiled in from `policies/`, its single source.
pub const SEED_CATALOG: &str = include_str!("../../../policies/agent-capabilities.yaml");

/// The seed catalog's Forgejo host; the demo points it at its git server on loopback.
const SEED_FORGEJO_HOST: &str = "host: git.example.org";

/// The seed catalog's ssh keys: the demo's world holds its own key under each.
const SSH_KEYS: [&str; 3] = ["RS2000_PLATFORM_KEY", "ISKRA_READONLY_KEY", "ROOT_SSH_KEY"];

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
    let tmp = tempdir()?;
    let dir = tmp.path.clone();

    println!(
        "\n== 2. aap dev-server: an in-memory Infisical on 127.0.0.1 (HTTPS, throwaway CA), its ssh keys made now"
    );
    // The demo's ssh key: made in memory and put only into the dev-server's world (as a real
    // deployment keeps it only in Infisical); its public half goes to the demo sshd. It never
    // touches the disk.
    let (demo_key, demo_pub) = demo_ssh_key()?;
    let mut seed = crate::devserver::Seed::default_seed();
    for s in seed.secrets.iter_mut() {
        if SSH_KEYS.contains(&s.key.as_str()) {
            s.value.clone_from(&demo_key);
        }
    }
    let identity = |name: &str| {
        seed.identities
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .ok_or_else(|| Error::internal(format!("the built-in dev-server seed has no `{name}` identity")).hint("this is a bug in aap (the embedded seed is broken); report it with: aap dev-server --help"))
    };
    let reader = identity("reader")?;
    let app_reader = identity("app-reader")?;
    let token = seed
        .secrets
        .iter()
        .find(|s| s.key == "FORGEJO_PAT_READ")
        .map(|s| s.value.clone())
        .unwrap_or_default();
    let mut secrets: Vec<String> = seed.secrets.iter().map(|s| s.value.clone()).collect();
    secrets.extend(seed.identities.iter().map(|i| i.client_secret.clone()));
    let project_id = seed.project_id.clone();
    let server = crate::devserver::spawn(crate::devserver::Options {
        tls: true,
        seed,
        ..Default::default()
    })?;
    println!("{}", server.url());
    let ca = server.ca_path();

    println!("\n== 3. the servers the capabilities reach, real ones on 127.0.0.1");
    let git = match servers::http_backend() {
        Some(backend) => {
            let root = dir.join("forgejo");
            servers::make_repo(&root, "demo", "hello from the demo's Forgejo stand-in\n")?;
            // HTTPS from the dev-server's CA: the broker's http-proxy forwards over TLS only,
            // and the config's ca_bundle (that CA) is what it trusts.
            let tls = server
                .ca()
                .map(|ca| ca.server_config("aap demo forgejo"))
                .transpose()?;
            let g = servers::GitServer::start(&root, backend, token, tls)?;
            println!(
                "git http-backend at {} (answers 401 without the Forgejo token)",
                g.url("demo.git")
            );
            Some(g)
        }
        None => {
            println!(
                "skipping the git server: git (with git-http-backend) is not installed (apt-get install -y git)"
            );
            None
        }
    };
    let sshd = match servers::find_sshd() {
        Some(bin) => {
            let s = servers::Sshd::start(&bin, &dir.join("sshd"), &demo_pub)?;
            println!(
                "sshd at 127.0.0.1:{} (host key made now; it knows the demo key's public half only)",
                s.port
            );
            Some(s)
        }
        None => {
            println!(
                "skipping the ssh step: OpenSSH's server (sshd) is not installed (apt-get install -y openssh-server)"
            );
            None
        }
    };

    let mut d = Demo {
        dir: dir.clone(),
        aap: exe.clone(),
        aap_exec,
        secrets,
        transcript: String::new(),
    };
    println!(
        "\n== 4. a throwaway operator key, config, catalog, state dir and audit log in {}",
        d.dir.display()
    );
    let catalog = match &git {
        Some(g) => SEED_CATALOG.replace(SEED_FORGEJO_HOST, &format!("host: {}", g.host())),
        None => SEED_CATALOG.to_string(),
    };
    let exe_dir = exe
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // The ssh-agent capabilities bind the key to their hosts' keys, so those must be known:
    // the demo sshd's, or without one a host key made now that no server holds (break-glass
    // then runs `ssh -V`, which connects nowhere).
    let known_hosts = dir.join("known_hosts");
    let host_key = match &sshd {
        Some(s) => s.host_key.clone(),
        None => {
            let key = servers::keygen(&dir.join("no_server_host_key"), "aap-demo-no-server")?;
            key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
        }
    };
    write(
        &known_hosts,
        &format!("vps1000.example.org,rs2000.example.org {host_key}\n"),
        0o644,
    )?;
    let config = write_installation(
        &d.dir,
        &Installation {
            url: server.url(),
            ca: ca.as_deref(),
            project_id: &project_id,
            client_id: &reader.client_id,
            client_secret: &reader.client_secret,
            catalog: &catalog,
            infisical_extra: "",
        },
    )?;
    write(
        &dir.join("app-reader/client_id"),
        &app_reader.client_id,
        0o644,
    )?;
    write(
        &dir.join("app-reader/client_secret"),
        &app_reader.client_secret,
        0o600,
    )?;
    let mut text = read(&config)?;
    text.push_str(&format!(
        "identities:\n  app-reader:\n    client_id_file: app-reader/client_id\n    client_secret_file: app-reader/client_secret\n\
         notify:\n  command: [/bin/sh, -c, 'cat > \"$0\"', {notified}]\n\
         ssh_known_hosts: [known_hosts]\n\
         secure_path: {exe_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        notified = dir.join("notified.json").display(),
    ));
    write(&config, &text, 0o644)?;
    println!("{}", text.trim_end());
    println!(
        "(the catalog is policies/agent-capabilities.yaml{})",
        if git.is_some() {
            ", with forgejo-pat-read's host pointed at the git server above"
        } else {
            ""
        }
    );

    println!(
        "\n== 4b. aap broker: decides, fetches and audits for aap-exec (here as your own user; on a real host as user aap)"
    );
    let broker = crate::broker::Spawned::start(&d.aap, &config, &d.dir.join("broker.sock"), None)?;
    println!("listening on {}", broker.socket.display());

    println!(
        "\n== 5. the operator approves a session for agent codex (grant signed with ssh-keygen -Y sign)"
    );
    let out = d.step(
        &d.aap_cmd(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "forgejo-pat-read",
            "--cap",
            "ssh-vps1000-iskra-readonly",
            "--cap",
            "infisical-secrets-read-scoped",
            "--ttl",
            "30m",
            "--reason",
            "aap demo",
        ]),
        Some(0),
    )?;
    let session = exported_session(
        &out,
        "aap session start --agent codex --cap forgejo-pat-read",
    )?;
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();

    println!("\n== 6. the agent works through aap-exec (AAP_SESSION={session})");
    if let Some(g) = &git {
        println!("-- forgejo-pat-read: git, without and then with the capability");
        let url = g.url("demo.git");
        // Without the capability git has no credential (the user's own helpers are switched
        // off, so none can answer or prompt): the server refuses it.
        let mut plain = Command::new("git");
        if let Some(ca) = &ca {
            // Trusting the server's CA, so what refuses it is the missing token, not TLS.
            plain
                .arg("-c")
                .arg(format!("http.sslCAInfo={}", ca.display()));
        }
        plain
            .args(["-c", "credential.helper=", "ls-remote", &url])
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false");
        d.env(&mut plain);
        d.step(&plain, Some(128))?;
        let clone = dir.join("clone");
        let clone_s = clone.display().to_string();
        d.step(
            &d.exec_cmd(
                &session,
                "forgejo-pat-read",
                &s(&["git", "clone", "-q", &url, &clone_s]),
            ),
            Some(0),
        )?;
        println!(
            "cloned: README says {:?}; the server answered {} requests with the token, refused {} without",
            read(&clone.join("README"))?.trim(),
            g.served(),
            g.refused()
        );
    }
    if let Some(sd) = &sshd {
        println!(
            "-- ssh-vps1000-iskra-readonly: ssh to the demo sshd, known as vps1000.example.org"
        );
        let argv = ssh_argv(
            &known_hosts,
            sd.port,
            "vps1000.example.org",
            "echo \"remote: logged in as $(id -un) with the key aap-exec's agent holds\"",
        )?;
        d.step(
            &d.exec_cmd(&session, "ssh-vps1000-iskra-readonly", &argv),
            Some(0),
        )
        .map_err(|e| e.hint(format!("see the sshd log: cat {}", sd.log.display())))?;
    }
    println!("-- infisical-secrets-read-scoped: a scoped token, revoked when the child exits");
    // The child names the server itself (a child of aap-exec sees no AAP_CONFIG), as a child
    // would run Infisical's own CLI with INFISICAL_API_URL.
    let aap_s = exe.display().to_string();
    let ca_s = ca
        .as_ref()
        .map(|c| c.display().to_string())
        .unwrap_or_default();
    let check = |secret: &str| {
        let mut v = s(&[
            aap_s.as_str(),
            "infisical",
            "check",
            "--token-env",
            "INFISICAL_TOKEN",
            "--url",
            server.url(),
            "--project-id",
            &project_id,
        ]);
        if !ca_s.is_empty() {
            v.extend(s(&["--ca-bundle", &ca_s]));
        }
        v.push(secret.to_string());
        v
    };
    d.step(
        &d.exec_cmd(
            &session,
            "infisical-secrets-read-scoped",
            &check("prod:/app:DB_PASSWORD"),
        ),
        Some(0),
    )?;
    d.step(
        &d.exec_cmd(
            &session,
            "infisical-secrets-read-scoped",
            &check("prod:/forgejo:FORGEJO_PAT_READ"),
        ),
        Some(77),
    )?;

    println!("\n== 7. denials: a capability the session was not granted, then a revoked session");
    d.step(
        &d.exec_cmd(
            &session,
            "ssh-rs2000-platform-host-agent",
            &s(&["ssh", "-V"]),
        ),
        Some(77),
    )?;
    d.step(
        &d.aap_cmd(&["session", "revoke", &session, "--reason", "demo over"]),
        Some(0),
    )?;
    d.step(
        &d.exec_cmd(
            &session,
            "infisical-secrets-read-scoped",
            &check("prod:/app:DB_PASSWORD"),
        ),
        Some(77),
    )?;

    println!("\n== 8. break-glass: the operator grants the critical capability, with a reason");
    let out = d.step(
        &d.aap_cmd(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "break-glass-full-access",
            "--ttl",
            "10m",
            "--break-glass",
            "--reason",
            "demo: INC-1 the deploy host is down",
        ]),
        Some(0),
    )?;
    let bg = exported_session(
        &out,
        "aap session start --agent codex --cap break-glass-full-access --break-glass --reason test",
    )?;
    let argv = match &sshd {
        Some(sd) => ssh_argv(
            &known_hosts,
            sd.port,
            "vps1000.example.org",
            "echo \"remote: break-glass login as $(id -un)\"",
        )?,
        None => s(&["ssh", "-V"]),
    };
    d.step(&d.exec_cmd(&bg, "break-glass-full-access", &argv), Some(0))?;
    let notified = read(&dir.join("notified.json")).unwrap_or_default();
    let ev: serde_json::Value = serde_json::from_str(notified.trim()).unwrap_or_default();
    println!(
        "the notify command got the audit line on its stdin: {} cap={} tier={} session={}",
        ev["event"].as_str().unwrap_or("(nothing)"),
        ev["capability"].as_str().unwrap_or(""),
        ev["tier"].as_str().unwrap_or(""),
        ev["session"].as_str().unwrap_or(""),
    );
    if ev["event"].as_str() != Some("exec.start") {
        return Err(
            Error::internal("the break-glass notify command got no exec.start line").hint(format!(
                "look at what it got: cat {}/notified.json",
                dir.display()
            )),
        );
    }

    println!("\n== 9. the audit log: every decision, hash-chained");
    d.step(&d.aap_cmd(&["audit", "tail", "-n", "40"]), Some(0))?;
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
        "\n== done: every seed capability ran or was refused as it should, no secret value appeared in any output above, and the audit log verifies."
    );
    drop(broker);
    drop(sshd);
    drop(server);
    Ok(0)
}

/// `ssh` to the demo sshd on `port` under the name `alias` (so the catalog's destination
/// constraint, a host name, applies), with no key file and no config: the agent aap-exec set up
/// is the only source of a key.
fn ssh_argv(known_hosts: &Path, port: u16, alias: &str, remote: &str) -> Result<Vec<String>> {
    let user = Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .ok_or_else(|| {
            Error::internal("cannot tell this user's name (id -un failed)")
                .hint("check the passwd entry of this uid: getent passwd \"$(id -u)\"")
        })?;
    Ok([
        "ssh",
        "-F",
        "/dev/null",
        "-p",
        &port.to_string(),
        "-o",
        &format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        &format!("HostKeyAlias={alias}"),
        "-o",
        "IdentityFile=/nonexistent/aap-demo",
        "-o",
        "BatchMode=yes",
        "-l",
        &user,
        "127.0.0.1",
        remote,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect())
}

impl Demo {
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
        // Everything the demo reaches is on loopback: never through a proxy of the environment.
        c.current_dir(&self.dir)
            .env("AAP_CONFIG", self.dir.join("config.yaml"))
            .env("no_proxy", "127.0.0.1,localhost")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("AAP_LOG");
        for v in [
            "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID",
            "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET",
            "INFISICAL_TOKEN",
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
        run.stdin(std::process::Stdio::null());
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
        let name = crate::sys::random_hex(8).map_err(|e| {
            Error::internal(format!("no randomness: {e}"))
                .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
        })?;
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

/// The session id from `aap session start`'s `export AAP_SESSION=...` line; `command` is how
/// to run that step by hand when the line is missing.
fn exported_session(out: &str, command: &str) -> Result<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("export AAP_SESSION="))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::internal("`aap session start` printed no export line").hint(format!(
                "run the step by hand to see why: AAP_LOG=debug {command}"
            ))
        })
}

/// A fresh ed25519 key: the OpenSSH private key (PEM) and its public line, made in memory.
fn demo_ssh_key() -> Result<(String, String)> {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    crate::sys::random_bytes(&mut seed[..]).map_err(|e| {
        Error::internal(format!(
            "cannot read random bytes for the demo's ssh key: {e}"
        ))
        .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
    })?;
    let mut key = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
    key.set_comment("aap-demo-key");
    let broken = |e: ssh_key::Error| {
        Error::internal(format!("cannot encode the demo's ssh key: {e}"))
            .hint("this is a bug in aap; report it with: aap --version")
    };
    let pem = key.to_openssh(ssh_key::LineEnding::LF).map_err(broken)?;
    let public = key.public_key().to_openssh().map_err(broken)?;
    Ok((pem.as_str().to_owned(), public))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::internal(format!("cannot read {}: {e}", path.display()))
            .hint("check TMPDIR: ls -ld \"${TMPDIR:-/tmp}\"")
    })
}
