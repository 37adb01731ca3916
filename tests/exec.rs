//! `aap-exec` end to end with real processes: a real dev-server on loopback (HTTPS with its
//! throwaway CA), real ssh-keygen-signed grants, real children.

mod common;
#[path = "common/grants.rs"]
mod grants;

use common::world::{DB_PASSWORD, World};
use common::*;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn env_secret_reaches_the_child_only() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    let o = run(&mut w.exec_in(
        &s,
        "db-env",
        &[
            "sh",
            "-c",
            "printf '%s' \"$DB_PASSWORD\" > got; env > env.txt",
        ],
    ));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(w.path().join("got")).unwrap(),
        DB_PASSWORD
    );
    let env = std::fs::read_to_string(w.path().join("env.txt")).unwrap();
    // aap's own variables and the identity variables never pass through; the marker does.
    assert!(!env.contains("AAP_CONFIG="), "{env}");
    assert!(env.contains("AAP_EXEC_INVOCATION="), "{env}");
    std::fs::remove_file(w.path().join("got")).unwrap();
    std::fs::remove_file(w.path().join("env.txt")).unwrap();
    assert_no_leak(
        &[DB_PASSWORD.to_string()],
        &format!("{}{}", stdout(&o), stderr(&o)),
        w.path(),
    );
}

