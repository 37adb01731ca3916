//! Issue 15, item 5: every hint is a command that works when followed. Each scenario makes a
//! real command fail, takes the `hint:` line it printed, runs the hint's command in the same
//! installation (same config, same session, `aap` and `aap-exec` on PATH), and asserts that the
//! hint's command succeeded or that the original command no longer fails for the reason it gave.

mod common;
#[path = "common/grants.rs"]
mod grants;

use common::world::World;
use common::{code, stderr, write};
use grants::*;
use std::path::Path;
use std::process::Command;

use common::follow::command_of;

struct Place<'a> {
    dir: &'a Path,
    config: &'a Path,
    session: Option<&'a str>,
}

/// Run `original` (it must fail with a hint), follow the hint, judge.
fn follow(what: &str, at: &Place<'_>, mut original: impl FnMut() -> Command) -> String {
    let o = common::run(&mut original());
    let err = stderr(&o);
    assert_ne!(code(&o), 0, "{what}: did not fail: {err}");
    let message = err
        .lines()
        .find_map(|l| l.split_once(": error: ").map(|(_, m)| m.to_owned()))
        .unwrap_or_else(|| panic!("{what}: no error line: {err}"));
    let hint = err
        .lines()
        .find_map(|l| l.split_once(": hint: ").map(|(_, h)| h.to_owned()))
        .unwrap_or_else(|| panic!("{what}: no hint: {err}"));
    let cmd =
        command_of(&hint).unwrap_or_else(|| panic!("{what}: the hint names no command: {hint}"));
    assert!(
        !cmd.contains('<') && !cmd.contains('>'),
        "{what}: the hint's command has a placeholder or a redirection: {cmd}"
    );
    let bin = Path::new(common::AAP).parent().unwrap();
    let waits = cmd.contains("aap request ") && cmd.ends_with(" --wait");
    let run = if waits {
        format!("{cmd} --timeout 1s")
    } else {
        cmd.clone()
    };
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(&run)
        .env_clear()
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("HOME", at.dir)
        .env("AAP_CONFIG", at.config)
        .current_dir(at.dir);
    if let Some(s) = at.session {
        sh.env("AAP_SESSION", s);
    }
    let h = common::run(&mut sh);
    eprintln!("{what}: followed `{cmd}`: exit {}", code(&h));
    if code(&h) == 0 {
        return cmd;
    }
    // A request that waits for the operator: filed, it waits; no one answers here (75).
    if waits && code(&h) == 75 {
        return cmd;
    }
    let again = common::run(&mut original());
    assert!(
        !stderr(&again).contains(&message),
        "{what}: followed the hint `{cmd}` (exit {}: {}), and the original still fails with: {message}",
        code(&h),
        stderr(&h)
    );
    cmd
}

