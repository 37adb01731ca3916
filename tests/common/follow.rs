//! Every hint a CLI test produces is followed, in its world, and judged (issue 15, item 5).
//!
//! [`super::run`] is the one place through which the tests run `aap` and `aap-exec` (directly,
//! or as another uid through `setpriv ... aap-exec`). With `AAP_TEST_FOLLOW_HINTS=1` (set by
//! `scripts/test-all.sh`), every hint such a command prints is followed right then, before the
//! test continues:
//!
//! - `PROG: hint: ...` lines on stderr after a `PROG: error: ...` (or, on exit 0, a
//!   `PROG: warning: ...`), judged against that message;
//! - each `warn` or `fail` finding of `aap doctor` (its text or its `--json` on stdout), whatever
//!   doctor's exit status, judged per finding: the finding's message must be gone from what
//!   doctor prints when run again in the copy (or from what the hint, when it is itself
//!   `aap doctor ...`, printed); the other findings remain, so the exit status says nothing.
//!   Doctor's hints are followed as the test's uid, the operator of these worlds (they fix the
//!   installation), even when doctor ran as an agent;
//! - the `aap:` and `aap-exec:` hint lines of a test's shell script (`sh -c SCRIPT`, directly or
//!   through `setpriv`) that runs `aap` or `aap-exec`, whatever the script's exit status; the
//!   script as a whole is the original, run again to judge.
//!
//! A command that changes the machine rather than the world (`useradd`, `apt-get`,
//! `systemctl`: [`MACHINE_WIDE`]) is never run; only an [`ALLOWLIST`] entry of kind
//! [`Kind::Inspect`] (runnable as written) or [`Kind::Service`] (the unit's by-hand form is run
//! instead) may judge it. Each hint is followed:
//!
//! - **In a copy of the world, at the world's own path.** The world is the test's `aap-test-*`
//!   temp dir that holds the command's working directory. It is copied (`cp -a`) to a scratch
//!   dir, and a holder process in a private mount namespace (`unshare --mount --propagation
//!   private`, as root: CI runs as root) bind-mounts the copy over the world's path. The hint's
//!   command and the re-run of the original command enter that namespace (`nsenter --mount`),
//!   so every absolute path in the config (catalog, state dir, audit log, sockets) names the
//!   copy, and nothing the hint does reaches the test's own files. A copy at another path
//!   would not work: configs hold absolute paths; following in place would change the state
//!   the test goes on to assert on.
//! - **With its own broker.** When the world's broker socket (the config's `broker.socket`, or
//!   `<world>/broker.sock`) answers, a broker of the copy (`aap broker`, as the uid that owns
//!   the original socket) is started in the namespace on the same path before the hint runs,
//!   and killed afterwards; so `aap-exec`, `aap request` and `aap session check` in a hint
//!   reach a broker that reads the copy's grants and writes the copy's audit log. Servers
//!   outside the world's dir (the dev-server, sshd, git) are shared, as the hint's reader
//!   would share them.
//! - **As the same user, in the same environment.** The hint runs under `sh -c` in the
//!   original's working directory with the original's environment (the helpers clear it and
//!   set it explicitly), the binaries' directory first in PATH, `AAP_SESSION` set from the
//!   original's `--session` (the reader's shell has it exported), and, when the original ran
//!   through `setpriv`, through the same `setpriv` prefix.
//!
//! Judged as in `tests/hints.rs`: the hint names a command (the whole hint, or what follows
//! its first `: `, up to `; ` or a parenthetical aside); the command must have no placeholder
//! (`<agent>`, an upper-case word such as `ID`, `...`); it passes when it succeeds, or when the
//! original command, run again in the copy afterwards, no longer fails with the same error
//! message (a corrected `aap-exec CAP -- CMD` passes when aap-exec printed no error of its own:
//! the status is then the program's). A hint that names the one thing to do rather than a command (an operator-only
//! action, checking a fingerprint out of band) must match an entry of [`ALLOWLIST`], reviewed
//! like code; any other hint without a command is a failure. A failure fails the test that
//! produced it, naming the test, the command, its error, the hint and what following it
//! printed. Each outcome is appended to `$AAP_TEST_HINT_LOG` when set, which
//! `scripts/test-all.sh` counts in its summary.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// How a hint that is not simply a command to run is judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// It names the one thing to do, and that is not a command here: an operator's edit of a
    /// file, an out-of-band check, something in Infisical's UI, waiting. Nothing is run.
    Prose,
    /// An edit described in words, then the command that checks it ("...; then run: aap
    /// catalog check FILE"). Without the edit that command must run and report the same error:
    /// it checks the thing the error is about.
    FixThenCheck,
    /// Its commands look at something (`ls -l FILE`, `command -v PROG`, `curl URL`): each must
    /// be runnable as written (valid shell, its program found); their exit status is the
    /// information, not a verdict.
    Inspect,
    /// Its command starts a service in the foreground (`aap broker`, `aap dev-server`): it must
    /// still be running when stopped after a few seconds, or exit 0.
    Daemon,
    /// It starts a systemd unit, which this image does not run, and gives the same service by
    /// hand in an aside (`(or run it by hand: aap broker --socket P)`, `(or in the foreground:
    /// ...)`). The unit's command must be runnable as written; the aside's is started in the
    /// copy, as the operator (the test's uid: starting the broker is the operator's act), and
    /// while it runs the original, run again, must no longer report the same thing. When the
    /// service itself refuses to start with an error and a hint of its own (the test broke the
    /// world it would serve), the next step is told: counted as allowlisted, not followed.
    Service,
    /// Its command is the original corrected (another argument, another file): run, it must
    /// not fail with the original's error; whether it then succeeds is its own story.
    Instead,
}

