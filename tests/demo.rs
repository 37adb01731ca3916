//! The README's quick start, `aap demo`, runs end to end, exercises every capability of the
//! seed catalog against real servers on loopback, and prints no secret.

mod common;

use common::*;

#[test]
fn demo_runs_every_seed_capability_and_prints_no_secret() {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).arg("demo"));
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{out}\n{}", stderr(&o));
    let have_sshd = ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file());
    let mut want = vec![
        "policies/agent-capabilities.yaml: ok, 5 capabilities",
        "export AAP_SESSION=",
        // forgejo-pat-read against a real git http-backend: refused without the token, cloned
        // with it.
        // The git server is HTTPS (the dev-server's CA, which plain git is told to trust, so
        // what refuses it is the missing token).
        "/ca.pem -c credential.helper= ls-remote https://127.0.0.1:",
        "$ aap-exec forgejo-pat-read -- git clone -q https://127.0.0.1:",
        "cloned: README says \"hello from the demo's Forgejo stand-in\"",
        // infisical-secrets-read-scoped: the scoped token reads /app and nothing else.
        "ok: read prod:/app:DB_PASSWORD (18 bytes) with the token in INFISICAL_TOKEN",
        "prod:/forgejo:FORGEJO_PAT_READ of project 7b5c1f0e-0d7a-4c52-9a53-0000000a0a0a as the identity: permission denied",
        // ssh-rs2000-platform-host-agent: not granted.
        "aap-exec: hint: ask the operator for it: aap request --session ",
        " ssh-rs2000-platform-host-agent --reason '...' --wait   (the operator adds it with: aap session approve ",
        "was revoked",
        // break-glass: banner and notify.
        "aap-exec: !! BREAK-GLASS: critical access to `break-glass-full-access` (critical tier)",
        "aap-exec: !!   reason: demo: INC-1 the deploy host is down",
        "the notify command got the audit line on its stdin: exec.start cap=break-glass-full-access tier=critical session=",
        "== done:",
    ];
    if have_sshd {
        want.extend([
            "remote: logged in as ",
            "remote: break-glass login as ",
            // 15, and an ssh.sign line for each of the two logins.
            ": valid, 17 events, head ",
            " ssh.sign        ok     ",
        ]);
    } else {
        missing_tool(
            "demo_runs_every_seed_capability_and_prints_no_secret",
            "sshd",
            "apt-get install -y openssh-server",
        );
        want.extend([
            "skipping the ssh step: OpenSSH's server (sshd) is not installed",
            ": valid, 13 events, head ",
        ]);
    }
    for w in want {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }
    // Refused: the scoped token on /forgejo, the ungranted capability, the revoked session.
    assert_eq!(out.matches("(exit 77)").count(), 3, "{out}");
    assert!(
        !out.lines().any(|l| l == "never printed"),
        "a denied child ran:\n{out}"
    );
    // The demo's temp dir (and with it the sshd, its keys and the git repositories) is gone.
    let demo_dir = out
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "== 4. a throwaway operator key, config, catalog, state dir and audit log in ",
            )
        })
        .expect("the demo names its directory");
    assert!(
        !std::path::Path::new(demo_dir).exists(),
        "{demo_dir} was left behind"
    );
    assert_no_leak(
        &seed_secret_values(),
        &format!("{out}{}", stderr(&o)),
        d.path(),
    );
}

/// Without OpenSSH's server the demo says so, skips the ssh step and still runs the rest (issue
/// 15, item 1). sshd is hidden for real: in a private mount namespace, /dev/null (no regular
/// file) is bind-mounted over each sshd the demo looks for.
#[test]
fn without_sshd_the_demo_says_so_and_skips_the_ssh_step() {
    let test = "without_sshd_the_demo_says_so_and_skips_the_ssh_step";
    let present: Vec<&str> = ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .into_iter()
        .filter(|p| std::path::Path::new(p).is_file())
        .collect();
    if aap::sys::uid() != 0 {
        assert!(!full_run(), "{test}: needs root (a mount namespace)");
        skip(test, "not root: cannot hide sshd in a mount namespace");
        return;
    }
    let d = tempdir();
    let hide: String = present
        .iter()
        .map(|p| format!("mount --bind /dev/null {p} && "))
        .collect();
    let o = run(cmd("unshare", d.path()).args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &format!("{hide}exec \"$0\" demo"),
        AAP,
    ]));
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{out}\n{}", stderr(&o));
    for want in [
        "skipping the ssh step: OpenSSH's server (sshd) is not installed",
        "cloned: README says \"hello from the demo's Forgejo stand-in\"",
        "ok: read prod:/app:DB_PASSWORD (18 bytes) with the token in INFISICAL_TOKEN",
        "aap-exec: !! BREAK-GLASS: critical access to `break-glass-full-access` (critical tier)",
        "the notify command got the audit line on its stdin: exec.start cap=break-glass-full-access",
        ": valid, 13 events, head ",
        "== done:",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("remote: logged in as "), "{out}");
    assert!(!out.contains(" ssh.sign "), "{out}");
}

