//! The ssh-agent backing against real OpenSSH (a real sshd on 127.0.0.1 with a throwaway host
//! key, the real ssh, ssh-agent and ssh-add), the wrapped-command backing with adversarial
//! argv, and break-glass (banner, notify, fsync'd audit) — all through the real `aap-exec`.

mod common;

use common::world::World;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// The seed's /ssh:SSH_PUBLIC_KEY (its private half is /ssh:SSH_PRIVATE_KEY).
const SEED_PUB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO+eeJY/7F4qZPnqDjnWlsiCZ/ infisical-test@localhost";

const SSH_CAPS: &str = "  - id: ssh-test
    description: ssh to the test sshd known as vps-test
    audit_tier: high
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [ssh, sh]
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 15m
      hosts: [vps-test]
    inject: [ { type: ssh-agent } ]
  - id: ssh-short
    description: same key, 2 s lifetime
    audit_tier: high
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [sh]
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 2s
      hosts: [vps-test]
    inject: [ { type: ssh-agent } ]
  - id: ssh-missing
    description: a key the dev-server does not have
    audit_tier: high
    agents: [codex]
    max_ttl: 2h
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: NOPE }
      key_lifetime: 15m
      hosts: [vps-test]
    inject: [ { type: ssh-agent } ]
";

fn have_sshd() -> bool {
    if Path::new(SSHD).exists() {
        true
    } else {
        missing_tool(
            "backings_ssh",
            SSHD,
            "apt-get install -y openssh-server openssh-client",
        );
        false
    }
}

fn keygen(path: &Path) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    let p = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    p.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// A real sshd on 127.0.0.1, killed (by pid) on drop.
struct Sshd {
    child: Child,
    port: u16,
    /// `ssh-ed25519 AAAA...` of its host key.
    host_key: String,
}