#[test]
fn fd_secret_is_a_sealed_memfd_readable_at_dev_fd() {
    let w = World::new();
    let s = w.session(&["db-fd"]);
    let script = "set -e; test -z \"${DB_PASSWORD:-}\"; case \"$DB_PASSWORD_FILE\" in /dev/fd/*) ;; *) exit 9;; esac; \
                  cat \"$DB_PASSWORD_FILE\" > got; cat \"$DB_PASSWORD_FILE\" >> got; \
                  readlink \"$DB_PASSWORD_FILE\" > link; ls /proc/self/fd > fds; \
                  if printf x >> \"$DB_PASSWORD_FILE\"; then exit 7; fi";
    let o = run(&mut w.exec_in(&s, "db-fd", &["sh", "-c", script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Readable twice (each open of /dev/fd/N starts at 0), and not writable (sealed).
    assert_eq!(
        std::fs::read_to_string(w.path().join("got")).unwrap(),
        format!("{DB_PASSWORD}{DB_PASSWORD}")
    );
    let link = std::fs::read_to_string(w.path().join("link")).unwrap();
    assert!(link.starts_with("/memfd:aap-secret"), "not a memfd: {link}");
    // The child holds stdio, the memfd, and whatever `ls` itself opens: no descriptor of the
    // wrapper (audit log, signalfd, TLS socket) leaked into it.
    let fds: Vec<i32> = std::fs::read_to_string(w.path().join("fds"))
        .unwrap()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        fds.len() <= 5,
        "unexpected descriptors in the child: {fds:?}"
    );
}

#[test]
fn a_descriptor_the_caller_left_open_does_not_reach_the_child() {
    let w = World::new();
    let s = w.session(&["db-fd"]);
    let inner = w.exec_in(&s, "db-fd", &["sh", "-c", "ls /proc/self/fd > fds"]);
    // The caller opens descriptor 7 without close-on-exec, then becomes aap-exec.
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg("exec 7</etc/hostname; exec \"$0\" \"$@\"")
        .arg(inner.get_program())
        .args(inner.get_args())
        .current_dir(inner.get_current_dir().unwrap_or(w.path()));
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let o = run(&mut c);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let fds: Vec<i32> = std::fs::read_to_string(w.path().join("fds"))
        .unwrap()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        !fds.contains(&7),
        "the caller's descriptor 7 leaked: {fds:?}"
    );
}

#[test]
fn no_secret_in_cmdline_state_audit_tmp_or_trace_output() {
    let w = World::new();
    let s = w.session(&["db-env", "db-fd"]);
    let o = run(w
        .exec_in(&s, "db-env", &["sh", "-c", "cat /proc/self/cmdline /proc/$PPID/cmdline > cmdlines; cat /proc/$PPID/environ > parent-env 2>/dev/null || true"])
        .env("AAP_LOG", "trace"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("TRACE") || stderr(&o).contains("DEBUG"),
        "trace logging was not on: {}",
        stderr(&o)
    );
    let o2 = run(w.exec_in(&s, "db-fd", &["true"]).env("AAP_LOG", "trace"));
    assert_eq!(code(&o2), 0, "{}", stderr(&o2));
    // The wrapper's own environment never held the secret (only the child's does).
    let text = format!("{}{}{}{}", stdout(&o), stderr(&o), stdout(&o2), stderr(&o2));
    assert_no_leak(&[DB_PASSWORD.to_string()], &text, w.path());
}

#[test]
fn exit_codes_propagate() {
    let w = World::new();
    let s = w.session(&["db-low"]);
    for c in [0, 1, 42, 255] {
        let o = run(&mut w.exec_in(&s, "db-low", &["sh", "-c", &format!("exit {c}")]));
        assert_eq!(code(&o), c, "{}", stderr(&o));
    }
    assert_eq!(w.count("exec.end"), 4);
}

#[test]
fn death_by_signal_is_shell_visible() {
    let w = World::new();
    let s = w.session(&["db-low"]);
    for (sig, n) in [("KILL", 9), ("SEGV", 11)] {
        // Direct: the wrapper re-raises the child's signal on itself.
        let o = run(&mut w.exec_in(&s, "db-low", &["sh", "-c", &format!("kill -{sig} $$")]));
        assert_eq!(o.status.signal(), Some(n), "{:?} {}", o.status, stderr(&o));
        // Through a shell: $? is 128+N, as if the child had run directly.
        let line = format!(
            "AAP_CONFIG={} {} --session {s} db-low -- sh -c 'kill -{sig} $$'; echo status=$?",
            w.config.display(),
            AAP_EXEC
        );
        let o = run(cmd("/bin/sh", w.path()).args(["-c", &line]));
        assert_eq!(stdout(&o).trim(), format!("status={}", 128 + n));
    }
    let ends: Vec<_> = w
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "exec.end")
        .collect();
    assert_eq!(ends.len(), 4);
    assert_eq!(ends[0]["signal"], 9);
    assert_eq!(ends[2]["signal"], 11);
}

fn signal_reaches_child(signame: &str, signo: i32, expect_code: i32) {
    let w = World::new();
    let s = w.session(&["db-low"]);
    let script = "trap 'echo TERM > got; exit 3' TERM; trap 'echo INT > got; exit 4' INT; touch ready; while :; do sleep 0.05; done";
    // Like a shell job: the wrapper and its child in their own process group.
    let mut child = w
        .exec_in(&s, "db-low", &["sh", "-c", script])
        .process_group(0)
        .spawn()
        .unwrap();
    wait_for(&w.path().join("ready"));
    let st = std::process::Command::new("kill")
        .args([&format!("-{signo}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!(
                "SIG{signame} sent to the wrapper never reached the child (no exit within 20 s)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(expect_code), "{status:?}");
    assert_eq!(
        std::fs::read_to_string(w.path().join("got"))
            .unwrap()
            .trim(),
        signame
    );
}

#[test]
fn sigterm_reaches_the_child() {
    signal_reaches_child("TERM", 15, 3);
}

#[test]
fn sigint_reaches_the_child() {
    signal_reaches_child("INT", 2, 4);
}

/// Assert: exit 77 (or `want`), the child never started, and one more `deny` audit line.
fn assert_denied(w: &World, mut c: std::process::Command, want: i32, msg: &str) -> String {
    let before = w.count("deny");
    let _ = std::fs::remove_file(w.path().join("started"));
    let o = run(&mut c);
    let err = stderr(&o);
    assert_eq!(code(&o), want, "{err}");
    assert!(!w.path().join("started").exists(), "the child ran");
    assert!(err.contains(msg), "expected {msg:?} in: {err}");
    assert!(err.contains("aap-exec: hint: "), "no hint: {err}");
    assert_eq!(w.count("deny"), before + 1, "no deny audit line for: {err}");
    err
}

#[test]
fn denials_start_no_child_and_are_audited() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    let touch = ["sh", "-c", "touch started"];
    // No session at all.
    let mut c = w.exec(&["db-env", "--"]);
    c.args(touch);
    let err = assert_denied(&w, c, 77, "neither --session nor AAP_SESSION is set");
    assert!(
        err.contains("aap session start --agent codex --cap db-env"),
        "{err}"
    );
    // Malformed and path-traversal ids.
    for bad in ["../../etc/passwd", "not-a-ulid", "/abs", &"7".repeat(300)] {
        assert_denied(&w, w.exec_in(bad, "db-env", &touch), 77, "");
    }
    // Unknown session.
    assert_denied(
        &w,
        w.exec_in("01ARZ3NDEKTSV4RRFFQ69G5FAV", "db-env", &touch),
        77,
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
    );
    // Not granted in this session: the hint asks for it, and names the operator's command.
    let err = assert_denied(&w, w.exec_in(&s, "db-fd", &touch), 77, "db-fd");
    assert!(
        err.contains(&format!("aap request --session {s} db-fd --reason '...' --wait   (the operator adds it with: aap session approve {s} --cap db-fd)")),
        "{err}"
    );
    // Not in the catalog.
    assert_denied(&w, w.exec_in(&s, "no-such-cap", &touch), 77, "no-such-cap");
    // allowed_commands: a program that is not `sh` from the trusted path.
    let s2 = w.session(&["db-sh-only"]);
    assert_denied(
        &w,
        w.exec_in(&s2, "db-sh-only", &["/usr/bin/env", "touch", "started"]),
        77,
        "may only be used by sh",
    );
    // A copy of sh outside the trusted path does not count either.
    std::fs::copy("/bin/sh", w.path().join("sh")).unwrap();
    assert_denied(
        &w,
        w.exec_in(&s2, "db-sh-only", &["./sh", "-c", "touch started"]),
        77,
        "may only be used by sh",
    );
    // ... but the real one works, and gets no loader or shell-startup variables of the caller.
    let o = run(w
        .exec_in(&s2, "db-sh-only", &["sh", "-c", "env > hardened-env"])
        .env("LD_PRELOAD", "/nonexistent/evil.so")
        .env("BASH_ENV", "/tmp/evil")
        .env("GIT_SSH_COMMAND", "evil")
        .env("HARMLESS", "kept"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let env = std::fs::read_to_string(w.path().join("hardened-env")).unwrap();
    assert!(env.contains("HARMLESS=kept"), "{env}");
    for bad in ["LD_PRELOAD=", "BASH_ENV=", "GIT_SSH_COMMAND="] {
        assert!(!env.contains(bad), "{bad} reached the child: {env}");
    }
    // Revoked.
    let o = run(&mut w.aap(&["session", "revoke", &s, "--reason", "test"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_denied(&w, w.exec_in(&s, "db-env", &touch), 77, "revoked");
    // Audit log still verifies after all of it.
    assert_eq!(code(&w.audit_verify()), 0);
}

#[test]
fn command_not_found_and_not_executable() {
    let w = World::new();
    let s = w.session(&["db-low"]);
    assert_denied(
        &w,
        w.exec_in(&s, "db-low", &["no-such-program-aap"]),
        127,
        "command not found: no-such-program-aap",
    );
    write(&w.path().join("script"), "#!/bin/sh\ntouch started\n");
    assert_denied(
        &w,
        w.exec_in(&s, "db-low", &["./script"]),
        126,
        "permission denied",
    );
    assert_denied(
        &w,
        w.exec_in(&s, "db-low", &["/tmp"]),
        126,
        "is a directory",
    );
}

#[test]
fn infisical_unavailable_gives_69_and_no_child() {
    // Down: the server is gone.
    let mut w = World::new();
    let s = w.session(&["db-env"]);
    let _ = w.server.child.kill();
    let _ = w.server.child.wait();
    assert_denied(
        &w,
        w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]),
        69,
        "",
    );

    // Answering 500 on every attempt.
    let w = World::new();
    let s = w.session(&["db-env"]);
    w.server
        .faults(serde_json::json!({ "fail_next": 10, "fail_status": 500 }));
    assert_denied(
        &w,
        w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]),
        69,
        "500",
    );

    // Slower than the configured timeout.
    let w = World::with(&["--tls"], "  timeout: 1s\n");
    let s = w.session(&["db-env"]);
    w.server.faults(serde_json::json!({ "latency_ms": 3000 }));
    assert_denied(
        &w,
        w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]),
        69,
        "",
    );
}

#[test]
fn unknown_secret_is_a_config_error() {
    let w = World::new();
    let s = w.session(&["missing-secret"]);
    assert_denied(
        &w,
        w.exec_in(&s, "missing-secret", &["sh", "-c", "touch started"]),
        78,
        "NOPE",
    );
}

#[test]
fn unwritable_audit_log_runs_nothing() {
    // A directory where the log should be: the broker, the log's only writer, refuses to
    // start, so aap-exec has nobody to ask and runs nothing. (A log that fails while the broker
    // runs: the full-disk case below.)
    let mut w = World::new();
    let s = w.session(&["db-env"]);
    w.broker = None;
    std::fs::rename(w.path().join("audit.jsonl"), w.path().join("audit.old")).unwrap();
    std::fs::create_dir(w.path().join("audit.jsonl")).unwrap();
    let started = aap::broker::Spawned::start(
        Path::new(AAP),
        &w.config,
        &w.path().join("broker.sock"),
        None,
    );
    assert!(started.is_err(), "a broker started without an audit log");
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]));
    assert_eq!(code(&o), 69, "{}", stderr(&o));
    assert!(
        !w.path().join("started").exists(),
        "the child ran without an audit log"
    );
    // What the broker says when it cannot open the log.
    let o = run(w
        .aap(&["broker", "--socket"])
        .arg(w.path().join("broker.sock")));
    assert_fails(&o, 65, "cannot open the audit log");

    // A full disk: a tiny tmpfs (needs root and mount(2); skipped otherwise, saying why).
    let w = World::new();
    let s = w.session(&["db-env"]);
    let mnt = w.path().join("full");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8k"])
        .arg("tmpfs")
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip(
            "full-disk case",
            "cannot mount a tmpfs here (not root, or no mount permission)",
        );
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    // Fill it, then point the audit log into it.
    let _ = std::fs::write(mnt.join("filler"), vec![b'x'; 64 * 1024]);
    let cfg = std::fs::read_to_string(&w.config)
        .unwrap()
        .replace("audit_log: audit.jsonl", "audit_log: full/audit.jsonl");
    write(&w.config, cfg);
    // The broker reads its config at start: a new one for the new log.
    let mut w = w;
    w.start_broker();
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]));
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(
        !w.path().join("started").exists(),
        "the child ran without an audit log"
    );
    assert!(stderr(&o).contains("audit"), "{}", stderr(&o));
}

