//! The project names no package registry's host anywhere in its tracked files: docs, scripts and
//! config say "the Rust package registry" (or the distribution's package manager), and tools
//! use their default registry. The one exception is what cargo itself writes into `Cargo.lock`
//! (and `fuzz/Cargo.lock`): the `source = "registry+https://github.com/rust-lang/<index>"` line
//! of every locked package names the default registry's index, and cannot be changed. (The
//! names below are assembled from parts, so that this file does not name them either.)

mod common;

use std::process::Command;

/// Registry hosts that must not appear (matched case-insensitively).
fn hosts() -> Vec<String> {
    let crates = ["crates", "io"].join(".");
    vec![
        crates.clone(),
        format!("static.{crates}"),
        format!("index.{crates}"),
        ["pypi", "org"].join("."),
        ["registry", "npmjs", "org"].join("."),
        ["deb", "debian", "org"].join("."),
    ]
}

/// The only line a tracked file may hold that names one: cargo's own, in a Cargo.lock.
fn cargo_lock_source() -> String {
    format!(
        "source = \"registry+https://github.com/rust-lang/{}-index\"",
        ["crates", "io"].join(".")
    )
}

/// Every finding: `path:line: text`, for the tracked files of the checkout (read from the work
/// tree, so an edit shows before it is committed).
fn findings() -> Vec<String> {
    let repo = common::repo();
    let o = Command::new("git")
        .current_dir(&repo)
        .args(["ls-files", "-z"])
        .output()
        .expect("git ls-files");
    assert!(o.status.success(), "git ls-files: {o:?}");
    let (hosts, lock_source) = (hosts(), cargo_lock_source());
    let mut out = Vec::new();
    for path in o.stdout.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        let path = String::from_utf8_lossy(path).into_owned();
        let Ok(bytes) = std::fs::read(repo.join(&path)) else {
            continue; // deleted in the work tree
        };
        let text = String::from_utf8_lossy(&bytes);
        let is_lock = path == "Cargo.lock" || path.ends_with("/Cargo.lock");
        for (n, line) in text.lines().enumerate() {
            if is_lock && line.trim() == lock_source {
                continue;
            }
            let lower = line.to_ascii_lowercase();
            if hosts.iter().any(|h| lower.contains(h.as_str())) {
                out.push(format!("{path}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    out
}

#[test]
fn no_tracked_file_names_a_package_registry_host() {
    if Command::new("git").arg("--version").output().is_err() {
        common::missing_tool(
            "no_tracked_file_names_a_package_registry_host",
            "git",
            "apt-get install -y git",
        );
        return;
    }
    let found = findings();
    assert!(
        found.is_empty(),
        "package registry hosts named in tracked files (say \"the Rust package registry\" instead):\n{}",
        found.join("\n")
    );
}

/// The check finds what it looks for: the exception covers exactly cargo's line.
#[test]
fn the_check_sees_the_cargo_lock_lines_it_excuses() {
    let lock = std::fs::read_to_string(common::repo().join("Cargo.lock")).unwrap();
    assert!(
        lock.lines().any(|l| l.trim() == cargo_lock_source()),
        "Cargo.lock no longer has cargo's source line; update cargo_lock_source()"
    );
    // ...and nothing else of Cargo.lock is excused: its line names a host the check looks for.
    assert!(
        hosts()
            .iter()
            .any(|h| cargo_lock_source().contains(h.as_str()))
    );
}

/// Issue 15, item 11: `deny.toml` lists no registry of its own (`allow-registry`): with none
/// listed, cargo-deny allows only the default one, and unknown registries stay denied.
#[test]
fn deny_toml_names_no_registry_and_denies_unknown_ones() {
    let text = std::fs::read_to_string(common::repo().join("deny.toml")).unwrap();
    let keys: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .collect();
    assert!(
        !keys.contains(&"allow-registry"),
        "deny.toml sets allow-registry; drop it (the default registry is allowed when none is listed)"
    );
    assert!(
        keys.contains(&"unknown-registry") && text.contains("unknown-registry = \"deny\""),
        "deny.toml must keep denying unknown registries"
    );
}
