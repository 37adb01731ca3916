//! The `aap-exec` command line (contract: `aap-exec [--session ID] [--reason TEXT] CAP -- CMD
//! [ARG...]`, `aap-exec --check CAP`, `aap-exec --list`).

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use clap::Parser;
use std::ffi::OsString;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "aap-exec",
    version,
    about = "Run a command with one approved capability's credential, then tear it down",
    override_usage = "aap-exec [--session ID] [--reason TEXT] CAP -- CMD [ARG...]\n       aap-exec --check CAP [-- CMD [ARG...]]\n       aap-exec --list [--json]"
)]
pub struct ExecCli {
    /// Session ULID (default: $AAP_SESSION).
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// Why this command needs the capability; recorded in the audit log.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Explain whether CAP may be used now, and why; with `-- CMD [ARG...]`, also whether that
    /// command may run with it (the verdict a run would get; nothing is fetched). Exit 0 or 77.
    #[arg(long, value_name = "CAP", conflicts_with_all = ["list", "cap"])]
    pub check: Option<String>,
    /// List what this session may use now, and until when.
    #[arg(long, conflicts_with = "cap")]
    pub list: bool,
    /// With --list: print JSON.
    #[arg(long, requires = "list")]
    pub json: bool,
    /// The capability to use.
    #[arg(value_name = "CAP")]
    pub cap: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

pub fn main() -> ExitCode {
    crate::sys::pin_timezone();
    // First, before any thread exists: block the signals we forward, so that every later
    // thread inherits the mask and none of them dies of a signal meant for the child.
    let watch = match crate::sys::SignalWatch::install() {
        Ok(w) => w,
        Err(e) => {
            let err = Error::internal(format!("cannot set up signal handling: {e}"))
                .hint("check that signalfd(2) is allowed here (seccomp)");
            return crate::cli::finish("aap-exec", Err(err));
        }
    };
    crate::log::init("aap-exec");
    let cli = match ExecCli::try_parse() {
        Ok(c) => c,
        Err(e) => return crate::cli::usage_error(e),
    };
    crate::cli::finish("aap-exec", run(cli, &watch))
}

fn run(cli: ExecCli, watch: &crate::sys::SignalWatch) -> Result<u8> {
    if let Some(cap) = &cli.check {
        return crate::client::check("aap-exec", cli.session, cap, &cli.command);
    }
    if cli.list {
        return crate::client::list(cli.session, cli.json);
    }
    let Some(cap) = cli.cap else {
        return Err(Error::config("no capability named")
            .hint("name a capability before `--`; the ones you may use: aap-exec --list"));
    };
    let mut command = cli.command.into_iter();
    let Some(program) = command.next() else {
        return Err(
            Error::config(format!("no command given after `{cap} --`")).hint(format!(
                "name the program to run after `--`, as in: aap-exec {cap} -- git fetch"
            )),
        );
    };
    let inv = crate::exec::run::Invocation {
        cap,
        session: cli.session,
        reason: cli.reason,
        program,
        args: command.collect(),
    };
    crate::exec::run::run(inv, watch)
}
