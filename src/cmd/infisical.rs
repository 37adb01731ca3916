//! `aap infisical check` (hidden): log in as an agent's identity, fetch one secret, revoke the
//! token. Prints the secret's length, never its value. Used by tests and the benchmark, and
//! handy to check an identity by hand.

#![forbid(unsafe_code)]

use crate::catalog::SecretRef;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::source::{Client, Identity};

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
