//! `aap infisical check` (hidden): log in as an agent's identity, fetch one secret, revoke the
//! token. Prints the secret's length, never its value. Used by tests and the benchmark, and
//! handy to check an identity by hand.

#![forbid(unsafe_code)]

use crate::catalog::SecretRef;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::source::{AccessToken, Client, Identity};

/// Parse `[ENV:]PATH:KEY`.
pub fn parse_ref(text: &str) -> Result<SecretRef> {
    let parts: Vec<&str> = text.split(':').collect();
    let (environment, path, key) = match parts.as_slice() {
        [p, k] => (None, *p, *k),
        [e, p, k] => (Some(e.to_string()), *p, *k),
        _ => (None, "", ""),
    };
    if path.is_empty() || key.is_empty() {
        return Err(
            Error::config(format!("secret reference {text:?} is not [ENV:]PATH:KEY"))
                .hint("write it like: aap infisical check --agent NAME prod:/app:DB_PASSWORD"),
        );
    }
    Ok(SecretRef {
        path: path.to_string(),
        key: key.to_string(),
        environment,
    })
}

pub fn check(agent: &str, secret: &str, repeat: u32, revoke: bool) -> Result<u8> {
    let r = parse_ref(secret)?;
    let cfg = Config::load()?;
    let inf = cfg.infisical()?;
    let identity = Identity::for_agent(&cfg, agent)?;
    let client = Client::new(inf)?;
    let mut len = 0;
    for _ in 0..repeat.max(1) {
        let v = client.fetch(&identity, &r, &inf.environment, &|line| {
            eprintln!("aap: {line}")
        })?;
        len = v.len();
    }
    if revoke {
        client.revoke_cached()?;
        println!("ok: fetched {r} ({len} bytes) as agent {agent}; token revoked");
    } else {
        println!("ok: fetched {r} ({len} bytes) as agent {agent}; token left to expire");
    }
    Ok(0)
}

/// `aap infisical check --token-env VAR SECRET`: read one secret with the access token in `VAR`
/// (as Infisical's own CLI reads `INFISICAL_TOKEN`); print its length only. The token is not
/// revoked: whoever handed it out (the broker, for an `infisical-token` capability) does that.
/// Where `check_token` reads, when not from the config.
pub struct Server {
    pub url: String,
    pub project_id: String,
    pub ca_bundle: Option<std::path::PathBuf>,
}

pub fn check_token(var: &str, secret: &str, server: Option<Server>) -> Result<u8> {
    let r = parse_ref(secret)?;
    let token = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Error::config(format!("{var} is not set (or empty): no access token to read with"))
                .hint(format!(
                    "run it with a capability that hands a token: aap-exec CAP -- aap infisical check --token-env {var} {secret}"
                ))
        })?;
    let token = AccessToken::new(
        crate::secret::SecretBytes::from_slice(std::os::unix::ffi::OsStrExt::as_bytes(
            token.as_os_str(),
        )),
        0,
    );
    let inf = match server {
        Some(s) => serde_json::from_value::<crate::config::InfisicalConfig>(serde_json::json!({
            "url": s.url, "project_id": s.project_id, "ca_bundle": s.ca_bundle,
        }))
        .map_err(|e| {
            Error::config(format!("--url/--project-id/--ca-bundle: {e}"))
                .hint("aap infisical check --token-env INFISICAL_TOKEN --url https://infisical.example.org --project-id ID prod:/app:KEY")
        })?,
        None => Config::load()?.infisical()?.clone(),
    };
    let inf = &inf;
    let client = Client::new(inf)?;
    let env = r.environment.as_deref().unwrap_or(&inf.environment);
    let v = client.get_secret(&token, &inf.project_id, env, &r.path, &r.key)?;
    println!(
        "ok: read {env}:{}:{} ({} bytes) with the token in {var}",
        r.path,
        r.key,
        v.len()
    );
    Ok(0)
}
