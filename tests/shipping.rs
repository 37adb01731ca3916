//! Shipping the audit log with an existing shipper: the rsyslog snippets in `docs/shipping/`
//! run in two real `rsyslogd` processes. The sender follows a real aap audit log (made by the
//! real binaries) and forwards it over TCP on loopback; the receiver writes what it gets to a
//! file. Every line must arrive byte-identical and in order, so the received file verifies with
//! `aap audit verify` and has the same head hash.
//!
//! Skips, saying so, only when `rsyslogd` is not installed (`apt-get install rsyslog`).

mod common;

use common::world::{DB_PASSWORD, World};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shipped snippets, as an operator installs them.
const SENDER: &str = "docs/shipping/rsyslog-aap.conf";
const COLLECTOR: &str = "docs/shipping/rsyslog-collector.conf";

fn find_rsyslogd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("rsyslogd"))
        .find(|p| p.is_file())
}

/// A running `rsyslogd -n`; on drop it gets SIGTERM (by its own pid), then SIGKILL if it has
/// not exited within 5 s.
struct Rsyslogd {
    child: Child,
    stderr: PathBuf,
}

impl Rsyslogd {
    fn start(bin: &Path, dir: &Path) -> Rsyslogd {
        let stderr = dir.join("rsyslogd.stderr");
        let child = Command::new(bin)
            .args(["-n", "-f"])
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn rsyslogd");
        Rsyslogd { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("rsyslogd exited early ({st}): {}", self.log());
        }
    }
}

impl Drop for Rsyslogd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replace `from` (which must occur) by `to`, so a changed snippet cannot silently escape the
/// test's substitutions.
fn subst(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the snippet no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// A directory with `rsyslog.conf`: the test's own work directory, then the snippet.
fn daemon_dir(root: &Path, name: &str, snippet: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir.join("snippet.conf"), snippet);
    write(
        &dir.join("rsyslog.conf"),
        format!(
            "global(workDirectory=\"{}\")\ninclude(file=\"{}\")\n",
            dir.display(),
            dir.join("snippet.conf").display()
        ),
    );
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll until `f` holds, or fail after `limit` with `what` and the daemons' stderr.
fn wait_until(limit: Duration, what: &str, daemons: &mut [&mut Rsyslogd], f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        for d in daemons.iter_mut() {
            d.assert_running();
        }
        if t.elapsed() > limit {
            let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
            panic!("{what} after {limit:?}; rsyslogd said: {logs:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one file the collector wrote (it names a directory after the sending host).
fn received_file(out: &Path) -> Option<PathBuf> {
    let host_dir = std::fs::read_dir(out).ok()?.next()?.ok()?.path();
    let f = host_dir.join("audit.jsonl");
    f.is_file().then_some(f)
}

fn read(p: &Option<PathBuf>) -> Vec<u8> {
    p.as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .unwrap_or_default()
}

/// `valid, N events, head H` from `aap audit verify FILE`.
fn verify(w: &World, file: &Path) -> String {
    let o = run(w.aap(&["audit", "verify"]).arg(file));
    assert_eq!(
        code(&o),
        0,
        "aap audit verify {}: {}",
        file.display(),
        stderr(&o)
    );
    let out = stdout(&o);
    out.split_once(": ")
        .map_or(out.clone(), |(_, r)| r.trim().to_string())
}

#[test]
fn rsyslog_forwards_every_audit_line_byte_identical() {
    let Some(rsyslogd) = find_rsyslogd() else {
        missing_tool(
            "rsyslog_forwards_every_audit_line_byte_identical",
            "rsyslogd",
            "apt-get install -y rsyslog",
        );
        return;
    };
    let w = World::new();
    let log = w.path().join("audit.jsonl");

    // A real audit log before the shipper starts: a session, runs, a denial, and a run whose
    // argv (logged for tier medium) makes a line longer than rsyslog's default 8 KiB limit.
    let s = w.session(&["db-env", "db-fd"]);
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", "true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let long = "x".repeat(2000);
    let mut argv = vec!["sh", "-c", "true", "sh"];
    argv.extend(std::iter::repeat_n(long.as_str(), 7));
    let o = run(&mut w.exec_in(&s, "db-env", &argv));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(&mut w.exec_in(&s, "claude-only", &["true"]));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    let before = std::fs::read_to_string(&log).unwrap();
    assert!(
        before.lines().any(|l| l.len() > 8192),
        "no audit line is over 8 KiB"
    );

    // The collector, from the shipped snippet, on loopback and writing into the test's dir.
    let port = free_port().to_string();
    let out = w.path().join("central");
    let collector_conf = std::fs::read_to_string(repo().join(COLLECTOR)).unwrap();
    let collector_conf = subst(
        &collector_conf,
        "input(type=\"imtcp\" Port=\"10514\"",
        &format!("input(type=\"imtcp\" Address=\"127.0.0.1\" Port=\"{port}\""),
    );
    let collector_conf = subst(
        &collector_conf,
        "/var/log/aap-central/",
        &format!("{}/", out.display()),
    );
    let mut receiver = Rsyslogd::start(
        &rsyslogd,
        &daemon_dir(w.path(), "collector", &collector_conf),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_until(
        Duration::from_secs(20),
        "the collector never listened",
        &mut [&mut receiver],
        || std::net::TcpStream::connect(&addr).is_ok(),
    );

    // The sender, from the shipped snippet, following the test's audit log.
    let sender_conf = std::fs::read_to_string(repo().join(SENDER)).unwrap();
    let sender_conf = subst(
        &sender_conf,
        "/var/log/aap/audit.jsonl",
        &log.display().to_string(),
    );
    let sender_conf = subst(&sender_conf, "collector.example.org", "127.0.0.1");
    let sender_conf = subst(&sender_conf, "Port=\"10514\"", &format!("Port=\"{port}\""));
    let mut sender = Rsyslogd::start(&rsyslogd, &daemon_dir(w.path(), "sender", &sender_conf));

    let limit = Duration::from_secs(30);
    wait_until(
        limit,
        "the lines written before the shipper started never all arrived",
        &mut [&mut receiver, &mut sender],
        || read(&received_file(&out)) == before.as_bytes(),
    );

    // Lines appended while the shipper runs follow: more runs, a revocation.
    let o = run(&mut w.exec_in(
        &s,
        "db-fd",
        &["sh", "-c", "cat \"$DB_PASSWORD_FILE\" >/dev/null"],
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(&mut w.aap(&["session", "revoke", &s, "--reason", "shipping test done"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(&mut w.exec_in(&s, "db-env", &["true"]));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    let after = std::fs::read(&log).unwrap();
    assert!(after.len() > before.len());
    wait_until(
        limit,
        "the lines appended while the shipper ran never all arrived",
        &mut [&mut receiver, &mut sender],
        || read(&received_file(&out)) == after,
    );

    // Identical bytes, so the same chain: the central copy verifies on its own, with the same
    // number of events and the same head hash; and it holds no secret.
    let got = received_file(&out).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), after);
    assert_eq!(verify(&w, &got), verify(&w, &log));
    assert!(!String::from_utf8_lossy(&after).contains(DB_PASSWORD));
    for event in [
        "session.start",
        "exec.start",
        "exec.end",
        "deny",
        "session.revoke",
    ] {
        assert!(w.count(event) > 0, "the shipped log has no {event} event");
    }
    drop(sender);
    drop(receiver);
}
