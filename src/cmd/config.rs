//! `aap config show`.

#![forbid(unsafe_code)]

use crate::config::{Config, Source};
use crate::error::Result;
use std::fmt::Write as _;

pub fn show(json: bool) -> Result<u8> {
    let cfg = Config::load()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&cfg).expect("config serializes")
        );
        return Ok(0);
    }
    print!("{}", render(&cfg));
    Ok(0)
}

/// `key = value   # source` lines. Holds no secret: identities are file paths, and the
/// environment's client secret is reported only as set or not.
pub fn render(cfg: &Config) -> String {
    let mut s = String::new();
    let from = cfg.file_source();
    match &cfg.file {
        Some(f) => {
            let why = match &f.from {
                Source::Env(v) if v == "AAP_CONFIG" => "named by $AAP_CONFIG".to_string(),
                Source::Env(v) => format!("found under ${v}"),
                _ => "the system default".to_string(),
            };
            let _ = writeln!(s, "# config file: {} ({why})", f.value.display());
        }
        None => {
            let _ = writeln!(
                s,
                "# config file: none found ($AAP_CONFIG unset, no $XDG_CONFIG_HOME/aap/config.yaml, no {}); using built-in defaults",
                crate::config::SYSTEM_CONFIG
            );
        }
    }
    let mut kv = |k: &str, v: String, src: &Source| {
        let _ = writeln!(s, "{k} = {v}  # {src}");
    };
    // Which keys the file itself sets: a value it leaves out is the built-in default's, and is
    // credited to the default, not to the file. (The file already loaded, so it parses.)
    let raw: Option<serde_yaml_ng::Value> = cfg
        .file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(&f.value).ok())
        .and_then(|t| serde_yaml_ng::from_str(&t).ok());
    let set = |keys: &[&str]| {
        let mut v = raw.as_ref();
        for k in keys {
            v = v.and_then(|v| v.get(*k));
        }
        v.is_some_and(|v| !v.is_null())
    };
    let src = |keys: &[&str]| {
        if set(keys) {
            from.clone()
        } else {
            Source::Default
        }
    };
    kv(
        "catalog",
        cfg.catalog.value.display().to_string(),
        &cfg.catalog.from,
    );
    kv(
        "state_dir",
        cfg.state_dir.value.display().to_string(),
        &cfg.state_dir.from,
    );
    kv(
        "broker.socket",
        cfg.broker.socket.value.display().to_string(),
        &cfg.broker.socket.from,
    );
    kv(
        "broker.max_connections_per_uid",
        cfg.broker.max_connections_per_uid.to_string(),
        &src(&["broker", "max_connections_per_uid"]),
    );
    kv(
        "audit_log",
        cfg.audit_log.value.display().to_string(),
        &cfg.audit_log.from,
    );
    let opt = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or("(unset)".to_string(), |p| p.display().to_string())
    };
    kv(
        "operator.allowed_signers",
        opt(&cfg.operator.allowed_signers),
        &src(&["operator", "allowed_signers"]),
    );
    kv(
        "operator.signing_key",
        opt(&cfg.operator.signing_key),
        &src(&["operator", "signing_key"]),
    );
    match &cfg.infisical {
        Some(i) => {
            kv("infisical.url", i.url.clone(), &src(&["infisical", "url"]));
            kv(
                "infisical.project_id",
                i.project_id.clone(),
                &src(&["infisical", "project_id"]),
            );
            kv(
                "infisical.environment",
                i.environment.clone(),
                &src(&["infisical", "environment"]),
            );
            kv(
                "infisical.ca_bundle",
                opt(&i.ca_bundle),
                &src(&["infisical", "ca_bundle"]),
            );
            kv(
                "infisical.connect_timeout",
                i.connect_timeout.to_string(),
                &src(&["infisical", "connect_timeout"]),
            );
            kv(
                "infisical.timeout",
                i.timeout.to_string(),
                &src(&["infisical", "timeout"]),
            );
        }
        None => kv("infisical", "(unset)".into(), &Source::Default),
    }
    for (name, a) in &cfg.agents {
        kv(
            &format!("agents.{name}.uid"),
            a.uid.map_or("(any)".into(), |u| u.to_string()),
            &src(&["agents", name, "uid"]),
        );
        kv(
            &format!("agents.{name}.client_id_file"),
            opt(&a.client_id_file),
            &src(&["agents", name, "client_id_file"]),
        );
        kv(
            &format!("agents.{name}.client_secret_file"),
            opt(&a.client_secret_file),
            &src(&["agents", name, "client_secret_file"]),
        );
    }
    for (name, i) in &cfg.identities {
        kv(
            &format!("identities.{name}.client_id_file"),
            i.client_id_file.display().to_string(),
            &src(&["identities", name, "client_id_file"]),
        );
        kv(
            &format!("identities.{name}.client_secret_file"),
            i.client_secret_file.display().to_string(),
            &src(&["identities", name, "client_secret_file"]),
        );
    }
    match &cfg.notify {
        Some(n) => {
            kv(
                "notify.command",
                n.command.join(" "),
                &src(&["notify", "command"]),
            );
            kv(
                "notify.allow_on_failure",
                n.allow_on_failure.to_string(),
                &src(&["notify", "allow_on_failure"]),
            );
            kv(
                "notify.timeout",
                n.timeout.map_or_else(
                    || {
                        format!(
                            "{}s",
                            crate::exec::breakglass::DEFAULT_NOTIFY_TIMEOUT.as_secs()
                        )
                    },
                    |t| t.to_string(),
                ),
                &src(&["notify", "timeout"]),
            );
        }
        None => kv(
            "notify",
            "(unset: break-glass uses are denied until a notify command is set)".into(),
            &Source::Default,
        ),
    }
    kv(
        "requests.ttl",
        cfg.request_ttl.to_string(),
        &src(&["requests", "ttl"]),
    );
    match &cfg.request_notify {
        Some(n) => kv("requests.notify.command", n.command.join(" "), &from),
        None => kv(
            "requests.notify",
            "(unset: nobody is told of a new request; see: aap requests --watch)".into(),
            &Source::Default,
        ),
    }
    kv(
        "ssh_known_hosts",
        if cfg.ssh_known_hosts.is_empty() {
            "(none: ssh-add -h reads ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts)".to_string()
        } else {
            cfg.ssh_known_hosts
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(",")
        },
        &src(&["ssh_known_hosts"]),
    );
    kv(
        "secure_path",
        cfg.secure_path.clone(),
        &src(&["secure_path"]),
    );
    let secret_env = if cfg.secret_env.is_empty() {
        "(none)".to_string()
    } else {
        cfg.secret_env.join(",")
    };
    kv("secret_env", secret_env, &src(&["secret_env"]));
    for var in ["AAP_SESSION", "AAP_LOG"] {
        let v = std::env::var(var).unwrap_or_else(|_| "(unset)".into());
        kv(&format!("env.{var}"), v, &Source::Env(var.into()));
    }
    for var in [
        "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID",
        "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET",
    ] {
        let v = if std::env::var_os(var).is_some() {
            "(set; value not shown)"
        } else {
            "(unset)"
        };
        kv(&format!("env.{var}"), v.into(), &Source::Env(var.into()));
    }
    s
}
