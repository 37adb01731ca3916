//! The wrapped-command backing (a sudo-like argv allow-list, no shell anywhere) and break-glass
//! uses (banner, notify with the exec.start event on stdin, fsync'd audit, deny on a failed
//! notify) through the real `aap-exec`.

mod common;

use common::world::{DB_PASSWORD, World};
use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A world plus extra catalog entries (appended) and extra config lines.
fn world(caps: &str, config_extra: &str) -> World {
    let mut w = World::new();
    let mut cat = std::fs::read_to_string(w.path().join("catalog.yaml")).unwrap();
    cat.push_str(&caps.replace("@DIR@", &w.path().display().to_string()));
    write(&w.path().join("catalog.yaml"), cat);
    let mut cfg = std::fs::read_to_string(&w.config).unwrap();
    cfg.push_str(&config_extra.replace("@DIR@", &w.path().display().to_string()));
    write(&w.config, cfg);
    w.start_broker(); // the broker reads its config at start
    w
}

fn script(path: &Path, body: &str) {
    write(path, format!("#!/bin/sh\n{body}"));
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

// ---- wrapped-command ----------------------------------------------------------------------------

const WRAPPED: &str = "  - id: restart-web
    description: restart the web unit, nothing else
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: @DIR@/bin/svc
      args: [\"^restart$\", \"^web(@[a-z0-9-]+)?\\\\.service$\"]
  - id: wrapped-secret
    description: a wrapped command that also gets a secret
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: @DIR@/bin/svc
      args: [\"^show$\"]
      secret: { path: /app, key: DB_PASSWORD }
    inject: [ { type: fd, name: PW_FILE } ]
";

/// `svc` records each argument it got, one per line, as hex (so any byte is visible).
fn wrapped_world() -> World {
    let w = world(WRAPPED, "");
    script(
        &w.path().join("bin/svc"),
        &format!(
            "for a in \"$@\"; do printf '%s' \"$a\" | od -An -tx1 | tr -d ' \\n'; echo; done >> {0}/ran\n\
             if [ -n \"$PW_FILE\" ]; then cat \"$PW_FILE\" > {0}/pw; fi\n",
            w.path().display()
        ),
    );
    w
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn an_allowed_argv_runs_the_program_exactly() {
    let w = wrapped_world();
    let s = w.session(&["restart-web", "wrapped-secret"]);
    let svc = w.path().join("bin/svc");
    let svc = svc.to_str().unwrap();
    let o = run(&mut w.exec_in(&s, "restart-web", &[svc, "restart", "web@blue.service"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let ran = std::fs::read_to_string(w.path().join("ran")).unwrap();
    assert_eq!(
        ran,
        format!("{}\n{}\n", hex(b"restart"), hex(b"web@blue.service"))
    );
    // Secrets are optional, and injected as the other forms are.
    let o = run(&mut w.exec_in(&s, "wrapped-secret", &[svc, "show"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(w.path().join("pw")).unwrap(),
        DB_PASSWORD
    );
}

/// Issue 15, item 4: `aap-exec --check CAP -- CMD` judges a wrapped command's argv exactly as a
/// run does, and runs nothing.
#[test]
fn check_with_a_command_judges_the_wrapped_argv_like_a_run() {
    let w = wrapped_world();
    let s = w.session(&["restart-web"]);
    let svc = w.path().join("bin/svc");
    let svc = svc.to_str().unwrap();
    let check = |argv: &[&str]| {
        let mut c = w.exec(&["--session", &s, "--check", "restart-web", "--"]);
        c.args(argv);
        run(&mut c)
    };
    let o = check(&[svc, "restart", "web.service"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("would run {svc}")),
        "{}",
        stdout(&o)
    );
    assert!(!w.path().join("ran").exists(), "a check ran the command");
    for argv in [
        &[svc, "stop", "web.service"][..],
        &[svc, "restart"][..],
        &["/bin/true"][..],
    ] {
        let checked = check(argv);
        let ran = run(&mut w.exec_in(&s, "restart-web", argv));
        assert_eq!(code(&checked), 77, "{}", stderr(&checked));
        assert_eq!(code(&checked), code(&ran));
        // (A loaded machine may add a "waiting for the broker" line to either: common::verdict.)
        assert_eq!(verdict(&checked), verdict(&ran));
    }
    assert!(!w.path().join("ran").exists());
}

#[test]
fn adversarial_argv_is_denied_naming_the_argument_and_pattern() {
    let w = wrapped_world();
    let s = w.session(&["restart-web"]);
    let svc = w.path().join("bin/svc");
    let svc = svc.to_str().unwrap();
    let pat2 = "'^web(@[a-z0-9-]+)?\\.service$'";
    let long = "w".repeat(100_000);
    let cases: Vec<(Vec<&[u8]>, &str)> = vec![
        (
            vec![b"restart;reboot", b"web.service"],
            "argument 1 'restart;reboot' does not match pattern '^restart$'",
        ),
        (vec![b"restart", b"web.service; touch pwned"], "argument 2 "),
        (
            vec![b"restart", b"$(touch pwned).service"],
            "argument 2 '$(touch pwned).service'",
        ),
        (vec![b"restart", b"`touch pwned`"], "argument 2 "),
        (
            vec![b"restart", b"web.service\ntouch pwned"],
            "argument 2 'web.service\\ntouch pwned'",
        ),
        (vec![b"restart\n", b"web.service"], "argument 1 "),
        (vec![b"--", b"web.service"], "argument 1 -- does not match"),
        (
            vec![b"restart", b"--", b"web.service"],
            "exactly 2 argument(s)",
        ),
        (vec![b"restart", b"-web.service"], "argument 2 "),
        (vec![b"restart", long.as_bytes()], "... (100000 bytes)"),
        (
            vec![b"restart", b"web\xff\xfe.service"],
            "argument 2 'web\\xff\\xfe.service'",
        ),
        (vec![b"restart"], "exactly 2 argument(s)"),
        (vec![b"restart", b"web.service", b"extra"], "got 3"),
    ];
    for (args, want) in &cases {
        let mut c = w.exec(&["--session", &s, "restart-web", "--", svc]);
        c.args(args.iter().map(|a| OsStr::from_bytes(a)));
        let o = run(&mut c);
        assert_eq!(code(&o), 77, "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(err.starts_with("aap-exec: error: "), "{err}");
        assert!(
            err.contains("\naap-exec: hint: aap-exec restart-web -- "),
            "{err}"
        );
        if want.starts_with("argument 2 ") {
            assert!(err.contains(pat2), "{err}");
        }
    }
    // Nothing ran, no metacharacter did anything, and each refusal is in the audit log.
    assert!(!w.path().join("ran").exists());
    assert!(!w.path().join("pwned").exists());
    assert_eq!(w.count("deny"), cases.len());
    assert_eq!(w.count("exec.start"), 0);
    assert_eq!(code(&w.audit_verify()), 0);
}

#[test]
fn another_program_is_denied_even_with_matching_args() {
    let w = wrapped_world();
    let s = w.session(&["restart-web"]);
    // A same-named program earlier in PATH, a shell, and /bin/echo: none is the catalog's.
    let fake = w.path().join("fake");
    script(
        &fake.join("svc"),
        &format!("touch {}/pwned\n", w.path().display()),
    );
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let o = run(w
        .exec_in(&s, "restart-web", &["svc", "restart", "web.service"])
        .env("PATH", &path));
    assert_fails(&o, 77, "runs only");
    for prog in ["sh", "/bin/echo"] {
        let o = run(&mut w.exec_in(&s, "restart-web", &[prog, "restart", "web.service"]));
        assert_eq!(code(&o), 77, "{}", stderr(&o));
    }
    assert!(!w.path().join("pwned").exists());
    assert!(!w.path().join("ran").exists());
}

// ---- break-glass --------------------------------------------------------------------------------

const CRITICAL: &str = "  - id: prod-root
    description: the production database password, break-glass only
    audit_tier: critical
    agents: []
    max_ttl: 1h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
";

fn break_glass_session(w: &World) -> String {
    let o = run(&mut w.aap(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "prod-root",
        "--ttl",
        "30m",
        "--break-glass",
        "--reason",
        "INC-42 database down",
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    stdout(&o)
        .trim()
        .strip_prefix("export AAP_SESSION=")
        .unwrap()
        .to_string()
}

/// The child records whether the exec.start line was already in the audit log when it ran.
fn child_checks_audit(w: &World) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "grep -c '\"exec.start\"' {0}/audit.jsonl > {0}/starts-seen; printf '%s' \"$DB_PASSWORD\" > {0}/got",
            w.path().display()
        ),
    ]
}

fn exec_argv(w: &World, s: &str, cap: &str, argv: &[String]) -> std::process::Output {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    run(&mut w.exec_in(s, cap, &argv))
}

#[test]
fn break_glass_prints_a_banner_notifies_with_the_event_and_fsyncs() {
    let w = world(
        CRITICAL,
        "notify:\n  command: [\"@DIR@/notify\", \"--from-aap\"]\n",
    );
    script(
        &w.path().join("notify"),
        &format!(
            "printf '%s\\n' \"$*\" > {0}/notify-args\ncat > {0}/notify-stdin\nenv > {0}/notify-env\n",
            w.path().display()
        ),
    );
    let s = break_glass_session(&w);
    let o = exec_argv(&w, &s, "prod-root", &child_checks_audit(&w));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("BREAK-GLASS"), "{err}");
    assert!(err.contains("prod-root"), "{err}");
    assert!(err.contains("INC-42 database down"), "{err}");
    assert!(err.contains(&s), "{err}");
    assert_eq!(
        stdout(&o),
        "",
        "notify output must not reach the child's stdout"
    );
    let read = |f: &str| std::fs::read_to_string(w.path().join(f)).unwrap();
    assert_eq!(read("got"), DB_PASSWORD);
    assert_eq!(read("notify-args"), "--from-aap\n");
    // The notify command got the exec.start line, exactly as it is in the audit log.
    let ev: serde_json::Value = serde_json::from_str(read("notify-stdin").trim()).unwrap();
    assert_eq!(ev["event"], "exec.start");
    assert_eq!(ev["capability"], "prod-root");
    assert_eq!(ev["tier"], "critical");
    let lines = w.audit_lines();
    let start = lines.iter().find(|l| l["event"] == "exec.start").unwrap();
    assert_eq!(&ev, start);
    // The event was on disk before the child ran (it is fsync'd: see Event::sync).
    assert_eq!(read("starts-seen"), "1\n");
    // No secret reached the notify command.
    let env = read("notify-env");
    assert!(!env.contains(DB_PASSWORD));
    assert!(!read("notify-stdin").contains(DB_PASSWORD));
    assert_eq!(w.count("exec.end"), 1);
    assert_eq!(code(&w.audit_verify()), 0);
}

#[test]
fn a_failing_or_missing_notify_denies_the_use() {
    for (extra, why) in [
        ("", "no notify command is configured"),
        ("notify:\n  command: [\"@DIR@/notify\"]\n", "exited with"),
        (
            "notify:\n  command: [\"@DIR@/no-such-notify\"]\n",
            "cannot start",
        ),
        (
            "notify:\n  command: [\"@DIR@/slow\"]\n  timeout: 1s\n",
            "did not finish within 1s",
        ),
    ] {
        let w = world(CRITICAL, extra);
        script(&w.path().join("notify"), "cat >/dev/null; exit 3\n");
        script(&w.path().join("slow"), "exec sleep 30\n");
        let s = break_glass_session(&w);
        let o = exec_argv(&w, &s, "prod-root", &child_checks_audit(&w));
        assert_eq!(code(&o), 77, "{extra}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(why), "{extra}: {err}");
        assert!(
            err.contains("aap-exec: error: break-glass use of `prod-root` denied"),
            "{err}"
        );
        assert!(err.contains("aap-exec: hint: "), "{err}");
        assert!(
            err.contains("BREAK-GLASS"),
            "the banner is shown even when denied: {err}"
        );
        assert!(!w.path().join("got").exists(), "the child ran");
        let lines = w.audit_lines();
        let deny = lines
            .iter()
            .find(|l| l["event"] == "deny")
            .expect("a deny line");
        assert!(deny["error"].as_str().unwrap().contains(why));
        assert_eq!(w.count("exec.end"), 0);
        assert_eq!(code(&w.audit_verify()), 0);
    }
}

#[test]
fn allow_on_failure_lets_the_use_through_with_a_warning() {
    let w = world(
        CRITICAL,
        "notify:\n  command: [\"@DIR@/notify\"]\n  allow_on_failure: true\n",
    );
    script(&w.path().join("notify"), "exit 1\n");
    let s = break_glass_session(&w);
    let o = exec_argv(&w, &s, "prod-root", &child_checks_audit(&w));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("BREAK-GLASS"));
    assert!(stderr(&o).contains("warning: the break-glass notify command failed"));
    assert_eq!(
        std::fs::read_to_string(w.path().join("got")).unwrap(),
        DB_PASSWORD
    );
    assert_eq!(w.count("exec.end"), 1);
    // The audit log says so too, not only the agent's stderr.
    let end = w
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.end")
        .unwrap();
    assert_eq!(end["outcome"], "ok", "{end}");
    assert!(
        end["error"]
            .as_str()
            .is_some_and(|e| e.contains("notify command failed") && e.contains("allow_on_failure")),
        "{end}"
    );
    assert_eq!(code(&w.audit_verify()), 0);
}

#[test]
fn ordinary_uses_neither_banner_nor_notify() {
    let w = world("", "notify:\n  command: [\"@DIR@/notify\"]\n");
    script(
        &w.path().join("notify"),
        &format!("touch {}/notified\n", w.path().display()),
    );
    let s = w.session(&["db-env"]);
    let o = run(&mut w.exec_in(&s, "db-env", &["true"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stderr(&o).contains("BREAK-GLASS"));
    assert!(!w.path().join("notified").exists());
}

/// The pid of a broker-run command is in the audit as soon as it is known: `exec.spawned`,
/// right after `exec.start` and before `exec.end`, with the pid the command itself reports.
#[test]
fn the_spawned_pid_in_the_audit_is_the_commands_own() {
    let w = world(
        "  - id: own-pid
    description: prints its own pid
    audit_tier: low
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: @DIR@/bin/pid
      args: []
",
        "",
    );
    script(&w.path().join("bin/pid"), "echo $$\n");
    let s = w.session(&["own-pid"]);
    let prog = w.path().join("bin/pid");
    let o = run(&mut w.exec_in(&s, "own-pid", &[prog.to_str().unwrap()]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let reported: u64 = stdout(&o).trim().parse().unwrap();
    let lines = w.audit_lines();
    let kinds: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["event"].as_str())
        .filter(|e| e.starts_with("exec."))
        .collect();
    assert_eq!(
        kinds,
        ["exec.start", "exec.spawned", "exec.end"],
        "{lines:#?}"
    );
    let spawned = lines.iter().find(|l| l["event"] == "exec.spawned").unwrap();
    assert_eq!(spawned["pid"].as_u64(), Some(reported), "{spawned}");
    let start = lines.iter().find(|l| l["event"] == "exec.start").unwrap();
    assert_eq!(spawned["invocation"], start["invocation"], "{spawned}");
    let end = lines.iter().find(|l| l["event"] == "exec.end").unwrap();
    assert_eq!(end["pid"].as_u64(), Some(reported), "{end}");
    assert_eq!(code(&w.audit_verify()), 0);
}