/// Hints that are not simply a command that fixes the error, keyed by a stable part of their
/// text, each with its kind and why. Reviewed like code: a new hint that names no command
/// fails the test that produced it until it is fixed or listed here.
pub const ALLOWLIST: &[(&str, Kind, &str)] = &[
    // An edit in words, then the command that checks it.
    (
        "compare the reference",
        Kind::FixThenCheck,
        "compare with the project in Infisical (out of band), fix, then the check",
    ),
    (
        "then run: aap catalog check",
        Kind::FixThenCheck,
        "a catalog edit in words, then the check",
    ),
    (
        "then: aap catalog check",
        Kind::FixThenCheck,
        "a catalog or config edit, then the check",
    ),
    (
        "# after fixing",
        Kind::FixThenCheck,
        "a config edit, then the check",
    ),
    (
        "and test it: echo",
        Kind::FixThenCheck,
        "fix notify.command, then feed it what the broker would",
    ),
    (
        "in the catalog, then: aap wrappers install",
        Kind::FixThenCheck,
        "a catalog edit, then the install again",
    ),
    (
        "restart the broker, then: aap session import",
        Kind::FixThenCheck,
        "an operator's config edit, then the import again",
    ),
    // The one thing to do, not a command here.
    (
        "retry later; if it persists",
        Kind::Prose,
        "a transient server fault: wait, then look at the server",
    ),
    (
        "wait until then, or fix this host's clock",
        Kind::Prose,
        "waiting, or the clock (operator)",
    ),
    (
        "wait for some of its aap-exec runs to end",
        Kind::Prose,
        "waiting, or an operator's config edit",
    ),
    (
        "the grant or its signature was altered",
        Kind::Prose,
        "copy the files again from the signing host (out of band)",
    ),
    (
        "in Infisical, give agent",
        Kind::Prose,
        "a role change in Infisical's UI",
    ),
    (
        "in Infisical, give the identity read access",
        Kind::Prose,
        "a role change in Infisical's UI (a child's `aap infisical check` with a scoped token)",
    ),
    (
        "check the client secret in",
        Kind::Prose,
        "compare with Infisical's UI (out of band)",
    ),
    (
        "check the token TTL",
        Kind::Prose,
        "Infisical's Universal Auth settings (out of band), and the clock",
    ),
    (
        "the operator adds `uid:",
        Kind::Prose,
        "an operator's config edit and broker restart",
    ),
    (
        "the operator adds the host key of",
        Kind::Prose,
        "verify a host key out of band, then the operator adds it",
    ),
    (
        "from the agent's own shell, not from inside another aap-exec",
        Kind::Prose,
        "where to run it from",
    ),
    (
        "name the file inside it",
        Kind::Prose,
        "a path to write instead",
    ),
    (
        "(format: docs/infisical.md",
        Kind::Prose,
        "a seed file edit",
    ),
    (
        "write the capabilities into it (format: docs/catalog.md",
        Kind::Prose,
        "write a catalog: the operator's policy",
    ),
    (
        "set infisical.ca_bundle",
        Kind::Prose,
        "a config edit; the openssl command shows the certificate",
    ),
    (
        "systemctl start aap-broker.socket (or ",
        Kind::Service,
        "start the broker service: systemd does not run here; its by-hand form is started instead",
    ),
    (
        "systemctl restart aap-broker.socket (or run it by hand: ",
        Kind::Service,
        "restart the broker service: systemd does not run here; its by-hand form is started instead",
    ),
    (
        "a real catalog is far smaller",
        Kind::Prose,
        "look at which file was named",
    ),
    (
        "if the signer is a real operator",
        Kind::Prose,
        "an operator's decision to trust a key (out of band)",
    ),
    (
        "add a line to",
        Kind::Prose,
        "an operator's edit of allowed_signers, the line given in full",
    ),
    (
        "name the program to run after `--`",
        Kind::Prose,
        "the usage: which program to run is the reader's choice",
    ),
    (
        "add `uid: N` (N: id -u",
        Kind::Prose,
        "an operator's config edit: the agent user's uid",
    ),
    (
        "ask for it yourself: aap request",
        Kind::Prose,
        "another agent's request: make one's own, in one's own session, which a waiter need not have",
    ),
    (
        "give each agent its own Unix user",
        Kind::Prose,
        "an operator's user and config change",
    ),
    (
        "use the 26-character id that `aap request` printed",
        Kind::Prose,
        "the id is in what the reader's aap request printed",
    ),
    // `aap doctor`'s findings.
    (
        "give the agent its own user (docs/threat-model.md",
        Kind::Prose,
        "an operator's user and config change",
    ),
    (
        "each line is: PRINCIPAL namespaces=",
        Kind::Prose,
        "an edit of the named line of allowed_signers, its format given",
    ),
    (
        "run this check as the operator too: aap doctor",
        Kind::Prose,
        "the operator is the signing key's owner, another uid than the test's; root's doctor says the same",
    ),
    (
        "to secure_path in",
        Kind::Prose,
        "a config edit, the directory to add named",
    ),
    (
        "create a user for it: useradd",
        Kind::Inspect,
        "it adds a user to the machine, outside the world: never run, it must be runnable as written",
    ),
    (
        "run the agent as its own user and set agents.",
        Kind::Inspect,
        "an operator's config edit; `id -u NAME` shows the uid once that user exists (the world has none)",
    ),
    (
        "apt-get install -y",
        Kind::Inspect,
        "it installs a package on the machine: never run, it must be runnable as written",
    ),
    (
        "move it away or choose another broker.socket",
        Kind::Inspect,
        "look at what is in the socket's place, then move it or edit the config",
    ),
    (
        "keep a copy as evidence and look at the lines around it",
        Kind::Inspect,
        "a broken chain is evidence to keep and read, not a state to repair",
    ),
    // Commands that look at something.
    (
        "check that Infisical answers: curl",
        Kind::Inspect,
        "look at the server",
    ),
    (
        "check that infisical.url points at Infisical itself",
        Kind::Inspect,
        "look at what answers at the url",
    ),
    ("check the path", Kind::Inspect, "look at the path"),
    (
        "point to a regular file: ls -l",
        Kind::Inspect,
        "look at the path",
    ),
    (
        "or point to the right file: ls -l",
        Kind::Inspect,
        "look at the path, then create or name it",
    ),
    (
        "check the name, or give the full path: command -v",
        Kind::Inspect,
        "look the program up",
    ),
    (
        "see where it breaks: aap audit verify",
        Kind::Inspect,
        "the verification shows the broken line",
    ),
    (
        "check the key signs at all",
        Kind::Inspect,
        "try the key by hand",
    ),
    (
        "copy the grant's two files again",
        Kind::FixThenCheck,
        "copy files from the signing host (out of band), then the import",
    ),
    (
        "import the .grant file that `aap session start` wrote",
        Kind::Prose,
        "which file to import: the reader's own grant",
    ),
    (
        "import the grant; its .sig is found next to it",
        Kind::Instead,
        "names the grant instead of its .sig; whether that grant imports is the grant's own story (the test's is revoked)",
    ),
    // A server in the foreground.
    (
        "listen on loopback: aap dev-server",
        Kind::Daemon,
        "a server in the foreground",
    ),
];

