//! `aap man` and `aap completions`: the pages render with the real man(1) without a single
//! warning, and the completions work in a real bash.

mod common;

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
