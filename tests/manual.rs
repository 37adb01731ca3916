//! `aap man` and `aap completions`: the pages render with the real man(1) without a single
//! warning, and the completions work in a real bash.

mod common;
#[path = "common/grants.rs"]
mod grants;

use common::*;
use std::path::Path;
use std::process::Command;

/// Render a page with man-db's `man -l` and groff's warnings on; returns (stdout, stderr).
fn render(page: &Path) -> (String, String) {
    let o = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man(1) runs: apt-get install -y man-db");
    assert!(
        o.status.success(),
        "man -l {}: {}",
        page.display(),
        stderr(&o)
    );
    (stdout(&o), stderr(&o))
}

#[test]
fn the_man_page_renders_without_warnings() {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).arg("man"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let page = d.path().join("aap.1");
    std::fs::write(&page, &o.stdout).unwrap();
    let (text, warnings) = render(&page);
    assert_eq!(warnings, "", "man -l printed warnings");
    for want in [
        "Agent Access Plane",
        "session",
        "doctor",
        "completions",
        "EXIT STATUS",
        "Infisical unavailable",
        "AAP_SESSION",
        "/etc/aap/config.yaml",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // Hidden plumbing commands stay out of the manual.
    assert!(text.contains("aap-session(1)"), "{text}");
    assert!(!text.contains("aap-git-credential"), "{text}");
    assert!(!text.contains("aap-infisical"), "{text}");
}

#[test]
fn every_page_written_by_man_dir_renders_without_warnings() {
    let d = tempdir();
    let out = d.path().join("man1");
    std::fs::create_dir(&out).unwrap();
    let o = run(cmd(AAP, d.path()).arg("man").arg("--dir").arg(&out));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut pages: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "aap.1",
        "aap-exec.1",
        "aap-session-start.1",
        "aap-audit-verify.1",
        "aap-doctor.1",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // It printed each path it wrote.
    assert_eq!(stdout(&o).lines().count(), pages.len());
    for p in &pages {
        let (text, warnings) = render(p);
        assert_eq!(warnings, "", "man -l {} printed warnings", p.display());
        assert!(!text.trim().is_empty());
    }
    let (exec, _) = render(&out.join("aap-exec.1"));
    assert!(exec.contains("--check"), "{exec}");
    let (start, _) = render(&out.join("aap-session-start.1"));
    assert!(start.contains("--break-glass"), "{start}");
}

#[test]
fn man_dir_must_exist() {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).args(["man", "--dir", "no/such/dir"]));
    assert_fails(&o, 78, "mkdir -p");
}

fn completions(shell: &str, extra: &[&str]) -> String {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).arg("completions").arg(shell).args(extra));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    stdout(&o)
}

/// Ask bash's completion function what it offers after `words` (the last one is completed).
fn bash_complete(script: &str, func: &str, words: &[&str]) -> String {
    let d = tempdir();
    let file = d.path().join("completion.bash");
    std::fs::write(&file, script).unwrap();
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{}'; COMP_POINT=${{#COMP_LINE}}; {func} {} '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file.display(),
        words_q.join(" "),
        words.len() - 1,
        words.join(" "),
        words[0],
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let o = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", &prog])
        .output()
        .unwrap();
    assert!(o.status.success(), "bash: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn bash_completions_complete_real_subcommands_and_flags() {
    let script = completions("bash", &[]);
    let got = bash_complete(&script, "_aap", &["aap", "se"]);
    assert_eq!(got.trim(), "session", "{got}");
    let got = bash_complete(&script, "_aap", &["aap", "session", "start", "--br"]);
    assert_eq!(got.trim(), "--break-glass", "{got}");
    let exec = completions("bash", &["--program", "aap-exec"]);
    let got = bash_complete(&exec, "_aap__exec", &["aap-exec", "--ch"]);
    assert_eq!(got.trim(), "--check", "{got}");
}

#[test]
fn zsh_fish_elvish_and_powershell_completions_generate() {
    assert!(completions("zsh", &[]).starts_with("#compdef aap"));
    assert!(completions("fish", &[]).contains("complete -c aap "));
    assert!(completions("elvish", &[]).contains("edit:completion:arg-completer[aap]"));
    assert!(completions("powershell", &[]).contains("Register-ArgumentCompleter"));
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).args(["completions", "tcsh"]));
    assert_eq!(code(&o), 2, "an unknown shell is a usage error");
}