#[test]
fn the_hints_of_session_and_request_failures_work_when_followed() {
    if !have_ssh_keygen() {
        return;
    }
    let env = Env::with_extra_config("notify:\n  command: [/bin/true]\n");
    env.ensure_broker();
    let at = Place {
        dir: env.path(),
        config: &env.config,
        session: None,
    };
    let env = &env;
    let aap = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            env.aap(&a)
        }
    };
    // --ttl over max_ttl keeps the rest of the command, --reason included.
    let cmd = follow(
        "start with a too long --ttl",
        &at,
        aap(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "forgejo-pat-read",
            "--ttl",
            "99h",
            "--reason",
            "review PR 12",
        ]),
    );
    assert!(cmd.contains("--reason 'review PR 12'"), "{cmd}");
    // ... and --break-glass with it.
    let cmd = follow(
        "break-glass start with a too long --ttl",
        &at,
        aap(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "break-glass-full-access",
            "--ttl",
            "9h",
            "--break-glass",
            "--reason",
            "incident 7",
        ]),
    );
    assert!(cmd.contains("--break-glass --reason 'incident 7'"), "{cmd}");
    follow(
        "a critical capability without --break-glass",
        &at,
        aap(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "break-glass-full-access",
        ]),
    );
    // No session: the hint starts one and sets AAP_SESSION (no `<id>` to fill in).
    let cmd = follow(
        "check without a session",
        &at,
        aap(&["session", "check", "forgejo-pat-read"]),
    );
    assert!(cmd.starts_with("eval "), "{cmd}");
    let cmd = follow("aap-exec without a session", &at, || {
        env.exec(&["forgejo-pat-read", "--", "true"])
    });
    assert!(cmd.starts_with("eval "), "{cmd}");

    let s = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let with_session = Place {
        session: Some(&s),
        ..at
    };
    follow(
        "an agent requests a critical capability",
        &with_session,
        aap(&[
            "request",
            "--session",
            &s,
            "break-glass-full-access",
            "--reason",
            "x",
        ]),
    );
    follow(
        "session approve with a too long --ttl",
        &at,
        aap(&[
            "session",
            "approve",
            &s,
            "--cap",
            "ssh-vps1000-iskra-readonly",
            "--ttl",
            "9h",
        ]),
    );
    follow(
        "a capability the session lacks",
        &with_session,
        aap(&[
            "session",
            "check",
            "--session",
            &s,
            "ssh-rs2000-platform-host-agent",
        ]),
    );
    follow(
        "approve of an unknown request",
        &at,
        aap(&["approve", "01JD0000000000000000000009"]),
    );
    let r = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    assert_eq!(code(&env.run(&["session", "revoke", &r])), 0);
    follow(
        "a revoked session",
        &at,
        aap(&["session", "check", "--session", &r, "forgejo-pat-read"]),
    );
    follow(
        "show of an unknown session",
        &at,
        aap(&["session", "show", "01JD0000000000000000000008"]),
    );
    follow(
        "deny of an unknown request",
        &at,
        aap(&["deny", "01JD0000000000000000000007"]),
    );
    follow(
        "start with a capability the catalog lacks",
        &at,
        aap(&[
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "no-such-cap",
        ]),
    );
    follow(
        "start with a capability not for the agent",
        &at,
        aap(&[
            "session",
            "start",
            "--agent",
            "claude",
            "--cap",
            "ssh-rs2000-platform-host-agent",
        ]),
    );
    follow(
        "a malformed session id",
        &at,
        aap(&["session", "check", "--session", "../x", "forgejo-pat-read"]),
    );
    let cmd = follow(
        "approving a capability into a revoked session",
        &at,
        aap(&[
            "session",
            "approve",
            &r,
            "--cap",
            "ssh-vps1000-iskra-readonly",
        ]),
    );
    assert!(
        cmd.contains("--agent codex --cap ssh-vps1000-iskra-readonly"),
        "{cmd}"
    );
    // A request file claiming another agent than its session's: the hint refuses that request.
    let fresh = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let o = common::run(
        env.aap(&["request", "ssh-rs2000-platform-host-agent", "--reason", "x"])
            .env("AAP_SESSION", &fresh),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid = common::stdout(&o)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let p = env.state.join("requests").join(format!("{rid}.json"));
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"codex\"", "\"claude\"")).unwrap();
    let cmd = follow(
        "a request naming another agent",
        &at,
        aap(&["approve", &rid]),
    );
    assert!(cmd.starts_with(&format!("aap deny {rid} ")), "{cmd}");
}

