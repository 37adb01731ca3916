//! Issue 15, item 2: an agent waits for the operator's answer (`aap request --wait`), the
//! operator is told of each request (`requests.notify`) and answers from a live queue
//! (`aap requests --watch`). The real binaries, broker and ssh-keygen; terminals are real
//! tmux panes.

mod common;
#[path = "common/grants.rs"]
mod grants;

use common::tmux::Tmux;
use common::{code, stderr, stdout};
use grants::*;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

macro_rules! need_ssh_keygen {
    () => {
        if !have_ssh_keygen() {
            return;
        }
    };
}

/// The request ids in `requests/`, oldest first.
fn request_ids(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.state.join("requests"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .filter(|n| aap::id::RequestId::parse(n).is_ok())
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Wait until a request not in `before` appears; its id.
fn new_request(env: &Env, before: &[String]) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(id) = request_ids(env).into_iter().find(|i| !before.contains(i)) {
            return id;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no new request appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawn `aap ARGS` as the agent of session `id`, stdout and stderr piped.
fn spawn_agent(env: &Env, id: &str, args: &[&str]) -> Child {
    env.aap(args)
        .env("AAP_SESSION", id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for `child` at most `secs`, then its output (killed and failed when it runs longer).
fn finish(mut child: Child, secs: u64) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "still running after {secs} s; stderr so far: {}",
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn wait_ends_0_on_approval_77_on_denial_with_the_reason_and_75_on_timeout() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let cap = "ssh-vps1000-iskra-readonly";

    // Approved: exit 0, and the capability works at once.
    let before = request_ids(&env);
    let child = spawn_agent(
        &env,
        &id,
        &["request", cap, "--reason", "read logs", "--wait"],
    );
    let rid = new_request(&env, &before);
    assert_eq!(code(&env.check(&id, cap)), 77, "granted before the answer");
    let o = env.run(&["approve", &rid, "--reason", "ok for today"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = finish(child, 20);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("approved: request {rid}")),
        "{}",
        stdout(&o)
    );
    // Not a terminal: the status line is printed once, not once a second.
    let waiting = format!("aap: waiting for the operator: request {rid} (");
    assert_eq!(
        stderr(&o).matches(&waiting).count(),
        1,
        "want one status line: {}",
        stderr(&o)
    );
    assert_eq!(code(&env.check(&id, cap)), 0, "approved, yet not usable");
    let log = std::fs::read_to_string(&env.audit).unwrap();
    assert!(log.contains("(operator: ok for today)"), "{log}");

    // Denied: exit 77 with the operator's reason.
    let cap2 = "ssh-rs2000-platform-host-agent";
    let before = request_ids(&env);
    let child = spawn_agent(
        &env,
        &id,
        &["request", cap2, "--reason", "deploy", "--wait"],
    );
    let rid2 = new_request(&env, &before);
    let o = env.run(&["deny", &rid2, "--reason", "use the read-only key"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = finish(child, 20);
    common::assert_fails(&o, 77, "the operator denied request");
    assert!(
        stderr(&o).contains("use the read-only key"),
        "{}",
        stderr(&o)
    );
    assert_eq!(code(&env.check(&id, cap2)), 77);

    // Timed out: exit 75, and the hint (wait again) works.
    let t0 = Instant::now();
    let o = finish(
        spawn_agent(
            &env,
            &id,
            &[
                "request",
                cap2,
                "--reason",
                "deploy now",
                "--wait",
                "--timeout",
                "2s",
            ],
        ),
        30,
    );
    common::assert_fails(&o, 75, "still pending after 2s");
    assert!(t0.elapsed() >= Duration::from_secs(2));
    let rid3 = request_ids(&env).pop().unwrap();
    let hint = format!("aap: hint: wait again: aap request --wait-on {rid3}");
    assert!(stderr(&o).contains(&hint), "{}", stderr(&o));
    let child = spawn_agent(&env, &id, &["request", "--wait-on", &rid3]);
    std::thread::sleep(Duration::from_millis(300));
    let o = env.run(&["approve", &rid3]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = finish(child, 20);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&env.check(&id, cap2)), 0);
    // The answers are the operator's files, and `aap session gc` removes them past retention.
    let answers = env.state.join("answers");
    assert_eq!(std::fs::read_dir(&answers).unwrap().count(), 3);
    std::thread::sleep(Duration::from_millis(1100));
    let o = env.run(&["session", "gc", "--retention", "0s"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&answers).unwrap().count(), 0);
}

#[test]
fn a_request_that_expires_unanswered_ends_the_wait_with_75_and_unknown_ids_with_77() {
    need_ssh_keygen!();
    let env = Env::with_extra_config("requests:\n  ttl: 2s\n");
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let o = finish(
        spawn_agent(
            &env,
            &id,
            &[
                "request",
                "ssh-vps1000-iskra-readonly",
                "--reason",
                "x",
                "--wait",
            ],
        ),
        30,
    );
    common::assert_fails(&o, 75, "expired unanswered");
    let o = common::run(
        env.aap(&["request", "--wait-on", "01JD0000000000000000000009"])
            .env("AAP_SESSION", &id),
    );
    common::assert_fails(&o, 77, "no request 01JD0000000000000000000009");
    let o = common::run(
        env.aap(&["request", "--wait-on", "../../etc/passwd"])
            .env("AAP_SESSION", &id),
    );
    assert_eq!(code(&o), 77, "{}", stderr(&o));
}

#[test]
fn requests_notify_gets_the_request_on_stdin_with_a_clean_environment() {
    need_ssh_keygen!();
    let probe = common::tempdir();
    let out = probe.path().join("request.json");
    let envf = probe.path().join("env");
    let env = Env::with_extra_config(&format!(
        "requests:\n  notify:\n    command: [/bin/sh, -c, 'env > {}; cat > {}']\n",
        envf.display(),
        out.display()
    ));
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let o = env.run(&["config", "show"]);
    assert!(
        stdout(&o).contains("requests.notify.command") && stdout(&o).contains("/bin/sh -c"),
        "{}",
        stdout(&o)
    );
    let o = common::run(
        env.aap(&[
            "request",
            "ssh-vps1000-iskra-readonly",
            "--reason",
            "read logs",
        ])
        .env("AAP_SESSION", &id)
        .env("SOMETHING_OF_THE_AGENT", "x"),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["id"], rid.as_str());
    assert_eq!(v["capability"], "ssh-vps1000-iskra-readonly");
    assert_eq!(v["agent"], "codex");
    assert_eq!(v["reason"], "read logs");
    let vars = std::fs::read_to_string(&envf).unwrap();
    for bad in ["AAP_CONFIG", "SOMETHING_OF_THE_AGENT", "HOME="] {
        assert!(
            !vars.contains(bad),
            "{bad} reached the notify command: {vars}"
        );
    }
    assert!(vars.contains("PATH="), "{vars}");

    // A failing notify does not lose the request; the agent is told to tell the operator.
    env.write_config("requests:\n  notify:\n    command: [/bin/false]\n");
    let o = common::run(
        env.aap(&[
            "request",
            "ssh-rs2000-platform-host-agent",
            "--reason",
            "deploy",
        ])
        .env("AAP_SESSION", &id),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("the operator's notify command failed"),
        "{}",
        stdout(&o)
    );
    assert_eq!(request_ids(&env).len(), 2);
}

// ---- terminals -------------------------------------------------------------------------------

/// `KEY=VALUE ... PROG ARGS` for a tmux shell line, quoted.
fn line(env: &Env, session: Option<&str>, prog: &str, args: &[&str]) -> String {
    let mut s = format!(
        "env -i PATH={} HOME={} AAP_CONFIG={}",
        aap::error::shell_quote(&std::env::var("PATH").unwrap_or_default()),
        aap::error::shell_quote(&env.path().display().to_string()),
        aap::error::shell_quote(&env.config.display().to_string())
    );
    if let Some(id) = session {
        s.push_str(&format!(" AAP_SESSION={id}"));
    }
    s.push(' ');
    s.push_str(&aap::error::shell_quote(prog));
    for a in args {
        s.push(' ');
        s.push_str(&aap::error::shell_quote(a));
    }
    s
}

#[test]
fn on_a_terminal_the_status_line_is_one_line_updated_in_place() {
    need_ssh_keygen!();
    let env = Env::new();
    let Some(tmux) = Tmux::new(
        "on_a_terminal_the_status_line_is_one_line_updated_in_place",
        env.path(),
    ) else {
        return;
    };
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    env.ensure_broker();
    let cap = "ssh-vps1000-iskra-readonly";
    tmux.start(&format!(
        "{}; echo EXIT=$?",
        line(
            &env,
            Some(&id),
            common::AAP,
            &[
                "request",
                cap,
                "--reason",
                "logs",
                "--wait",
                "--timeout",
                "3m"
            ]
        )
    ));
    let s = tmux.wait_for("waiting for the operator: request");
    let rid = request_ids(&env).pop().unwrap();
    assert!(s.contains(&format!("request {rid} (3m left)")), "{s}");
    // Seconds pass; still exactly one status line (rewritten in place, not appended).
    std::thread::sleep(Duration::from_millis(2500));
    let s = tmux.screen();
    assert_eq!(s.matches("waiting for the operator").count(), 1, "{s}");
    let o = env.run(&["approve", &rid]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let s = tmux.wait_for("EXIT=");
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(s.contains(&format!("approved: request {rid}")), "{s}");
    // The status line was cleared, not left behind.
    assert_eq!(s.matches("waiting for the operator").count(), 0, "{s}");
}

#[test]
fn requests_watch_shows_the_queue_live_and_answers_with_a_key_and_a_reason() {
    need_ssh_keygen!();
    let env = Env::new();
    let Some(tmux) = Tmux::new(
        "requests_watch_shows_the_queue_live_and_answers_with_a_key_and_a_reason",
        env.path(),
    ) else {
        return;
    };
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    tmux.start(&format!(
        "{}; echo EXIT=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon | sed 's/^/MODE=/'",
        line(&env, None, common::AAP, &["requests", "--watch"])
    ));
    tmux.wait_for("no pending requests");
    // A request made while the operator watches shows up by itself.
    let before = request_ids(&env);
    let waiter = spawn_agent(
        &env,
        &id,
        &[
            "request",
            "ssh-rs2000-platform-host-agent",
            "--reason",
            "deploy web",
            "--wait",
        ],
    );
    let rid = new_request(&env, &before);
    let s = tmux.wait_for(&rid);
    assert!(s.contains("deploy web") && s.contains("> "), "{s}");
    tmux.keys(&["d"]);
    tmux.wait_for("reason (Enter for none");
    tmux.keys(&["-l", "not on a Friday"]);
    tmux.keys(&["Enter"]);
    tmux.wait_for(&format!("denied request {rid}"));
    let o = finish(waiter, 20);
    common::assert_fails(&o, 77, "not on a Friday");

    // Approve with `a` (and no reason).
    let before = request_ids(&env);
    let waiter = spawn_agent(
        &env,
        &id,
        &[
            "request",
            "ssh-vps1000-iskra-readonly",
            "--reason",
            "read logs",
            "--wait",
        ],
    );
    let rid2 = new_request(&env, &before);
    tmux.wait_for(&rid2);
    tmux.keys(&["a"]);
    tmux.wait_for("reason (Enter for none");
    tmux.keys(&["Enter"]);
    tmux.wait_for(&format!("approved request {rid2}"));
    let o = finish(waiter, 20);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&env.check(&id, "ssh-vps1000-iskra-readonly")), 0);
    tmux.wait_for("no pending requests");
    // Ctrl-C quits like q, and the terminal is back in its usual mode.
    tmux.keys(&["C-c"]);
    let s = tmux.wait_for("MODE=");
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(s.contains("MODE=icanon"), "the terminal was left raw: {s}");
    let log = std::fs::read_to_string(&env.audit).unwrap();
    assert!(
        log.contains("request.deny") && log.contains("not on a Friday"),
        "{log}"
    );
    assert!(log.contains("request.approve"), "{log}");
}
