//! The ssh-agent backing against real OpenSSH: a real sshd on 127.0.0.1 with a throwaway host
//! key, the real `ssh` and `ssh-add`, through the real `aap-exec`, with the broker as the SSH
//! agent (issue 12). The broker and the agent side are one uid here (this test's); the
//! guarantees about another uid are in tests/broker_two_uids.rs.

mod common;

use common::sshd::{SEED_PUB, Sshd, have_sshd, keygen};
use common::world::World;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
  - id: ssh-fwd
    description: same, and forwarding (ssh -A) among the hosts allowed
    audit_tier: high
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [ssh, sh]
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 15m
      hosts: [vps-test]
      allow_forwarding: true
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

/// `SHA256:...` of a public key line, by the real ssh-keygen.
fn fingerprint(pubkey: &str) -> String {
    let o = Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(pubkey.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

fn user() -> String {
    let o = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// Single-quote for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sh_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A world with the ssh capabilities, two sshds (`vps-test`, the constrained destination, and
/// `other-test`, a host the key is not constrained to), and a known_hosts file naming both by
/// alias (the config's `ssh_known_hosts`, read by the broker).
struct SshWorld {
    w: World,
    vps: Sshd,
    other: Sshd,
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
        // aap-exec makes the agent's socket directory in $XDG_RUNTIME_DIR when that is a 0700
        // directory of ours: this one, so the tests can watch it.
        let run = w.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        SshWorld { w, vps, other }
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
        c.env("XDG_RUNTIME_DIR", self.w.path().join("run"));
        c
    }

    fn sh(&self, session: &str, cap: &str, script: &str) -> Command {
        self.exec(
            session,
            cap,
            &["sh".to_string(), "-c".to_string(), script.to_string()],
        )
    }

    /// What aap-exec's agent sockets left in the `XDG_RUNTIME_DIR` it is given: every entry but
    /// the uid's own directory `aap-agent-<uid>` (kept for the next run), and every socket in
    /// that directory.
    fn agent_dirs(&self) -> Vec<String> {
        let names = |d: &Path| -> Vec<String> {
            match std::fs::read_dir(d) {
                Ok(rd) => rd
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        let run = self.w.path().join("run");
        let own = format!("aap-agent-{}", aap::sys::uid());
        let mut left: Vec<String> = names(&run).into_iter().filter(|n| *n != own).collect();
        left.extend(
            names(&run.join(&own))
                .into_iter()
                .map(|n| format!("{own}/{n}")),
        );
        left
    }

    fn read(&self, f: &str) -> String {
        std::fs::read_to_string(self.w.path().join(f)).unwrap_or_default()
    }

    fn signs(&self) -> Vec<serde_json::Value> {
        self.w
            .audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "ssh.sign")
            .collect()
    }

    fn accepted(&self, sshd: &str) -> usize {
        self.read(&format!("{sshd}/sshd.log"))
            .matches("Accepted publickey")
            .count()
    }

    /// Wait (at most 20 s) for `file` in the world dir to hold a line.
    fn wait_for(&self, file: &str, child: &mut Child) -> String {
        let t = Instant::now();
        loop {
            let v = self.read(file);
            if v.ends_with('\n') {
                return v.trim().to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no {file} in time");
            assert!(
                child.try_wait().unwrap().is_none(),
                "aap-exec ended before writing {file}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The seed key's lines, minus the header line every unencrypted ed25519 key shares.
fn key_probes() -> Vec<String> {
    let key = seed_secret_values()
        .into_iter()
        .find(|v| v.contains("OPENSSH PRIVATE KEY"))
        .unwrap();
    let key: Vec<String> = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .skip(1)
        .map(str::to_string)
        .collect();
    assert!(key.len() >= 3);
    key
}

// ---- the agent protocol, spoken by hand --------------------------------------------------------

/// Send one agent message, read the answer's body (`None`: the broker closed the connection).
fn agent_call(s: &mut UnixStream, body: &[u8]) -> Option<Vec<u8>> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    s.write_all(&frame).ok()?;
    read_answer(s)
}

fn read_answer(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

fn connect(sock: &str) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {sock}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENT_IDENTITIES_ANSWER: u8 = 12;

// ---- tests --------------------------------------------------------------------------------------

#[test]
fn ssh_through_the_brokers_agent_logs_in_audits_and_leaves_nothing() {
    if !have_sshd("ssh_through_the_brokers_agent_logs_in_audits_and_leaves_nothing") {
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
        s.read("vps/sshd.log")
    );
    assert_eq!(stdout(&o), "ok\n");
    // Teardown: the per-exec socket is gone.
    assert!(s.agent_dirs().is_empty(), "{:?}", s.agent_dirs());
    // The signature that opened the session is in the audit log, with its destination.
    let signs = s.signs();
    assert_eq!(signs.len(), 1, "{signs:?}");
    let l = &signs[0];
    assert_eq!(l["outcome"], "ok", "{l}");
    assert_eq!(l["ssh_host"], "vps-test", "{l}");
    assert_eq!(l["ssh_host_key"], fingerprint(&s.vps.host_key), "{l}");
    assert_eq!(l["ssh_user"], user(), "{l}");
    assert_eq!(l["ssh_forwarded"], false, "{l}");
    assert_eq!(l["capability"], "ssh-test", "{l}");
    assert_eq!(l["session"], sid.as_str(), "{l}");
    assert_eq!(s.accepted("vps"), 1);
    // The operator sees where the signature went: in the session's story and in the tail
    // (issue 15, item 3).
    let dest = format!(
        "ssh_user={} ssh_host=vps-test ssh_host_key={}",
        user(),
        fingerprint(&s.vps.host_key)
    );
    let o = run(&mut s.w.aap(&["session", "log", &sid]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let story = stdout(&o);
    let signed = story
        .lines()
        .find(|l| l.contains("  ssh signature    ssh-test "))
        .unwrap_or_else(|| panic!("no ssh signature line in:\n{story}"));
    for want in [
        "ssh_host=vps-test".to_string(),
        format!("ssh_user={}", user()),
        format!("ssh_host_key={}", fingerprint(&s.vps.host_key)),
    ] {
        assert!(signed.contains(&want), "{want:?} missing from {signed:?}");
    }
    assert!(
        story.contains(
            "1 exec(s), 0 not ending in exit 0; 0 denial(s); 0 request(s); 1 ssh signature(s)"
        ),
        "{story}"
    );
    let o = run(&mut s.w.aap(&["audit", "tail", "--session", &sid]));
    let tail = stdout(&o);
    assert!(
        tail.lines()
            .any(|l| l.contains(" ssh.sign ") && l.contains(&dest)),
        "{dest:?} missing from:\n{tail}"
    );
    // The key never reached a file, the audit log or our output.
    assert_no_leak(
        &key_probes(),
        &format!("{}{}", stdout(&o), stderr(&o)),
        s.w.path(),
    );
    assert_eq!(s.w.count("exec.end"), 1);
    assert_eq!(code(&s.w.audit_verify()), 0);
}

/// Issue 15, items 4 and 5: a destination whose host key the configured `ssh_known_hosts` lacks
/// is refused before anything is fetched or run, `--check` says the same, and the hint sends the operator to that file and to an
/// out-of-band check of the key, never to `ssh-keyscan >> ~/.ssh/known_hosts` (the agent's own
/// file, and an unverified key).
#[test]
fn a_destination_without_a_known_host_key_names_the_configured_file_not_keyscan() {
    if !have_sshd("a_destination_without_a_known_host_key_names_the_configured_file_not_keyscan") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let kh = s.w.path().join("known_hosts");
    // Only the other host's key is listed now; the broker reads the file at each use.
    write(&kh, format!("other-test {}\n", s.other.host_key));
    let argv = s.ssh("vps-test", s.vps.port, "echo never printed");
    let reads = || s.w.server.stats()["secret_reads"].as_u64().unwrap();
    let before = reads();
    let o = run(&mut s.exec(&sid, "ssh-test", &argv));
    // Refused before the key is fetched, and `--check` gives the same verdict (issue 15, item 4).
    assert_eq!(reads(), before, "the key was fetched for nothing");
    let mut check = s.w.exec(&["--session", &sid, "--check", "ssh-test", "--"]);
    check.args(&argv);
    let checked = run(&mut check);
    assert_eq!(code(&checked), code(&o), "{}", stderr(&checked));
    // (A loaded machine may add a "waiting for the broker" line to either: common::verdict.)
    assert_eq!(verdict(&checked), verdict(&o));
    assert_fails(
        &o,
        78,
        format!(
            "aap-exec: error: no host key of vps-test is listed in ssh_known_hosts ({})",
            kh.display()
        ),
    );
    let err = stderr(&o);
    let hint = err
        .lines()
        .find_map(|l| l.strip_prefix("aap-exec: hint: "))
        .unwrap_or_else(|| panic!("no hint in: {err}"));
    assert!(
        hint.starts_with(&format!(
            "the operator adds the host key of vps-test to {}, after checking its fingerprint out of band",
            kh.display()
        )),
        "{hint}"
    );
    for bad in ["ssh-keyscan", "~/.ssh", ">>"] {
        assert!(!hint.contains(bad), "{bad:?} in the hint: {hint}");
    }
    assert!(!stdout(&o).contains("never printed"));
    assert_eq!(s.accepted("vps"), 0, "the destination was reached");
}

#[test]
fn the_child_gets_the_brokers_socket_and_ssh_add_lists_only_this_key() {
    if !have_sshd("the_child_gets_the_brokers_socket_and_ssh_add_lists_only_this_key") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let script = "set -e; printf '%s\\n' \"$SSH_AUTH_SOCK\" > sock; printf '%s\\n' \"${SSH_AGENT_PID:-unset}\" > pid; \
                  stat -c '%a %u %F' \"$(dirname \"$SSH_AUTH_SOCK\")\" > mode; stat -c '%a %u %F' \"$SSH_AUTH_SOCK\" > sockmode; \
                  grep SigBlk /proc/self/status > blk; ssh-add -L > keys; ls /proc/self/fd > fds";
    let o = run(s
        .sh(&sid, "ssh-test", script)
        .env("SSH_AUTH_SOCK", "/nonexistent/inherited.sock")
        .env("SSH_AGENT_PID", "1"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sock = s.read("sock");
    // In the XDG_RUNTIME_DIR aap-exec was given, the uid's own directory, a fresh name.
    let agents = format!(
        "{}/run/aap-agent-{}/agent-",
        s.w.path().display(),
        aap::sys::uid()
    );
    assert!(
        sock.starts_with(&agents) && sock.trim_end().ends_with(".sock"),
        "{sock}"
    );
    assert_eq!(s.read("pid"), "unset\n");
    // A private directory: the agent's uid (this test's), mode 0700 (docs/backings.md); the
    // socket in it is the agent's too, 0600.
    let me = aap::sys::uid();
    assert_eq!(s.read("mode"), format!("700 {me} directory\n"));
    assert_eq!(s.read("sockmode"), format!("600 {me} socket\n"));
    assert_eq!(s.read("blk"), "SigBlk:\t0000000000000000\n");
    // Exactly the seed's key (ssh-add -L prints the public key with our comment).
    let keys = s.read("keys");
    assert_eq!(keys.lines().count(), 1, "{keys}");
    let want: String = SEED_PUB
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(keys.starts_with(&want), "{keys} vs {want}");
    // No descriptor of the broker's reached the child (stdio and ls's own).
    assert_eq!(s.read("fds").lines().count(), 4, "{}", s.read("fds"));
    assert!(!Path::new(sock.trim()).exists(), "socket left behind");
    assert!(s.agent_dirs().is_empty(), "{:?}", s.agent_dirs());
}

#[test]
fn ssh_add_cannot_delete_lock_or_add_keys() {
    if !have_sshd("ssh_add_cannot_delete_lock_or_add_keys") {
        return;
    }
    let s = SshWorld::new();
    let d = s.w.path();
    let sid = s.w.session(&["ssh-test"]);
    write(&d.join("seed.pub"), format!("{SEED_PUB}\n"));
    keygen(&d.join("extra"));
    write(&d.join("askpass"), "#!/bin/sh\necho lock-passphrase\n");
    std::fs::set_permissions(
        d.join("askpass"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = "for op in D d x add; do case $op in \
                    D) ssh-add -D ;; d) ssh-add -d seed.pub ;; x) ssh-add -x ;; add) ssh-add extra ;; \
                  esac > out-$op 2>&1; echo $? > rc-$op; done; ssh-add -L > after 2>&1";
    let o = run(s
        .sh(&sid, "ssh-test", script)
        .env("SSH_ASKPASS", d.join("askpass"))
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for op in ["D", "d", "x", "add"] {
        let rc = s.read(&format!("rc-{op}"));
        let out = s.read(&format!("out-{op}"));
        assert_ne!(rc.trim(), "0", "ssh-add {op} was not refused: {out}");
        assert!(
            out.contains("ailed") || out.contains("Could not"),
            "ssh-add {op}: {out}"
        );
    }
    // Nothing changed: the key is listed, not locked, and the extra key was not added.
    let after = s.read("after");
    assert_eq!(after.lines().count(), 1, "{after}");
    assert!(
        after.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO"),
        "{after}"
    );
}

#[test]
fn a_destination_outside_hosts_is_refused_by_the_agent_and_audited() {
    if !have_sshd("a_destination_outside_hosts_is_refused_by_the_agent_and_audited") {
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
    assert_eq!(s.accepted("other"), 0, "{}", s.read("other/sshd.log"));
    let signs = s.signs();
    let refused: Vec<_> = signs.iter().filter(|l| l["outcome"] == "denied").collect();
    assert!(!refused.is_empty(), "{signs:?}");
    for l in &refused {
        assert_eq!(l["ssh_host_key"], fingerprint(&s.other.host_key), "{l}");
        assert!(l.get("ssh_host").is_none(), "{l}");
        assert!(
            l["error"].as_str().unwrap().contains("not a known key"),
            "{l}"
        );
    }
    assert_eq!(
        signs.iter().filter(|l| l["outcome"] == "ok").count(),
        1,
        "{signs:?}"
    );
}

#[test]
fn without_approval_it_is_denied_and_no_socket_ever_exists() {
    if !have_sshd("without_approval_it_is_denied_and_no_socket_ever_exists") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["db-env"]); // a session, but not for ssh-test
    let argv = s.ssh("vps-test", s.vps.port, "echo ok");
    // Watch for an agent socket (or directory) for the whole run, not just after it.
    let mut child = s
        .exec(&sid, "ssh-test", &argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = false;
    while child.try_wait().unwrap().is_none() {
        seen |= !s.agent_dirs().is_empty();
        std::thread::sleep(Duration::from_millis(2));
    }
    let o = child.wait_with_output().unwrap();
    assert_fails(&o, 77, "aap-exec: error:");
    assert!(stderr(&o).contains("aap-exec: hint:"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert!(!seen, "an agent socket existed during a denied run");
    assert_eq!(s.accepted("vps"), 0);
    assert_eq!(s.w.count("deny"), 1);
    assert!(s.signs().is_empty());
}

#[test]
fn revoking_the_session_mid_exec_makes_the_next_ssh_fail() {
    if !have_sshd("revoking_the_session_mid_exec_makes_the_next_ssh_fail") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let one = sh_join(&s.ssh("vps-test", s.vps.port, "echo one"));
    let two = sh_join(&s.ssh("vps-test", s.vps.port, "echo two"));
    let script = format!(
        "{one} > one.out 2> one.err; echo $? > one.rc; echo ready > ready; \
         i=0; while [ ! -e go ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
         {two} > two.out 2> two.err; echo $? > two.rc"
    );
    let mut child = s
        .sh(&sid, "ssh-test", &script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_for("ready", &mut child);
    assert_eq!(s.read("one.rc"), "0\n", "{}", s.read("one.err"));
    assert_eq!(s.read("one.out"), "one\n");
    let o = run(&mut s.w.aap(&["session", "revoke", &sid, "--reason", "test"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    write(&s.w.path().join("go"), "");
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(s.read("two.rc"), "255\n", "{}", s.read("two.err"));
    assert_eq!(s.read("two.out"), "");
    // One login only: the second was refused before the server could accept anything.
    assert_eq!(s.accepted("vps"), 1, "{}", s.read("vps/sshd.log"));
    let end: Vec<_> =
        s.w.audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "exec.end")
            .collect();
    assert!(
        end[0]["error"].as_str().unwrap_or("").contains("revoked")
            || s.signs().iter().any(|l| l["outcome"] == "denied"
                && l["error"].as_str().unwrap_or("").contains("revoked")),
        "neither exec.end nor an ssh.sign says the session was revoked: {end:?} {:?}",
        s.signs()
    );
}

/// `ssh -A` to vps-test, then, on vps-test, `ssh` back to vps-test with the forwarded agent.
fn forwarded_login(s: &SshWorld, cap: &str) -> (String, String) {
    let sid = s.w.session(&[cap]);
    let inner = sh_join(&s.ssh("vps-test", s.vps.port, "echo inner-ok"));
    let mut outer = s.ssh("vps-test", s.vps.port, &format!("{inner}; echo inner=$?"));
    outer.insert(1, "-A".into());
    let o = run(&mut s.exec(&sid, cap, &outer));
    assert_eq!(code(&o), 0, "{}\n{}", stderr(&o), s.read("vps/sshd.log"));
    (stdout(&o), stderr(&o))
}

#[test]
fn ssh_a_then_a_signature_from_the_remote_side_is_refused() {
    if !have_sshd("ssh_a_then_a_signature_from_the_remote_side_is_refused") {
        return;
    }
    let s = SshWorld::new();
    let (out, err) = forwarded_login(&s, "ssh-test");
    assert_eq!(out, "inner=255\n", "{err}");
    assert_eq!(s.accepted("vps"), 1, "{}", s.read("vps/sshd.log"));
    let signs = s.signs();
    let fwd: Vec<_> = signs
        .iter()
        .filter(|l| l["outcome"] == "denied" && l["ssh_forwarded"] == true)
        .collect();
    assert!(!fwd.is_empty(), "{signs:?}");
    assert!(
        fwd[0]["error"]
            .as_str()
            .unwrap()
            .contains("does not allow forwarding"),
        "{}",
        fwd[0]
    );
    assert_eq!(fwd[0]["ssh_user"], user());
}

#[test]
fn with_allow_forwarding_the_remote_side_may_log_in() {
    if !have_sshd("with_allow_forwarding_the_remote_side_may_log_in") {
        return;
    }
    let s = SshWorld::new();
    let (out, err) = forwarded_login(&s, "ssh-fwd");
    assert_eq!(out, "inner-ok\ninner=0\n", "{err}");
    assert_eq!(s.accepted("vps"), 2);
    let signs = s.signs();
    assert_eq!(signs.len(), 2, "{signs:?}");
    assert!(signs.iter().all(|l| l["outcome"] == "ok"), "{signs:?}");
    assert_eq!(signs[1]["ssh_forwarded"], true);
}

#[test]
fn sigkill_of_aap_exec_makes_the_socket_refuse_within_one_second() {
    if !have_sshd("sigkill_of_aap_exec_makes_the_socket_refuse_within_one_second") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test"]);
    let mut child = s
        .sh(
            &sid,
            "ssh-test",
            "echo $$ > child.pid; printf '%s\\n' \"$SSH_AUTH_SOCK\" > sock; exec sleep 30",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = s.wait_for("sock", &mut child);
    let child_pid = s.read("child.pid");
    // A connection made before the kill works...
    let mut early = connect(&sock);
    let a = agent_call(&mut early, &[11]).expect("list answered");
    assert_eq!(a[0], SSH_AGENT_IDENTITIES_ANSWER);
    child.kill().unwrap(); // SIGKILL: no teardown code of aap-exec's runs
    child.wait().unwrap();
    let killed = Instant::now();
    // ...and within 1 s neither it nor a new connection is served.
    let mut refused = false;
    while killed.elapsed() < Duration::from_secs(1) {
        let new_fails = match UnixStream::connect(&sock) {
            Err(_) => true,
            Ok(mut c) => {
                c.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                agent_call(&mut c, &[11]).is_none()
            }
        };
        if new_fails {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = killed.elapsed();
    let old = agent_call(&mut early, &[11]);
    // The path is still there (nothing of aap-exec's ran to remove it), but nobody listens on
    // it any more: the broker closed the only listening copy.
    let after = UnixStream::connect(&sock).map(|_| ()).map_err(|e| e.kind());
    let dir = Path::new(&sock).parent().unwrap().to_path_buf();
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    let _ = Command::new("kill").arg(child_pid.trim()).status();
    assert!(
        refused,
        "the socket still served 1 s after aap-exec's SIGKILL"
    );
    assert!(
        old.is_none(),
        "an open connection still served after the kill"
    );
    assert_eq!(
        after,
        Err(std::io::ErrorKind::ConnectionRefused),
        "a connect to {sock} after the kill"
    );
    eprintln!("refused {} ms after the SIGKILL", took.as_millis());
}

#[test]
fn the_key_expires_with_its_lifetime() {
    if !have_sshd("the_key_expires_with_its_lifetime") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-short"]);
    let o = run(&mut s.sh(
        &sid,
        "ssh-short",
        "ssh-add -l > before; sleep 3; ssh-add -l > after 2>&1; echo $? > rc; true",
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(s.read("before").contains("ED25519"), "{}", s.read("before"));
    let after = s.read("after");
    assert!(!after.contains("ED25519"), "{after}");
    assert_ne!(s.read("rc"), "0\n", "{after}");
}

#[test]
fn the_key_lifetime_is_capped_by_the_grants_remaining_time() {
    if !have_sshd("the_key_lifetime_is_capped_by_the_grants_remaining_time") {
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
    let o = run(&mut s.sh(
        &sid,
        "ssh-test",
        "ssh-add -l > before; sleep 4; ssh-add -l > after 2>&1; true",
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(s.read("before").contains("ED25519"), "{}", s.read("before"));
    assert!(!s.read("after").contains("ED25519"), "{}", s.read("after"));
}

#[test]
fn a_failed_fetch_leaves_no_agent_socket() {
    if !have_sshd("a_failed_fetch_leaves_no_agent_socket") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-missing"]);
    let o = run(&mut s.exec(
        &sid,
        "ssh-missing",
        &s.ssh("vps-test", s.vps.port, "echo ok"),
    ));
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("aap-exec: error:"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert!(s.agent_dirs().is_empty(), "{:?}", s.agent_dirs());
    assert_eq!(s.w.count("exec.start"), 0);
}

/// Junk, huge, truncated and unbound requests on the agent socket: each is refused (or its
/// connection closed), audited where it is a signature, and the broker goes on serving: the
/// same exec's ssh logs in afterwards, and a new exec works.
#[test]
fn junk_huge_and_truncated_frames_never_hurt_the_broker() {
    if !have_sshd("junk_huge_and_truncated_frames_never_hurt_the_broker") {
        return;
    }
    let s = SshWorld::new();
    let sid = s.w.session(&["ssh-test", "db-env"]);
    let login = sh_join(&s.ssh("vps-test", s.vps.port, "echo ok"));
    let script = format!(
        "printf '%s\\n' \"$SSH_AUTH_SOCK\" > sock; \
         i=0; while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; \
         {login} > login.out 2> login.err; echo $? > login.rc"
    );
    let mut child = s
        .sh(&sid, "ssh-test", &script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = s.wait_for("sock", &mut child);

    // A partial frame left hanging on its own connection does not block others.
    let mut hanging = connect(&sock);
    hanging.write_all(&[0, 0, 0, 100, 11]).unwrap();

    let mut c = connect(&sock);
    // Unknown message types, empty and random bodies of valid frames: SSH_AGENT_FAILURE.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for n in [1usize, 2, 5, 17, 100, 1000, 4096] {
        let mut body: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
        if body[0] == 11 {
            body[0] = 200; // not a list request, which would be answered
        }
        let a = agent_call(&mut c, &body).expect("a junk frame closed the connection");
        assert_eq!(a, vec![SSH_AGENT_FAILURE], "body of {n} bytes");
    }
    // Add identity (17), remove all (19), lock (22), an unknown extension (27): refused.
    for body in [
        vec![19u8],
        vec![22, 0, 0, 0, 1, b'x'],
        vec![27, 0, 0, 0, 5, b'q', b'u', b'e', b'r', b'y'],
        vec![17, 0, 0, 0, 0],
    ] {
        assert_eq!(agent_call(&mut c, &body), Some(vec![SSH_AGENT_FAILURE]));
    }
    // A sign request for our key on an unbound connection: refused, and audited.
    use ssh_agent_lib::proto::{Request, SignRequest};
    use ssh_agent_lib::ssh_encoding::Encode;
    let pubkey = ssh_agent_lib::ssh_key::PublicKey::from_openssh(SEED_PUB).unwrap();
    let req = Request::SignRequest(SignRequest {
        credential: pubkey.key_data().clone().into(),
        data: b"anything at all".to_vec(),
        flags: 0,
    });
    let mut body = Vec::new();
    req.encode(&mut body).unwrap();
    assert_eq!(agent_call(&mut c, &body), Some(vec![SSH_AGENT_FAILURE]));
    let unbound: Vec<_> = s
        .signs()
        .into_iter()
        .filter(|l| l["error"].as_str().unwrap_or("").contains("not bound"))
        .collect();
    assert_eq!(unbound.len(), 1, "{:?}", s.signs());
    // Still served on the same connection.
    assert_eq!(
        agent_call(&mut c, &[11]).map(|a| a[0]),
        Some(SSH_AGENT_IDENTITIES_ANSWER)
    );
    // Over the limit (256 KiB), a zero length, the largest length: the connection is closed.
    for len in [256 * 1024 + 1u32, 0, u32::MAX] {
        let mut c = connect(&sock);
        let _ = c.write_all(&len.to_be_bytes());
        let _ = c.write_all(&[11; 64]);
        assert!(read_answer(&mut c).is_none(), "length {len} was answered");
    }
    // Truncated: a length, part of a body, then the end.
    for cut in [1usize, 3, 50] {
        let mut c = connect(&sock);
        let mut f = 100u32.to_be_bytes().to_vec();
        f.extend(std::iter::repeat_n(13u8, cut));
        c.write_all(&f).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(read_answer(&mut c).is_none());
    }
    // Many connections at once, beyond the per-exec limit: none hurts the broker.
    let many: Vec<UnixStream> = (0..40)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    drop(many);
    drop(hanging);

    // The exec's own ssh still logs in.
    write(&s.w.path().join("go"), "");
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(s.read("login.rc"), "0\n", "{}", s.read("login.err"));
    assert_eq!(s.read("login.out"), "ok\n");
    // And the broker serves a new exec.
    let o = run(&mut s
        .w
        .exec_in(&sid, "db-env", &["sh", "-c", "test -n \"$DB_PASSWORD\""]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&s.w.audit_verify()), 0);
}

/// The broker serves only on what aap-exec must send it: a listening Unix stream socket bound
/// to the path it names. A client that sends anything else (a regular file, one end of a
/// socket pair, a bound socket that does not listen, a UDP socket, a Unix datagram socket, a
/// listening TCP socket, a listening socket bound elsewhere, no descriptor at all) is refused
/// with 77 and the reason, a `deny` line is written, no exec starts and nothing is served on
/// what it sent.
#[test]
fn a_forged_agent_socket_is_refused_and_nothing_is_served_on_it() {
    use aap::proto::{BrokerMsg, ClientMsg, Conn, Hello};
    use std::os::fd::OwnedFd;
    if !have_sshd("a_forged_agent_socket_is_refused_and_nothing_is_served_on_it") {
        return;
    }
    let s = SshWorld::new();
    let d = s.w.path().to_path_buf();
    let sid = s.w.session(&["ssh-test"]);
    let sh = ["/usr/bin/sh", "/bin/sh"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    // One exec of ssh-test spoken by hand, up to the broker's request for the socket; then
    // `fd` (if any) claimed to listen on `path`. Returns the broker's answer.
    let forge = |fd: Option<OwnedFd>, path: &Path| -> BrokerMsg {
        let sock = UnixStream::connect(d.join("broker.sock")).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = Conn::new(sock);
        c.send(
            &ClientMsg::Exec {
                hello: Hello::current(),
                cap: "ssh-test".into(),
                session: Some(sid.clone()),
                reason: None,
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"true".to_vec()],
                program: sh.into(),
                program_error: None,
                cwd: d.display().to_string(),
                nested: None,
            },
            &[],
        )
        .unwrap();
        loop {
            match c.recv::<BrokerMsg>().unwrap() {
                BrokerMsg::Stage { .. } | BrokerMsg::Progress { .. } => {}
                BrokerMsg::AgentSocket {} => break,
                other => panic!("before the socket request the broker sent {other:?}"),
            }
        }
        let fds: Vec<&OwnedFd> = fd.iter().collect();
        c.send(
            &ClientMsg::AgentSocket {
                path: path.display().to_string(),
            },
            &fds,
        )
        .unwrap();
        drop(fds);
        drop(fd); // ours: the broker holds the only copy now, if it kept one
        loop {
            match c.recv::<BrokerMsg>().unwrap() {
                BrokerMsg::Stage { .. } | BrokerMsg::Progress { .. } => {}
                other => return other,
            }
        }
    };
    let refused = |fd: Option<OwnedFd>, path: &Path, needle: &str| match forge(fd, path) {
        BrokerMsg::Error {
            code,
            message,
            hint,
        } => {
            assert_eq!(code, 77, "{message}");
            assert!(
                message.contains("the ssh agent socket aap-exec sent")
                    && message.contains("is refused")
                    && message.contains(needle),
                "{message}"
            );
            assert!(hint.is_some(), "{message}: no hint");
        }
        other => panic!("{needle}: the broker answered {other:?}"),
    };
    let claimed = d.join("claimed.sock");
    // A regular file.
    let file = std::fs::File::create(d.join("forged-file")).unwrap();
    refused(Some(file.into()), &claimed, "it is not a socket");
    // One end of a socket pair: the other end is never served.
    let (a, mut b) = UnixStream::pair().unwrap();
    refused(Some(a.into()), &claimed, "not listening");
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = b.write_all(&[0, 0, 0, 1, 11]);
    let mut buf = [0u8; 4];
    assert_eq!(
        b.read(&mut buf).unwrap_or(0),
        0,
        "the socket pair was served"
    );
    // A Unix stream socket, bound but not listening.
    {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let at = d.join("bound.sock");
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(&at).unwrap(),
        )
        .unwrap();
        refused(Some(fd), &at, "not listening");
    }
    // UDP, a Unix datagram socket, a listening TCP socket.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    refused(Some(udp.into()), &claimed, "not AF_UNIX");
    let dgram_at = d.join("dgram.sock");
    let dgram = std::os::unix::net::UnixDatagram::bind(&dgram_at).unwrap();
    refused(Some(dgram.into()), &dgram_at, "not SOCK_STREAM");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    refused(Some(tcp.into()), &claimed, "not AF_UNIX");
    // Nothing listens on the TCP port any more: the broker did not keep it.
    assert!(std::net::TcpStream::connect(("127.0.0.1", tcp_port)).is_err());
    // A listening Unix socket, but not bound where the client says.
    let real = d.join("real.sock");
    let l = std::os::unix::net::UnixListener::bind(&real).unwrap();
    refused(Some(l.into()), &claimed, "real.sock");
    assert_eq!(
        UnixStream::connect(&real).map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the broker kept the refused listener"
    );
    // No descriptor at all.
    refused(None, &claimed, "expected 1 descriptors");

    // Each was a denial; no exec started, no signature was made or asked for.
    assert_eq!(s.w.count("deny"), 8);
    assert_eq!(s.w.count("exec.start"), 0);
    assert!(s.signs().is_empty(), "{:?}", s.signs());
    // And the real aap-exec still works through the same broker.
    let o = run(&mut s.sh(&sid, "ssh-test", "ssh-add -L > keys"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        s.read("keys")
            .starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO")
    );
    assert_eq!(code(&s.w.audit_verify()), 0);
}
