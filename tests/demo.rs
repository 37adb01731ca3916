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
        "aap-exec: hint: ask the operator for it: aap request ssh-rs2000-platform-host-agent --reason '...' --wait   (the operator adds it with: aap session approve ",
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
