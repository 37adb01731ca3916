//! The `wrapped-command` backing: like a sudoers line. The capability names one absolute
//! program and one anchored pattern per argument position; `aap-exec CAP -- PROG ARGS...` runs
//! that program only when PROG is it and every argument matches its pattern, with exactly as
//! many arguments as patterns. There is no shell anywhere: arguments go to execve(2) as they
//! are, so `;`, `$(...)`, quotes and newlines are plain bytes that a pattern matches or not.

#![forbid(unsafe_code)]

use crate::error::{Error, Result, shell_quote};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How much of a refused argument a message shows.
const SHOW_MAX: usize = 80;

/// Check `resolved` (the program as execvp would find it) and `args` against the backing.
/// Returns the program to run: the catalog's own absolute path.
pub fn check(
    cap_id: &str,
    command: &str,
    patterns: &[String],
    resolved: &Path,
    args: &[OsString],
) -> Result<PathBuf> {
    let want = Path::new(command);
    let same = match (std::fs::canonicalize(resolved), std::fs::canonicalize(want)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(Error::denied(format!(
            "capability `{cap_id}` runs only {command}; {} is not that program",
            shell_quote(&resolved.to_string_lossy())
        ))
        .hint(format!(
            "aap-exec {cap_id} -- {command} {}",
            example(patterns)
        )));
    }
    if args.len() != patterns.len() {
        return Err(Error::denied(format!(
            "capability `{cap_id}` allows {command} with exactly {} argument(s) ({}); got {}",
            patterns.len(),
            patterns.join(" "),
            args.len()
        ))
        .hint(format!(
            "aap-exec {cap_id} -- {command} {}",
            example(patterns)
        )));
    }
    for (i, (arg, pat)) in args.iter().zip(patterns).enumerate() {
        // Anchored again here whatever the catalog wrote (the catalog check already requires
        // ^...$); bytes, so a non-UTF-8 argument is matched (and refused) rather than mangled.
        let re = regex::bytes::Regex::new(&format!("^(?:{pat})$")).map_err(|e| {
            Error::config(format!(
                "argument pattern #{} of `{cap_id}` is not a valid regex: {e}",
                i + 1
            ))
            .hint("aap catalog check")
        })?;
        if !re.is_match(arg.as_bytes()) {
            return Err(Error::denied(format!(
                "capability `{cap_id}`: argument {} {} does not match pattern {}",
                i + 1,
                show(arg),
                shell_quote(pat)
            ))
            .hint(format!(
                "aap-exec {cap_id} -- {command} {}",
                example(patterns)
            )));
        }
    }
    Ok(want.to_path_buf())
}

/// An argument as a message shows it: shell-quoted, control bytes and invalid UTF-8 escaped,
/// cut at [`SHOW_MAX`] characters with its length.
fn show(arg: &OsString) -> String {
    let text: String = arg
        .as_bytes()
        .utf8_chunks()
        .flat_map(|c| {
            let valid = c.valid().chars().flat_map(|ch| {
                if ch.is_control() {
                    ch.escape_default().collect::<Vec<_>>()
                } else {
                    vec![ch]
                }
            });
            let bad = c
                .invalid()
                .iter()
                .flat_map(|b| format!("\\x{b:02x}").chars().collect::<Vec<_>>());
            valid.chain(bad).collect::<Vec<_>>()
        })
        .collect();
    let n = text.chars().count();
    if n > SHOW_MAX {
        let cut: String = text.chars().take(SHOW_MAX).collect();
        format!("{}... ({} bytes)", shell_quote(&cut), arg.len())
    } else {
        shell_quote(&text)
    }
}

/// The patterns as a reminder of the argv shape, e.g. `'^restart$' '^web\.service$'`.
/// Arguments that match `patterns`, for a hint that runs: the shortest string each pattern
/// matches, checked against the pattern itself. A pattern it cannot build an argument for
/// (none in practice) is named instead (`ARG2 matching '...'`).
fn example(patterns: &[String]) -> String {
    let mut args = Vec::new();
    let mut unknown = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        match sample(p) {
            Some(a) => args.push(shell_quote(&a)),
            None => {
                args.push(format!("ARG{}", i + 1));
                unknown.push(format!("ARG{} matching {}", i + 1, shell_quote(p)));
            }
        }
    }
    let mut s = args.join(" ");
    if !unknown.is_empty() {
        s.push_str(&format!("   ({})", unknown.join(", ")));
    }
    s
}