/// Whether hints are followed in this run.
pub fn enabled() -> bool {
    std::env::var_os("AAP_TEST_FOLLOW_HINTS").is_some_and(|v| v == "1")
}

/// When hints are followed and logged: assert that the running test had a hint of a command
/// starting with `original` (e.g. "/bin/sh -c ") followed or allowlisted, not failed or
/// missed. Without the follower on, nothing to check.
pub fn assert_judged(original: &str) {
    let Some(path) = std::env::var_os("AAP_TEST_HINT_LOG").filter(|_| enabled()) else {
        return;
    };
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let me = format!("{}: `{original}", test_name());
    assert!(
        log.lines().any(
            |l| (l.starts_with("FOLLOWED ") || l.starts_with("ALLOWLISTED ")) && l.contains(&me)
        ),
        "no hint of `{original}...` was followed for {}: {log}",
        test_name()
    );
}

/// The command a hint names: from its first `aap`, `aap-exec` or `eval` word (the start, or
/// after a `: `), up to a `; ` or a trailing parenthetical aside.
pub fn command_of(hint: &str) -> Option<String> {
    let starts = ["aap ", "aap-exec ", "eval "];
    let mut at = None;
    if starts.iter().any(|s| hint.starts_with(s)) {
        at = Some(0);
    } else {
        for (i, _) in hint.match_indices(": ") {
            if starts.iter().any(|s| hint[i + 2..].starts_with(s)) {
                at = Some(i + 2);
                break;
            }
        }
    }
    let cmd = &hint[at?..];
    let cmd = cmd.split("   (").next().unwrap_or(cmd);
    let cmd = cmd.split(" (or ").next().unwrap_or(cmd);
    // `CMD; then: ...`, `CMD; inspect: ...`: the first command is the one to run.
    let cmd = cmd.split("; ").next().unwrap_or(cmd);
    Some(cmd.trim().to_owned())
}

/// The programs a hint's command may start with (or an absolute path): a word at the start of
/// a hint, or after its `: ` or `; `, that is one of these begins a command.
const PROGRAMS: &[&str] = &[
    "aap",
    "aap-exec",
    "eval",
    "chmod",
    "chown",
    "ls",
    "mkdir",
    "mv",
    "cp",
    "sed",
    "curl",
    "openssl",
    "command",
    "echo",
    "date",
    "iconv",
    "ssh-keygen",
    "systemctl",
    "git",
    "cat",
    "rm",
    "grep",
    "id",
    "touch",
    "setfacl",
    "runuser",
    "setpriv",
    "su",
    // System commands of `aap doctor`'s hints.
    "chattr",
    "lsattr",
    "useradd",
    "getent",
    "apt-get",
    "fuser",
];

/// Whether `first`, the first word of `rest`, begins a command: a word of [`PROGRAMS`], an
/// absolute path, or `install` with an option (`install -m 0600 ...`; "install it" is prose).
fn begins_command(first: &str, rest: &str) -> bool {
    PROGRAMS.contains(&first)
        || first.starts_with('/')
        || (first == "install" && rest.starts_with("install -"))
}

/// Every command a hint names, in order: each starts at the hint's start or after a `: ` or
/// `; `, with a word of [`PROGRAMS`], and ends at the next `; `, ` (` aside or `, then `.
pub fn commands_of(hint: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    while from < hint.len() {
        let rest = &hint[from..];
        let first = rest.split_whitespace().next().unwrap_or("");
        let is_cmd = begins_command(first, rest);
        // A command inside a parenthetical aside is a note (the operator's side, another way),
        // not a step of the hint.
        let inside = hint[..from].matches('(').count() > hint[..from].matches(')').count();
        if is_cmd
            && !inside
            && (from == 0 || hint[..from].ends_with(": ") || hint[..from].ends_with("; "))
        {
            let end = ["; ", " (", ", then "]
                .iter()
                .filter_map(|sep| rest.find(sep))
                .min()
                .unwrap_or(rest.len());
            out.push(rest[..end].trim().to_owned());
            from += end.max(1);
            if hint[from..].starts_with("; ") {
                from += 2;
            }
            continue;
        }
        // The next `: ` or `; `.
        let one = rest.chars().next().map_or(1, char::len_utf8);
        match [": ", "; "]
            .iter()
            .filter_map(|sep| rest[one..].find(sep))
            .min()
        {
            Some(i) => from += one + i + 2,
            None => break,
        }
    }
    out
}

/// Programs that change the machine rather than the world: never run by the follower.
const MACHINE_WIDE: &[&str] = &[
    "useradd",
    "userdel",
    "usermod",
    "groupadd",
    "apt-get",
    "apt",
    "dpkg",
    "systemctl",
];

/// Whether any simple command of `cmd` (split at `&&`, `||`, `;`, `|`) runs a program of
/// [`MACHINE_WIDE`].
pub fn machine_wide(cmd: &str) -> bool {
    cmd.split(['&', '|', ';'])
        .filter_map(|part| part.split_whitespace().next())
        .any(|w| MACHINE_WIDE.contains(&w))
}