const WRAPPED: &str = "  - id: restart-web
    description: restart the web unit, nothing else
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: @DIR@/bin/svc
      args: [\"^restart$\", \"^web(@[a-z0-9-]+)?\\\\.service$\"]
";

#[test]
fn the_hints_of_refused_commands_work_when_followed() {
    let mut w = World::new();
    let d = w.path().to_path_buf();
    let cat = d.join("catalog.yaml");
    let mut text = std::fs::read_to_string(&cat).unwrap();
    text.push_str(&WRAPPED.replace("@DIR@", &d.display().to_string()));
    write(&cat, text);
    write(&d.join("bin/svc"), "#!/bin/sh\nexit 0\n");
    std::fs::set_permissions(
        d.join("bin/svc"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    w.start_broker();
    let s = w.session(&["restart-web", "db-sh-only", "db-env"]);
    let at = Place {
        dir: &d,
        config: &w.config,
        session: Some(&s),
    };
    let svc = d.join("bin/svc").display().to_string();
    for argv in [
        vec![svc.as_str(), "stop", "web.service"],
        vec![svc.as_str(), "restart"],
        vec!["/bin/true", "restart", "web.service"],
    ] {
        let cmd = follow("a wrapped command with other arguments", &at, || {
            w.exec_in(&s, "restart-web", &argv)
        });
        assert!(cmd.ends_with("restart web.service"), "{cmd}");
    }
    follow("a program allowed_commands does not name", &at, || {
        w.exec_in(&s, "db-sh-only", &["cat", "/etc/hostname"])
    });
    // The exec path's grant denials.
    follow("aap-exec of a capability the session lacks", &at, || {
        w.exec_in(&s, "db-fd", &["true"])
    });
    follow("aap-exec of a capability the catalog lacks", &at, || {
        w.exec_in(&s, "db-nope", &["true"])
    });
    follow("aap-exec of another agent's capability", &at, || {
        w.exec_in(&s, "claude-only", &["true"])
    });
    let r = w.session(&["db-low"]);
    assert_eq!(
        code(&common::run(&mut w.aap(&["session", "revoke", &r]))),
        0
    );
    follow("aap-exec in a revoked session", &at, || {
        w.exec_in(&r, "db-low", &["true"])
    });
}

/// The reading of hints that tests/common/follow.rs follows for every CLI test.
#[test]
fn hints_are_read_into_their_commands_and_placeholders() {
    use common::follow::{commands_of, placeholder};
    assert_eq!(
        commands_of(
            "keep a copy as evidence and look at the lines around it: cp -p a a.evidence; sed -n '4,5p' a"
        ),
        ["cp -p a a.evidence", "sed -n '4,5p' a"]
    );
    assert_eq!(
        commands_of(
            "chmod 0750 /s/requests (only the broker writes requests now), then ask the agent to request again"
        ),
        ["chmod 0750 /s/requests"]
    );
    assert_eq!(
        commands_of(
            "inspect it: aap session show X; then the operator revokes it and starts a new one: aap session revoke X && aap session start --agent codex --cap c"
        ),
        [
            "aap session show X",
            "aap session revoke X && aap session start --agent codex --cap c"
        ]
    );
    assert_eq!(
        commands_of("fix the YAML at that line, then run: aap catalog check cat.yaml"),
        ["aap catalog check cat.yaml"]
    );
    assert!(commands_of("retry later; if it persists, check the server's logs").is_empty());
    assert_eq!(
        placeholder("aap request CAP --reason '...' --wait").as_deref(),
        Some("CAP")
    );
    assert_eq!(
        placeholder("aap session start --agent <agent>").as_deref(),
        Some("<agent>")
    );
    assert_eq!(
        placeholder("aap-exec db-env -- CMD [ARG...]").as_deref(),
        Some("CMD")
    );
    assert_eq!(
        placeholder("aap session start --reason 'review PR 12' --ttl 8h"),
        None
    );
    assert_eq!(
        placeholder("openssl s_client -connect h:1 </dev/null"),
        None
    );
    assert_eq!(
        placeholder("aap-exec --session \"$AAP_SESSION\" --list"),
        None
    );
}

#[test]
fn doctor_findings_and_system_commands_are_read() {
    use common::follow::{by_hand, commands_of, doctor_findings, machine_wide};
    // doctor's text: each warn or fail with its indented hint; ok lines have none.
    let text = "ok    config           /e/config.yaml is valid
warn  permissions      the audit log /l is not append-only: whoever can write it can rewrite the whole hash chain
                       hint: chattr +a /l (and ship it off the host: docs/operator-guide.md)
fail  broker           broker.socket /s does not exist
                       hint: systemctl start aap-broker.socket (or run it by hand: aap broker --socket /s)
aap doctor: 1 ok, 1 warn, 1 fail
";
    let f = doctor_findings(text);
    assert_eq!(f.len(), 2, "{f:?}");
    assert!(f[0].0.starts_with("the audit log /l is not append-only"));
    assert_eq!(commands_of(&f[0].1), ["chattr +a /l"]);
    assert_eq!(by_hand(&f[1].1).as_deref(), Some("aap broker --socket /s"));
    // ... and its JSON.
    let json = r#"{"checks":[{"check":"x","status":"ok","message":"fine"},{"check":"y","status":"fail","message":"bad","hint":"chmod o-w /l"}]}"#;
    assert_eq!(
        doctor_findings(json),
        [("bad".to_string(), "chmod o-w /l".to_string())]
    );
    assert_eq!(
        commands_of(
            "create it append-only, the broker's alone: install -m 0600 -o aap /dev/null /l && chattr +a /l"
        ),
        ["install -m 0600 -o aap /dev/null /l && chattr +a /l"]
    );
    assert!(commands_of("install it, or put the directory that holds it in PATH").is_empty());
    // Commands that change the machine are never run by the follower.
    assert!(machine_wide("useradd --system --create-home codex"));
    assert!(machine_wide("true && apt-get install -y git"));
    assert!(!machine_wide("chown root: /l && chmod 0600 /l"));
}

/// A test's shell script that runs `aap-exec`: the hints it prints are followed too
/// (tests/common/follow.rs), though the script itself exits 0; in the full run the hint log
/// must show this test's hint judged.
#[test]
fn hints_inside_a_tests_shell_script_are_followed() {
    let w = World::new();
    let script = format!("{} db-env -- true; echo status=$?", common::AAP_EXEC);
    let o = common::run(
        common::cmd("/bin/sh", w.path())
            .env("AAP_CONFIG", &w.config)
            .args(["-c", &script]),
    );
    let out = common::stdout(&o);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        out.contains("status=") && !out.contains("status=0"),
        "aap-exec without a session succeeded: {out}"
    );
    assert!(
        stderr(&o).contains("aap-exec: hint: "),
        "no hint: {}",
        stderr(&o)
    );
    common::follow::assert_judged("/bin/sh -c ");
}