/// The operator guide's walk-through uses only capabilities the seed catalog has, so an operator
/// who installed `policies/agent-capabilities.yaml` (step 3) can type every command as shown.
#[test]
fn the_operator_guide_uses_only_seed_capabilities() {
    let cat: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("policies/agent-capabilities.yaml")).unwrap(),
    )
    .unwrap();
    let ids: Vec<&str> = cat["capabilities"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    let guide = std::fs::read_to_string(repo().join("docs/operator-guide.md")).unwrap();
    // Capability ids the guide's commands name: after --cap, `aap-exec [--check]`,
    // `aap request`, `aap session check`, and in denials ("is not granted X").
    let mut named = Vec::new();
    for line in guide.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let next = words.get(i + 1).copied();
            let cap = match (*w, next) {
                ("--cap", Some(c)) => Some(c),
                ("aap-exec", Some(c)) if !c.starts_with('-') && !c.starts_with('`') => Some(c),
                // `aap request [--session ID] CAP`
                ("request", Some("--session")) if i > 0 && words[i - 1] == "aap" => {
                    words.get(i + 3).copied()
                }
                ("request", Some(c)) if i > 0 && words[i - 1] == "aap" => Some(c),
                ("check", Some(c)) if i > 0 && words[i - 1] == "session" => Some(c),
                ("granted", Some(c)) => Some(c),
                _ => None,
            };
            if let Some(c) = cap {
                let c = c.trim_end_matches([';', ',', '`', ')']);
                if c.contains('-')
                    && c.chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                {
                    named.push(c.to_string());
                }
            }
        }
    }
    assert!(named.iter().any(|c| c == "forgejo-pat-read"), "{named:?}");
    let unknown: Vec<&String> = named
        .iter()
        .filter(|c| !ids.contains(&c.as_str()) && c.as_str() != "restart-web")
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/operator-guide.md names capabilities the seed catalog lacks: {unknown:?}"
    );
}

/// The shell commands of a Markdown file's ```sh blocks: (line number, command line), comments
/// and prompts' output lines (`# ...`) left out.
fn shell_lines(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for (n, line) in md.lines().enumerate() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            in_sh = !in_sh && matches!(lang.trim(), "sh" | "bash" | "shell");
            continue;
        }
        if in_sh && !t.starts_with('#') && !t.is_empty() {
            out.push((n + 1, t.to_string()));
        }
    }
    out
}

/// The words a shell line runs as commands: the first, and each after `&&`, `||`, `;`, `|`,
/// `$(` or a privilege wrapper's `--`.
fn commands(line: &str) -> Vec<String> {
    let line = line.split(" # ").next().unwrap_or(line);
    let seps = ["&&", "||", ";", "|", "("];
    let spaced = seps.iter().fold(line.replace("$(", "("), |l, sep| {
        l.replace(sep, &format!(" {sep} "))
    });
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let mut out = Vec::new();
    let mut next_is_command = true;
    for w in words {
        if seps.contains(&w) || w == "--" {
            next_is_command = true;
        } else if next_is_command && !w.contains('=') {
            out.push(w.to_string());
            next_is_command = false;
        }
    }
    out
}

/// Issue 15, item 11: the guide and the README assume nothing an image may lack: no `sudo`
/// anywhere a command is run (`runuser`, `setpriv` or `su` instead), and the install copies the
/// binaries already built rather than running `cargo install`, which builds everything again.
#[test]
fn the_guide_and_readme_run_no_sudo_and_install_without_rebuilding() {
    assert_eq!(
        commands("runuser -u codex -- aap doctor && x=1 sudo ls | sudo tee f; $(sudo id)"),
        ["runuser", "aap", "sudo", "sudo", "sudo"],
        "the reader of shell lines"
    );
    let mut found = Vec::new();
    let mut installs = 0;
    for file in ["README.md", "docs/operator-guide.md"] {
        let md = std::fs::read_to_string(repo().join(file)).unwrap();
        for (n, line) in shell_lines(&md) {
            let cmds = commands(&line);
            if cmds.iter().any(|c| c == "sudo") {
                found.push(format!("{file}:{n}: {line}"));
            }
            if line.starts_with("cargo install") {
                found.push(format!("{file}:{n}: {line} (cargo install builds again)"));
            }
            if line.starts_with("install ") && line.contains("target/release/aap ") {
                installs += 1;
            }
        }
    }
    assert!(
        found.is_empty(),
        "commands an image may lack, or a rebuild:\n{}",
        found.join("\n")
    );
    assert_eq!(
        installs, 2,
        "the README and the guide each install the built binaries with install(1)"
    );
}