/// The words of a shell command, each with whether any part of it was quoted.
fn words(cmd: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let (mut w, mut quoted, mut q, mut any) = (String::new(), false, None::<char>, false);
    for ch in cmd.chars() {
        match (q, ch) {
            (Some(c), _) if ch == c => q = None,
            (Some(_), _) => w.push(ch),
            (None, '\'' | '"') => {
                q = Some(ch);
                quoted = true;
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push((std::mem::take(&mut w), quoted));
                }
                (quoted, any) = (false, false);
            }
            (None, c) => {
                w.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push((w, quoted));
    }
    out
}

/// A word of `cmd` the reader would have to fill in: `<agent>`, an unquoted upper-case word
/// (`ID`, `CAP`), an unquoted `...`. A quoted free-text value (`--reason '...'`) runs as
/// written and is not one.
pub fn placeholder(cmd: &str) -> Option<String> {
    words(cmd)
        .into_iter()
        .find(|(w, quoted)| {
            w.split('<').skip(1).any(|r| {
                r.split_once('>').is_some_and(|(inner, _)| {
                    !inner.is_empty()
                        && inner
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                })
            }) || (!quoted
                && (w.contains("...")
                    || w.contains('…')
                    || (w.len() >= 2 && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))))
        })
        .map(|(w, _)| w)
}

/// One `error:` (or `warning:`, or doctor finding's) message and the hints printed after it.
#[derive(Debug)]
struct Told {
    message: String,
    hint: String,
}

/// The (message, hint) pairs of a stderr: `PROG: hint: H` after `PROG: error: M` (or
/// `PROG: warning: M`). With `ours_only`, only lines whose PROG is `aap` or `aap-exec` (what a
/// shell script of a test printed mixes in other programs' lines).
fn hints_of(err: &str, ours_only: bool) -> Vec<Told> {
    let mut out = Vec::new();
    let mut message = String::new();
    for l in err.lines() {
        if ours_only && !(l.starts_with("aap: ") || l.starts_with("aap-exec: ")) {
            continue;
        }
        if let Some((_, m)) = l
            .split_once(": error: ")
            .or_else(|| l.split_once(": warning: "))
        {
            message = m.to_owned();
        } else if let Some((_, h)) = l.split_once(": hint: ") {
            out.push(Told {
                message: message.clone(),
                hint: h.to_owned(),
            });
        }
    }
    out
}

/// The `skip`, `warn` and `fail` findings of `aap doctor`'s stdout that carry a hint, from its JSON
/// (`--json`) or its text (`STATUS CHECK MESSAGE`, then an indented `hint: H`).
fn findings_of(out: &str) -> Vec<Told> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(out) {
        return v["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["status"] == "skip" || f["status"] == "warn" || f["status"] == "fail")
            .filter_map(|f| {
                Some(Told {
                    message: f["message"].as_str()?.to_owned(),
                    hint: f["hint"].as_str()?.to_owned(),
                })
            })
            .collect();
    }
    let mut out_ = Vec::new();
    let mut message: Option<String> = None;
    for l in out.lines() {
        if (l.starts_with("skip  ") || l.starts_with("warn  ") || l.starts_with("fail  "))
            && l.len() > 23
        {
            message = Some(l[23..].to_owned());
        } else if let Some(h) = l.trim_start().strip_prefix("hint: ")
            && l.starts_with(' ')
            && let Some(m) = message.take()
        {
            out_.push(Told {
                message: m,
                hint: h.to_owned(),
            });
        } else {
            message = None;
        }
    }
    out_
}

/// [`findings_of`] as (message, hint) pairs.
pub fn doctor_findings(out: &str) -> Vec<(String, String)> {
    findings_of(out)
        .into_iter()
        .map(|t| (t.message, t.hint))
        .collect()
}

/// Every finding message (of any status) of a doctor's stdout.
fn doctor_messages(out: &str) -> Vec<String> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(out) {
        return v["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["status"] != "ok")
            .filter_map(|f| f["message"].as_str().map(str::to_owned))
            .collect();
    }
    out.lines()
        .filter(|l| (l.starts_with("warn  ") || l.starts_with("fail  ")) && l.len() > 23)
        .map(|l| l[23..].to_owned())
        .collect()
}

/// What a command run by a test is, for following its hints.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Subject {
    /// `aap` or `aap-exec`: the hints on its stderr.
    Ours,
    /// `aap doctor`: the hint of each finding on its stdout, whatever its exit status.
    Doctor,
    /// `sh -c SCRIPT` (or `bash`) whose script runs `aap` or `aap-exec`: their hints on its
    /// stderr, whatever the script's own exit status (`...; echo status=$?`).
    Script,
}

fn is_shell(p: &OsStr) -> bool {
    matches!(
        Path::new(p).file_name().and_then(OsStr::to_str),
        Some("sh" | "bash" | "dash")
    )
}

/// The subject of `c`: what it is, the binary whose directory the reader has first in PATH,
/// and the prefix (`setpriv ...`) that runs it as another uid.
fn subject(c: &Command) -> Option<(Subject, PathBuf, Vec<OsString>)> {
    let prog = c.get_program();
    let args: Vec<&OsStr> = c.get_args().collect();
    let (at, prefix): (usize, Vec<OsString>) = if is_ours(prog) || is_shell(prog) {
        (0, Vec::new())
    } else if Path::new(prog).file_name() == Some(OsStr::new("setpriv")) {
        let i = args.iter().position(|a| is_ours(a) || is_shell(a))?;
        (
            i + 1,
            std::iter::once(prog.to_owned())
                .chain(args[..i].iter().map(|a| a.to_os_string()))
                .collect(),
        )
    } else {
        return None;
    };
    let runs = if at == 0 { prog } else { args[at - 1] };
    let rest = &args[at..];
    if is_ours(runs) {
        let sub = rest.iter().find(|a| !a.to_string_lossy().starts_with('-'));
        let what = if sub.is_some_and(|s| *s == "doctor") {
            Subject::Doctor
        } else {
            Subject::Ours
        };
        return Some((what, PathBuf::from(runs), prefix));
    }
    // A shell: `-c SCRIPT` that names `aap` or `aap-exec`.
    let i = rest.iter().position(|a| *a == "-c")?;
    let script = rest.get(i + 1)?.to_string_lossy();
    let bin = script
        .split(|c: char| c.is_whitespace() || "'\";|&()".contains(c))
        .find(|w| w.starts_with('/') && is_ours(OsStr::new(w)))
        .map(PathBuf::from);
    let named = bin.is_some()
        || script
            .split(|c: char| c.is_whitespace() || ";|&()".contains(c))
            .any(|w| w == "aap" || w == "aap-exec");
    if !named {
        return None;
    }
    Some((
        Subject::Script,
        bin.unwrap_or_else(|| PathBuf::from(super::AAP)),
        prefix,
    ))
}