#[test]
fn nesting_is_refused_unless_allowed() {
    let w = World::new();
    let s = w.session(&["db-env", "db-nested"]);
    let inner = format!(
        "AAP_CONFIG={} {AAP_EXEC} --session {s} db-env -- sh -c 'touch started'",
        w.config.display()
    );
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", &inner]));
    assert_fails(&o, 77, "nesting `db-env` inside it is refused");
    assert!(!w.path().join("started").exists());
    let inner = format!(
        "AAP_CONFIG={} {AAP_EXEC} --session {s} db-nested -- sh -c 'touch started'",
        w.config.display()
    );
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", &inner]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(w.path().join("started").exists());
}

#[test]
fn two_hundred_concurrent_invocations() {
    let w = World::new();
    let s = w.session(&["db-fd"]);
    let children: Vec<_> = (0..200)
        .map(|i| {
            w.exec_in(
                &s,
                "db-fd",
                &["sh", "-c", &format!("cat \"$DB_PASSWORD_FILE\" > out.{i}")],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert_eq!(code(&o), 0, "invocation {i}: {}", stderr(&o));
        assert_eq!(
            std::fs::read_to_string(w.path().join(format!("out.{i}"))).unwrap(),
            DB_PASSWORD
        );
    }
    let v = w.audit_verify();
    assert_eq!(code(&v), 0, "{}", stderr(&v));
    assert_eq!(w.count("exec.start") + w.count("exec.end"), 400);
}

#[test]
fn usage_errors() {
    let w = World::new();
    let o = run(&mut w.exec(&["db-env"]));
    assert_eq!(code(&o), 78);
    assert_eq!(
        stderr(&o),
        "aap-exec: error: no command given after `db-env --`\naap-exec: hint: name the program to run after `--`, as in: aap-exec db-env -- git fetch\n"
    );
}

#[test]
fn validated_catalog_marker_is_bound_to_the_catalog_bytes() {
    let w = World::new();
    let s = w.session(&["db-low"]);
    let o = run(&mut w.exec_in(&s, "db-low", &["true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let marker = w.path().join("state/cache/catalog-validated");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().len(),
        64,
        "no validation marker written"
    );
    // An edit only the JSON Schema catches (an empty description): the bytes changed, so the
    // marker no longer matches and the full validation runs and refuses.
    let cat = std::fs::read_to_string(w.path().join("catalog.yaml")).unwrap();
    write(
        &w.path().join("catalog.yaml"),
        cat.replace("description: For another agent", "description: \"\""),
    );
    let o = run(&mut w.exec_in(&s, "db-low", &["sh", "-c", "touch started"]));
    assert_fails(&o, 78, "capability `claude-only`");
    assert!(!w.path().join("started").exists());
    // Restored bytes match the marker again.
    write(&w.path().join("catalog.yaml"), cat);
    let o = run(&mut w.exec_in(&s, "db-low", &["true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_symlinked_validation_marker_is_not_trusted() {
    let w = World::new();
    let s = w.session(&["db-low"]);
    // A catalog only the JSON Schema refuses, and a marker for exactly its bytes, reached
    // through a symlink: read like every state file, the link is refused, so the full
    // validation runs and refuses.
    let cat = std::fs::read_to_string(w.path().join("catalog.yaml")).unwrap();
    let bad = cat.replace("description: For another agent", "description: \"\"");
    write(&w.path().join("catalog.yaml"), &bad);
    let elsewhere = w.path().join("forged-marker");
    write(&elsewhere, aap::catalog::validation_digest(&bad));
    let cache = w.path().join("state/cache");
    std::fs::create_dir_all(&cache).unwrap();
    let marker = cache.join("catalog-validated");
    let _ = std::fs::remove_file(&marker);
    std::os::unix::fs::symlink(&elsewhere, &marker).unwrap();
    let o = run(&mut w.exec_in(&s, "db-low", &["sh", "-c", "touch started"]));
    assert_fails(&o, 78, "capability `claude-only`");
    assert!(!w.path().join("started").exists());
}

#[test]
fn catalog_check_of_the_configs_catalog_records_the_validation() {
    let w = World::new();
    let marker = w.path().join("state/cache/catalog-validated");
    // Never creates the state dir: whoever ran first would own it.
    let o = run(&mut w.aap(&["catalog", "check"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!w.path().join("state").exists());
    w.session(&["db-low"]);
    let _ = std::fs::remove_file(&marker);
    // An explicit FILE is checked but not recorded: it may not be the catalog aap-exec reads.
    let o = run(&mut w.aap(&["catalog", "check", "catalog.yaml"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!marker.exists());
    let o = run(&mut w.aap(&["catalog", "check"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let cat = std::fs::read_to_string(w.path().join("catalog.yaml")).unwrap();
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        aap::catalog::validation_digest(&cat)
    );
}

#[test]
fn a_request_file_not_owned_by_the_broker_is_refused_as_forged() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    let o = run(&mut w.aap(&[
        "request",
        "db-fd",
        "--reason",
        "need the file form",
        "--session",
        &s,
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("the operator approves it with: aap approve "))
        .unwrap()
        .trim()
        .to_string();
    // The broker wrote it, into a requests/ only it may write.
    let dir = w.path().join("state/requests");
    let file = dir.join(format!("{rid}.json"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o022, 0);
    let broker_uid = std::fs::metadata(&dir).unwrap().uid();
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), broker_uid);
    // A request file owned by anyone else is a forgery.
    std::os::unix::fs::lchown(&file, Some(4242), None).unwrap();
    let o = run(&mut w.aap(&["approve", &rid]));
    assert_fails(&o, 77, "refusing a forged request");
    // So is any request in a requests/ others may write.
    std::os::unix::fs::lchown(&file, Some(broker_uid), None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let o = run(&mut w.aap(&["approve", &rid]));
    assert_fails(&o, 77, "may be forged");
    // The broker's own request, in its own directory, is approved.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let o = run(&mut w.aap(&["approve", &rid]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn every_grant_denial_kind_starts_no_child_through_aap_exec() {
    let w = World::new();
    let _ = w.session(&["db-env"]); // creates state/grants
    let grants_dir = w.path().join("state/grants");
    let key = w.path().join("operator");
    let put = |id: &str, json: &[u8], sig: &[u8]| {
        write(&grants_dir.join(format!("{id}.grant")), json);
        write(&grants_dir.join(format!("{id}.grant.sig")), sig);
    };
    let touch = ["sh", "-c", "touch started"];
    let signed = |json: &str, k: &Path| grants::ssh_sign(k, "aap-grant", json.as_bytes());
    // Grants as aap writes them, naming this world's operator principal.
    let grant = |id: &str, nbf: i64, exp: i64, hosts: &[&str]| {
        grants::grant_json(id, "codex", &["db-env"], nbf, exp, hosts)
            .replace(grants::OPERATOR, "operator@aap")
    };

    // Expired, and not yet valid: well-formed grants, correctly signed.
    let id = grants::new_id();
    let g = grant(&id, -7200, -3600, &[]);
    put(&id, g.as_bytes(), &signed(&g, &key));
    assert_denied(&w, w.exec_in(&id, "db-env", &touch), 77, "expired");
    let id = grants::new_id();
    let g = grant(&id, 3600, 7200, &[]);
    put(&id, g.as_bytes(), &signed(&g, &key));
    assert_denied(&w, w.exec_in(&id, "db-env", &touch), 77, "not valid");

    // A flipped byte in a signed grant: the signature no longer verifies.
    let id = grants::new_id();
    let g = grant(&id, -60, 3600, &[]);
    let sig = signed(&g, &key);
    put(&id, g.replace("\"db-env\"", "\"db-fd\"").as_bytes(), &sig);
    assert_denied(&w, w.exec_in(&id, "db-fd", &touch), 77, "signature");

    // Signed by a key that is not in allowed_signers.
    let other = w.path().join("intruder");
    grants::keygen(&other, "ed25519", None);
    let id = grants::new_id();
    let g = grant(&id, -60, 3600, &[]);
    put(&id, g.as_bytes(), &signed(&g, &other));
    assert_denied(&w, w.exec_in(&id, "db-env", &touch), 77, "allowed_signers");

    // Granted for another host only.
    let id = grants::new_id();
    let g = grant(&id, -60, 3600, &["elsewhere.example.org"]);
    put(&id, g.as_bytes(), &signed(&g, &key));
    assert_denied(
        &w,
        w.exec_in(&id, "db-env", &touch),
        77,
        "elsewhere.example.org",
    );

    // The config maps codex to another uid: the caller's uid is no agent at all.
    let good = w.session(&["db-env"]);
    let cfg = std::fs::read_to_string(&w.config).unwrap();
    let me = format!("uid: {}", nix::unistd::getuid());
    write(&w.config, cfg.replace(&me, "uid: 4242"));
    let mut w = w;
    w.start_broker();
    let err = assert_denied(
        &w,
        w.exec_in(&good, "db-env", &touch),
        77,
        "is not an agent",
    );
    assert!(err.contains("agents.<name>.uid"), "{err}");
    write(&w.config, cfg);
    w.start_broker();
    let o = run(&mut w.exec_in(&good, "db-env", &["true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn infisicals_rate_limit_is_waited_out_and_the_agent_told_once() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    // The recorded unlicensed answer (500 + retry-after + x-ratelimit-remaining: 0), 1 s.
    w.server
        .faults(serde_json::json!({ "rate_limit_next": 1, "retry_after": 1 }));
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", "exit 3"]));
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let line = "aap-exec: waiting 1 s for Infisical's rate limit\n";
    assert_eq!(stderr(&o).matches(line).count(), 1, "{}", stderr(&o));
    // A wait longer than infisical.timeout: 69, naming the wait, and no child.
    w.server
        .faults(serde_json::json!({ "rate_limit_next": 1, "retry_after": 58 }));
    assert_denied(
        &w,
        w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]),
        69,
        "asks to wait 58 s",
    );
}

#[test]
fn a_warm_broker_makes_one_secret_read_per_exec_on_one_connection() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    let mut before = w.server.stats();
    for round in 0..2 {
        let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", "exit 3"]));
        assert_eq!(code(&o), 3, "{}", stderr(&o));
        let after = w.server.stats();
        let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        // The broker keeps the agent identity's token (in memory) and reuses it: one login
        // for the first exec, none after; every exec reads the secret; nothing is revoked
        // per exec.
        assert_eq!(delta("logins"), if round == 0 { 1 } else { 0 }, "{after}");
        assert_eq!(delta("secret_reads"), 1, "{after}");
        assert_eq!(delta("revokes"), 0, "{after}");
        if round == 1 {
            // One request, on the kept-alive connection (the stats call is the new one).
            assert_eq!(delta("requests"), 1, "{after}");
            assert_eq!(delta("connections"), 1, "{after}");
        }
        before = after;
    }
}

#[test]
fn a_killed_broker_leaves_the_child_running_and_its_successor_records_the_end() {
    let mut w = World::new();
    let s = w.session(&["db-env"]);
    let child = w
        .exec_in(
            &s,
            "db-env",
            &["sh", "-c", "touch started; sleep 1; exit 7"],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&w.path().join("started"));
    // The broker dies while the child runs.
    w.broker.as_mut().unwrap().kill();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 7, "the child's status stands: {err}");
    assert!(
        err.contains("did not confirm that the end of this run was recorded"),
        "{err}"
    );
    let starts = w.audit_lines();
    let inv = starts
        .iter()
        .rev()
        .find(|l| l["event"] == "exec.start")
        .unwrap()["invocation"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !starts
            .iter()
            .any(|l| l["event"] == "exec.end" && l["invocation"] == inv.as_str()),
        "no end could be written by a dead broker"
    );
    // Its successor writes exec.end (outcome unknown) for the run it never saw end.
    w.start_broker();
    let end = w
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.end" && l["invocation"] == inv.as_str())
        .expect("exec.end from the restarted broker");
    assert_eq!(end["outcome"], "unknown", "{end}");
    assert_eq!(code(&w.audit_verify()), 0);
    // And only once: another restart adds nothing.
    let n = w.count("exec.end");
    w.start_broker();
    assert_eq!(w.count("exec.end"), n);
}

#[test]
fn without_a_broker_aap_exec_exits_69_naming_how_to_start_it() {
    let mut w = World::new();
    let s = w.session(&["db-env"]);
    w.broker = None;
    let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", "touch started"]));
    assert_fails(&o, 69, "cannot reach the aap broker");
    assert!(
        stderr(&o).contains("systemctl start aap-broker.socket")
            && stderr(&o).contains("aap broker --socket"),
        "{}",
        stderr(&o)
    );
    assert!(!w.path().join("started").exists());
}

/// The broker refuses to start on a config it could not enforce, saying what to change.
#[test]
fn the_broker_refuses_to_start_on_exposed_identities_and_ambiguous_agents() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let start = |w: &World| {
        run(w
            .aap(&["broker", "--socket"])
            .arg(w.path().join("other.sock")))
    };
    // A client secret any local user may read.
    let secret = w.path().join("identity/client_secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = start(&w);
    assert_fails(&o, 78, "is readable by any local user");
    assert!(stderr(&o).contains("chmod 0400"), "{}", stderr(&o));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = std::fs::read_to_string(&w.config).unwrap();
    // An agent without a uid: the broker could never map it.
    let me = format!("    uid: {}\n", nix::unistd::getuid());
    write(&w.config, cfg.replace(&me, ""));
    assert_fails(&start(&w), 78, "has no uid");
    // Two agents on one uid: neither could be told apart.
    write(
        &w.config,
        cfg.replace("agents:\n", &format!("agents:\n  claude:\n{me}")),
    );
    assert_fails(&start(&w), 78, "share uid");
    assert!(!w.path().join("other.sock").exists());
}

/// aap-exec blocks the signals it forwards; its child must start with none blocked or ignored
/// (else SIGTERM or ^C could never stop it), for the env and the fd form alike.
#[test]
fn the_child_starts_with_no_blocked_or_ignored_signals() {
    let w = World::new();
    let s = w.session(&["db-env", "db-fd"]);
    for cap in ["db-env", "db-fd"] {
        // grep itself is the child (a shell would reset its own mask and hide the fault).
        let o = run(&mut w.exec_in(
            &s,
            cap,
            &["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"],
        ));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let out = stdout(&o);
        let blk = out.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap();
        assert_eq!(
            u64::from_str_radix(blk.trim(), 16).unwrap(),
            0,
            "{cap}: {out}"
        );
        // SIGPIPE (bit 13), which std ignores in aap-exec, must not be ignored in the child.
        let ign = out.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap();
        let ign = u64::from_str_radix(ign.trim(), 16).unwrap();
        assert_eq!(ign & (1 << (13 - 1)), 0, "{cap}: SIGPIPE ignored: {out}");
    }
}

/// Issue 15, item 3: `aap session log ID` tells one session's story, argv at every tier.
#[test]
fn session_log_tells_what_the_agent_did_with_argv_at_every_tier() {
    let w = World::new();
    let id = w.session(&["db-low"]);
    let o = run(&mut w.exec_in(&id, "db-low", &["sh", "-c", "exit 3"]));
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let o = run(&mut w.exec_in(&id, "db-low", &["sh", "-c", "true", "a b"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(&mut w.exec_in(&id, "db-env", &["true"]));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    let o = run(w
        .aap(&["request", "db-env", "--reason", "need the env form"])
        .env("AAP_SESSION", &id));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    let o = run(&mut w.aap(&["approve", &rid]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Approved: aap-exec works at once.
    let o = run(&mut w.exec_in(&id, "db-env", &["sh", "-c", "test -n \"$DB_PASSWORD\""]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // A re-signing without a request.
    let o = run(&mut w.aap(&["session", "approve", &id, "--cap", "db-fd"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // argv is recorded at tier low too.
    let starts: Vec<_> = w
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "exec.start")
        .collect();
    assert_eq!(starts.len(), 3);
    assert_eq!(starts[0]["tier"], "low");
    assert_eq!(starts[0]["argv"], serde_json::json!(["sh", "-c", "exit 3"]));
    // An event kind this build does not know (a newer broker's) shows by its name, with its
    // fields. (Real ssh.sign and http.request lines: tests/backings_ssh.rs and
    // tests/backings_git.rs.)
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(w.path().join("audit.jsonl"))
        .unwrap();
    use std::io::Write;
    writeln!(
        log,
        r#"{{"v":1,"id":"01JD0000000000000000000000","ts":"2099-01-01T00:00:00.000Z","event":"future.event","session":"{id}","agent":"codex","uid":1,"host":"h","capability":"ssh-x","outcome":"ok","destination":"vps1000.example.org","prev":"x"}}"#
    )
    .unwrap();
    drop(log);
    let o = run(&mut w.aap(&["session", "log", &id]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "granted",
        "sh -c 'exit 3'  exit 3  in ",
        "sh -c true 'a b'  exit 0  in ",
        "DENIED           db-env                        true  denied",
        "requested        db-env",
        "reason=\"need the env form\"",
        "approved         db-env",
        "re-signed        db-fd",
        "future.event     ssh-x",
        "destination=vps1000.example.org",
        "3 exec(s), 1 not ending in exit 0; 1 denial(s); 1 request(s)\n",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // exec.end lines are joined to their start, not shown twice.
    assert_eq!(out.matches("exec ").count(), 3, "{out}");
    let o = run(&mut w.aap(&["session", "log", &id, "--json"]));
    assert!(
        stdout(&o).lines().all(|l| l.contains(&id)),
        "{}",
        stdout(&o)
    );
    // `aap audit tail` shows argv too.
    let o = run(&mut w.aap(&["audit", "tail", "-n", "50"]));
    assert!(
        stdout(&o).contains(r#"argv="sh -c 'exit 3'""#),
        "{}",
        stdout(&o)
    );
}

/// Issue 15, item 4: `aap-exec --check CAP -- CMD` gives the verdict a run would, command
/// included, and fetches nothing; `aap-exec --list --json`.
#[test]
fn check_with_a_command_gives_the_runs_verdict_without_fetching() {
    let w = World::new();
    let id = w.session(&["db-sh-only", "db-env"]);
    let check = |cap: &str, argv: &[&str]| {
        let mut c = w.exec(&["--session", &id, "--check", cap, "--"]);
        c.args(argv);
        run(&mut c)
    };
    let reads = |w: &World| w.server.stats()["secret_reads"].as_u64().unwrap();
    let before = reads(&w);
    let o = check("db-sh-only", &["sh", "-c", "true"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("allowed: sh -c true would run /"),
        "{}",
        stdout(&o)
    );
    // Refused commands: the same exit code and message as the run itself.
    for (cap, argv) in [
        ("db-sh-only", &["cat", "/etc/hostname"][..]),
        ("db-env", &["no-such-command-aap-test"][..]),
    ] {
        let checked = check(cap, argv);
        let ran = run(&mut w.exec_in(&id, cap, argv));
        assert_ne!(code(&ran), 0, "{}", stderr(&ran));
        assert_eq!(code(&checked), code(&ran), "{}", stderr(&checked));
        // (A loaded machine may add a "waiting for the broker" line to either: common::verdict.)
        assert_eq!(verdict(&checked), verdict(&ran));
    }
    // Without a command, only the grant is judged, as before.
    assert_eq!(
        code(&run(&mut w.exec(&[
            "--session",
            &id,
            "--check",
            "db-sh-only"
        ]))),
        0
    );
    assert_eq!(reads(&w), before, "a check fetched a secret");

    let o = run(&mut w.exec(&["--session", &id, "--list", "--json"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["session"], id.as_str());
    assert_eq!(v["agent"], "codex");
    let caps = v["capabilities"].as_array().unwrap();
    let sh_only = caps.iter().find(|c| c["id"] == "db-sh-only").unwrap();
    assert_eq!(sh_only["usable"], true);
    assert_eq!(sh_only["allowed_commands"], serde_json::json!(["sh"]));
    assert!(sh_only["left_secs"].as_u64().unwrap() > 3000);
    assert_eq!(
        code(&run(&mut w.exec(&["--json"]))),
        2,
        "--json needs --list"
    );
}

/// Issue 15, item 8: a slow Infisical or a slow broker is said once on stderr, a fast run says
/// nothing.
#[test]
fn a_wait_longer_than_a_second_is_said_once_and_a_fast_run_says_nothing() {
    let w = World::with(&["--tls", "--latency-ms", "1500"], "");
    let id = w.session(&["db-env"]);
    let o = run(&mut w.exec_in(&id, "db-env", &["sh", "-c", "test -n \"$DB_PASSWORD\""]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stderr(&o)
            .matches("aap-exec: waiting for Infisical (1 s)...")
            .count(),
        1,
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stderr(&o).matches("waiting for").count(),
        1,
        "{}",
        stderr(&o)
    );

    let w = World::new();
    let id = w.session(&["db-env"]);
    let argv = ["sh", "-c", "test -n \"$DB_PASSWORD\""];
    // The first run warms the broker (catalog, login); the second is the fast one.
    assert_eq!(code(&run(&mut w.exec_in(&id, "db-env", &argv))), 0);
    let o = run(&mut w.exec_in(&id, "db-env", &argv));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stderr(&o).contains("waiting for"), "{}", stderr(&o));

    // A stopped broker: the client says it waits for the broker, once.
    let pid = w.broker.as_ref().unwrap().pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    // The stop is delivered asynchronously: wait until the kernel shows the broker stopped, or
    // the client may be answered before it is.
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    };
    let t0 = std::time::Instant::now();
    while !stopped() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "the broker never stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let child = w
        .exec_in(&id, "db-env", &argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1600));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stderr(&o)
            .matches("aap-exec: waiting for the broker (1 s)...")
            .count(),
        1,
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stderr(&o).matches("waiting for").count(),
        1,
        "{}",
        stderr(&o)
    );
}

/// aap-exec starts once for every command an agent runs, so what it links is checked here:
/// no TLS, HTTP, async runtime, YAML or schema code (the broker does all that), no shared
/// libgcc_s (its constructor's CPUID instructions trap on a VM; build.rs links the unwinder in
/// statically when the compiler has it), position-dependent (no start-up relocations), and
/// static when the compiler has libc.a (no loader at all).
#[test]
fn aap_exec_links_no_http_tls_yaml_or_libgcc_s_and_is_position_dependent() {
    let tool = |t: &str, args: &[&str]| -> Option<String> {
        match std::process::Command::new(t).args(args).output() {
            Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(o) => panic!(
                "{t} {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => None,
        }
    };
    let Some(symbols) = tool("nm", &["-C", AAP_EXEC]) else {
        return missing_tool(
            "aap_exec_links_no_http",
            "nm",
            "apt-get install -y binutils",
        );
    };
    // A crate's symbols start with its path (`rustls::...`, `<hyper::...`); serde_yaml covers
    // serde_yaml_ng.
    for crate_name in [
        "rustls",
        "reqwest",
        "hyper",
        "tokio",
        "serde_yaml",
        "jsonschema",
        "ring",
    ] {
        let hits: Vec<&str> = symbols
            .lines()
            .filter(|l| {
                [" ", "<", "&"].iter().any(|b| {
                    l.contains(&format!("{b}{crate_name}::"))
                        || l.contains(&format!("{b}{crate_name}_"))
                })
            })
            .take(3)
            .collect();
        assert!(hits.is_empty(), "aap-exec links {crate_name}: {hits:?}");
    }
    let dynamic = tool("readelf", &["-h", "-d", AAP_EXEC]).expect("readelf (binutils, as nm)");
    assert!(
        dynamic.contains("EXEC (Executable file)"),
        "aap-exec is not position-dependent:\n{dynamic}"
    );
    let has_eh = tool("cc", &["-print-file-name=libgcc_eh.a"])
        .is_some_and(|p| Path::new(p.trim()).is_absolute());
    if has_eh {
        assert!(
            !dynamic.contains("libgcc_s"),
            "aap-exec still loads libgcc_s:\n{dynamic}"
        );
    }
    // Static (build.rs) when the compiler has libc.a: no program interpreter, no dynamic
    // section, so no loader runs.
    let has_libc_a =
        tool("cc", &["-print-file-name=libc.a"]).is_some_and(|p| Path::new(p.trim()).is_absolute());
    if !has_libc_a {
        // build.rs linked dynamically; the full run installs libc6-dev, so it fails there.
        return missing_tool(
            "aap_exec_links_no_http",
            "libc.a",
            "apt-get install -y libc6-dev",
        );
    }
    if has_eh {
        assert_eq!(
            option_env!("AAP_EXEC_LINK"),
            Some("static"),
            "build.rs did not link aap-exec statically"
        );
        let headers = tool("readelf", &["-l", "-d", AAP_EXEC]).expect("readelf");
        assert!(
            !headers.contains("INTERP") && headers.contains("There is no dynamic section"),
            "aap-exec is not static:\n{headers}"
        );
    }
}
