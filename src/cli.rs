//! Command-line definitions (the contract in DESIGN.md) and dispatch.

#![forbid(unsafe_code)]

use crate::duration::Dur;
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
    /// Run an in-memory server speaking Infisical's API, for tests and the quick start.
    DevServer(DevServerArgs),
    /// The broker, in the foreground: decides, fetches, audits and tears down for aap-exec
    /// (systemd units: contrib/systemd/).
    Broker {
        /// Listen here instead of the config's broker.socket (default /run/aap/broker.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<std::path::PathBuf>,
    },
    /// The git credential helper aap-exec configures for forgejo-pat (hidden; see
    /// docs/backings.md). Reads git's request on stdin; always exits 0.
    #[command(hide = true)]
    GitCredential {
        /// The capability's host (`host[:port]`); other hosts get no answer.
        #[arg(long, value_name = "HOST")]
        host: String,
        /// The inherited sealed memfd holding the token.
        #[arg(long, value_name = "N")]
        fd: i32,
        /// git's action: get, store or erase.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        action: Vec<String>,
    },
    /// Diagnostics against Infisical (hidden; see docs/infisical.md).
    #[command(subcommand, hide = true)]
    Infisical(InfisicalCmd),
    /// Dynamic completion (hidden): the ids for the word at INDEX of WORDS, if it is one.
    #[command(name = "__complete", hide = true)]
    Complete {
        /// The program being completed.
        #[arg(long, value_parser = ["aap", "aap-exec"], default_value = "aap")]
        program: String,
        /// The index in WORDS of the word under the cursor.
        #[arg(long)]
        index: usize,
        /// The command line, split into words by the shell.
        #[arg(last = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Start, approve, revoke, list, show, check and clean up signed session grants.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Ask the operator for a capability in this session ($AAP_SESSION); grants nothing itself.
    /// With --wait, block until the operator answers: exit 0 approved, 77 denied, 75 timed out.
    Request {
        /// The capability to ask for.
        #[arg(required_unless_present = "wait_on")]
        cap: Option<String>,
        /// Why it is needed (shown to the operator and written to the audit log).
        #[arg(long, value_name = "TEXT", required_unless_present = "wait_on")]
        reason: Option<String>,
        /// Session ULID (default: $AAP_SESSION).
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// Wait for the operator's answer (one status line on stderr).
        #[arg(long)]
        wait: bool,
        /// Wait for the answer to this earlier request of yours instead of asking again.
        #[arg(long, value_name = "REQ", conflicts_with_all = ["cap", "reason", "session", "wait"])]
        wait_on: Option<String>,
        /// Wait at most this long (default: until the request expires, requests.ttl).
        #[arg(long, value_name = "DURATION", value_parser = parse_dur)]
        timeout: Option<Dur>,
    },
    /// List pending agent requests; --watch shows them live and answers with a key press.
    Requests {
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Show the queue live in this terminal: a approves, d denies (each asks for a
        /// reason), j/k or the arrows move, q quits.
        #[arg(long)]
        watch: bool,
    },
    /// Approve a pending request: re-sign its session's grant with the capability added.
    Approve {
        /// Request ULID (from `aap requests`).
        req: String,
        /// How long the capability stays usable (default: its max_ttl, not past the session).
        #[arg(long, value_name = "DURATION", value_parser = parse_dur)]
        ttl: Option<Dur>,
        /// Why (recorded in the audit log, shown to a waiting agent).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Refuse a pending request.
    Deny {
        /// Request ULID (from `aap requests`).
        req: String,
        /// Why (recorded in the audit log, shown to a waiting agent).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Verify and read the hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Install PATH wrappers: shims that run a program through aap-exec.
    #[command(subcommand)]
    Wrappers(WrappersCmd),
    /// Check this installation: config, catalog, owners and modes, signers, signing key,
    /// Infisical logins (no secret is read), ssh and git tools, the audit log. Exit 0 unless a
    /// check fails (then 78).
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Skip the Infisical checks (no network).
        #[arg(long)]
        offline: bool,
    },
    /// Print shell completions for aap (or aap-exec) to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// Complete this program instead of aap.
        #[arg(long, value_name = "PROGRAM", value_parser = ["aap", "aap-exec"], default_value = "aap")]
        program: String,
    },
    /// Print the aap(1) man page to stdout, or write every page (aap, its subcommands,
    /// aap-exec) into DIR.
    Man {
        /// Write aap.1, aap-SUBCOMMAND.1 and aap-exec.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum WrappersCmd {
    /// Install the shipped shims (e.g. git), or one shim per program of each --cap, into DIR.
    /// Idempotent; never overwrites a file it did not write.
    Install {
        /// The directory to put first in PATH.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Generate shims from this capability's allowed_commands (repeat for more).
        #[arg(long = "cap", value_name = "CAP")]
        caps: Vec<String>,
    },
}

fn parse_dur(s: &str) -> std::result::Result<Dur, String> {
    Dur::parse(s)
}

#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// Sign a grant for a new session and print `export AAP_SESSION=...`.
    Start {
        /// The agent the session is for.
        #[arg(long, value_name = "NAME")]
        agent: String,
        /// A capability to grant (repeat for more).
        #[arg(long = "cap", value_name = "CAP", required = true)]
        caps: Vec<String>,
        /// How long (default: the smallest max_ttl of the capabilities).
        #[arg(long, value_name = "DURATION", value_parser = parse_dur)]
        ttl: Option<Dur>,
        /// Limit the grant to this host (repeat for more; default: any host).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Why (written into the grant and the audit log; required with --break-glass).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Allow critical (break-glass) capabilities; needs --reason.
        #[arg(long)]
        break_glass: bool,
        /// Print JSON instead of the export line.
        #[arg(long)]
        json: bool,
    },
    /// Add capabilities to a session by re-signing its grant.
    Approve {
        /// Session ULID.
        id: String,
        /// A capability to add (repeat for more).
        #[arg(long = "cap", value_name = "CAP", required = true)]
        caps: Vec<String>,
        /// How long (default: the capability's max_ttl, not past the session's end).
        #[arg(long, value_name = "DURATION", value_parser = parse_dur)]
        ttl: Option<Dur>,
        /// Why (written to the audit log; required with --break-glass).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Allow critical (break-glass) capabilities; needs --reason.
        #[arg(long)]
        break_glass: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install a grant signed on another host: verify its signature against this host's
    /// allowed_signers, check its agent, host and expiry, then install it atomically.
    Import {
        /// The grant file (`<SESSION>.grant`, the exact signed bytes).
        file: PathBuf,
        /// Its signature (default: FILE.sig, as `aap session start` names it).
        #[arg(long, value_name = "FILE")]
        sig: Option<PathBuf>,
    },
    /// Revoke a session: from now on every check of it denies.
    Revoke {
        /// Session ULID.
        id: String,
        /// Why (written to the audit log).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// List sessions (active and not-yet-valid ones unless --all).
    List {
        /// Also expired, revoked and invalid sessions.
        #[arg(long)]
        all: bool,
        /// Only sessions usable now (status active).
        #[arg(long, conflicts_with = "all")]
        active: bool,
        /// Only this agent's sessions.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Only sessions that grant this capability (unexpired, unless --all).
        #[arg(long, value_name = "CAP")]
        cap: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One session's story from the audit log: grants and re-signings, requests and answers,
    /// every exec (argv, exit status, duration), denials, ssh signatures, proxied requests.
    Log {
        /// Session ULID.
        id: String,
        /// Print the session's audit lines as they are in the log.
        #[arg(long)]
        json: bool,
    },
    /// Show one session, including whether its signature verifies.
    Show {
        /// Session ULID.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Explain whether CAP may be used now in this session; exit 0 or 77.
    Check {
        /// Session ULID (default: $AAP_SESSION).
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// The capability.
        cap: String,
    },
    /// Remove expired or revoked grants older than the retention period, and expired requests.
    Gc {
        /// Keep expired or revoked sessions this long after they ended.
        #[arg(long, value_name = "DURATION", value_parser = parse_dur, default_value = "7d")]
        retention: Dur,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Check every line and the hash chain; print the count and the head hash. Exit 0 or 65.
    Verify {
        /// The log to verify (default: the config's audit_log).
        file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the last events, human-readable; -f follows the file.
    Tail {
        /// Keep printing events as they are appended.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this session's events.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// Only this agent's events.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Print the JSON lines as they are in the log.
        #[arg(long)]
        json: bool,
        /// How many past events to print first.
        #[arg(short = 'n', long, value_name = "N", default_value_t = 20)]
        lines: usize,
    },
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
    /// Fault: Retry-After seconds sent with 429/503 and with --rate-limit-next (default 58).
    #[arg(long, value_name = "SECS")]
    pub retry_after: Option<u64>,
    /// Fault: answer the next N requests like Infisical's rate limiter (--rate-limit-status).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub rate_limit_next: u32,
    /// Fault: status for --rate-limit-next: 500 (unlicensed self-hosted) or 429.
    #[arg(long, value_name = "STATUS", value_parser = ["500", "429"], default_value = "500")]
    pub rate_limit_status: String,
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
    /// With --token-env, use the access token in that variable instead (what an
    /// `infisical-token` capability hands its child) and neither log in nor revoke.
    Check {
        /// The agent whose identity logs in (agents.<NAME> in the config, or the
        /// INFISICAL_UNIVERSAL_AUTH_CLIENT_ID/_SECRET environment).
        #[arg(
            long,
            value_name = "NAME",
            required_unless_present = "token_env",
            conflicts_with = "token_env"
        )]
        agent: Option<String>,
        /// Read with the access token in this environment variable (e.g. INFISICAL_TOKEN).
        #[arg(long, value_name = "VAR")]
        token_env: Option<String>,
        /// With --token-env: the Infisical URL (default: the config's infisical.url). A child
        /// of aap-exec sees no AAP_CONFIG, so it names the server itself.
        #[arg(long, value_name = "URL", requires_all = ["token_env", "project_id"])]
        url: Option<String>,
        /// With --url: the project to read from.
        #[arg(long, value_name = "ID", requires = "url")]
        project_id: Option<String>,
        /// With --url: a CA bundle to trust (a private CA, the dev-server's).
        #[arg(long, value_name = "FILE", requires = "url")]
        ca_bundle: Option<PathBuf>,
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
    crate::sys::pin_timezone();
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
        Command::DevServer(a) => crate::cmd::devserver::run(a),
        Command::Broker { socket } => crate::broker::main(socket),
        Command::GitCredential { host, fd, action } => {
            crate::cmd::gitcredential::run(&host, fd, &action)
        }
        Command::Infisical(InfisicalCmd::Check {
            agent,
            token_env,
            url,
            project_id,
            ca_bundle,
            secret,
            repeat,
            no_revoke,
        }) => match (agent, token_env) {
            (_, Some(var)) => {
                let server = url.map(|url| crate::cmd::infisical::Server {
                    url,
                    project_id: project_id.unwrap_or_default(),
                    ca_bundle,
                });
                crate::cmd::infisical::check_token(&var, &secret, server)
            }
            (Some(agent), None) => {
                crate::cmd::infisical::check(&agent, &secret, repeat, !no_revoke)
            }
            (None, None) => Err(crate::error::Error::config(
                "give --agent NAME or --token-env VAR",
            )
            .hint("aap infisical check --agent codex prod:/app:DB_PASSWORD")),
        },
        Command::Session(c) => crate::cmd::session::run(c),
        Command::Request {
            wait_on: Some(rid),
            timeout,
            ..
        } => crate::client::wait_on(&rid, timeout),
        Command::Request {
            cap,
            reason,
            session,
            wait,
            timeout,
            ..
        } => crate::client::request(
            cap.as_deref().unwrap_or_default(),
            reason.as_deref().unwrap_or_default(),
            session,
            wait,
            timeout,
        ),
        Command::Requests { json, watch: false } => crate::cmd::request::list(json),
        Command::Requests { watch: true, .. } => crate::cmd::watch::run(),
        Command::Approve { req, ttl, reason } => {
            crate::cmd::request::approve(&req, ttl, reason.as_deref())
        }
        Command::Deny { req, reason } => crate::cmd::request::deny(&req, reason.as_deref()),
        Command::Audit(c) => crate::cmd::audit::run(c),
        Command::Wrappers(WrappersCmd::Install { dir, caps }) => {
            crate::cmd::wrappers::install(&dir, &caps)
        }
        Command::Doctor { json, offline } => crate::cmd::doctor::run(json, offline),
        Command::Complete {
            program,
            index,
            words,
        } => Ok(crate::cmd::complete::run(&program, index, &words)),
        Command::Completions { shell, program } => crate::cmd::manual::completions(shell, &program),
        Command::Man { dir } => crate::cmd::manual::man(dir.as_deref()),
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