/// The shortest printable string `pattern` matches, if it can be built and does match.
fn sample(pattern: &str) -> Option<String> {
    use regex_syntax::hir::{Class, Hir, HirKind};
    fn walk(h: &Hir, out: &mut String) -> Option<()> {
        match h.kind() {
            HirKind::Empty | HirKind::Look(_) => {}
            HirKind::Literal(l) => out.push_str(std::str::from_utf8(&l.0).ok()?),
            HirKind::Class(Class::Unicode(c)) => {
                // Prefer a letter or digit of the class; else its first printable character.
                let chars = c.ranges().iter().flat_map(|r| r.start()..=r.end());
                let mut first = None;
                for ch in chars.take(4096) {
                    if ch.is_ascii_alphanumeric() {
                        first = Some(ch);
                        break;
                    }
                    if first.is_none() && ch.is_ascii_graphic() {
                        first = Some(ch);
                    }
                }
                out.push(first?);
            }
            HirKind::Class(Class::Bytes(c)) => {
                let b = c
                    .ranges()
                    .iter()
                    .flat_map(|r| r.start()..=r.end())
                    .find(u8::is_ascii_alphanumeric)?;
                out.push(char::from(b));
            }
            HirKind::Repetition(r) => {
                for _ in 0..r.min.min(64) {
                    walk(&r.sub, out)?;
                }
            }
            HirKind::Capture(c) => walk(&c.sub, out)?,
            HirKind::Concat(v) => {
                for h in v {
                    walk(h, out)?;
                }
            }
            HirKind::Alternation(v) => walk(v.first()?, out)?,
        }
        Some(())
    }
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let mut out = String::new();
    walk(&hir, &mut out)?;
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).ok()?;
    (re.is_match(&out) && !out.is_empty() && !out.starts_with('-')).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn pats() -> Vec<String> {
        vec!["^restart$".into(), r"^web(@[a-z0-9-]+)?\.service$".into()]
    }
    fn args(a: &[&[u8]]) -> Vec<OsString> {
        a.iter().map(|b| OsString::from_vec(b.to_vec())).collect()
    }

    #[test]
    fn the_hint_gives_arguments_that_match_not_the_patterns() {
        assert_eq!(example(&pats()), "restart web.service");
        assert_eq!(
            example(&["^(start|stop)$".into(), "^[0-9]{2,}$".into()]),
            "start 00"
        );
        // A pattern only an empty or option-like argument matches is named, not guessed.
        assert_eq!(example(&["^-x$".into()]), "ARG1   (ARG1 matching '^-x$')");
    }

    #[test]
    fn matching_argv_runs_the_catalog_program() {
        let p = check(
            "c",
            "/bin/sh",
            &pats(),
            Path::new("/bin/sh"),
            &args(&[b"restart", b"web@blue.service"]),
        )
        .unwrap();
        assert_eq!(p, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn adversarial_arguments_are_refused_naming_position_and_pattern() {
        let cases: &[(&[u8], &[u8], usize)] = &[
            (b"restart;reboot", b"web.service", 1),
            (b"restart", b"web.service;reboot", 2),
            (b"restart", b"$(reboot).service", 2),
            (b"restart", b"web.service\n", 2),
            (b"restart\nreboot", b"web.service", 1),
            (b"--", b"web.service", 1),
            (b"restart", b"--", 2),
            (b"restart", b"web\xff.service", 2),
            (b"restart", b"web.servic", 2),
            (b"Restart", b"web.service", 1),
        ];
        for (a, b, pos) in cases {
            let e = check(
                "c",
                "/bin/sh",
                &pats(),
                Path::new("/bin/sh"),
                &args(&[a, b]),
            )
            .unwrap_err();
            assert_eq!(e.exit_code(), 77);
            assert!(
                e.message().contains(&format!("argument {pos} ")),
                "{}",
                e.message()
            );
            assert!(e.message().contains(&pats()[pos - 1]), "{}", e.message());
            assert!(!e.message().contains('\n'), "{}", e.message());
        }
        let long = vec![b'a'; 200_000];
        let e = check(
            "c",
            "/bin/sh",
            &pats(),
            Path::new("/bin/sh"),
            &args(&[b"restart", &long]),
        )
        .unwrap_err();
        assert!(e.message().contains("(200000 bytes)"), "{}", e.message());
        assert!(e.message().len() < 400);
    }

    #[test]
    fn wrong_count_or_program_is_refused() {
        let e = check(
            "c",
            "/bin/sh",
            &pats(),
            Path::new("/bin/sh"),
            &args(&[b"restart"]),
        )
        .unwrap_err();
        assert!(
            e.message().contains("exactly 2 argument(s)"),
            "{}",
            e.message()
        );
        let e = check(
            "c",
            "/bin/sh",
            &pats(),
            Path::new("/bin/sh"),
            &args(&[b"restart", b"web.service", b"x"]),
        )
        .unwrap_err();
        assert!(e.message().contains("got 3"), "{}", e.message());
        let e = check(
            "c",
            "/bin/sh",
            &pats(),
            Path::new("/bin/true"),
            &args(&[b"restart", b"web.service"]),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 77);
        assert!(e.message().contains("runs only /bin/sh"), "{}", e.message());
    }
}
