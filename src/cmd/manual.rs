//! `aap man` and `aap completions`: man pages and shell completions generated from the clap
//! definitions in src/cli.rs and src/exec_cli.rs, so they cannot drift from the real flags.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use clap::CommandFactory;
use std::io::Write;
use std::path::Path;

/// Sections clap does not know about, appended to aap(1) and aap-exec(1).
const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
success (for \fBaap\-exec\fR: after a child ran, the child's status; 128+N when signal N ended it)
.TP
\fB2\fR
usage error
.TP
\fB65\fR
audit log or grant data invalid (\fBaap audit verify\fR)
.TP
\fB69\fR
Infisical unavailable
.TP
\fB70\fR
internal error
.TP
\fB77\fR
denied: no grant, expired, revoked, forged, or not for this capability
.TP
\fB78\fR
config or catalog invalid (\fBaap doctor\fR: a check failed)
.TP
\fB126\fR
the command cannot be executed
.TP
\fB127\fR
the command was not found
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBAAP_CONFIG\fR
the config file; else \fI$XDG_CONFIG_HOME/aap/config.yaml\fR, else \fI/etc/aap/config.yaml\fR.
\fBaap\-exec\fR uses only \fI/etc/aap/config.yaml\fR when it exists.
.TP
\fBAAP_SESSION\fR
the session ULID, set for the agent by the operator
.TP
\fBAAP_LOG\fR
tracing filter for diagnostics on stderr, e.g. \fBdebug\fR; secrets are never logged
.TP
\fBINFISICAL_UNIVERSAL_AUTH_CLIENT_ID\fR, \fBINFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET\fR
an agent's Infisical identity when the config names no identity files
"#;

const FILES: &str = r#".SH FILES
.TP
\fI/etc/aap/config.yaml\fR
the config (root-owned)
.TP
\fI/etc/aap/agent\-capabilities.yaml\fR
the capability catalog
.TP
\fI/etc/aap/allowed_signers\fR
operator keys trusted to sign grants (OpenSSH allowed_signers format)
.TP
\fI/var/lib/aap/\fR
state: \fIgrants/\fR, \fIrevoked/\fR, \fIrequests/\fR
.TP
\fI/var/log/aap/audit.jsonl\fR
the hash\-chained audit log
"#;

const SEE_ALSO: &str = r#".SH "SEE ALSO"
\fBaap\-exec\fR(1), \fBssh\-keygen\fR(1), \fBssh\-agent\fR(1), \fBgit\-credential\fR(1).
The operator guide: \fIdocs/operator\-guide.md\fR; the threat model: \fIdocs/threat\-model.md\fR.
"#;

/// Render one page: clap's sections, then ours.
fn render_page(cmd: clap::Command, extra: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    for section in extra {
        out.extend_from_slice(section.as_bytes());
    }
    Ok(out)
}

fn aap_page() -> std::io::Result<Vec<u8>> {
    render_page(
        crate::cli::Cli::command(),
        &[EXIT_STATUS, ENVIRONMENT, FILES, SEE_ALSO],
    )
}

fn exec_page() -> std::io::Result<Vec<u8>> {
    render_page(
        crate::exec_cli::ExecCli::command(),
        &[EXIT_STATUS, ENVIRONMENT, SEE_ALSO],
    )
}

/// A failed write; `hint` is the command to run next.
fn write_err(what: &str, e: std::io::Error, hint: String) -> Error {
    Error::internal(format!("cannot write {what}: {e}")).hint(hint)
}

/// Writing to stdout failed (a closed pipe, a full disk behind a redirect).
fn stdout_err(what: &str, e: std::io::Error) -> Error {
    write_err(
        &format!("{what} to stdout"),
        e,
        "write it to a file instead: aap man --dir /tmp/aap-man (or redirect: aap man > aap.1)"
            .into(),
    )
}

/// `aap man [--dir DIR]`.
pub fn man(dir: Option<&Path>) -> Result<u8> {
    let Some(dir) = dir else {
        let page = aap_page().map_err(|e| stdout_err("the man page", e))?;
        std::io::stdout()
            .write_all(&page)
            .map_err(|e| stdout_err("the man page", e))?;
        return Ok(0);
    };
    if !dir.is_dir() {
        return Err(
            Error::config(format!("{} is not a directory", dir.display())).hint(format!(
                "create it first: mkdir -p {}",
                crate::error::quote_path(dir)
            )),
        );
    }
    let mut written = Vec::new();
    let mut put = |name: String, bytes: std::io::Result<Vec<u8>>| -> Result<()> {
        let path = dir.join(&name);
        let hint = || {
            format!(
                "check the directory: ls -ld {}",
                crate::error::quote_path(dir)
            )
        };
        let bytes = bytes.map_err(|e| write_err(&name, e, hint()))?;
        std::fs::write(&path, bytes)
            .map_err(|e| write_err(&path.display().to_string(), e, hint()))?;
        written.push(path);
        Ok(())
    };
    put("aap.1".into(), aap_page())?;
    put("aap-exec.1".into(), exec_page())?;
    // One page per visible subcommand, named like git's: aap-session.1, aap-session-start.1.
    let mut root = crate::cli::Cli::command().disable_help_subcommand(true);
    root.build();
    let mut stack: Vec<(String, clap::Command)> = root
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| (format!("aap-{}", c.get_name()), c.clone()))
        .collect();
    while let Some((name, cmd)) = stack.pop() {
        for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            stack.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
        let cmd = cmd.name(name.clone()).display_name(name.clone());
        put(format!("{name}.1"), render_page(cmd, &[SEE_ALSO]))?;
    }
    for p in &written {
        println!("{}", p.display());
    }
    Ok(0)
}

/// `aap completions SHELL [--program aap-exec]`.
pub fn completions(shell: clap_complete::Shell, program: &str) -> Result<u8> {
    let mut cmd = if program == "aap-exec" {
        crate::exec_cli::ExecCli::command()
    } else {
        crate::cli::Cli::command()
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, program, &mut out);
    let script = String::from_utf8_lossy(&out).into_owned();
    let out = super::complete::dynamic_part(shell, program, &script);
    std::io::stdout().write_all(out.as_bytes()).map_err(|e| {
        write_err(
            "the completions to stdout",
            e,
            format!("redirect them to a file: aap completions {shell} > aap.{shell}"),
        )
    })?;
    Ok(0)
}
