//! Command-line definitions (the contract in DESIGN.md) and dispatch.

#![forbid(unsafe_code)]

use crate::error::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "aap",
    version,
    about = "Agent Access Plane: short-lived, operator-approved, audited credentials for AI agents",
    long_about = None,
    propagate_version = true,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check, list and show the capability catalog.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Show the resolved configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Run the quick-start demo on the embedded defaults (no config needed).
    Demo,
}

#[derive(Subcommand, Debug)]
pub enum CatalogCmd {
    /// Validate a catalog (default: the config's `catalog`). Exit 0 when valid, 78 otherwise.
    Check {
        /// The catalog file to check.
        file: Option<PathBuf>,
    },
    /// List capabilities.
    List {
        /// Only capabilities this agent may be granted.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        #[command(flatten)]
        common: CatalogArgs,
    },
    /// Show one capability.
    Show {
        /// Capability id.
        id: String,
        #[command(flatten)]
        common: CatalogArgs,
    },
}

#[derive(Args, Debug)]
pub struct CatalogArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read this catalog instead of the config's `catalog`.
    #[arg(long, value_name = "FILE")]
    pub catalog: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print every resolved value and where it came from.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the `aap` binary.
pub fn main_aap() -> ExitCode {
    crate::log::init("aap");
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    finish("aap", dispatch(cli))
}

fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Catalog(c) => crate::cmd::catalog::run(c),
        Command::Config(ConfigCmd::Show { json }) => crate::cmd::config::show(json),
        Command::Demo => crate::cmd::demo::run(),
    }
}

/// Print a clap error (or help/version) the way clap does; usage errors exit 2.
pub fn usage_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// Print an error as `PROG: error: ...` / `PROG: hint: ...` and turn it into the exit code.
pub fn finish(prog: &str, r: Result<u8>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::debug!(kind = ?e.kind(), "command failed");
            eprint!("{}", e.render(prog));
            ExitCode::from(e.exit_code())
        }
    }
}