impl Sshd {
    fn start(dir: &Path, name: &str) -> Sshd {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let _ = std::fs::create_dir_all("/run/sshd"); // privilege-separation dir
        let host_key = keygen(&d.join("host_key"));
        write(&d.join("authorized_keys"), format!("{SEED_PUB}\n"));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        write(
            &d.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowAgentForwarding no\n\
                 LogLevel VERBOSE\n",
                hk = d.join("host_key").display(),
                pid = d.join("sshd.pid").display(),
                ak = d.join("authorized_keys").display(),
            ),
        );
        std::fs::set_permissions(
            d.join("host_key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sshd did not listen: {}",
                std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd {
            child,
            port,
            host_key,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn user() -> String {
    let o = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// A world with the ssh capabilities, two sshds (`vps-test`, the constrained destination, and
/// `other-test`, a host the key is not constrained to), a known_hosts file naming both by
/// alias, and a private XDG_RUNTIME_DIR where the agent directory goes.
struct SshWorld {
    w: World,
    vps: Sshd,
    other: Sshd,
    run_dir: PathBuf,
}

impl SshWorld {
    fn new() -> SshWorld {
        let mut w = World::new();
        let d = w.path().to_path_buf();
        let d = d.as_path();
        let mut cat = std::fs::read_to_string(d.join("catalog.yaml")).unwrap();
        cat.push_str(SSH_CAPS);
        write(&d.join("catalog.yaml"), cat);
        let vps = Sshd::start(d, "vps");
        let other = Sshd::start(d, "other");
        write(
            &d.join("known_hosts"),
            format!("vps-test {}\nother-test {}\n", vps.host_key, other.host_key),
        );
        let mut cfg = std::fs::read_to_string(&w.config).unwrap();
        cfg.push_str("ssh_known_hosts: [known_hosts]\n");
        write(&w.config, cfg);
        w.start_broker(); // the broker reads its config at start
        let run_dir = d.join("run");
        std::fs::create_dir(&run_dir).unwrap();
        std::fs::set_permissions(
            &run_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        SshWorld {
            w,
            vps,
            other,
            run_dir,
        }
    }

    /// `ssh` argv to `alias` (whose sshd listens on `port`), running `remote`.
    fn ssh(&self, alias: &str, port: u16, remote: &str) -> Vec<String> {
        let kh = self.w.path().join("known_hosts");
        [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            &port.to_string(),
            "-o",
            &format!("UserKnownHostsFile={}", kh.display()),
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("HostKeyAlias={alias}"),
            // No key files at all: the agent is the only source of a key.
            "-o",
            "IdentityFile=/nonexistent/aap-test-key",
            "-o",
            "BatchMode=yes",
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "KbdInteractiveAuthentication=no",
            "-l",
            &user(),
            "127.0.0.1",
            remote,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn exec(&self, session: &str, cap: &str, argv: &[String]) -> Command {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut c = self.w.exec_in(session, cap, &argv);
        c.env("XDG_RUNTIME_DIR", &self.run_dir);
        c
    }

    /// Live ssh-agent processes whose socket is under our run dir.
    fn our_agents(&self) -> Vec<u32> {
        agents_under(&self.run_dir)
    }

    fn run_dir_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// Pids of running (not zombie) `ssh-agent` processes (by their executable's name, so the
/// keeper, which is aap-exec, is not counted) whose command line mentions `dir`.
fn agents_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ssh-agent" && cmdline.contains(&needle) && !zombie {
            out.push(pid);
        }
    }
    out
}

#[test]
fn ssh_through_the_private_agent_prints_ok_and_leaves_nothing() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let argv = s.ssh("vps-test", s.vps.port, "echo ok");
    let o = run(s
        .exec(&sid, "ssh-test", &argv)
        // An inherited agent is replaced, never used.
        .env("SSH_AUTH_SOCK", "/nonexistent/inherited.sock")
        .env("SSH_AGENT_PID", "1"));
    assert_eq!(
        code(&o),
        0,
        "stderr: {}\nsshd log: {}",
        stderr(&o),
        std::fs::read_to_string(s.w.path().join("vps/sshd.log")).unwrap_or_default()
    );
    assert_eq!(stdout(&o), "ok\n");
    // Teardown: no agent of ours left, its directory gone.
    assert!(s.our_agents().is_empty(), "{:?}", s.our_agents());
    assert!(s.run_dir_entries().is_empty(), "{:?}", s.run_dir_entries());
    // The key never reached a file, the audit log or our output.
    let key = seed_secret_values()
        .into_iter()
        .find(|v| v.contains("OPENSSH PRIVATE KEY"))
        .unwrap();
    // Every line of the key but the header line that all unencrypted ed25519 keys share (the
    // operator's own key file has it too).
    let key: Vec<String> = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .skip(1)
        .map(str::to_string)
        .collect();
    assert!(key.len() >= 3);
    assert_no_leak(&key, &format!("{}{}", stdout(&o), stderr(&o)), s.w.path());
    assert_eq!(s.w.count("exec.end"), 1);
}

#[test]
fn the_child_sees_only_our_agent_in_a_private_dir() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let script = "set -e; printf '%s\\n' \"$SSH_AUTH_SOCK\" > sock; printf '%s\\n' \"${SSH_AGENT_PID:-unset}\" > pid; \
                  stat -c %a \"$(dirname \"$SSH_AUTH_SOCK\")\" > mode; grep SigBlk /proc/self/status > blk; ssh-add -l > keys; ls /proc/self/fd > fds";
    let argv: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
    let o = run(s
        .exec(&sid, "ssh-test", &argv)
        .env("SSH_AUTH_SOCK", "/nonexistent/inherited.sock")
        .env("SSH_AGENT_PID", "1"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(s.w.path().join(f)).unwrap();
    let sock = read("sock");
    assert!(
        sock.starts_with(&format!("{}/aap-agent-", s.run_dir.display())),
        "{sock}"
    );
    assert_eq!(read("pid"), "unset\n");
    assert_eq!(read("mode"), "700\n");
    // The child's signal mask is empty (aap-exec's own blocked set is not inherited).
    assert_eq!(read("blk"), "SigBlk:\t0000000000000000\n");
    // Exactly the seed's key, with its destination constraint.
    let keys = read("keys");
    assert_eq!(keys.lines().count(), 1, "{keys}");
    let fp = Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(SEED_PUB.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert!(keys.contains(fp), "{keys} vs {fp}");
    assert!(!Path::new(sock.trim()).exists(), "socket left behind");
}

#[test]
fn a_destination_outside_the_constraints_is_refused_by_the_agent() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    // Same key authorized on both servers; the client trusts both host keys. Only the agent's
    // destination constraint (vps-test's host key) tells them apart.
    let good = run(&mut s.exec(&sid, "ssh-test", &s.ssh("vps-test", s.vps.port, "echo ok")));
    assert_eq!(code(&good), 0, "{}", stderr(&good));
    let bad = run(&mut s.exec(
        &sid,
        "ssh-test",
        &s.ssh("other-test", s.other.port, "echo ok"),
    ));
    assert_eq!(code(&bad), 255, "{}", stderr(&bad));
    assert_eq!(stdout(&bad), "");
    assert!(
        stderr(&bad).contains("Permission denied (publickey)"),
        "{}",
        stderr(&bad)
    );
    // The server never accepted the key: the refusal came from the agent.
    let log = std::fs::read_to_string(s.w.path().join("other/sshd.log")).unwrap();
    assert!(!log.contains("Accepted publickey"), "{log}");
    assert!(s.our_agents().is_empty());
}

#[test]
fn without_approval_it_is_denied_and_no_agent_ever_starts() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["db-env"]); // a session, but not for ssh-test
    let argv = s.ssh("vps-test", s.vps.port, "echo ok");
    // Watch for an agent for the whole run, not just after it.
    let mut c = s.exec(&sid, "ssh-test", &argv);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = false;
    while child.try_wait().unwrap().is_none() {
        seen |= !s.our_agents().is_empty() || !s.run_dir_entries().is_empty();
        std::thread::sleep(Duration::from_millis(2));
    }
    let o = child.wait_with_output().unwrap();
    assert_fails(&o, 77, "aap-exec: error:");
    assert!(stderr(&o).contains("aap-exec: hint:"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert!(
        !seen,
        "an agent or its directory existed during a denied run"
    );
    assert!(s.run_dir_entries().is_empty());
    let sshd_log = std::fs::read_to_string(s.w.path().join("vps/sshd.log")).unwrap();
    assert!(!sshd_log.contains("Accepted"), "{sshd_log}");
    assert_eq!(s.w.count("deny"), 1);
}

#[test]
fn kill_9_of_aap_exec_leaves_no_agent_after_one_second() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let marker = s.w.path().join("remote.pid");
    let remote = format!("echo $$ > {}; exec sleep 30", marker.display());
    let argv = s.ssh("vps-test", s.vps.port, &remote);
    let mut child = s
        .exec(&sid, "ssh-test", &argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::fs::read_to_string(&marker).map_or(true, |m| m.trim().is_empty()) {
        assert!(t.elapsed() < Duration::from_secs(20), "ssh never logged in");
        assert!(child.try_wait().unwrap().is_none(), "aap-exec ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.our_agents().len(), 1, "the agent should be running now");
    child.kill().unwrap(); // SIGKILL: no teardown code of ours runs
    child.wait().unwrap();
    let killed = Instant::now();
    while !s.our_agents().is_empty() && killed.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = s.our_agents();
    // End the remote sleep (and so the orphaned ssh client) before asserting.
    if let Ok(p) = std::fs::read_to_string(&marker) {
        let _ = Command::new("kill").arg(p.trim()).status();
    }
    assert!(
        left.is_empty(),
        "agent(s) {left:?} survived aap-exec's SIGKILL by 1 s"
    );
    // The agent removed its own socket on SIGTERM (the parent-death signal).
    let sockets: Vec<_> = std::fs::read_dir(&s.run_dir)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .collect();
    assert!(sockets.is_empty(), "{sockets:?}");
}

#[test]
fn the_key_expires_with_its_lifetime() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-short"]);
    let argv: Vec<String> = [
        "sh",
        "-c",
        "ssh-add -l > before; sleep 3; ssh-add -l > after 2>&1; true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run(&mut s.exec(&sid, "ssh-short", &argv));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = std::fs::read_to_string(s.w.path().join("before")).unwrap();
    let after = std::fs::read_to_string(s.w.path().join("after")).unwrap();
    assert!(before.contains("ED25519"), "{before}");
    assert!(after.contains("no identities"), "{after}");
}

#[test]
fn a_fake_ssh_add_in_path_is_never_used() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    // An agent-controlled PATH entry with ssh-add/ssh-agent that would capture the key.
    let bin = s.w.path().join("evil");
    std::fs::create_dir(&bin).unwrap();
    for name in ["ssh-add", "ssh-agent"] {
        write(
            &bin.join(name),
            format!(
                "#!/bin/sh\ncat > {}/captured-{name}\nexit 1\n",
                s.w.path().display()
            ),
        );
        std::fs::set_permissions(
            bin.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let o = run(s
        .exec(&sid, "ssh-test", &s.ssh("vps-test", s.vps.port, "echo ok"))
        .env("PATH", path));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "ok\n");
    assert!(!s.w.path().join("captured-ssh-add").exists());
    assert!(!s.w.path().join("captured-ssh-agent").exists());
}

#[test]
fn the_key_lifetime_is_capped_by_the_grants_remaining_time() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    // key_lifetime is 15m, but the grant has 3 s left: the key must go with the grant.
    let o = run(&mut s.w.aap(&[
        "session", "start", "--agent", "codex", "--cap", "ssh-test", "--ttl", "3s",
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sid = stdout(&o)
        .trim()
        .strip_prefix("export AAP_SESSION=")
        .unwrap()
        .to_string();
    let argv: Vec<String> = [
        "sh",
        "-c",
        "ssh-add -l > before; sleep 4; ssh-add -l > after 2>&1; true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run(&mut s.exec(&sid, "ssh-test", &argv));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = std::fs::read_to_string(s.w.path().join("before")).unwrap();
    let after = std::fs::read_to_string(s.w.path().join("after")).unwrap();
    assert!(before.contains("ED25519"), "{before}");
    assert!(after.contains("no identities"), "{after}");
}

#[test]
fn a_failed_fetch_tears_the_early_agent_down() {
    if !have_sshd() {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-missing"]);
    // The agent starts while the key is fetched; the fetch fails, so it must go again.
    let o = run(&mut s.exec(
        &sid,
        "ssh-missing",
        &s.ssh("vps-test", s.vps.port, "echo ok"),
    ));
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("aap-exec: error:"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert!(s.our_agents().is_empty(), "{:?}", s.our_agents());
    assert!(s.run_dir_entries().is_empty(), "{:?}", s.run_dir_entries());
    assert_eq!(s.w.count("exec.start"), 0);
}
