//! `aap catalog check|list|show`.

#![forbid(unsafe_code)]

use crate::catalog::{Backing, Capability, Catalog, Inject};
use crate::cli::CatalogCmd;
use crate::error::{Kind, Result};
use std::io::Write;

pub fn run(cmd: CatalogCmd) -> Result<u8> {
    match cmd {
        CatalogCmd::Check { file } => {
            let from_config = file.is_none();
            let path = crate::catalog::resolve_path(file)?;
            // The config's own catalog: record the validation for aap-exec (docs/catalog.md).
            let cat = if from_config {
                let cfg = crate::config::Config::load()?;
                Catalog::validate_and_record(&path, &cfg.state_dir.value)?
            } else {
                Catalog::load(&path)?
            };
            check_run_as(&cat, &path)?;
            let critical = cat
                .capabilities()
                .iter()
                .filter(|c| c.audit_tier == crate::catalog::Tier::Critical)
                .count();
            println!(
                "{}: ok, {} capabilities ({critical} critical)",
                path.display(),
                cat.len()
            );
            Ok(0)
        }
        CatalogCmd::List { agent, common } => {
            let cat = Catalog::load(&crate::catalog::resolve_path(common.catalog)?)?;
            let caps: Vec<&Capability> = match &agent {
                Some(a) => cat.for_agent(a).collect(),
                None => cat.capabilities().iter().collect(),
            };
            print_list(&caps, common.json);
            Ok(0)
        }
        CatalogCmd::Show { id, common } => {
            let cat = Catalog::load(&crate::catalog::resolve_path(common.catalog)?)?;
            let cap = cat.get(&id).ok_or_else(|| cat.unknown(&id, Kind::Config))?;
            let mut out = std::io::stdout().lock();
            if common.json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(cap).expect("capability serializes")
                );
            } else {
                let _ = out.write_all(describe(cap).as_bytes());
            }
            Ok(0)
        }
    }
}

/// Every `run_as` must name a user of this host: a capability the broker could never start is
/// refused here, not at its first use. (Whether the broker may switch to it is the broker's to
/// say: it holds CAP_SETUID/CAP_SETGID or not; see docs/backings.md.)
fn check_run_as(cat: &Catalog, path: &std::path::Path) -> Result<()> {
    for c in cat.capabilities() {
        let Backing::WrappedCommand {
            run_as: Some(user), ..
        } = &c.backing
        else {
            continue;
        };
        match crate::sys::user_by_name(user) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(crate::error::Error::config(format!(
                    "{}: capability `{}` runs as user `{user}`, which has no passwd entry on this host",
                    path.display(),
                    c.id
                ))
                .hint(format!(
                    "create the user (useradd --system {user}) or change run_as, then: aap catalog check {}",
                    crate::error::shell_quote(&path.to_string_lossy())
                )));
            }
            Err(e) => {
                return Err(crate::error::Error::config(format!(
                    "{}: cannot look up user `{user}` of capability `{}`: {e}",
                    path.display(),
                    c.id
                ))
                .hint(format!("getent passwd {user}")));
            }
        }
    }
    Ok(())
}

/// Print capabilities as a table, or as JSON.
pub fn print_list(caps: &[&Capability], json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(caps).expect("catalog serializes")
        );
        return;
    }
    let w = caps.iter().map(|c| c.id.len()).max().unwrap_or(2).max(2);
    let _ = writeln!(
        out,
        "{:<w$}  {:<8}  {:>7}  {:<15}  AGENTS",
        "ID", "TIER", "MAX_TTL", "BACKING"
    );
    for c in caps {
        let agents = if c.agents.is_empty() {
            "(break-glass only)".to_string()
        } else {
            c.agents.join(",")
        };
        let _ = writeln!(
            out,
            "{:<w$}  {:<8}  {:>7}  {:<15}  {agents}",
            c.id,
            c.audit_tier.as_str(),
            c.max_ttl.to_string(),
            c.backing.type_name()
        );
    }
}

/// A human description of one capability.
pub fn describe(c: &Capability) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<17}{v}\n"));
    line("id:", c.id.clone());
    line("description:", c.description.clone());
    line("audit tier:", c.audit_tier.to_string());
    line(
        "agents:",
        if c.agents.is_empty() {
            "none (break-glass grants only)".into()
        } else {
            c.agents.join(", ")
        },
    );
    line("max ttl:", c.max_ttl.to_string());
    if let Some(cmds) = &c.allowed_commands {
        line("allowed commands:", cmds.join(", "));
    }
    line("backing:", c.backing.type_name().into());
    match &c.backing {
        Backing::ForgejoPat { host, secret } => {
            line("  host:", host.clone());
            line("  secret:", secret.to_string());
        }
        Backing::SshAgent {
            secret,
            key_lifetime,
            hosts,
            allow_forwarding,
        } => {
            line("  secret:", secret.to_string());
            line("  key lifetime:", key_lifetime.to_string());
            line("  hosts:", hosts.join(", "));
            line(
                "  forwarding:",
                if *allow_forwarding {
                    "allowed (ssh -A, among the hosts)".into()
                } else {
                    "refused".into()
                },
            );
        }
        Backing::InfisicalToken {
            identity,
            secret_path,
            environment,
        } => {
            line("  identity:", identity.clone());
            line("  secret path:", secret_path.clone());
            if let Some(e) = environment {
                line("  environment:", e.clone());
            }
        }
        Backing::WrappedCommand {
            command,
            args,
            secret,
            run_as,
        } => {
            line("  command:", command.clone());
            line("  args:", args.join(" "));
            line(
                "  run as:",
                run_as
                    .clone()
                    .unwrap_or_else(|| "the broker's own user".into()),
            );
            if let Some(sr) = secret {
                line("  secret:", sr.to_string());
            }
        }
        Backing::Secret { secret } => line("  secret:", secret.to_string()),
    }
    for i in &c.inject {
        let v = match i {
            Inject::Env { name } => format!("env {name}"),
            Inject::Fd { name } => format!("fd, path in {name}=/dev/fd/N"),
            Inject::GitCredential => "git-credential (one-shot helper)".into(),
            Inject::SshAgent => "ssh-agent (the broker signs; the key never leaves it)".into(),
            Inject::HttpProxy(p) => {
                let mut extra = String::new();
                if let Some(h) = &p.host {
                    extra.push_str(&format!(" to {h}"));
                }
                if let Some(n) = &p.name {
                    extra.push_str(&format!(", base URL in {n}"));
                }
                match (&p.header, &p.scheme) {
                    (Some(h), Some(sc)) => extra.push_str(&format!(", token in {h}: {sc} ...")),
                    (Some(h), None) => extra.push_str(&format!(", token in {h}")),
                    _ => {}
                }
                format!(
                    "http-proxy, {}{extra} (the broker adds the token; it never reaches the child)",
                    c.access.unwrap_or_default().as_str()
                )
            }
        };
        line("inject:", v);
    }
    s
}