/// Findings already followed in this test process, by (world, message, hint): the doctor
/// tests run the same doctor as JSON and as text.
fn seen(c: &Command, t: &Told) -> bool {
    static SEEN: std::sync::Mutex<Vec<(PathBuf, String, String)>> =
        std::sync::Mutex::new(Vec::new());
    let cwd = c
        .get_current_dir()
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    let key = (world_of(&cwd), t.message.clone(), t.hint.clone());
    let mut s = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if s.contains(&key) {
        return true;
    }
    s.push(key);
    false
}

fn is_ours(p: &OsStr) -> bool {
    matches!(
        Path::new(p).file_name().and_then(OsStr::to_str),
        Some("aap" | "aap-exec")
    )
}

/// The test running now: `crate::test_name`.
fn test_name() -> String {
    let t = std::thread::current();
    format!(
        "{}::{}",
        env!("CARGO_CRATE_NAME"),
        t.name().unwrap_or("<unnamed thread>")
    )
}

fn log(line: &str) {
    if let Some(p) = std::env::var_os("AAP_TEST_HINT_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
    {
        // One write(2) with O_APPEND: lines of parallel tests never interleave.
        let _ = f.write_all(format!("{}\n", line.replace('\n', " ")).as_bytes());
    }
}

fn shell_line(c: &Command) -> String {
    let q = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    std::iter::once(q(c.get_program()))
        .chain(c.get_args().map(q))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Called by [`super::run`] after every command: follows and judges the hints of an `aap` or
/// `aap-exec` (failed, or warning on success), of each finding of an `aap doctor`, and of the
/// `aap` and `aap-exec` a test's shell script runs.
pub fn after(c: &Command, o: &Output) {
    if !enabled() {
        return;
    }
    let Some((what, bin, prefix)) = subject(c) else {
        return;
    };
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let told: Vec<Told> = match what {
        Subject::Ours => hints_of(&err, false),
        Subject::Script => hints_of(&err, true),
        Subject::Doctor => {
            let mut t = findings_of(&String::from_utf8_lossy(&o.stdout));
            t.extend(hints_of(&err, false));
            t.retain(|t| !seen(c, t));
            t
        }
    };
    if told.is_empty() {
        return;
    }
    let test = test_name();
    let original = shell_line(c);
    if !can_follow(&test) {
        return;
    }
    let mut failures = Vec::new();
    for t in &told {
        let r = judge(c, &bin, &prefix, t, what);
        let line = match &r {
            Judged::Worked(how) => {
                format!("FOLLOWED {test}: `{original}`: hint {:?}: {how}", t.hint)
            }
            Judged::Allowlisted(key) => {
                format!(
                    "ALLOWLISTED {test}: `{original}`: hint {:?} (entry {key:?})",
                    t.hint
                )
            }
            Judged::Failed(why) => format!(
                "FAILED {test}: `{original}`: error {:?}: hint {:?}: {why}",
                t.message, t.hint
            ),
        };
        log(&line);
        eprintln!("hint-follow: {line}");
        if let Judged::Failed(why) = r {
            failures.push(format!(
                "test {test}\n  command: {original}\n  its error: {}\n  its hint: {}\n  following it: {why}",
                t.message, t.hint
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "a hint does not work when followed (tests/common/follow.rs):\n{}",
        failures.join("\n")
    );
}

/// Whether this machine can follow hints (root, unshare, nsenter); otherwise the full run
/// fails and any other run skips following, saying so.
fn can_follow(test: &str) -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let can = *CAN.get_or_init(machine_can_follow);
    if can {
        return true;
    }
    let why = if aap::sys::uid() == 0 {
        "unshare, nsenter, mount, cp or timeout is missing (apt-get install -y util-linux coreutils)"
    } else {
        "following hints needs root (a private mount namespace over the world's directory)"
    };
    assert!(
        !super::full_run(),
        "{test}: {why}: in the full run, hints are followed"
    );
    super::skip(&format!("{test}: following its hints"), why);
    false
}

fn machine_can_follow() -> bool {
    let root = aap::sys::uid() == 0;
    let tools = ["unshare", "nsenter", "mount", "cp", "timeout"]
        .iter()
        .all(|t| {
            Command::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    root && tools
}

enum Judged {
    Worked(String),
    Allowlisted(&'static str),
    Failed(String),
}

fn printed(o: &Output) -> String {
    format!(
        "exit {}; stdout: {}; stderr: {}",
        o.status
            .code()
            .map_or_else(|| format!("{:?}", o.status), |c| c.to_string()),
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

type Env = Vec<(OsString, Option<OsString>)>;

/// The environment the hint's reader has: the original's, the binaries first in PATH, and
/// `AAP_SESSION` from its `--session`.
fn reader_env(c: &Command, bin: &Path) -> Env {
    let mut env: Env = c
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(OsStr::to_owned)))
        .collect();
    let get = |env: &Env, k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.clone())
    };
    let path = get(&env, "PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let mut p = bin
        .parent()
        .unwrap_or(Path::new("/"))
        .as_os_str()
        .to_owned();
    p.push(":");
    p.push(&path);
    env.retain(|(k, _)| k != "PATH");
    env.push(("PATH".into(), Some(p)));
    if get(&env, "AAP_SESSION").is_none() {
        let args: Vec<&OsStr> = c.get_args().collect();
        if let Some(i) = args.iter().position(|a| *a == "--session")
            && let Some(s) = args.get(i + 1)
        {
            env.push(("AAP_SESSION".into(), Some(s.to_os_string())));
        }
    }
    env
}

fn sh(prefix: &[OsString], script: &str) -> Vec<OsString> {
    let mut argv: Vec<OsString> = prefix.to_vec();
    argv.extend(["sh".into(), "-c".into(), OsString::from(script)]);
    argv
}

/// Whether `cmd` can run as written in the copy: no shell syntax error, and its program exists.
/// The error says which, with what the shell printed.
fn runnable(copy: &Copy, as_whom: &[OsString], env: &Env, cmd: &str) -> Result<(), String> {
    let word = words(cmd).first().map(|w| w.0.clone()).unwrap_or_default();
    let check = format!(
        "sh -n -c {} && command -v {} >/dev/null",
        crate_quote(cmd),
        crate_quote(&word)
    );
    let o = copy.run(&sh(as_whom, &check), env);
    if o.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{cmd}` cannot run as written (a shell syntax error, or no program {word}): {}",
        printed(&o)
    ))
}

fn judge(c: &Command, bin: &Path, prefix: &[OsString], t: &Told, what: Subject) -> Judged {
    let cmds = commands_of(&t.hint);
    let entry = ALLOWLIST.iter().find(|(k, _, _)| t.hint.contains(k));
    if let Some((key, Kind::Prose, _)) = entry {
        return Judged::Allowlisted(key);
    }
    if entry.is_none() && cmds.is_empty() {
        return Judged::Failed(
            "the hint names no command, and no entry of ALLOWLIST in tests/common/follow.rs covers it".into(),
        );
    }
    if cmds.is_empty() {
        return Judged::Failed(format!(
            "its ALLOWLIST entry {:?} expects a command, and the hint names none",
            entry.unwrap().0
        ));
    }
    // A command that changes the machine outside the world (its users, its packages, its
    // services) is never run: only an entry that judges it by whether it can run may take it.
    if !matches!(entry, Some((_, Kind::Inspect | Kind::Service, _)))
        && let Some(cmd) = cmds.iter().find(|c| machine_wide(c))
    {
        return Judged::Failed(format!(
            "its command `{cmd}` changes the machine outside the test's world, so it is not run; an ALLOWLIST entry of kind Inspect or Service must judge it"
        ));
    }
    for cmd in &cmds {
        if let Some(p) = placeholder(cmd) {
            return Judged::Failed(format!(
                "its command `{cmd}` has a placeholder for the reader to fill in: {p}"
            ));
        }
    }
    let copy = match Copy::of(c) {
        Ok(copy) => copy,
        Err(e) => return Judged::Failed(format!("cannot make a copy of the world: {e}")),
    };
    let env = reader_env(c, bin);
    // A hint for the operator ("the operator starts one: ...") is followed as the operator:
    // the test's own uid, without the original's `setpriv`.
    let before = &t.hint[..t.hint.find(cmds[0].as_str()).unwrap_or(0)];
    // So are doctor's hints, when doctor ran as an agent: they fix the installation, which
    // is the operator's (the test's uid owns these worlds), or rerun doctor as the operator.
    let as_whom: &[OsString] = if what == Subject::Doctor
        || (before.contains("the operator") && !before.contains("ask the operator"))
    {
        &[]
    } else {
        prefix
    };
    match entry {
        Some((key, Kind::Inspect, _)) => {
            for cmd in &cmds {
                if let Err(why) = runnable(&copy, as_whom, &env, cmd) {
                    return Judged::Failed(format!("its command {why}"));
                }
            }
            return Judged::Allowlisted(key);
        }
        Some((key, Kind::Daemon, _)) => {
            let cmd = &cmds[0];
            let o = copy.run(
                &sh(as_whom, &format!("timeout 3 {}", crate_quote_sh(cmd))),
                &env,
            );
            return match o.status.code() {
                Some(0 | 124) => Judged::Allowlisted(key),
                _ => Judged::Failed(format!(
                    "ran `{cmd}`: it did not keep running: {}",
                    printed(&o)
                )),
            };
        }
        Some((key, Kind::FixThenCheck, _)) => {
            // The check cannot show the fix before it is made (a notify that is too slow
            // succeeds when run by hand): it must be runnable as written, and is run so that its
            // output shows in the log.
            let cmd = cmds.last().unwrap();
            if let Err(why) = runnable(&copy, as_whom, &env, cmd) {
                return Judged::Failed(format!("its check {why}"));
            }
            let o = copy.run(&sh(as_whom, cmd), &env);
            eprintln!(
                "hint-follow: the check `{cmd}` before the fix: {}",
                printed(&o)
            );
            return Judged::Allowlisted(key);
        }
        Some((key, Kind::Instead, _)) => {
            let script = cmds.join("\n");
            let h = copy.run(&sh(as_whom, &script), &env);
            let err = String::from_utf8_lossy(&h.stderr);
            return if t.message.is_empty() || err.contains(&t.message) {
                Judged::Failed(format!(
                    "ran `{script}` in the original's place: it fails with the same error: {}",
                    printed(&h)
                ))
            } else {
                eprintln!(
                    "hint-follow: `{script}` in the original's place: {}",
                    printed(&h)
                );
                Judged::Allowlisted(key)
            };
        }
        Some((key, Kind::Service, _)) => {
            if let Err(why) = runnable(&copy, as_whom, &env, &cmds[0]) {
                return Judged::Failed(format!("its unit's command {why}"));
            }
            return match by_hand(&t.hint) {
                None => Judged::Failed(format!(
                    "its ALLOWLIST entry {key:?} expects a by-hand command in an aside, and the hint has none"
                )),
                Some(cmd) => match copy.serve(&cmd, &env) {
                    // The service refuses the world the test broke (an audit log that is a
                    // directory), saying why and what to do: the next step is told.
                    Err(why) if why.contains("exited at start") && why.contains(": hint: ") => {
                        eprintln!("hint-follow: {why}");
                        Judged::Allowlisted(key)
                    }
                    Err(why) => Judged::Failed(why),
                    Ok(mut svc) => {
                        let gone = still_there(c, &copy, t, what);
                        svc.stop();
                        match gone {
                            None => Judged::Worked(format!(
                                "systemd does not run here; `{cmd}` (its by-hand form) ran, and then the original no longer reported it"
                            )),
                            Some(again) => Judged::Failed(format!(
                                "ran `{cmd}` (the unit's by-hand form); the original again, while it ran: {again}{}\n  its output: {}",
                                copy.broker_log(),
                                svc.output()
                            )),
                        }
                    }
                },
            };
        }
        _ => {}
    }
    // A request that waits for the operator: filed, it waits (75 when no one answers).
    let script: Vec<String> = cmds
        .iter()
        .map(|cmd| {
            if cmd.contains("aap request ") && cmd.contains(" --wait") && !cmd.contains("--timeout")
            {
                format!("{cmd} --timeout 1s")
            } else {
                cmd.clone()
            }
        })
        .collect();
    let waits = script.last().unwrap().contains("--timeout 1s");
    let script = script.join("\n");
    let h = copy.run(&sh(as_whom, &script), &env);
    if what == Subject::Doctor {
        // Judged per finding: the others remain, and so does doctor's exit status. Following
        // the hint worked when the finding is gone from what the hint printed (a hint that is
        // itself `aap doctor ...`), or from doctor run again in the copy.
        let mine = String::from_utf8_lossy(&h.stdout);
        if script.contains("aap doctor")
            && h.status.code().is_some()
            && !doctor_messages(&mine).is_empty()
            && !doctor_messages(&mine).contains(&t.message)
        {
            return Judged::Worked(format!(
                "`{script}` ran, and the finding is not in what it printed"
            ));
        }
        return match still_there(c, &copy, t, what) {
            None => Judged::Worked(format!(
                "`{script}` ({}), after which doctor run again no longer reports the finding",
                printed(&h)
            )),
            Some(again) => Judged::Failed(format!(
                "ran `{script}`: {}\n  then doctor again still reports it: {again}",
                printed(&h)
            )),
        };
    }
    if h.status.success() {
        return Judged::Worked(format!("`{script}` succeeded"));
    }
    // A corrected run (`aap-exec CAP -- CMD ...` in place of one aap-exec refused): aap-exec
    // let it through when it printed no error of its own; the status is then the program's
    // (a test's hook may exit 3 on purpose).
    if script.starts_with("aap-exec ")
        && script.contains(" -- ")
        && !script.contains('\n')
        && h.status.code().is_some()
        && !String::from_utf8_lossy(&h.stderr).contains("aap-exec: error:")
    {
        return Judged::Worked(format!(
            "`{script}` ran the command (aap-exec refused nothing): {}",
            printed(&h)
        ));
    }
    if waits && h.status.code() == Some(75) {
        return Judged::Worked(format!(
            "`{script}` filed the request, which waits for the operator: {}",
            printed(&h)
        ));
    }
    // Did following it remove the reason? Run the original again, in the copy.
    match still_there(c, &copy, t, what) {
        None => Judged::Worked(format!(
            "`{script}` ({}), after which the original no longer reports its error",
            printed(&h)
        )),
        Some(again) => Judged::Failed(format!(
            "ran `{script}`: {}\n  then the original again: {again}{}",
            printed(&h),
            copy.broker_log()
        )),
    }
}

/// The original command run again in the copy: `None` when it no longer reports `t`'s
/// message (doctor: among its findings; any other: on its stderr), else what it printed.
fn still_there(c: &Command, copy: &Copy, t: &Told, what: Subject) -> Option<String> {
    let mut argv: Vec<OsString> = vec![c.get_program().to_owned()];
    argv.extend(c.get_args().map(OsStr::to_owned));
    let env: Env = c
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(OsStr::to_owned)))
        .collect();
    let again = copy.run(&argv, &env);
    let there = match what {
        Subject::Doctor => {
            doctor_messages(&String::from_utf8_lossy(&again.stdout)).contains(&t.message)
        }
        _ => t.message.is_empty() || String::from_utf8_lossy(&again.stderr).contains(&t.message),
    };
    there.then(|| printed(&again))
}

/// The by-hand form of a service hint: the command after `(or run it by hand: ` or
/// `(or in the foreground: `, up to its `)`.
pub fn by_hand(hint: &str) -> Option<String> {
    ["(or run it by hand: ", "(or in the foreground: "]
        .iter()
        .find_map(|open| {
            let rest = &hint[hint.find(open)? + open.len()..];
            Some(rest[..rest.find(')')?].trim().to_owned())
        })
}

/// `s` as one shell word.
fn crate_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `cmd` as the argument list of another command (`timeout 3 ...`): run by a shell of its own.
fn crate_quote_sh(cmd: &str) -> String {
    format!("sh -c {}", crate_quote(cmd))
}

/// A copy of a command's world, mounted over the world's path in a private mount namespace
/// held by a process of its own, with a broker of its own when the world's broker runs.
struct Copy {
    scratch: tempfile::TempDir,
    holder: std::process::Child,
    broker: Option<std::process::Child>,
    cwd: PathBuf,
    /// Why the copy has no broker of its own, when the world's ran.
    note: String,
}

/// The world of a command: the outermost `aap-test-*` directory above its working directory,
/// else the working directory itself.
fn world_of(cwd: &Path) -> PathBuf {
    cwd.ancestors()
        .filter(|a| {
            a.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("aap-test-"))
        })
        .last()
        .unwrap_or(cwd)
        .to_path_buf()
}

impl Copy {
    fn of(c: &Command) -> Result<Copy, String> {
        let cwd = c
            .get_current_dir()
            .map(Path::to_path_buf)
            .or_else(|| std::env::current_dir().ok())
            .ok_or("no working directory")?;
        let world = world_of(&cwd);
        if world == Path::new("/") {
            return Err("the command runs in /, which has no world to copy".into());
        }
        let scratch = tempfile::Builder::new()
            .prefix("aap-hint-")
            .tempdir()
            .map_err(|e| format!("scratch dir: {e}"))?;
        let copy = scratch.path().join("w");
        let o = Command::new("cp")
            .arg("-a")
            .arg(&world)
            .arg(&copy)
            .output()
            .map_err(|e| format!("cp: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "cp -a {} {}: {}",
                world.display(),
                copy.display(),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" \"$1\" && echo ready && exec cat")
            .arg(&copy)
            .arg(&world)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let mut line = String::new();
        let _ = std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = holder.kill();
            let o = holder.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "unshare --mount, mount --bind: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let mut me = Copy {
            scratch,
            holder,
            broker: None,
            cwd,
            note: String::new(),
        };
        // A broker that will not start on the copy (the world's config is what the test
        // broke) leaves the copy without one; what the hint then prints says so.
        if let Err(e) = me.start_broker(c, &world, &copy) {
            me.note = e;
        }
        Ok(me)
    }

    /// A broker for the copy when the world's broker answers.
    fn start_broker(&mut self, c: &Command, world: &Path, copy: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let config = c
            .get_envs()
            .find(|(k, _)| *k == "AAP_CONFIG")
            .and_then(|(_, v)| v.map(PathBuf::from));
        let mut sockets = vec![world.join("broker.sock")];
        if let Some(cfg) = &config
            && let Ok(cfg) = aap::config::Config::load_path(cfg)
        {
            sockets.insert(0, cfg.broker.socket.value.clone());
        }
        let Some(socket) = sockets
            .into_iter()
            .find(|s| s.starts_with(world) && std::os::unix::net::UnixStream::connect(s).is_ok())
        else {
            return Ok(());
        };
        let Some(config) = config else {
            return Ok(());
        };
        let rel = socket.strip_prefix(world).unwrap();
        let in_copy = copy.join(rel);
        let owner = std::fs::metadata(&socket).map_err(|e| e.to_string())?.uid();
        let _ = std::fs::remove_file(&in_copy);
        let log = std::fs::File::create(self.scratch.path().join("broker.log"))
            .map_err(|e| e.to_string())?;
        let mut argv: Vec<OsString> = Vec::new();
        if owner != aap::sys::uid() {
            let u = owner.to_string();
            argv.extend(
                [
                    "setpriv",
                    "--reuid",
                    &u,
                    "--regid",
                    &u,
                    "--clear-groups",
                    "--",
                ]
                .map(OsString::from),
            );
        }
        argv.push(super::AAP.into());
        argv.extend(["broker".into(), "--socket".into(), socket.clone().into()]);
        let mut b = self.enter(&argv);
        b.env_clear()
            .env("AAP_CONFIG", &config)
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = b.spawn().map_err(|e| format!("start a broker: {e}"))?;
        // The copy's socket is the same inode at the copy's own path, outside the namespace.
        loop {
            if std::os::unix::net::UnixStream::connect(&in_copy).is_ok() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "the copy's broker exited at start ({st}){}",
                    self.broker_log()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.broker = Some(child);
        Ok(())
    }

    /// Start `cmd` (a service in the foreground) in the copy, as the test's uid, with `env`;
    /// when it names `--socket P`, wait until P (in the copy) accepts connections.
    fn serve(&self, cmd: &str, env: &Env) -> Result<Served, String> {
        let out = self.scratch.path().join("served.log");
        let log = std::fs::File::create(&out).map_err(|e| e.to_string())?;
        let mut c = self.enter(&sh(&[], &format!("exec {cmd}")));
        c.env_clear()
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        for (k, v) in env {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        let child = c.spawn().map_err(|e| format!("start `{cmd}`: {e}"))?;
        let mut svc = Served { child, out };
        let socket = words(cmd)
            .windows(2)
            .find(|w| w[0].0 == "--socket")
            .map(|w| PathBuf::from(&w[1].0));
        let world = world_of(&self.cwd);
        let in_copy = socket.map(|s| match s.strip_prefix(&world) {
            Ok(rel) => self.scratch.path().join("w").join(rel),
            Err(_) => s,
        });
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(Some(st)) = svc.child.try_wait() {
                return Err(format!(
                    "ran `{cmd}`: it exited at start ({st}): {}",
                    svc.output()
                ));
            }
            let ready = match &in_copy {
                Some(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                None => t0.elapsed() > std::time::Duration::from_secs(1),
            };
            if ready {
                return Ok(svc);
            }
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                let out = svc.output();
                svc.stop();
                return Err(format!("ran `{cmd}`: it did not listen within 10 s: {out}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn broker_log(&self) -> String {
        if !self.note.is_empty() {
            return format!("\n  the copy has no broker: {}", self.note);
        }
        match std::fs::read_to_string(self.scratch.path().join("broker.log")) {
            Ok(l) if !l.trim().is_empty() => format!("\n  the copy's broker.log: {}", l.trim()),
            _ => String::new(),
        }
    }

    /// `argv` inside the namespace, in the original's working directory.
    fn enter(&self, argv: &[OsString]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.holder.id().to_string())
            .args(["--mount", "--", "sh", "-c", "cd \"$0\" && exec \"$@\""])
            .arg(&self.cwd)
            .args(argv);
        c
    }

    /// Run `argv` in the copy with exactly `env`, stdin empty, for at most two minutes (a
    /// guard against a hint that waits for a terminal or an operator, not a timing check).
    fn run(&self, argv: &[OsString], env: &[(OsString, Option<OsString>)]) -> Output {
        let mut full: Vec<OsString> = vec!["timeout".into(), "--kill-after=5".into(), "120".into()];
        full.extend(self.enter(argv).get_args().map(OsStr::to_owned));
        full.insert(3, "nsenter".into());
        let mut c = Command::new(&full[0]);
        c.args(&full[1..]).env_clear().stdin(Stdio::null());
        for (k, v) in env {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c.output().expect("spawn timeout nsenter")
    }
}

/// A service a hint started in a copy, stopped by its own pid.
struct Served {
    child: std::process::Child,
    out: PathBuf,
}

impl Served {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        if let Some(b) = &mut self.broker {
            let _ = b.kill();
            let _ = b.wait();
        }
        drop(self.holder.stdin.take()); // its `cat` ends: the namespace goes with it
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // A hint may have made a file append-only (`chattr +a`), which the removal of the
        // scratch dir could not delete.
        let _ = Command::new("chattr")
            .arg("-R")
            .arg("-a")
            .arg(self.scratch.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
