//! Issue 11, item 11: the broker as one uid (root, this test's), the agent side as another
//! (65534, through `setpriv --reuid --regid --clear-groups`), on an installation set up the way
//! an operator would for two uids. Every guarantee about the agent is proven as the agent's uid,
//! with the tools that uid has (sh, coreutils, util-linux's flock, curl, python3, an
//! `LD_PRELOAD` library built with gcc).
//!
//! Layout (world dir 0755):
//! - config.yaml, catalog.yaml, allowed_signers: root 0644 (the agent finds the socket by it);
//! - identity/client_secret, scoped/client_secret, the operator's signing key: root 0600;
//! - audit.jsonl: root 0600;
//! - state/: root 0700 (the agent reads no grant any more), except in the test of the
//!   default layout (0755, `.lock` 0644) that `aap session start` creates;
//! - home-<uid>/: the agent's HOME and cwd, its own, 0700.
//!
//! Config: `agents.codex.uid: 65534`, `agents.claude.uid: 65533`; uid 65532 is no agent.
//!
//! Not root: skipped (a failure when `AAP_TEST_FULL=1`).

mod common;

use common::tmux::Tmux;
use common::world::{DB_PASSWORD, World};
use common::*;
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CODEX: u32 = 65534;
const CLAUDE: u32 = 65533;
const UNMAPPED: u32 = 65532;

/// Whether this test can run: root (to be two uids) and setpriv. Otherwise it skips, or fails
/// in the full run.
fn can_run(test: &str) -> bool {
    if aap::sys::uid() != 0 {
        assert!(
            !full_run(),
            "{test}: the two-uid tests must run as root (CI does): in the full run this is a failure, not a skip"
        );
        skip(
            test,
            "not root: the broker and the agent cannot be two uids (run as root, as CI does)",
        );
        return false;
    }
    if Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        missing_tool(test, "setpriv", "apt-get install -y util-linux");
        return false;
    }
    true
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
}

/// An installation for two uids, with its broker (as root) running.
struct Two {
    w: World,
    bins: AgentBins,
    /// A session of codex: db-env, db-fd and infisical-scoped.
    codex: String,
    /// A session of claude: claude-only.
    claude: String,
}

impl Two {
    fn new() -> Two {
        Self::with_state_mode(Some(0o700))
    }

    /// `state_mode`: the mode the state dir gets after the sessions are made (`None`: as
    /// `aap session start` created it).
    fn with_state_mode(state_mode: Option<u32>) -> Two {
        let mut w = World::new();
        let d = w.path().to_path_buf();
        // The scoped identity, for the infisical-token capability.
        let (id, secret) = seed_identity("scoped");
        write(&d.join("scoped/client_id"), format!("{id}\n"));
        std::fs::write(d.join("scoped/client_secret"), format!("{secret}\n")).unwrap();
        let me = aap::sys::uid();
        let mut cfg = std::fs::read_to_string(&w.config).unwrap();
        let codex_line = format!("agents:\n  codex:\n    uid: {me}\n");
        assert!(cfg.contains(&codex_line), "unexpected world config: {cfg}");
        cfg = cfg.replace(
            &codex_line,
            &format!("agents:\n  claude:\n    uid: {CLAUDE}\n  codex:\n    uid: {CODEX}\n"),
        );
        cfg.push_str(
            "identities:\n  scoped:\n    client_id_file: scoped/client_id\n    client_secret_file: scoped/client_secret\n",
        );
        write(&w.config, cfg);
        let cat = d.join("catalog.yaml");
        let mut text = std::fs::read_to_string(&cat).unwrap();
        text.push_str(
            &"  - id: infisical-scoped
    description: A token of the scoped identity (reads /forgejo only)
    audit_tier: medium
    agents: [codex]
    max_ttl: 1h
    backing: { type: infisical-token, identity: scoped, secret_path: /forgejo }
    inject: [ { type: env, name: INFISICAL_TOKEN } ]
  - id: deploy-status
    description: A deploy hook run by the broker (as its own user) with a token
    audit_tier: medium
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: @DIR@/bin/deploy
      args: [\"^status$\", \"^web$\"]
      secret: { path: /app, key: DB_PASSWORD }
    inject: [ { type: env, name: DEPLOY_TOKEN } ]
  - id: whoami-daemon
    description: A broker-run command as another user (daemon)
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/whoami, args: [], run_as: daemon }
  - id: sleeper
    description: A broker-run command that runs until it is ended
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/sleeper, args: [] }
  - id: term-probe
    description: A broker-run command that looks at its terminal and reads lines
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/term-probe, args: [] }
  - id: pager
    description: A broker-run pager
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/pager, args: [] }
  - id: term-daemon
    description: A broker-run command as daemon that looks at its terminal and reads a line
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/term-daemon, args: [], run_as: daemon }
  - id: bg-probe
    description: A broker-run command that counts until told to stop, then reads a line
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/bg-probe, args: [] }
  - id: paste-cat
    description: A broker-run command that echoes lines while it reads them, until END
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: @DIR@/bin/paste-cat, args: [] }
"
            .replace("@DIR@", &d.display().to_string()),
        );
        write(&cat, text);
        // The hook: bash, calls curl through PATH, uses the token, writes where only the
        // broker's user may (priv/, root 0700) what it saw.
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::create_dir_all(d.join("priv")).unwrap();
        chmod(&d.join("priv"), 0o700);
        let script = |name: &str, body: String| {
            let p = d.join("bin").join(name);
            std::fs::write(&p, body).unwrap();
            chmod(&p, 0o755);
        };
        script(
            "deploy",
            format!(
                "#!/bin/bash\n\
                 curl -s -o /dev/null -H \"Authorization: Bearer $DEPLOY_TOKEN\" file:///dev/null || true\n\
                 env > {0}/priv/env || exit 1\n\
                 echo \"$(id -u) $PWD\" > {0}/priv/ran || exit 1\n\
                 echo \"status web: ok\"\n\
                 exit 3\n",
                d.display()
            ),
        );
        script(
            "whoami",
            "#!/bin/sh\necho \"$(id -u):$(id -g):$(id -G) $PWD $HOME $USER\"\n".to_string(),
        );
        script(
            "sleeper",
            format!(
                "#!/bin/sh\necho $$ > {0}/priv/sleeper.pid\nexec sleep 60\n",
                d.display()
            ),
        );

        script(
            "term-probe",
            "#!/bin/sh\n\
             echo \"tty=$(tty)\"\n\
             test -t 0 && test -t 1 && test -t 2 && echo 'all three are terminals'\n\
             echo \"size=$(stty size)\"\n\
             echo READY1\n\
             read a\n\
             echo \"got=$a size=$(stty size)\"\n\
             echo READY2\n\
             read b\n\
             echo \"got=$b\"\n\
             echo READY3\n\
             exec sleep 60\n"
                .to_string(),
        );
        script(
            "pager",
            "#!/bin/sh\nseq 1 500 | sed 's/^/line /' | less\n".to_string(),
        );
        script(
            "term-daemon",
            "#!/bin/sh\n\
             t=$(tty)\n\
             echo \"uid=$(id -u) tty=$t owner=$(stat -c %U \"$t\")\"\n\
             echo READY1\n\
             read a\n\
             echo \"got=$a\"\n\
             exec sleep 60\n"
                .to_string(),
        );
        // Counts into priv/ticks (the broker's user's) until priv/stop-ticking exists; each count
        // is renamed into place, so a reader never sees the file empty.
        script(
            "bg-probe",
            format!(
                "#!/bin/sh\n\
                 echo BG-READY\n\
                 n=0\n\
                 while [ ! -e {0}/priv/stop-ticking ]; do n=$((n+1)); echo $n > {0}/priv/ticks.tmp; mv {0}/priv/ticks.tmp {0}/priv/ticks; sleep 0.05; done\n\
                 echo ASK\n\
                 read line\n\
                 echo \"got=$line\"\n\
                 exec sleep 60\n",
                d.display()
            ),
        );
        script(
            "paste-cat",
            "#!/bin/sh\nexec awk '/^END$/ { print \"LINES=\" n; exit } { n++; print }'\n"
                .to_string(),
        );
        // Modes, as the operator sets them for two uids.
        chmod(&d, 0o755);
        for f in ["config.yaml", "catalog.yaml", "allowed_signers"] {
            chmod(&d.join(f), 0o644);
        }
        for f in ["identity/client_secret", "scoped/client_secret", "operator"] {
            chmod(&d.join(f), 0o600);
        }
        for dir in ["identity", "scoped"] {
            chmod(&d.join(dir), 0o755);
        }
        let log = d.join("audit.jsonl");
        if !log.exists() {
            std::fs::write(&log, "").unwrap();
        }
        chmod(&log, 0o600);
        w.start_broker(); // the broker reads its config at start

        let start = |agent: &str, caps: &[&str]| {
            let mut args = vec!["session", "start", "--agent", agent, "--ttl", "1h"];
            for c in caps {
                args.extend(["--cap", c]);
            }
            let o = run(&mut w.aap(&args));
            assert_eq!(code(&o), 0, "session start: {}", stderr(&o));
            stdout(&o)
                .trim()
                .strip_prefix("export AAP_SESSION=")
                .unwrap()
                .to_string()
        };
        let codex = start(
            "codex",
            &[
                "db-env",
                "db-fd",
                "infisical-scoped",
                "deploy-status",
                "sleeper",
                "whoami-daemon",
                "term-probe",
                "pager",
                "term-daemon",
                "bg-probe",
                "paste-cat",
            ],
        );
        let claude = start("claude", &["claude-only"]);
        let state = d.join("state");
        assert!(
            state.join(".lock").exists(),
            "no state lock after a session start"
        );
        if let Some(m) = state_mode {
            chmod(&state, m);
        }
        for uid in [CODEX, CLAUDE, UNMAPPED] {
            let h = d.join(format!("home-{uid}"));
            std::fs::create_dir_all(&h).unwrap();
            std::os::unix::fs::chown(&h, Some(uid), Some(uid)).unwrap();
            chmod(&h, 0o700);
        }
        Two {
            w,
            bins: agent_bins(),
            codex,
            claude,
        }
    }

    fn dir(&self) -> &Path {
        self.w.path()
    }

    fn home(&self, uid: u32) -> PathBuf {
        self.dir().join(format!("home-{uid}"))
    }

    fn audit(&self) -> PathBuf {
        self.dir().join("audit.jsonl")
    }

    /// `argv` as `uid` (gid `uid`, no supplementary groups), HOME and cwd its home, a clean
    /// environment with AAP_CONFIG.
    fn as_uid(&self, uid: u32, argv: &[&str]) -> Command {
        let u = uid.to_string();
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &u, "--regid", &u, "--clear-groups", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.home(uid))
            .env("AAP_CONFIG", &self.w.config)
            .current_dir(self.home(uid));
        c
    }

    /// `sh -c SCRIPT` as `uid`.
    fn sh(&self, uid: u32, script: &str) -> Command {
        self.as_uid(uid, &["sh", "-c", script])
    }

    /// `aap-exec ARGS` as `uid`.
    fn exec(&self, uid: u32, args: &[&str]) -> Command {
        let mut argv = vec![self.bins.aap_exec.to_str().unwrap()];
        argv.extend_from_slice(args);
        self.as_uid(uid, &argv)
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.w.audit_lines()
    }

    fn assert_chain_valid(&self) {
        let o = self.w.audit_verify();
        assert_eq!(code(&o), 0, "audit verify: {}{}", stdout(&o), stderr(&o));
    }

    /// The status of reading /forgejo:FORGEJO_TOKEN with `token` now.
    fn read_with(&self, token: &str) -> u16 {
        let path = format!(
            "/api/v3/secrets/raw/FORGEJO_TOKEN?workspaceId={}&environment=prod&secretPath=/forgejo",
            self.w.server.project_id
        );
        self.w
            .server
            .request("GET", &path, Some(&format!("Bearer {token}")), None)
            .0
    }
}

fn assert_permission_denied(o: &std::process::Output, what: &str) {
    let err = stderr(o);
    assert_ne!(code(o), 0, "{what} succeeded as the agent: {}", stdout(o));
    assert!(
        err.contains("Permission denied") || err.contains("EACCES"),
        "{what}: expected EACCES, got: {err}"
    );
}

