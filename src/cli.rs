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
    /// Run an in-memory server speaking Infisical's API, for tests and the quick start.
    DevServer(DevServerArgs),
    /// Diagnostics against Infisical (hidden; see docs/infisical.md).
    #[command(subcommand, hide = true)]
    Infisical(InfisicalCmd),
}

/// `aap dev-server`: NOT Infisical; test identities and secrets only.
#[derive(Args, Debug)]
pub struct DevServerArgs {
    /// Address to listen on; loopback only unless --i-know-this-is-not-infisical.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// YAML seed (project, secrets, identities); default: the built-in demo world.
    #[arg(long, value_name = "FILE")]
    pub seed: Option<PathBuf>,
    /// Serve HTTPS with a throwaway CA (its path is on the ready line).
    #[arg(long)]
    pub tls: bool,
    /// Allow a non-loopback listen address.
    #[arg(long)]
    pub i_know_this_is_not_infisical: bool,
    /// Fault: added latency per answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Fault: fail the next N requests with --fail-status.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fail_next: u32,
    /// Fault: status for --fail-next: 429, 500 or 503.
    #[arg(long, value_name = "STATUS", value_parser = ["429", "500", "503"], default_value = "503")]
    pub fail_status: String,
    /// Fault: Retry-After seconds sent with 429/503.
    #[arg(long, value_name = "SECS")]
    pub retry_after: Option<u64>,
    /// Fault: answer the next N requests with a body that is not JSON.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub malformed_next: u32,
    /// Fault: close the connection mid-body on the next N answers.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub close_mid_body_next: u32,
    /// Fault: answer the next N requests with a 2 MiB body.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub huge_body_next: u32,
    /// Fault: the next N token checks find the token expired.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub expire_tokens_next: u32,
}

#[derive(Subcommand, Debug)]
pub enum InfisicalCmd {
    /// Log in as an agent's identity, fetch one secret, revoke the token; print only its length.
    Check {
        /// The agent whose identity logs in (agents.<NAME> in the config, or the
        /// INFISICAL_UNIVERSAL_AUTH_CLIENT_ID/_SECRET environment).
        #[arg(long, value_name = "NAME")]
        agent: String,
        /// The secret: [ENV:]PATH:KEY, e.g. prod:/app:DB_PASSWORD.
        secret: String,
        /// Repeat the fetch N times with the same client (connection and token reuse).
        #[arg(long, value_name = "N", default_value_t = 1, hide = true)]
        repeat: u32,
        /// Leave the token to expire instead of revoking it (benchmarks of login + fetch only).
        #[arg(long, hide = true)]
        no_revoke: bool,
    },
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
        Command::DevServer(a) => crate::cmd::devserver::run(a),
        Command::Infisical(InfisicalCmd::Check {
            agent,
            secret,
            repeat,
            no_revoke,
        }) => crate::cmd::infisical::check(&agent, &secret, repeat, !no_revoke),
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