// ---- dynamic completion of ids -----------------------------------------------------------------

/// An installation with the seed catalog, one session of codex and one pending request.
/// Returns (env, session, request).
fn ids_world() -> (grants::Env, String, String) {
    let env = grants::Env::new();
    let s = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    let o = run(&mut env.aap(&[
        "request",
        "ssh-vps1000-iskra-readonly",
        "--reason",
        "read the deploy log",
        "--session",
        &s,
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let req = stdout(&o)
        .split_whitespace()
        .nth(1)
        .expect("request ID pending: ...")
        .to_string();
    assert_eq!(req.len(), 26, "{}", stdout(&o));
    (env, s, req)
}

const SEED_CAPS: [&str; 5] = [
    "forgejo-pat-read",
    "ssh-rs2000-platform-host-agent",
    "ssh-vps1000-iskra-readonly",
    "infisical-secrets-read-scoped",
    "break-glass-full-access",
];

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Run bash's completion function `func` for `words` (the last is completed), with AAP_CONFIG.
fn bash_complete_in(env: &grants::Env, script: &str, func: &str, words: &[&str]) -> String {
    let file = env.path().join("completion.bash");
    std::fs::write(&file, script).unwrap();
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{}'; COMP_POINT=${{#COMP_LINE}}; {func} {} '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file.display(),
        words_q.join(" "),
        words.len() - 1,
        words.join(" "),
        words[0],
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let o = run(cmd("bash", env.path())
        .env("AAP_CONFIG", &env.config)
        .args(["--noprofile", "--norc", "-c", &prog]));
    assert!(o.status.success(), "bash: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn bash_completes_capability_session_and_request_ids_from_the_catalog_and_state() {
    let (env, s, req) = ids_world();
    let script = completions("bash", &[]);
    let f = "_aap_dynamic";
    let got = bash_complete_in(
        &env,
        &script,
        f,
        &[AAP, "session", "start", "--agent", "codex", "--cap", ""],
    );
    assert_eq!(sorted_lines(&got), sorted(&SEED_CAPS), "{got}");
    let got = bash_complete_in(&env, &script, f, &[AAP, "catalog", "show", "ssh-"]);
    assert_eq!(
        sorted_lines(&got),
        sorted(&[
            "ssh-rs2000-platform-host-agent",
            "ssh-vps1000-iskra-readonly"
        ]),
        "{got}"
    );
    for words in [
        &[AAP, "session", "revoke", ""][..],
        &[AAP, "session", "show", &s[..4]],
        &[AAP, "audit", "tail", "--session", ""],
    ] {
        let got = bash_complete_in(&env, &script, f, words);
        assert_eq!(got.trim(), s, "{words:?}: {got}");
    }
    let got = bash_complete_in(&env, &script, f, &[AAP, "approve", ""]);
    assert_eq!(got.trim(), req, "{got}");
    let got = bash_complete_in(&env, &script, f, &[AAP, "catalog", "list", "--agent", ""]);
    assert_eq!(got.trim(), "codex", "{got}");
    // A revoked session is no longer offered.
    let o = env.run(&["session", "revoke", &s]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let got = bash_complete_in(&env, &script, f, &[AAP, "session", "revoke", ""]);
    assert_eq!(got.trim(), "", "{got}");
    // Everything else is still clap's static completion.
    let got = bash_complete_in(&env, &script, f, &[AAP, "se"]);
    assert_eq!(got.trim(), "session", "{got}");
    let got = bash_complete_in(&env, &script, f, &[AAP, "session", "start", "--br"]);
    assert_eq!(got.trim(), "--break-glass", "{got}");
    // aap-exec: CAP and --check are capabilities, --session a session; after -- nothing of ours.
    let exec = completions("bash", &["--program", "aap-exec"]);
    let f = "_aap_exec_dynamic";
    let got = bash_complete_in(&env, &exec, f, &[AAP_EXEC, "forgejo"]);
    assert_eq!(got.trim(), "forgejo-pat-read", "{got}");
    let got = bash_complete_in(&env, &exec, f, &[AAP_EXEC, "--check", "infisical"]);
    assert_eq!(got.trim(), "infisical-secrets-read-scoped", "{got}");
    let got = bash_complete_in(&env, &exec, f, &[AAP_EXEC, "--ch"]);
    assert_eq!(got.trim(), "--check", "{got}");
    let got = bash_complete_in(
        &env,
        &exec,
        f,
        &[AAP_EXEC, "forgejo-pat-read", "--", "forgejo"],
    );
    assert!(!got.contains("forgejo-pat-read"), "{got}");
}

fn have(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        missing_tool(test, tool, &format!("apt-get install -y {tool}"));
    }
    found
}

#[test]
fn zsh_completes_ids_through_the_real_completion_function() {
    if !have(
        "zsh",
        "zsh_completes_ids_through_the_real_completion_function",
    ) {
        return;
    }
    let (env, s, req) = ids_world();
    let file = env.path().join("_aap");
    std::fs::write(&file, completions("zsh", &[])).unwrap();
    // Loaded the way compinit loads it, it registers the dynamic function for aap.
    let o = run(cmd("zsh", env.path()).args([
        "-f",
        "-c",
        &format!(
            "autoload -U compinit && compinit -u -D -d {d}/zcd && source {f} && print -r -- $_comps[aap]",
            d = env.path().display(),
            f = file.display()
        ),
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "_aap_dynamic", "{}", stderr(&o));
    // What it hands zsh's _describe at an id position (_describe itself needs a live line
    // editor, so it prints its array here); elsewhere it calls clap's _aap.
    let ask = |words: &str, current: usize| {
        let o = run(cmd("zsh", env.path()).env("AAP_CONFIG", &env.config).args([
            "-f",
            "-c",
            &format!(
                "compdef() {{ : }}; source {f}; _describe() {{ print -rl -- ${{(P)4}} }}; _aap() {{ print -r -- static }}; words=({words}); CURRENT={current}; _aap_dynamic",
                f = file.display()
            ),
        ]));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o)
    };
    let got = ask(&format!("{AAP} session revoke ''"), 4);
    assert!(
        got.starts_with(&format!("{s}:codex: forgejo-pat-read until ")),
        "{got}"
    );
    let got = ask(&format!("{AAP} deny ''"), 3);
    assert!(
        got.starts_with(&format!("{req}:codex: ssh-vps1000-iskra-readonly")),
        "{got}"
    );
    let got = ask(&format!("{AAP} session start --cap ''"), 5);
    let ids: Vec<&str> = got.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(sorted(&ids), sorted(&SEED_CAPS), "{got}");
    let got = ask(&format!("{AAP} session ''"), 3);
    assert_eq!(got.trim(), "static", "{got}");
}

#[test]
fn fish_completes_ids_with_its_own_completion_engine() {
    if !have("fish", "fish_completes_ids_with_its_own_completion_engine") {
        return;
    }
    let (env, s, req) = ids_world();
    let file = env.path().join("aap.fish");
    std::fs::write(&file, completions("fish", &[])).unwrap();
    let exec_file = env.path().join("aap-exec.fish");
    std::fs::write(&exec_file, completions("fish", &["--program", "aap-exec"])).unwrap();
    let bin = Path::new(AAP).parent().unwrap();
    let mut path = std::ffi::OsString::from(bin);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap());
    let complete = |line: &str| {
        let o = run(cmd("fish", env.path())
            .env("AAP_CONFIG", &env.config)
            .env("PATH", &path)
            .args([
                "--no-config",
                "-c",
                &format!(
                    "source {}; source {}; complete -C {}",
                    file.display(),
                    exec_file.display(),
                    grants_quote(line)
                ),
            ]));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o)
    };
    let got = complete("aap session revoke ");
    assert!(
        got.starts_with(&format!("{s}\tcodex: forgejo-pat-read until ")),
        "{got}"
    );
    let got = complete("aap approve ");
    assert!(got.starts_with(&format!("{req}\t")), "{got}");
    let got = complete("aap session start --cap ssh-");
    let ids: Vec<&str> = got.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(
        sorted(&ids),
        sorted(&[
            "ssh-rs2000-platform-host-agent",
            "ssh-vps1000-iskra-readonly"
        ]),
        "{got}"
    );
    let got = complete("aap-exec infisical");
    assert!(got.starts_with("infisical-secrets-read-scoped\t"), "{got}");
    let got = complete("aap sessio");
    assert!(got.starts_with("session"), "{got}");
}

fn grants_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "\\'"))
}