/// Sanity: the happy path works across uids, and the audit line's uid is the kernel's.
#[test]
fn the_agent_uid_runs_a_granted_capability_and_is_audited_as_itself() {
    if !can_run("the_agent_uid_runs_a_granted_capability_and_is_audited_as_itself") {
        return;
    }
    let t = Two::new();
    let o = run(&mut t.exec(
        CODEX,
        &[
            "--session",
            &t.codex,
            "db-env",
            "--",
            "sh",
            "-c",
            "test -n \"$DB_PASSWORD\" && test \"$(id -u)\" = 65534",
        ],
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines = t.audit_lines();
    for ev in ["exec.start", "exec.end"] {
        let l = lines
            .iter()
            .find(|l| l["event"] == ev)
            .unwrap_or_else(|| panic!("no {ev} in {lines:?}"));
        assert_eq!(l["uid"], CODEX, "{l}");
        assert_eq!(l["agent"], "codex", "{l}");
    }
    t.assert_chain_valid();
}

/// Property 1: No identity file (nor the operator's signing key) can be read by the agent: EACCES.
#[test]
fn the_agent_cannot_read_any_identity_file() {
    if !can_run("the_agent_cannot_read_any_identity_file") {
        return;
    }
    let t = Two::new();
    // The setup is realistic: the agent reads the config and the catalog.
    let o = run(&mut t.sh(
        CODEX,
        "cat \"$AAP_CONFIG\" >/dev/null && cat ../catalog.yaml >/dev/null",
    ));
    assert_eq!(
        code(&o),
        0,
        "the agent must read the config: {}",
        stderr(&o)
    );
    for f in ["identity/client_secret", "scoped/client_secret", "operator"] {
        let p = t.dir().join(f);
        let o = run(&mut t.as_uid(CODEX, &["cat", p.to_str().unwrap()]));
        assert_permission_denied(&o, &format!("cat {f}"));
        // An open(2) of its own, to see the errno.
        let o = run(&mut t.as_uid(
            CODEX,
            &[
                "/usr/bin/python3",
                "-c",
                "import sys\ntry:\n  open(sys.argv[1],'rb').read(1)\n  print('READ')\nexcept OSError as e:\n  print('errno', e.errno)",
                p.to_str().unwrap(),
            ],
        ));
        assert_eq!(stdout(&o).trim(), "errno 13", "open {f}: {}", stderr(&o));
    }
}

/// Property 2: The audit log cannot be written, truncated, appended to, replaced or opened for reading
/// (so it cannot be flock'ed).
#[test]
fn the_agent_cannot_touch_the_audit_log() {
    if !can_run("the_agent_cannot_touch_the_audit_log") {
        return;
    }
    let t = Two::new();
    // Something in the log first.
    let o = run(&mut t.exec(CODEX, &["--session", &t.codex, "db-env", "--", "true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let log = t.audit();
    let before = std::fs::read(&log).unwrap();
    assert!(!before.is_empty());
    let l = log.to_str().unwrap();
    let q = |s: &str| format!("'{s}'");
    for (what, script) in [
        ("append with >>", format!("echo x >> {}", q(l))),
        ("write with >", format!("echo x > {}", q(l))),
        ("read", format!("cat {} > /dev/null", q(l))),
        ("truncate", format!("truncate -s 0 {}", q(l))),
        ("flock -s", format!("flock -s -n {} true", q(l))),
        ("flock -x", format!("flock -x -n {} true", q(l))),
    ] {
        let o = run(&mut t.sh(CODEX, &script));
        assert_permission_denied(&o, what);
    }
    for (what, script) in [
        ("rm", format!("rm -f {}", q(l))),
        ("mv", format!("mv -f {} {}.x", q(l), q(l))),
        ("replace", format!("ln -sf /dev/null {}", q(l))),
    ] {
        let o = run(&mut t.sh(CODEX, &script));
        assert_ne!(code(&o), 0, "{what} succeeded as the agent");
    }
    // Every open mode, and flock, from a program of the agent's own.
    let o = run(&mut t.as_uid(
        CODEX,
        &[
            "/usr/bin/python3",
            "-c",
            "import sys, os, fcntl\nfor fl in (os.O_RDONLY, os.O_WRONLY|os.O_APPEND, os.O_RDWR, os.O_WRONLY|os.O_TRUNC, os.O_PATH):\n  try:\n    fd = os.open(sys.argv[1], fl)\n    try:\n      fcntl.flock(fd, fcntl.LOCK_SH|fcntl.LOCK_NB)\n      print('LOCKED', fl)\n    except OSError as e:\n      print('open ok, flock errno', e.errno, fl)\n  except OSError as e:\n    print('errno', e.errno)",
            l,
        ],
    ));
    let out = stdout(&o);
    assert!(
        !out.contains("LOCKED"),
        "the agent took a lock on the log: {out}"
    );
    // O_PATH opens (it needs only the directory's search bit) but cannot be flock'ed (EBADF).
    let denied = out.lines().filter(|l| *l == "errno 13").count();
    assert_eq!(
        denied,
        4,
        "every real open must be EACCES: {out}{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&log).unwrap(), before, "the log changed");
    t.assert_chain_valid();
    // And the broker still writes it.
    let o = run(&mut t.exec(CODEX, &["--session", &t.codex, "db-env", "--", "true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(t.w.count("exec.end"), 2);
    t.assert_chain_valid();
}

/// Python, as the agent: hold a shared flock on `path` until killed, printing `held` once it
/// holds it or `errno N` when it cannot open or lock it.
const HOLD_LOCK: &str = "import sys, os, fcntl, time
try:
  fd = os.open(sys.argv[1], os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_SH)
  print('held', flush=True)
  time.sleep(60)
except OSError as e:
  print('errno', e.errno, flush=True)
";

/// Property 3: The state lock cannot be taken by the agent, and `aap session revoke` by root works
/// while the agent keeps trying.
#[test]
fn the_agent_cannot_take_the_state_lock_and_revoke_works_while_it_tries() {
    if !can_run("the_agent_cannot_take_the_state_lock_and_revoke_works_while_it_tries") {
        return;
    }
    let t = Two::new();
    let lock = t.dir().join("state/.lock");
    let l = lock.to_str().unwrap();
    for script in [
        format!("flock -s -n '{l}' true"),
        format!("flock -x -n '{l}' true"),
        format!("cat '{l}'"),
        format!("ls '{}'", t.dir().join("state/grants").display()),
    ] {
        let o = run(&mut t.sh(CODEX, &script));
        assert_permission_denied(&o, &script);
    }
    let o = run(&mut t.as_uid(CODEX, &["/usr/bin/python3", "-c", HOLD_LOCK, l]));
    assert_eq!(stdout(&o).trim(), "errno 13", "{}", stderr(&o));
    // The happy path needs no grant read by the agent: state/ is 0700 root.
    let o = run(&mut t.exec(CODEX, &["--session", &t.codex, "db-env", "--", "true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // The agent keeps trying to take the lock while root revokes.
    let mut trier = t
        .sh(
            CODEX,
            &format!("while :; do flock -s '{l}' sleep 5 2>/dev/null; flock -s -n '{}' sleep 5 2>/dev/null; sleep 0.01; done", t.dir().join("state").display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let o = run(&mut t
        .w
        .aap(&["session", "revoke", &t.codex, "--reason", "test"]));
    let took = t0.elapsed();
    let _ = trier.kill();
    let _ = trier.wait();
    assert_eq!(code(&o), 0, "revoke: {}", stderr(&o));
    assert!(took < Duration::from_secs(3), "revoke took {took:?}");
    assert!(t.dir().join(format!("state/revoked/{}", t.codex)).exists());
    let o = run(&mut t.exec(CODEX, &["--session", &t.codex, "db-env", "--", "true"]));
    assert_eq!(
        code(&o),
        77,
        "a revoked session still works: {}",
        stderr(&o)
    );
    let revoke = t
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "session.revoke")
        .expect("session.revoke audited");
    assert_eq!(revoke["uid"], 0, "{revoke}");
}

/// Property 3b: The layout `aap session start` creates by itself (state/ 0755, `.lock` 0644), which the
/// operator guide still documents: can the agent block `aap session revoke`?
///
/// Was a hole (issue 11, item 7), closed by an operator-only (0600) state lock: "No lock or file an agent can open may block `aap session
/// revoke` or `aap session start`"): the agent opens `.lock` read-only and holds a shared
/// flock; revoke waits 10 s for its exclusive lock (src/state.rs `StateDir::lock`, called by
/// `revoke` in src/cmd/session.rs) and fails with 69 without writing the marker. This test
/// fails until the lock is out of the agents' reach.
#[test]
fn in_the_default_state_layout_the_agent_cannot_block_revoke() {
    if !can_run("in_the_default_state_layout_the_agent_cannot_block_revoke") {
        return;
    }
    let t = Two::with_state_mode(None);
    let lock = t.dir().join("state/.lock");
    let mut holder = t
        .as_uid(
            CODEX,
            &["/usr/bin/python3", "-c", HOLD_LOCK, lock.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let out = holder.stdout.take().unwrap();
        std::io::BufReader::new(out).read_line(&mut first).unwrap();
    }
    let t0 = Instant::now();
    let o = run(&mut t
        .w
        .aap(&["session", "revoke", &t.codex, "--reason", "test"]));
    let took = t0.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        code(&o),
        0,
        "HOLE: the agent ({}) blocked `aap session revoke` for {took:?}: {}",
        first.trim(),
        stderr(&o)
    );
    assert!(
        took < Duration::from_secs(3),
        "HOLE: revoke waited {took:?} for the agent's lock"
    );
    assert!(t.dir().join(format!("state/revoked/{}", t.codex)).exists());
}

/// The LD_PRELOAD library (aap-exec is static, so it loads into its children only; aap-exec
/// itself is traced with [`TRACE_PY`]): dumps, into $HOME/dump-<pid>-<n>-<tag>, everything the
/// process can see: environ, /proc/self/fd targets, the contents of every memfd, and every writable
/// mapping of its memory. It dumps at load, after every recvmsg (descriptors arrive), before
/// every sendmsg (the `started` report: the child runs, its secrets were read) and at exit.
/// With AAP_T_STOP_BEFORE_STARTED set, it stops its process (SIGSTOP) right before the
/// `started` report goes out.
const PRELOAD_C: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;
static int seq;

static void put(int out, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) { ssize_t w = write(out, c, n); if (w <= 0) return; c += w; n -= w; }
}
static void puts_(int out, const char *s) { put(out, s, strlen(s)); }

static void dump(const char *tag) {
    const char *home = getenv("HOME");
    if (!home) return;
    /* aap-exec makes itself non-dumpable, which makes /proc/self/mem root's: undo it. */
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    char path[4096];
    snprintf(path, sizeof path, "%s/dump-%d-%d-%s", home, (int)getpid(), seq++, tag);
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) return;
    puts_(out, "== environ\n");
    for (char **e = environ; e && *e; e++) { puts_(out, *e); puts_(out, "\n"); }
    puts_(out, "== fds\n");
    for (int fd = 0; fd < 1024; fd++) {
        if (fd == out) continue;
        char l[64], t[4096];
        snprintf(l, sizeof l, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(l, t, sizeof t - 1);
        if (n < 0) continue;
        t[n] = 0;
        char line[4200];
        snprintf(line, sizeof line, "fd %d -> %s\n", fd, t);
        puts_(out, line);
        if (strncmp(t, "/memfd:", 7) == 0) {
            char buf[65536];
            ssize_t r = pread(fd, buf, sizeof buf, 0);
            if (r > 0) { puts_(out, "-- memfd contents\n"); put(out, buf, r); puts_(out, "\n"); }
        }
    }
    puts_(out, "== memory\n");
    FILE *maps = fopen("/proc/self/maps", "re");
    int mem = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
    if (maps && mem >= 0) {
        char line[4096];
        while (fgets(line, sizeof line, maps)) {
            unsigned long a, b; char perms[8] = {0};
            if (sscanf(line, "%lx-%lx %7s", &a, &b, perms) != 3) continue;
            if (perms[0] != 'r') continue;
            if (perms[1] != 'w' && !strstr(line, "memfd")) continue;
            if (strstr(line, "[vvar]") || strstr(line, "[vsyscall]")) continue;
            static char chunk[1 << 16];
            for (unsigned long p = a; p < b; p += sizeof chunk) {
                size_t want = b - p < sizeof chunk ? b - p : sizeof chunk;
                ssize_t r = pread(mem, chunk, want, (off_t)p);
                if (r > 0) put(out, chunk, r);
            }
        }
    }
    if (maps) fclose(maps);
    if (mem >= 0) close(mem);
    close(out);
}

__attribute__((constructor)) static void at_load(void) { dump("load"); }
__attribute__((destructor)) static void at_exit_(void) { dump("exit"); }

ssize_t recvmsg(int fd, struct msghdr *m, int flags) {
    static ssize_t (*real)(int, struct msghdr *, int);
    if (!real) real = dlsym(RTLD_NEXT, "recvmsg");
    ssize_t r = real(fd, m, flags);
    dump("recvmsg");
    return r;
}

ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
    static ssize_t (*real)(int, const struct msghdr *, int);
    if (!real) real = dlsym(RTLD_NEXT, "sendmsg");
    int started = 0;
    for (size_t i = 0; m && i < m->msg_iovlen; i++)
        if (memmem(m->msg_iov[i].iov_base, m->msg_iov[i].iov_len, "\"started\"", 9)) started = 1;
    dump(started ? "started" : "sendmsg");
    if (started && getenv("AAP_T_STOP_BEFORE_STARTED")) raise(SIGSTOP);
    return real(fd, m, flags);
}
"#;

/// aap-exec is linked statically (build.rs), so no loader ever reads `LD_PRELOAD` for it: the
/// agent's tool against it is ptrace, from its start, which PR_SET_DUMPABLE cannot end. This
/// gdb script (Python), run by the agent's uid as `gdb -batch -x SCRIPT --args aap-exec ...`,
/// does what the preload library did inside a dynamic aap-exec: it turns aap-exec's
/// `prctl(PR_SET_DUMPABLE, 0)` into a harmless `PR_GET_DUMPABLE` (so the same uid may read its
/// /proc files), and dumps, into $HOME/dump-<pid>-<n>-<tag>, environ, /proc/PID/fd targets,
/// the contents of every memfd and every writable mapping of its memory: after every recvmsg
/// (descriptors arrive), before every sendmsg (`started` when it carries the `started` report:
/// the child runs, its secrets were read) and at exit. With AAP_T_STOP_BEFORE_STARTED it
/// writes $HOME/held-before-started and keeps aap-exec stopped right before the `started` report
/// goes out. The inferior gets `LD_PRELOAD` from AAP_T_INFERIOR_PRELOAD (for its children, which
/// are dynamic); gdb itself does not. It exits with aap-exec's status.
const TRACE_PY: &str = r#"
import gdb, os, time
home = os.environ["HOME"]
stop_started = bool(os.environ.get("AAP_T_STOP_BEFORE_STARTED"))
pre = os.environ.get("AAP_T_INFERIOR_PRELOAD")
# The program starts through /bin/sh (gdb's default): with startup-with-shell off gdb would
# split the arguments itself and keep the backslashes it escaped them with.
os.environ["SHELL"] = "/bin/sh"
for c in ["set pagination off", "set confirm off", "set auto-load off",
          "set follow-fork-mode parent", "set detach-on-fork on",
          "catch syscall prctl sendmsg recvmsg exit_group"]:
    gdb.execute(c, to_string=True)
gdb.execute("unset environment LD_PRELOAD", to_string=True)
if pre:
    gdb.execute("set environment LD_PRELOAD " + pre, to_string=True)
seq = [0]

def dump(pid, tag):
    out = open("%s/dump-%d-%d-%s" % (home, pid, seq[0], tag), "wb")
    seq[0] += 1
    out.write(b"== environ\n")
    try:
        out.write(open("/proc/%d/environ" % pid, "rb").read().replace(b"\0", b"\n"))
    except OSError as e:
        out.write(("environ: %s\n" % e).encode())
    out.write(b"== fds\n")
    for fd in sorted(os.listdir("/proc/%d/fd" % pid), key=int):
        try:
            t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        out.write(("fd %s -> %s\n" % (fd, t)).encode())
        if t.startswith("/memfd:"):
            try:
                out.write(b"-- memfd contents\n" + open("/proc/%d/fd/%s" % (pid, fd), "rb").read(65536) + b"\n")
            except OSError as e:
                out.write(("memfd: %s\n" % e).encode())
    out.write(b"== memory\n")
    mem = open("/proc/%d/mem" % pid, "rb", 0)
    for line in open("/proc/%d/maps" % pid):
        f = line.split()
        if f[1][0] != "r" or (f[1][1] != "w" and "memfd" not in line):
            continue
        if "[vvar]" in line or "[vsyscall]" in line:
            continue
        a, b = (int(x, 16) for x in f[0].split("-"))
        try:
            mem.seek(a)
            out.write(mem.read(b - a))
        except OSError:
            pass
    out.close()

def is_started():
    inf = gdb.selected_inferior()
    hdr = bytes(inf.read_memory(int(gdb.parse_and_eval("$rsi")), 56))
    iov, n = int.from_bytes(hdr[16:24], "little"), int.from_bytes(hdr[24:32], "little")
    for i in range(min(n, 8)):
        e = bytes(inf.read_memory(iov + 16 * i, 16))
        base, ln = int.from_bytes(e[:8], "little"), int.from_bytes(e[8:], "little")
        if b'"started"' in bytes(inf.read_memory(base, min(ln, 1 << 16))):
            return True
    return False

gdb.execute("run", to_string=True)
while gdb.selected_inferior().pid:
    pid = gdb.selected_inferior().pid
    nr = int(gdb.parse_and_eval("$orig_rax"))
    entry = int(gdb.parse_and_eval("$rax")) == -38
    if nr == 157 and entry and int(gdb.parse_and_eval("$rdi")) == 4:
        gdb.execute("set $rdi = 3", to_string=True)
    elif nr == 46 and entry:
        started = is_started()
        dump(pid, "started" if started else "sendmsg")
        if started and stop_started:
            open(home + "/held-before-started", "w").close()
            time.sleep(120)
    elif nr == 47 and not entry:
        dump(pid, "recvmsg")
    elif nr == 231:
        dump(pid, "exit")
    gdb.execute("continue", to_string=True)
code = gdb.parse_and_eval("$_exitcode")
sig = gdb.parse_and_eval("$_exitsignal")
if code.type.code != gdb.TYPE_CODE_VOID:
    gdb.execute("quit %d" % int(code))
elif sig.type.code != gdb.TYPE_CODE_VOID:
    gdb.execute("quit %d" % (128 + int(sig)))
gdb.execute("quit 70")
"#;

/// Write the tracer script into `dir` (readable by the agent); `None` (skipped, or a failure in
/// the full run) without gdb.
fn tracer(test: &str, dir: &Path) -> Option<PathBuf> {
    if Command::new("gdb").arg("--version").output().is_err() {
        missing_tool(test, "gdb", "apt-get install -y gdb");
        return None;
    }
    let py = dir.join("trace.py");
    std::fs::write(&py, TRACE_PY).unwrap();
    chmod(&py, 0o644);
    Some(py)
}

/// `aap-exec ARGS` as `uid` under the agent's tracer `py`, with `preload` for its children.
fn traced_exec(t: &Two, uid: u32, py: &Path, preload: &Path, args: &[&str]) -> Command {
    let mut argv = vec![
        "gdb",
        "-q",
        "-nx",
        "-batch",
        "-x",
        py.to_str().unwrap(),
        "--args",
        t.bins.aap_exec.to_str().unwrap(),
    ];
    argv.extend_from_slice(args);
    let mut c = t.as_uid(uid, &argv);
    c.env("AAP_T_INFERIOR_PRELOAD", preload);
    c
}

/// aap-exec is static (build.rs): `LD_PRELOAD` given to it loads nothing into it (its
/// children, dynamic, do load it).
#[test]
fn aap_exec_is_static_and_ld_preload_does_not_load_into_it() {
    let test = "aap_exec_is_static_and_ld_preload_does_not_load_into_it";
    if !can_run(test) {
        return;
    }
    if option_env!("AAP_EXEC_LINK") != Some("static") {
        // build.rs links dynamically when the C compiler lacks libc.a (or another archive).
        missing_tool(test, "libc.a", "apt-get install -y libc6-dev");
        return;
    }
    let t = Two::new();
    let Some(so) = build_preload(test, t.dir()) else {
        return;
    };
    let home = t.home(CODEX);
    let o = run(t
        .exec(
            CODEX,
            &[
                "--session",
                &t.codex,
                "db-env",
                "--",
                "sh",
                "-c",
                "echo $$ > child.pid",
            ],
        )
        .env("LD_PRELOAD", &so));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let child: String = std::fs::read_to_string(home.join("child.pid"))
        .unwrap()
        .trim()
        .to_owned();
    let ds = dumps(&home);
    assert!(
        ds.iter()
            .any(|(n, _)| n.starts_with(&format!("dump-{child}-"))),
        "the preload did not even load into the child: {:?}",
        ds.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(
        ds.iter()
            .all(|(n, _)| !n.ends_with("-started") && !n.ends_with("-recvmsg")),
        "the preload ran in aap-exec: {:?}",
        ds.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
}

/// Build the preload library into `dir` (readable by the agent); `None` (skipped) without gcc.
fn build_preload(test: &str, dir: &Path) -> Option<PathBuf> {
    let src = dir.join("dump.c");
    let so = dir.join("dump.so");
    std::fs::write(&src, PRELOAD_C).unwrap();
    let o = match Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
    {
        Ok(o) => o,
        Err(_) => {
            missing_tool(test, "gcc", "apt-get install -y gcc");
            return None;
        }
    };
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    chmod(&so, 0o755);
    Some(so)
}

/// Every dump file in `home`, as (name, bytes).
fn dumps(home: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(home).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("dump-") {
            out.push((name, std::fs::read(e.path()).unwrap()));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The probes of one secret: itself, and for multi-line values each long line of it.
fn probes(s: &str) -> Vec<String> {
    let mut v = vec![s.to_string()];
    v.extend(
        s.lines()
            .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
            .map(str::to_string),
    );
    v
}

/// Property 4: The agent tracing aap-exec from its start (gdb, [`TRACE_PY`]: it keeps aap-exec
/// dumpable and dumps its memory, descriptors and memfds at every message), with an LD_PRELOAD
/// library in its children, captures no identity client secret and no secret the grant does
/// not name; it does capture the granted one (so it works).
#[test]
fn tracing_aap_exec_captures_no_identity_and_no_ungranted_secret() {
    let test = "tracing_aap_exec_captures_no_identity_and_no_ungranted_secret";
    if !can_run(test) {
        return;
    }
    let t = Two::new();
    let Some(so) = build_preload(test, t.dir()) else {
        return;
    };
    let Some(py) = tracer(test, t.dir()) else {
        return;
    };
    let home = t.home(CODEX);
    for (cap, script) in [
        ("db-env", "test -n \"$DB_PASSWORD\""),
        ("db-fd", "cat \"$DB_PASSWORD_FILE\" >/dev/null"),
        ("infisical-scoped", "test -n \"$INFISICAL_TOKEN\""),
    ] {
        for e in std::fs::read_dir(&home).unwrap().flatten() {
            std::fs::remove_file(e.path()).unwrap();
        }
        let o = run(&mut traced_exec(
            &t,
            CODEX,
            &py,
            &so,
            &["--session", &t.codex, cap, "--", "sh", "-c", script],
        ));
        assert_eq!(code(&o), 0, "{cap}: {}", stderr(&o));
        let ds = dumps(&home);
        // aap-exec's dumps: those of the process that sent the `started` report.
        let wrapper_pids: Vec<String> = ds
            .iter()
            .filter(|(n, _)| n.ends_with("-started"))
            .map(|(n, _)| n.split('-').nth(1).unwrap().to_string())
            .collect();
        let aap_exec_dumps: Vec<_> = ds
            .iter()
            .filter(|(n, _)| {
                wrapper_pids
                    .iter()
                    .any(|p| n.starts_with(&format!("dump-{p}-")))
            })
            .collect();
        assert!(
            !aap_exec_dumps.is_empty(),
            "{cap}: the tracer did not dump aap-exec (dumps: {:?})",
            ds.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        let granted = if cap.starts_with("db-") {
            Some(DB_PASSWORD)
        } else {
            None
        };
        if let Some(g) = granted {
            // The legitimately granted value is seen (the probe works).
            assert!(
                aap_exec_dumps.iter().any(|(_, b)| contains(b, g)),
                "{cap}: the dump did not even see the granted secret: the probe is broken"
            );
        }
        for s in seed_secret_values() {
            if Some(s.as_str()) == granted {
                continue;
            }
            for p in probes(&s) {
                for (name, bytes) in &ds {
                    assert!(
                        !contains(bytes, &p),
                        "{cap}: {name} captured a secret the grant does not hand out ({}...)",
                        &p[..8]
                    );
                }
            }
        }
    }
}

/// Python, as the agent: a hand-made client. argv: socket, then a JSON list of frames to try,
/// each on a fresh connection; a frame is a JSON object sent as a length-prefixed frame, or a
/// string of hex for raw bytes. Prints a JSON list, per attempt, of the replies, the number
/// of descriptors received, and their contents. With argv[3] == "hold", after a `deliver` it
/// prints the result at once and keeps the connection open until killed.
const FORGE_PY: &str = r#"
import array, json, os, socket, struct, sys, time
path, frames = sys.argv[1], json.loads(sys.argv[2])
hold = len(sys.argv) > 3 and sys.argv[3] == "hold"
results = []
for f in frames:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if isinstance(f, str):
        s.sendall(bytes.fromhex(f))
    else:
        b = json.dumps(f).encode()
        s.sendall(struct.pack(">I", len(b)) + b)
    s.settimeout(10)
    buf, replies, fds, contents, final = b"", [], 0, [], False
    while not final:
        try:
            data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except (socket.timeout, ConnectionResetError) as e:
            replies.append({"client-error": str(e)})
            break
        for lvl, typ, d in anc:
            if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(d[: len(d) - len(d) % 4])
                for fd in a:
                    fds += 1
                    contents.append(os.pread(fd, 65536, 0).decode("latin-1"))
        if not data:
            break
        buf += data
        while len(buf) >= 4:
            n = struct.unpack(">I", buf[:4])[0]
            if len(buf) < 4 + n:
                break
            m = json.loads(buf[4 : 4 + n])
            buf = buf[4 + n :]
            replies.append(m)
            if m.get("type") in ("error", "done", "deliver", "recorded"):
                final = True
    results.append({"replies": replies, "fds": fds, "contents": contents})
    if hold and final:
        print(json.dumps(results), flush=True)
        time.sleep(3600)
    s.close()
print(json.dumps(results), flush=True)
"#;

fn exec_frame(cap: &str, session: &str, extra: &[(&str, serde_json::Value)]) -> serde_json::Value {
    let mut m = serde_json::json!({
        "type": "exec",
        "hello": { "version": aap::proto::VERSION },
        "cap": cap,
        "session": session,
        "reason": null,
        "argv": [b"true".to_vec()],
        "program": "/bin/true",
        "program_error": null,
        "cwd": "/",
        "nested": null,
    });
    for (k, v) in extra {
        m[*k] = v.clone();
    }
    m
}

/// Property 5: A never-granted secret cannot be fetched by any means the agent uid has.
#[test]
fn a_never_granted_secret_cannot_be_fetched_by_any_means_of_the_agent() {
    if !can_run("a_never_granted_secret_cannot_be_fetched_by_any_means_of_the_agent") {
        return;
    }
    let t = Two::new();
    let ungranted: Vec<String> = seed_secret_values()
        .into_iter()
        .filter(|s| s != DB_PASSWORD)
        .collect();
    let reads0 = t.w.server.stats()["secret_reads"].clone();

    // aap-exec with a capability the grant does not name, and one of another agent.
    for cap in ["db-low", "claude-only", "missing-secret", "no-such-cap"] {
        let o = run(&mut t.exec(
            CODEX,
            &[
                "--session",
                &t.codex,
                cap,
                "--",
                "sh",
                "-c",
                "env; touch ran",
            ],
        ));
        assert_eq!(code(&o), 77, "{cap}: {}", stderr(&o));
        assert!(!t.home(CODEX).join("ran").exists(), "{cap}: the child ran");
        assert_no_leak(&ungranted, &(stdout(&o) + &stderr(&o)), &t.home(CODEX));
    }

    // Forged requests over the socket.
    let sock = t.dir().join("broker.sock");
    let s = t.codex.as_str();
    let c = t.claude.as_str();
    let frames = vec![
        // Another agent's session and capability.
        exec_frame("claude-only", c, &[]),
        // A capability outside codex's grant.
        exec_frame("db-low", s, &[]),
        // Fields that would choose the uid, agent or time.
        exec_frame("claude-only", c, &[("uid", 0.into())]),
        exec_frame("claude-only", c, &[("agent", "claude".into())]),
        exec_frame("db-low", s, &[("time", "2000-01-01T00:00:00Z".into())]),
        exec_frame(
            "claude-only",
            c,
            &[("hello", serde_json::json!({"version": 1, "uid": 0}))],
        ),
        // Another protocol version.
        exec_frame(
            "db-low",
            s,
            &[("hello", serde_json::json!({"version": 999}))],
        ),
        // A report first, a check and a list of another agent's session.
        serde_json::json!({"type": "started", "pid": 1}),
        serde_json::json!({"type": "check", "hello": {"version": 1}, "cap": "claude-only", "session": c}),
        serde_json::json!({"type": "list", "hello": {"version": 1}, "session": c}),
        serde_json::json!({"type": "become-root"}),
        // Raw bytes: garbage, and a frame larger than the cap.
        serde_json::json!("0000000568656c6c6f"),
        serde_json::json!("7fffffff7b7d"),
    ];
    let o = run(&mut t.as_uid(
        CODEX,
        &[
            "/usr/bin/python3",
            "-c",
            FORGE_PY,
            sock.to_str().unwrap(),
            &serde_json::to_string(&frames).unwrap(),
        ],
    ));
    assert_eq!(code(&o), 0, "forge client: {}", stderr(&o));
    let out = stdout(&o);
    let results: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(results.len(), frames.len(), "{out}");
    for (f, r) in frames.iter().zip(&results) {
        assert_eq!(r["fds"], 0, "{f}: descriptors were handed out: {r}");
        let replies = r["replies"].as_array().unwrap();
        assert!(
            !replies.iter().any(|m| m["type"] == "deliver"),
            "{f}: delivered: {r}"
        );
        let last = replies
            .last()
            .unwrap_or_else(|| panic!("{f}: no answer: {r}"));
        match last["type"].as_str() {
            Some("error") => {
                let code = last["code"].as_u64().unwrap();
                assert!(code == 77 || code == 78, "{f}: {r}");
            }
            // check/list of another agent's session: an answer, but a denial.
            Some("done") => {
                assert_ne!(last["code"], 0, "{f}: {r}");
            }
            _ => panic!("{f}: unexpected answer {r}"),
        }
    }
    assert_no_leak(&ungranted, &out, &t.home(CODEX));
    // The broker still serves.
    let o = run(&mut t.exec(CODEX, &["--session", &t.codex, "db-env", "--", "true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // The identity files (see also the test of property 1).
    for f in ["identity/client_secret", "scoped/client_secret"] {
        let o = run(&mut t.as_uid(CODEX, &["cat", t.dir().join(f).to_str().unwrap()]));
        assert_permission_denied(&o, f);
    }

    // curl to the dev-server without credentials (the agent has no CA: -k).
    let url = &t.w.server.url;
    let pid = &t.w.server.project_id;
    let (reader_id, _) = seed_identity("reader");
    for (what, args) in [
        (
            "read without a token",
            vec![format!(
                "{url}/api/v3/secrets/raw/FORGEJO_TOKEN?workspaceId={pid}&environment=prod&secretPath=/forgejo"
            )],
        ),
        (
            "read with a made-up token",
            vec![
                "-H".into(),
                "Authorization: Bearer not-a-token".into(),
                format!(
                    "{url}/api/v3/secrets/raw/FORGEJO_TOKEN?workspaceId={pid}&environment=prod&secretPath=/forgejo"
                ),
            ],
        ),
        (
            "login with the client id and no secret",
            vec![
                "-H".into(),
                "content-type: application/json".into(),
                "--data".into(),
                format!("{{\"clientId\":\"{reader_id}\",\"clientSecret\":\"\"}}"),
                format!("{url}/api/v1/auth/universal-auth/login"),
            ],
        ),
    ] {
        let mut argv = vec!["curl", "-sk", "-w", "\n%{http_code}"];
        argv.extend(args.iter().map(String::as_str));
        let o = run(&mut t.as_uid(CODEX, &argv));
        let body = stdout(&o);
        let status = body.lines().last().unwrap_or("");
        assert!(
            status.starts_with('4'),
            "{what}: expected a 4xx, got {status:?}: {body}"
        );
        assert_no_leak(&ungranted, &body, &t.home(CODEX));
        assert!(!body.contains("accessToken"), "{what}: {body}");
    }
    // One secret read: the happy exec above; nothing else reached a secret.
    let reads1 = t.w.server.stats()["secret_reads"].clone();
    assert_eq!(
        reads1.as_u64().unwrap(),
        reads0.as_u64().unwrap() + 1,
        "secret reads other than the one granted exec"
    );
}

/// The state of process `pid`: `None` when gone, else its state letter.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Issue 15, item 1: the dev-server's CA is readable by the agent uids it serves, so an
/// agent's child holding a scoped token (infisical-scoped, as uid 65534) verifies the
/// server's certificate with it and reads what the token may read, and nothing else.
#[test]
fn the_agents_child_trusts_the_dev_servers_ca_with_its_scoped_token() {
    if !can_run("the_agents_child_trusts_the_dev_servers_ca_with_its_scoped_token") {
        return;
    }
    let t = Two::new();
    let ca =
        t.w.server
            .ca
            .clone()
            .expect("the world's dev-server serves HTTPS");
    let ca = ca.to_str().unwrap();
    let o = run(&mut t.as_uid(CODEX, &["head", "-c", "27", ca]));
    assert_eq!(stdout(&o), "-----BEGIN CERTIFICATE-----", "{}", stderr(&o));
    let check = |what: &str| {
        run(&mut t.exec(
            CODEX,
            &[
                "--session",
                &t.codex,
                "infisical-scoped",
                "--",
                t.bins.aap.to_str().unwrap(),
                "infisical",
                "check",
                "--token-env",
                "INFISICAL_TOKEN",
                "--url",
                &t.w.server.url,
                "--project-id",
                &t.w.server.project_id,
                "--ca-bundle",
                ca,
                what,
            ],
        ))
    };
    let o = check("prod:/forgejo:FORGEJO_TOKEN");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("ok: read prod:/forgejo:FORGEJO_TOKEN ("),
        "{}",
        stdout(&o)
    );
    // The same trust, another path: refused by Infisical (403), not by TLS.
    let o = check("prod:/app:DB_PASSWORD");
    assert_fails(&o, 77, "permission denied");
}

/// Run infisical-scoped as the agent, with a child that writes its pid and token into the
/// agent's home, then lives `child_secs`; `signal` goes to aap-exec once the child runs
/// (after `settle`). Returns how long after the child's exit the token was dead and exec.end
/// written, with that exec.end; panics past `limit`.
fn signal_wrapper_during_child(
    t: &Two,
    signal: Signal,
    settle: Duration,
    tracer: Option<(&Path, &Path)>,
    limit: Duration,
) -> (Duration, serde_json::Value) {
    let home = t.home(CODEX);
    let script = "echo $$ > \"$HOME/child.pid.tmp\" && mv \"$HOME/child.pid.tmp\" \"$HOME/child.pid\"; printf '%s' \"$INFISICAL_TOKEN\" > \"$HOME/tok.tmp\" && mv \"$HOME/tok.tmp\" \"$HOME/tok\"; sleep 1; exit 0";
    let argv = [
        "--session",
        &t.codex,
        "infisical-scoped",
        "--",
        "sh",
        "-c",
        script,
    ];
    let mut c = match tracer {
        Some((py, so)) => {
            let mut c = traced_exec(t, CODEX, py, so, &argv);
            c.env("AAP_T_STOP_BEFORE_STARTED", "1");
            c
        }
        None => t.exec(CODEX, &argv),
    };
    let revokes0 = t.w.server.stats()["revokes"].as_u64().unwrap();
    let mut wrapper = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wpid = wrapper.id(); // setpriv execs aap-exec (or gdb, with the tracer): the same pid
    wait_for("the child's token", Duration::from_secs(30), || {
        home.join("tok").exists()
    });
    let token = std::fs::read_to_string(home.join("tok")).unwrap();
    let cpid: u32 = std::fs::read_to_string(home.join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(token.len() >= 16, "no token: {token:?}");
    std::thread::sleep(settle);
    if tracer.is_none() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(wpid as i32), signal)
            .expect("signal aap-exec");
    }
    wait_for("the child to exit", Duration::from_secs(10), || {
        matches!(proc_state(cpid), None | Some('Z'))
    });
    let exited = Instant::now();
    let mut dead_at = None;
    let mut end = None;
    while dead_at.is_none() || end.is_none() {
        if exited.elapsed() > limit {
            break;
        }
        if dead_at.is_none() && t.read_with(&token) == 401 {
            dead_at = Some(exited.elapsed());
        }
        if end.is_none() {
            end = t
                .audit_lines()
                .into_iter()
                .find(|l| l["event"] == "exec.end" && l["capability"] == "infisical-scoped");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = exited.elapsed();
    // Clean up the wrapper (stopped, or gone).
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let revokes1 = t.w.server.stats()["revokes"].as_u64().unwrap();
    assert!(
        dead_at.is_some(),
        "the scoped token was still valid {took:?} after the child exited"
    );
    let end = end.unwrap_or_else(|| panic!("no exec.end {took:?} after the child exited"));
    assert!(revokes1 > revokes0, "the dev-server saw no revocation");
    (took, end)
}

/// Property 6: SIGKILL and SIGSTOP of aap-exec while its child runs: exec.end is written and the
/// scoped token revoked within 1 s of the child's exit.
#[test]
fn sigkill_and_sigstop_of_aap_exec_still_end_and_revoke_within_a_second() {
    if !can_run("sigkill_and_sigstop_of_aap_exec_still_end_and_revoke_within_a_second") {
        return;
    }
    for (name, sig) in [("SIGKILL", Signal::SIGKILL), ("SIGSTOP", Signal::SIGSTOP)] {
        let t = Two::new();
        let (took, end) = signal_wrapper_during_child(
            &t,
            sig,
            Duration::from_millis(300),
            None,
            Duration::from_secs(1),
        );
        assert!(took <= Duration::from_secs(1), "{name}: took {took:?}");
        assert_eq!(end["uid"], CODEX, "{name}: {end}");
        assert_eq!(end["outcome"], "wrapper-lost", "{name}: {end}");
        t.assert_chain_valid();
    }
}

/// Property 6b: The same, with the agent choosing the instant: its LD_PRELOAD library stops aap-exec
/// (SIGSTOP) after the child is spawned and before aap-exec reports the child's pid.
///
/// Was a hole (issue 11, item 4), closed by the broker finding the child among the wrapper's
/// children itself, re-checking the grant, and a deadline for the start report: "SIGKILL or SIGSTOP of aap-exec can no longer keep a token
/// alive past the child"): the broker watches only a child it was told about
/// (`watch` in src/broker/exec.rs waits on the socket alone until `Started` arrives, with no
/// deadline), so a wrapper stopped before that report keeps the scoped token valid, and
/// exec.end unwritten, for as long as it stays stopped: past the child (tested here), and, by
/// reading `watch`, which never looks at the grant again, past the grant's expiry and past
/// `aap session revoke` (only Infisical's own token TTL ends it). A hand-made client that
/// never reports a child does the same without any SIGSTOP. This test fails until that is
/// bounded (e.g. a deadline for `Started` after delivery, and teardown at the grant's end).
#[test]
fn sigstop_before_the_started_report_still_revokes_within_a_second() {
    let test = "sigstop_before_the_started_report_still_revokes_within_a_second";
    if !can_run(test) {
        return;
    }
    let t = Two::new();
    let Some(so) = build_preload(test, t.dir()) else {
        return;
    };
    let Some(py) = tracer(test, t.dir()) else {
        return;
    };
    let (took, end) = signal_wrapper_during_child(
        &t,
        Signal::SIGSTOP,
        Duration::ZERO,
        Some((&py, &so)),
        Duration::from_secs(3),
    );
    assert!(
        t.home(CODEX).join("held-before-started").exists(),
        "the tracer never held aap-exec before its `started` report"
    );
    assert!(took <= Duration::from_secs(1), "HOLE: took {took:?}");
    assert_eq!(end["uid"], CODEX, "{end}");
}

/// Property 7: Another agent's session is refused (77), and so is an unmapped uid, with a hint naming
/// `agents.<name>.uid`; both are audited as deny lines carrying the kernel's uid.
#[test]
fn another_agents_session_and_an_unmapped_uid_are_refused_and_audited() {
    if !can_run("another_agents_session_and_an_unmapped_uid_are_refused_and_audited") {
        return;
    }
    let t = Two::new();
    // claude (65533) with codex's session.
    let o = run(&mut t.exec(
        CLAUDE,
        &[
            "--session",
            &t.codex,
            "db-env",
            "--",
            "sh",
            "-c",
            "touch ran",
        ],
    ));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    assert!(!t.home(CLAUDE).join("ran").exists());
    // codex (65534) with claude's session.
    let o = run(&mut t.exec(
        CODEX,
        &[
            "--session",
            &t.claude,
            "claude-only",
            "--",
            "sh",
            "-c",
            "touch ran",
        ],
    ));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    assert!(!t.home(CODEX).join("ran").exists());
    // An unmapped uid.
    let o = run(&mut t.exec(
        UNMAPPED,
        &[
            "--session",
            &t.codex,
            "db-env",
            "--",
            "sh",
            "-c",
            "touch ran",
        ],
    ));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("agents.<name>.uid"), "{err}");
    assert!(err.contains("aap-exec: hint:"), "{err}");
    assert!(err.contains(&format!("uid: {UNMAPPED}")), "{err}");
    assert!(!t.home(UNMAPPED).join("ran").exists());

    let denies: Vec<_> = t
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "deny")
        .collect();
    assert_eq!(denies.len(), 3, "{denies:?}");
    assert_eq!(denies[0]["uid"], CLAUDE, "{}", denies[0]);
    assert_eq!(denies[0]["agent"], "claude", "{}", denies[0]);
    assert_eq!(denies[1]["uid"], CODEX, "{}", denies[1]);
    assert_eq!(denies[1]["agent"], "codex", "{}", denies[1]);
    assert_eq!(denies[2]["uid"], UNMAPPED, "{}", denies[2]);
    assert!(denies[2]["agent"].is_null(), "{}", denies[2]);
    assert_eq!(t.w.count("exec.start"), 0);
    t.assert_chain_valid();
}

/// Issue 15: an agent waits on its own requests only, whatever id it names; the answer comes
/// from the broker, since the agent cannot read the state dir.
#[test]
fn an_agent_waits_only_on_its_own_requests() {
    if !can_run("an_agent_waits_only_on_its_own_requests") {
        return;
    }
    let t = Two::new();
    let aap = t.bins.aap.to_str().unwrap().to_owned();
    let mut c = t.as_uid(
        CODEX,
        &[
            &aap,
            "request",
            "--session",
            &t.codex,
            "db-low",
            "--reason",
            "low",
        ],
    );
    let o = run(&mut c);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    // The agent cannot read its request or any answer itself.
    let o = run(&mut t.sh(
        CODEX,
        &format!("cat {}/state/requests/{rid}.json", t.dir().display()),
    ));
    assert_permission_denied(&o, "reading the request file");
    let wait = |uid: u32, timeout: &str| {
        run(&mut t.as_uid(
            uid,
            &[&aap, "request", "--wait-on", &rid, "--timeout", timeout],
        ))
    };
    // Another agent's uid, and a uid that is no agent, are refused.
    assert_fails(&wait(CLAUDE, "5s"), 77, "was made by uid 65534, not by you");
    assert_fails(&wait(UNMAPPED, "5s"), 77, "is not an agent");
    // Its own: pending, so the wait times out.
    assert_fails(&wait(CODEX, "1s"), 75, "still pending after 1s");
    // Answered: codex learns the reason, claude still nothing.
    let o = run(&mut t.w.aap(&["deny", &rid, "--reason", "not needed"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = wait(CODEX, "5s");
    assert_fails(&o, 77, "the operator denied request");
    assert!(stderr(&o).contains("not needed"), "{}", stderr(&o));
    assert_fails(&wait(CLAUDE, "5s"), 77, "was made by uid 65534, not by you");

    // Approved while the agent waits: it exits 0 and its next aap-exec works at once.
    let reqs = t.dir().join("state/requests");
    let before: Vec<_> = std::fs::read_dir(&reqs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let child = t
        .as_uid(
            CODEX,
            &[
                &aap,
                "request",
                "--session",
                &t.codex,
                "db-sh-only",
                "--reason",
                "sh",
                "--wait",
                "--timeout",
                "60s",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let rid2 = loop {
        let new = std::fs::read_dir(&reqs)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| {
                n.len() == 31
                    && n.ends_with(".json")
                    && !before.iter().any(|b| b.to_string_lossy() == *n)
            });
        if let Some(n) = new {
            break n.trim_end_matches(".json").to_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no request appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let o = run(&mut t.w.aap(&["approve", &rid2]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(&mut t.exec(
        CODEX,
        &[
            "--session",
            &t.codex,
            "db-sh-only",
            "--",
            "sh",
            "-c",
            "test -n \"$DB_PASSWORD\"",
        ],
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// Issue 15, item 5: an agent that runs the operator's commands is told they are the
/// operator's, not sent to `ssh-keygen -y`.
#[test]
fn an_agent_running_operator_commands_is_told_they_are_the_operators() {
    if !can_run("an_agent_running_operator_commands_is_told_they_are_the_operators") {
        return;
    }
    let t = Two::new();
    let aap = t.bins.aap.to_str().unwrap().to_owned();
    for args in [
        &["session", "start", "--agent", "codex", "--cap", "db-low"][..],
        &["session", "approve", &t.codex, "--cap", "db-low"][..],
    ] {
        let mut argv = vec![aap.as_str()];
        argv.extend_from_slice(args);
        let o = run(&mut t.as_uid(CODEX, &argv));
        let err = stderr(&o);
        assert_eq!(code(&o), 77, "{err}");
        assert!(
            err.contains("is for the operator only: uid 65534 is agent codex"),
            "{err}"
        );
        assert!(!err.contains("ssh-keygen -y"), "{err}");
        let want = if args[1] == "start" {
            "aap: hint: the operator starts a session for you: aap session start --agent codex --cap db-low".to_string()
        } else {
            format!(
                "aap: hint: ask the operator for it instead: aap request --session {} db-low --reason '...' --wait",
                t.codex
            )
        };
        assert!(err.contains(&want), "{err}");
    }
}

/// Issue 15, item 5: a hint that `aap-exec` prints inside an agent's own shell script (the
/// `Two::sh` form: `setpriv ... sh -c SCRIPT`, as the agent's uid) is followed too, as that
/// uid, though the script itself exits 0.
#[test]
fn a_hint_inside_an_agents_script_is_followed_as_the_agent() {
    if !can_run("a_hint_inside_an_agents_script_is_followed_as_the_agent") {
        return;
    }
    let t = Two::new();
    // db-low is not in codex's session: denied, with the request to make as the hint.
    let script = format!(
        "{} --session {} db-low -- true; echo status=$?",
        t.bins.aap_exec.display(),
        t.codex
    );
    let o = run(&mut t.sh(CODEX, &script));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "status=77\n", "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "aap-exec: hint: ask the operator for it: aap request --session {} db-low ",
            t.codex
        )),
        "{}",
        stderr(&o)
    );
    follow::assert_judged(&format!(
        "setpriv --reuid {CODEX} --regid {CODEX} --clear-groups -- sh -c "
    ));
}

// ---- the broker as the SSH agent (issue 12) ----------------------------------------------------

/// The seed's /ssh:SSH_PUBLIC_KEY, type and base64 (its private half is /ssh:SSH_PRIVATE_KEY).
const SSH_SEED_PUB: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO+eeJY/7F4qZPnqDjnWlsiCZ/";

impl Two {
    /// The installation plus an `ssh-agent` capability (`ssh-two`, host `vps-test`, whose key
    /// a root-owned known_hosts lists), and a codex session for it.
    fn with_ssh() -> (Two, String) {
        let mut t = Two::new();
        let d = t.dir().to_path_buf();
        let cat = d.join("catalog.yaml");
        let mut text = std::fs::read_to_string(&cat).unwrap();
        text.push_str(
            "  - id: ssh-two
    description: the seed's ssh key for vps-test
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    allowed_commands: [sh, ssh-add]
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 15m
      hosts: [vps-test]
    inject: [ { type: ssh-agent } ]
",
        );
        write(&cat, text);
        // Any host key will do: these tests list keys, they do not log in.
        write(&d.join("known_hosts"), format!("vps-test {SSH_SEED_PUB}\n"));
        chmod(&d.join("known_hosts"), 0o644);
        let mut cfg = std::fs::read_to_string(&t.w.config).unwrap();
        cfg.push_str("ssh_known_hosts: [known_hosts]\n");
        write(&t.w.config, cfg);
        chmod(&t.w.config, 0o644);
        t.w.start_broker();
        chmod(&d.join("state"), 0o755);
        let o = run(&mut t.w.aap(&[
            "session", "start", "--agent", "codex", "--cap", "ssh-two", "--ttl", "1h",
        ]));
        chmod(&d.join("state"), 0o700);
        assert_eq!(code(&o), 0, "session start: {}", stderr(&o));
        let sid = stdout(&o)
            .trim()
            .strip_prefix("export AAP_SESSION=")
            .unwrap()
            .to_string();
        (t, sid)
    }

    /// Wait (at most 20 s) for `file` in `uid`'s home to hold a line.
    fn wait_line(&self, uid: u32, file: &str, child: &mut std::process::Child) -> String {
        let t0 = Instant::now();
        loop {
            let v = std::fs::read_to_string(self.home(uid).join(file)).unwrap_or_default();
            if v.ends_with('\n') {
                return v.trim().to_string();
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no {file} in time");
            assert!(
                child.try_wait().unwrap().is_none(),
                "aap-exec ended before writing {file}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Item 6 of issue 12: the child's `SSH_AUTH_SOCK` is in a private directory of the agent's
/// uid (made by aap-exec, mode 0700), so a second uid cannot even reach it (the directory
/// denies it); root, whom no directory stops, reaches the broker and is refused by its
/// SO_PEERCRED check; the exec's own uid is served before and after.
#[test]
fn a_second_uids_connection_to_the_agent_socket_is_refused() {
    if !can_run("a_second_uids_connection_to_the_agent_socket_is_refused") {
        return;
    }
    let (t, sid) = Two::with_ssh();
    let script = "printf '%s\\n' \"$SSH_AUTH_SOCK\" > sock; ssh-add -L > keys 2>&1; \
                  i=0; while [ ! -e go ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
                  ssh-add -L > keys-after 2>&1";
    let mut child = t
        .exec(
            CODEX,
            &["--session", &sid, "ssh-two", "--", "sh", "-c", script],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = t.wait_line(CODEX, "sock", &mut child);
    // No XDG_RUNTIME_DIR in the agent's environment: the agent uid's own directory in
    // /dev/shm (a sticky directory of root's on this image; /tmp where it is not).
    let dir = Path::new(&sock).parent().unwrap();
    let shm = std::fs::symlink_metadata("/dev/shm").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.is_dir() && m.uid() == 0 && m.mode() & 0o1000 != 0
    });
    let base = if shm { "/dev/shm" } else { "/tmp" };
    assert_eq!(
        dir,
        Path::new(&format!("{base}/aap-agent-{CODEX}")),
        "{sock}"
    );
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(dir).unwrap();
        assert!(m.is_dir(), "{}", dir.display());
        assert_eq!(m.uid(), CODEX, "owner of {}", dir.display());
        assert_eq!(m.mode() & 0o7777, 0o700, "mode of {}", dir.display());
    }
    // claude (another agent's uid) and an unmapped uid: the directory denies them.
    for uid in [CLAUDE, UNMAPPED] {
        let o = run(t
            .sh(uid, "ssh-add -L; echo rc=$?")
            .env("SSH_AUTH_SOCK", &sock));
        let out = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !out.contains("AAAAC3NzaC1lZDI1NTE5"),
            "uid {uid} was served: {out}"
        );
        assert!(!stdout(&o).contains("rc=0"), "uid {uid}: {out}");
        assert!(out.contains("Permission denied"), "uid {uid}: {out}");
        // A connect of its own: EACCES, from the directory.
        let o = run(&mut t.as_uid(
            uid,
            &[
                "/usr/bin/python3",
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1])\nexcept PermissionError as e:\n print(e, file=sys.stderr); sys.exit(1)",
                &sock,
            ],
        ));
        assert_permission_denied(&o, "connecting to the agent socket");
        let o = run(&mut t.as_uid(uid, &["ls", dir.to_str().unwrap()]));
        assert_permission_denied(&o, "listing the agent directory");
    }
    // And root (the broker's own uid here, not the exec's agent) is refused too.
    {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(&[0, 0, 0, 1, 11]);
        let mut b = [0u8; 4];
        assert!(
            c.read_exact(&mut b).is_err(),
            "root's connection was served"
        );
    }
    std::fs::write(t.home(CODEX).join("go"), "").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // aap-exec removed its socket at the end; the uid's directory stays for the next run.
    assert!(!Path::new(&sock).exists(), "{sock} left behind");
    assert!(dir.is_dir(), "{} went", dir.display());
    // The exec's own uid was served, before and after the refused ones.
    for f in ["keys", "keys-after"] {
        let keys = std::fs::read_to_string(t.home(CODEX).join(f)).unwrap();
        assert!(keys.starts_with(SSH_SEED_PUB), "{f}: {keys}");
        assert_eq!(keys.lines().count(), 1, "{f}: {keys}");
    }
    t.assert_chain_valid();
}

/// Item 6 of issue 12: the agent tracing aap-exec from its start ([`TRACE_PY`]), with an
/// LD_PRELOAD library in the child's ssh-add, dumps everything each process sees: environ,
/// descriptors, memfd contents, its writable memory. With the broker as the agent, none of it
/// holds any line of the private key; the agent is still usable (the public key is listed).
#[test]
fn tracing_aap_exec_captures_no_ssh_key() {
    let test = "tracing_aap_exec_captures_no_ssh_key";
    if !can_run(test) {
        return;
    }
    let (t, sid) = Two::with_ssh();
    let Some(so) = build_preload(test, t.dir()) else {
        return;
    };
    let Some(py) = tracer(test, t.dir()) else {
        return;
    };
    let home = t.home(CODEX);
    let o = run(&mut traced_exec(
        &t,
        CODEX,
        &py,
        &so,
        &[
            "--session",
            &sid,
            "ssh-two",
            "--",
            "sh",
            "-c",
            "ssh-add -L > keys; test -S \"$SSH_AUTH_SOCK\"",
        ],
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let keys = std::fs::read_to_string(home.join("keys")).unwrap();
    assert!(keys.starts_with(SSH_SEED_PUB), "{keys}");
    let ds = dumps(&home);
    assert!(
        ds.iter().any(|(n, _)| n.ends_with("-started")),
        "the tracer did not dump aap-exec: {:?}",
        ds.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    // The dumps saw the delivery (the socket path in the child's environment is in aap-exec's
    // memory): the probe looks where a key would have been.
    assert!(
        ds.iter().any(|(_, b)| contains(b, "/aap-agent-")),
        "no dump saw the agent socket's path: the probe is broken"
    );
    let key = seed_secret_values()
        .into_iter()
        .find(|v| v.contains("OPENSSH PRIVATE KEY"))
        .unwrap();
    // Every line of the key but the header line all unencrypted ed25519 keys share.
    let lines: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .skip(1)
        .collect();
    assert!(lines.len() >= 3);
    for l in lines {
        for (name, bytes) in &ds {
            assert!(!contains(bytes, l), "a line of the ssh key is in {name}");
        }
    }
    assert!(!stderr(&o).contains("OPENSSH PRIVATE KEY"));
}

/// Issue 12 across two real uids: the agent's uid (65534) runs the real `ssh` through
/// `aap-exec` to a real sshd on 127.0.0.1, and logs in through the broker's agent (the broker
/// is root here and holds the key); the signature's `ssh.sign` line carries the agent's uid.
#[test]
fn ssh_logs_in_through_the_brokers_agent_across_two_uids() {
    let test = "ssh_logs_in_through_the_brokers_agent_across_two_uids";
    if !can_run(test) || !common::sshd::have_sshd(test) {
        return;
    }
    let (t, sid) = Two::with_ssh();
    let d = t.dir().to_path_buf();
    let sshd = common::sshd::Sshd::start(&d, "vps");
    // The broker reads ssh_known_hosts at each exec: vps-test is now this sshd. The agent's
    // ssh trusts the same file (readable by every uid).
    let kh = d.join("known_hosts");
    write(&kh, format!("vps-test {}\n", sshd.host_key));
    chmod(&kh, 0o644);
    let ssh = format!(
        "id -u > client-uid; ssh -F /dev/null -p {} -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
         -o StrictHostKeyChecking=yes -o HostKeyAlias=vps-test -o IdentityFile=/nonexistent/aap-test-key \
         -o BatchMode=yes -o PasswordAuthentication=no -l root 127.0.0.1 'echo ok; id -u'",
        sshd.port,
        kh.display()
    );
    let o = run(&mut t.exec(
        CODEX,
        &["--session", &sid, "ssh-two", "--", "sh", "-c", &ssh],
    ));
    let log = std::fs::read_to_string(d.join("vps/sshd.log")).unwrap_or_default();
    assert_eq!(code(&o), 0, "{}\nsshd: {log}", stderr(&o));
    // The client ran as the agent's uid; the remote side as the user it logged in as.
    let client = std::fs::read_to_string(t.home(CODEX).join("client-uid")).unwrap();
    assert_eq!(client.trim(), CODEX.to_string());
    assert_eq!(stdout(&o), "ok\n0\n");
    assert_eq!(
        log.matches("Accepted publickey for root").count(),
        1,
        "{log}"
    );
    let signs: Vec<_> = t
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "ssh.sign")
        .collect();
    assert_eq!(signs.len(), 1, "{signs:?}");
    let l = &signs[0];
    assert_eq!(l["outcome"], "ok", "{l}");
    assert_eq!(l["uid"], CODEX, "{l}");
    assert_eq!(l["ssh_host"], "vps-test", "{l}");
    assert_eq!(l["ssh_user"], "root", "{l}");
    assert_eq!(l["capability"], "ssh-two", "{l}");
    t.assert_chain_valid();
}

// ---- broker-run wrapped commands (issue 14) -------------------------------------------------------

/// The five environment attacks of issue 14 against a broker-run deploy hook: none reaches it,
/// none gets the token, and the hook runs exactly as without them.
#[test]
fn a_broker_run_command_gets_nothing_of_the_agents_environment() {
    if !can_run("a_broker_run_command_gets_nothing_of_the_agents_environment") {
        return;
    }
    let t = Two::new();
    let home = t.home(CODEX);
    let h = home.display();
    // The agent's traps: each one, if it ran, writes the token into the agent's home.
    let setup = format!(
        "mkdir -p {h}/bin && printf '#!/bin/sh\\necho \"$DEPLOY_TOKEN\" > {h}/stolen-path\\n' > {h}/bin/curl && chmod 755 {h}/bin/curl && \
         printf 'echo \"$DEPLOY_TOKEN\" > {h}/stolen-bashenv\\n' > {h}/bashenv"
    );
    let o = run(&mut t.sh(CODEX, &setup));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let aap_exec = t.bins.aap_exec.to_str().unwrap().to_owned();
    let attack = format!(
        "curl() {{ echo \"$DEPLOY_TOKEN\" > {h}/stolen-func; }}; export -f curl; \
         env LD_PRELOAD={h}/no-such-lib.so BASH_ENV={h}/bashenv SHELLOPTS=xtrace PATH={h}/bin:$PATH \
         {aap_exec} --session {s} deploy-status -- {d}/bin/deploy status web",
        s = t.codex,
        d = t.dir().display()
    );
    let o = run(&mut t.sh(
        CODEX,
        &format!("exec bash -c '{}'", attack.replace('\'', "'\\''")),
    ));
    // The hook's own status, exactly.
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(stdout(&o), "status web: ok\n", "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        !err.contains(DB_PASSWORD),
        "the token reached stderr: {err}"
    );
    // aap-exec itself is the agent's: dynamic, it says it could not preload; static
    // (build.rs), it has no loader to say so. The hook's bash, curl, env and id would each say
    // it again if LD_PRELOAD reached them.
    let ours = usize::from(option_env!("AAP_EXEC_LINK") != Some("static"));
    assert_eq!(
        err.matches("ld.so").count(),
        ours,
        "LD_PRELOAD reached the command: {err}"
    );
    assert!(!err.contains("+ "), "xtrace ran: {err}");
    for f in ["stolen-path", "stolen-bashenv", "stolen-func"] {
        assert!(!home.join(f).exists(), "{f}: an attack got the token");
    }
    let env = std::fs::read_to_string(t.dir().join("priv/env")).unwrap();
    for bad in [
        "LD_PRELOAD",
        "BASH_ENV",
        "SHELLOPTS",
        "BASH_FUNC",
        "AAP_CONFIG",
        &*format!("{h}/bin"),
    ] {
        assert!(!env.contains(bad), "{bad} reached the command: {env}");
    }
    assert!(
        env.contains("HOME=/root\n") || env.contains("HOME=/\n"),
        "{env}"
    );
    assert!(
        env.contains(&format!("DEPLOY_TOKEN={DB_PASSWORD}\n")),
        "the hook lacks its token"
    );
    // Started by the broker as its own user (root), in the caller's directory (root may enter it).
    let ran = std::fs::read_to_string(t.dir().join("priv/ran")).unwrap();
    assert_eq!(ran, format!("0 {h}\n"));
    // Audit: argv at this tier, run_as, the broker's pid, the directory used, the status.
    let lines = t.audit_lines();
    let start = lines.iter().find(|l| l["event"] == "exec.start").unwrap();
    let end = lines.iter().find(|l| l["event"] == "exec.end").unwrap();
    assert_eq!(start["argv"][1], "status", "{start}");
    assert_eq!(start["run_as"], "root", "{start}");
    assert_eq!(end["run_as"], "root", "{end}");
    assert_eq!(end["exit_code"], 3, "{end}");
    assert_eq!(end["cwd_used"], h.to_string(), "{end}");
    assert!(end["pid"].as_u64().is_some(), "{end}");
    t.assert_chain_valid();
}

/// Only the broker's user may write priv/: the hook works through aap-exec and fails when the
/// agent runs it directly. Argument patterns still hold.
#[test]
fn a_broker_run_command_has_run_as_rights_and_keeps_its_argv_patterns() {
    if !can_run("a_broker_run_command_has_run_as_rights_and_keeps_its_argv_patterns") {
        return;
    }
    let t = Two::new();
    let deploy = t.dir().join("bin/deploy");
    let deploy = deploy.to_str().unwrap();
    let o = run(&mut t.as_uid(CODEX, &[deploy, "status", "web"]));
    assert_ne!(code(&o), 3, "the hook worked as the agent");
    assert!(!t.dir().join("priv/ran").exists());
    let o = run(&mut t.exec(
        CODEX,
        &[
            "--session",
            &t.codex,
            "deploy-status",
            "--",
            deploy,
            "status",
            "db",
        ],
    ));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    assert!(!t.dir().join("priv/ran").exists());
    let o = run(&mut t.exec(
        CODEX,
        &[
            "--session",
            &t.codex,
            "deploy-status",
            "--",
            deploy,
            "status",
            "web",
        ],
    ));
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(t.dir().join("priv/ran").exists());
}

/// SIGKILL of aap-exec: the broker sees the connection close, ends the command, writes exec.end.
#[test]
fn sigkill_of_aap_exec_ends_the_broker_run_command_and_records_the_end() {
    if !can_run("sigkill_of_aap_exec_ends_the_broker_run_command_and_records_the_end") {
        return;
    }
    let t = Two::new();
    let sleeper = t.dir().join("bin/sleeper");
    let mut wrapper = t
        .exec(
            CODEX,
            &[
                "--session",
                &t.codex,
                "sleeper",
                "--",
                sleeper.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = t.dir().join("priv/sleeper.pid");
    wait_for("the command's start", Duration::from_secs(10), || {
        pid_file.exists()
    });
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(proc_state(pid).is_some());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wrapper.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let _ = wrapper.wait();
    wait_for("the command's end", Duration::from_secs(5), || {
        matches!(proc_state(pid), None | Some('Z'))
    });
    wait_for("exec.end", Duration::from_secs(5), || {
        t.audit_lines().iter().any(|l| l["event"] == "exec.end")
    });
    let lines = t.audit_lines();
    let end = lines.iter().find(|l| l["event"] == "exec.end").unwrap();
    assert_eq!(end["outcome"], "wrapper-lost", "{end}");
    assert_eq!(end["pid"], pid, "{end}");
    t.assert_chain_valid();
}

/// `run_as: daemon`: the broker (root) starts the command as daemon, its groups only, in `/`
/// because daemon cannot enter the agent's 0700 home; exec.end says so.
#[test]
fn run_as_switches_user_and_falls_back_to_root_dir_when_it_cannot_enter_the_cwd() {
    if !can_run("run_as_switches_user_and_falls_back_to_root_dir_when_it_cannot_enter_the_cwd") {
        return;
    }
    if !matches!(aap::sys::user_by_name("daemon"), Ok(Some(u)) if u.uid == 1) {
        assert!(!full_run(), "no user daemon (uid 1) on this host");
        skip("run_as_switches_user", "no user daemon (uid 1)");
        return;
    }
    let t = Two::new();
    let prog = t.dir().join("bin/whoami");
    let o = run(&mut t.exec(
        CODEX,
        &[
            "--session",
            &t.codex,
            "whoami-daemon",
            "--",
            prog.to_str().unwrap(),
        ],
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "1:1:1 / /usr/sbin daemon\n");
    let lines = t.audit_lines();
    let end = lines.iter().find(|l| l["event"] == "exec.end").unwrap();
    assert_eq!(end["run_as"], "daemon", "{end}");
    assert_eq!(end["cwd_used"], "/", "{end}");
    assert_eq!(end["cwd"], t.home(CODEX).display().to_string(), "{end}");
}

// ---- broker-run commands under a terminal (issue 14, item 3) -------------------------------------

/// A 200x50 tmux window running an interactive bash (job control, no line editing) as the
/// agent, in its home, with the clean environment of [`Two::as_uid`].
fn agent_terminal(test: &str, t: &Two) -> Option<Tmux> {
    let tmux = Tmux::new(test, t.dir())?;
    let q = |p: &Path| aap::error::shell_quote(&p.display().to_string());
    let script = format!(
        "cd {home} && exec setpriv --reuid {CODEX} --regid {CODEX} --clear-groups -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME={home} AAP_CONFIG={cfg} TERM=screen PS1='agent$ ' bash --norc --noprofile --noediting -i",
        home = q(&t.home(CODEX)),
        cfg = q(&t.w.config),
    );
    tmux.start(&script);
    tmux.wait_for("agent$");
    Some(tmux)
}

/// A world of two uids and the agent's terminal in it; `None` when the test cannot run here.
fn terminal_world(test: &str) -> Option<(Two, Tmux)> {
    if !can_run(test) {
        return None;
    }
    let t = Two::new();
    let tmux = agent_terminal(test, &t)?;
    Some((t, tmux))
}

/// The agent's command line for broker-run capability `cap`, whose program is `bin/<cap>` of
/// the world, then `tail` (a redirection, `&`, `; echo ...`).
fn exec_line(t: &Two, cap: &str, tail: &str) -> String {
    format!(
        "{} --session {} {cap} -- {}{tail}",
        t.bins.aap_exec.display(),
        t.codex,
        t.dir().join("bin").join(cap).display()
    )
}

/// Save the terminal's modes to `modes-before`, and wait until that is done: a line typed
/// while `stty` still runs is echoed at once, and the shell's next prompt (then the next
/// command's first output line) lands after it, on one screen line.
fn save_modes(tmux: &Tmux) {
    tmux.type_line("stty -g > modes-before && echo SAVED-$((6*7))");
    tmux.wait_for("SAVED-42");
}

/// ^C to the command in the foreground: it dies of SIGINT, and aap-exec exits 128+2.
fn interrupt_gives_130(tmux: &Tmux) {
    tmux.keys(&["C-c"]);
    // Type only once the shell has its prompt back: a line typed while aap-exec still relays
    // the terminal goes to the dying command (or is flushed with its modes), and is lost.
    let t0 = Instant::now();
    let prompt = |s: &str| {
        s.lines()
            .map(str::trim_end)
            .rfind(|l| !l.is_empty())
            .is_some_and(|l| l == "agent$")
    };
    while !prompt(&tmux.screen()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no prompt after ^C; screen:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    tmux.type_line("echo RC:$?:");
    assert_eq!(tmux.wait_status(), 130, "{}", tmux.screen());
}

/// Under a terminal, a broker-run command gets a terminal of its own (not the caller's), the
/// caller's window size and its changes; ^Z stops it and `fg` resumes it with its input; ^C
/// ends it and aap-exec exits 130; the caller's terminal has its modes back afterwards.
#[test]
fn a_broker_run_command_under_a_terminal_gets_its_own_and_job_control() {
    let test = "a_broker_run_command_under_a_terminal_gets_its_own_and_job_control";
    let Some((t, tmux)) = terminal_world(test) else {
        return;
    };
    let pane_tty = stdout(&tmux.cmd(&["display-message", "-p", "-t", "t", "#{pane_tty}"]))
        .trim()
        .to_owned();
    assert!(pane_tty.starts_with("/dev/pts/"), "{pane_tty}");
    let probe = t.dir().join("bin/term-probe");
    save_modes(&tmux);
    tmux.type_line(&format!(
        "{} --session {} term-probe -- {}",
        t.bins.aap_exec.display(),
        t.codex,
        probe.display()
    ));
    let s = tmux.wait_for("READY1");
    assert!(s.contains("all three are terminals"), "{s}");
    assert!(s.contains("size=50 200"), "{s}");
    let tty = s
        .lines()
        .find_map(|l| l.strip_prefix("tty="))
        .unwrap_or_else(|| panic!("no tty line: {s}"));
    assert!(
        tty.starts_with("/dev/pts/"),
        "the command has no terminal: {s}"
    );
    assert_ne!(tty, pane_tty, "the command holds the caller's own terminal");

    // A window size change reaches it (SIGWINCH to aap-exec, relayed).
    tmux.cmd(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(700));
    tmux.type_line("one");
    let s = tmux.wait_for("READY2");
    assert!(s.contains("got=one size=40 120"), "{s}");

    // ^Z: the command and aap-exec stop, the shell has the terminal; fg resumes both.
    tmux.keys(&["C-z"]);
    let s = tmux.wait_for("Stopped");
    // As any program stopped by ^Z: SIGTSTP, 128+20.
    tmux.type_line("echo RC:$?:");
    assert_eq!(tmux.wait_status(), 148, "{}", tmux.screen());
    let pid_of = |name: &str| -> Vec<u32> {
        let o = run(Command::new("pgrep").args(["-f", name]));
        stdout(&o)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let probes: Vec<u32> = pid_of(&format!("/bin/sh {}", probe.display()));
    assert_eq!(probes.len(), 1, "{probes:?}; screen:\n{s}");
    wait_for("the command to stop", Duration::from_secs(5), || {
        proc_state(probes[0]) == Some('T')
    });
    tmux.type_line("echo SHELL-HAS-IT");
    tmux.wait_for("SHELL-HAS-IT\n");
    tmux.type_line("fg");
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(
        proc_state(probes[0]),
        Some('T'),
        "fg did not resume the command"
    );
    tmux.type_line("two");
    let s = tmux.wait_for("READY3");
    assert!(s.contains("got=two"), "{s}");

    // ^C: the command (now sleep) dies of SIGINT; aap-exec exits 128+2.
    tmux.keys(&["C-c"]);
    tmux.wait_for("^C\nagent$");
    tmux.type_line("echo RC:$?:");
    assert_eq!(tmux.wait_status(), 130, "{}", tmux.screen());
    tmux.type_line("stty -g | cmp -s - modes-before && echo MODES-RESTORED");
    tmux.wait_for("MODES-RESTORED\n");
    let lines = t.audit_lines();
    let end = lines
        .iter()
        .find(|l| l["event"] == "exec.end" && l["capability"] == "term-probe")
        .unwrap();
    assert_eq!(end["signal"], 2, "{end}");
}

/// Standard input not a terminal, output one (`aap-exec ... < /dev/null` in a terminal): no pty
/// is made; the command's standard output is the caller's terminal itself, its input is the
/// caller's /dev/null, and ^C (which reaches aap-exec, the terminal's foreground job) is relayed:
/// the command dies of SIGINT and aap-exec exits 130.
#[test]
fn a_broker_run_command_with_stdin_not_a_terminal_gets_no_pty_and_the_callers_output() {
    let test = "a_broker_run_command_with_stdin_not_a_terminal_gets_no_pty_and_the_callers_output";
    let Some((t, tmux)) = terminal_world(test) else {
        return;
    };
    let pane_tty = stdout(&tmux.cmd(&["display-message", "-p", "-t", "t", "#{pane_tty}"]))
        .trim()
        .to_owned();
    assert!(pane_tty.starts_with("/dev/pts/"), "{pane_tty}");
    tmux.type_line(&exec_line(&t, "term-probe", " < /dev/null"));
    // Both reads see end of input at once, so the probe runs through to its `exec sleep`.
    let s = tmux.wait_for("READY3");
    assert!(s.contains("tty=not a tty"), "stdin became a terminal: {s}");
    assert!(!s.contains("all three are terminals"), "{s}");
    assert!(
        s.contains("got=\n"),
        "the first read did not see end of input: {s}"
    );
    let spawned = t
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.spawned" && l["capability"] == "term-probe")
        .expect("no exec.spawned for term-probe");
    let pid = spawned["pid"].as_u64().expect("exec.spawned has no pid");
    let fd = |n: u32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
            .unwrap_or_else(|e| panic!("fd {n} of the command {pid}: {e}"))
    };
    assert_eq!(
        fd(1),
        Path::new(&pane_tty),
        "the command's output is not the caller's terminal"
    );
    assert_eq!(fd(0), Path::new("/dev/null"), "the command's input");

    tmux.keys(&["C-c"]);
    tmux.wait_for("^C\nagent$");
    tmux.type_line("echo RC:$?:");
    assert_eq!(tmux.wait_status(), 130, "{}", tmux.screen());
    let end = t
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.end" && l["capability"] == "term-probe")
        .expect("no exec.end for term-probe");
    assert_eq!(end["signal"], 2, "{end}");
}

/// Under a terminal with `run_as: daemon`: the command runs as daemon on a terminal of its own
/// that daemon owns (so it can use it), reads what is typed, and ^C ends it.
#[test]
fn a_broker_run_command_as_another_user_gets_a_terminal_it_owns() {
    let test = "a_broker_run_command_as_another_user_gets_a_terminal_it_owns";
    let Some((t, tmux)) = terminal_world(test) else {
        return;
    };
    let pane_tty = stdout(&tmux.cmd(&["display-message", "-p", "-t", "t", "#{pane_tty}"]))
        .trim()
        .to_owned();
    tmux.type_line(&exec_line(&t, "term-daemon", ""));
    let s = tmux.wait_for("READY1");
    let line = s
        .lines()
        .find(|l| l.starts_with("uid="))
        .unwrap_or_else(|| panic!("no uid line: {s}"));
    let daemon_uid = stdout(&run(Command::new("id").args(["-u", "daemon"])))
        .trim()
        .to_owned();
    assert!(
        line.starts_with(&format!("uid={daemon_uid} tty=/dev/pts/")),
        "{line}"
    );
    assert!(line.ends_with(" owner=daemon"), "{line}");
    assert!(!line.contains(&format!("tty={pane_tty} ")), "{line}");
    tmux.type_line("typed-by-the-agent");
    tmux.wait_for("got=typed-by-the-agent");
    interrupt_gives_130(&tmux);
    let end = t
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.end" && l["capability"] == "term-daemon")
        .expect("no exec.end for term-daemon");
    assert_eq!(end["run_as"], "daemon", "{end}");
}

/// The counter the bg-probe writes, when it has written one.
fn ticks(t: &Two) -> Option<u64> {
    std::fs::read_to_string(t.dir().join("priv/ticks"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `fg` the bg-probe, stop its counting, and type `word` for the line it then reads: the screen
/// once it shows it got that line.
fn fg_then_the_probe_reads(tmux: &Tmux, t: &Two, word: &str) -> String {
    tmux.type_line("fg");
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(t.dir().join("priv/stop-ticking"), "").unwrap();
    tmux.wait_for("ASK");
    tmux.type_line(word);
    tmux.wait_for(&format!("got={word}"))
}

/// ^Z then `bg`: the command runs on in the background while the shell has the terminal (what
/// is typed reaches the shell, not the command); `fg` gives the command its input again, and ^C
/// ends it.
#[test]
fn a_broker_run_command_continued_with_bg_runs_on_and_fg_gives_it_its_input() {
    let test = "a_broker_run_command_continued_with_bg_runs_on_and_fg_gives_it_its_input";
    let Some((t, tmux)) = terminal_world(test) else {
        return;
    };
    tmux.type_line(&exec_line(&t, "bg-probe", ""));
    tmux.wait_for("BG-READY");
    wait_for("the probe to count", Duration::from_secs(10), || {
        ticks(&t).is_some()
    });
    tmux.keys(&["C-z"]);
    tmux.wait_for("Stopped");
    let stopped_at = ticks(&t);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        ticks(&t),
        stopped_at,
        "the command counted on while stopped"
    );

    tmux.type_line("bg");
    wait_for(
        "the command to count on in the background",
        Duration::from_secs(10),
        || ticks(&t) > stopped_at.map(|n| n + 3),
    );
    // The shell reads the terminal, not the command.
    tmux.type_line("echo SHELL-HAS-IT");
    tmux.wait_for("SHELL-HAS-IT\n");
    let before = ticks(&t);
    wait_for(
        "the command to count on in the background while the shell has the terminal",
        Duration::from_secs(10),
        || ticks(&t) > before,
    );

    let s = fg_then_the_probe_reads(&tmux, &t, "three");
    assert!(!s.contains("got=\n"), "the command read nothing: {s}");
    interrupt_gives_130(&tmux);
}

/// Started in the background (`&`): the terminal and its input stay the shell's while the
/// command runs; `fg` gives the command its input.
#[test]
fn a_broker_run_command_started_in_the_background_leaves_the_terminal_to_the_shell() {
    let test = "a_broker_run_command_started_in_the_background_leaves_the_terminal_to_the_shell";
    let Some((t, tmux)) = terminal_world(test) else {
        return;
    };
    save_modes(&tmux);
    tmux.type_line(&exec_line(&t, "bg-probe", " &"));
    tmux.wait_for("BG-READY");
    wait_for("the probe to count", Duration::from_secs(10), || {
        ticks(&t).is_some_and(|n| n > 3)
    });
    // The shell reads what is typed, in its own modes (not raw: cmp finds them unchanged).
    tmux.type_line("stty -g | cmp -s - modes-before && echo SHELL-HAS-IT-COOKED");
    tmux.wait_for("SHELL-HAS-IT-COOKED\n");
    fg_then_the_probe_reads(&tmux, &t, "four");
    interrupt_gives_130(&tmux);
}

/// A paste far larger than a terminal's buffers into a broker-run command that echoes what it
/// reads: input and output flow at once (neither direction waits for the other), every line
/// arrives.
#[test]
fn a_large_paste_into_a_broker_run_command_arrives_whole() {
    let test = "a_large_paste_into_a_broker_run_command_arrives_whole";
    let Some((t, tmux)) = terminal_world(test) else {
        return;
    };
    tmux.type_line(&exec_line(&t, "paste-cat", "; echo RC:$?:"));
    // 3,000 lines of 100 bytes: 300 KB, many times the pty's buffers both ways.
    let mut paste = String::new();
    for i in 0..3000 {
        paste.push_str(&format!("{i:05} {}\n", "x".repeat(94)));
    }
    paste.push_str("END\n");
    let file = t.dir().join("paste.txt");
    std::fs::write(&file, paste).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    tmux.cmd(&["load-buffer", file.to_str().unwrap()]);
    tmux.cmd(&["paste-buffer", "-t", "t"]);
    let t0 = Instant::now();
    loop {
        let s = tmux.screen();
        if s.contains("LINES=3000") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the paste did not arrive whole in 60 s (the relay stalled?); screen:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tmux.wait_status(), 0, "{}", tmux.screen());
}

/// A pager run by the broker shows its text on the caller's terminal and quits with `q`.
#[test]
fn a_broker_run_pager_shows_and_quits_with_q() {
    let test = "a_broker_run_pager_shows_and_quits_with_q";
    if !can_run(test) {
        return;
    }
    if Command::new("less").arg("--version").output().is_err() {
        missing_tool(test, "less", "apt-get install -y less");
        return;
    }
    let t = Two::new();
    let Some(tmux) = agent_terminal(test, &t) else {
        return;
    };
    tmux.type_line(&exec_line(&t, "pager", "; echo RC:$?:"));
    let s = tmux.wait_for("line 49");
    assert!(s.contains("line 1\n"), "{s}");
    assert!(!s.contains("line 51"), "not paged: {s}");
    // It waits for a key.
    std::thread::sleep(Duration::from_millis(500));
    let s = tmux.screen();
    assert!(!s.contains("RC:0:"), "the pager did not wait: {s}");
    tmux.keys(&["q"]);
    assert_eq!(tmux.wait_status(), 0, "{}", tmux.screen());
}

/// SIGKILL of aap-exec while its command runs on a terminal: the caller's terminal is in raw
/// mode then, and the broker (which holds it) gives it its modes back and ends the command. The
/// caller is a plain `sh -c`, which restores no terminal modes itself.
#[test]
fn sigkill_of_aap_exec_under_a_terminal_gives_the_terminal_its_modes_back() {
    let test = "sigkill_of_aap_exec_under_a_terminal_gives_the_terminal_its_modes_back";
    if !can_run(test) {
        return;
    }
    let t = Two::new();
    let Some(tmux) = Tmux::new(test, t.dir()) else {
        return;
    };
    let probe = t.dir().join("bin/term-probe");
    let caller = t.dir().join("bin/caller");
    std::fs::write(
        &caller,
        format!(
            "#!/bin/sh\nstty -g > modes-before\n{} --session {} term-probe -- {}\necho RC:$?:\nsleep 1\nstty -g | cmp -s - modes-before && echo MODES-RESTORED\nexec sleep 60\n",
            t.bins.aap_exec.display(),
            t.codex,
            probe.display()
        ),
    )
    .unwrap();
    chmod(&caller, 0o755);
    let q = |p: &Path| aap::error::shell_quote(&p.display().to_string());
    let script = format!(
        "cd {home} && exec setpriv --reuid {CODEX} --regid {CODEX} --clear-groups -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME={home} AAP_CONFIG={cfg} TERM=screen {caller}",
        home = q(&t.home(CODEX)),
        cfg = q(&t.w.config),
        caller = q(&caller),
    );
    tmux.start(&script);
    let s = tmux.wait_for("READY1");
    let pane_tty = stdout(&tmux.cmd(&["display-message", "-p", "-t", "t", "#{pane_tty}"]))
        .trim()
        .to_owned();
    let modes = stdout(&run(Command::new("stty").args(["-F", &pane_tty, "-a"])));
    assert!(
        modes.contains("-icanon") && modes.contains("-echo "),
        "the caller's terminal is not raw while the command runs: {modes}\n{s}"
    );
    let o = run(
        Command::new("pgrep").args(["-f", &format!("{} --session", t.bins.aap_exec.display())])
    );
    let pids: Vec<i32> = stdout(&o)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
    assert_eq!(tmux.wait_status(), 137, "{}", tmux.screen());
    tmux.wait_for("MODES-RESTORED");
    wait_for("exec.end", Duration::from_secs(5), || {
        t.audit_lines().iter().any(|l| l["event"] == "exec.end")
    });
    let lines = t.audit_lines();
    let end = lines.iter().find(|l| l["event"] == "exec.end").unwrap();
    assert_eq!(end["outcome"], "wrapper-lost", "{end}");
}
