//! The typed catalog, as the schema describes it. Deserialized only after the schema passed.

#![forbid(unsafe_code)]

use crate::duration::Dur;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    pub schema_version: u32,
    pub capabilities: Vec<Capability>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Low,
    Medium,
    High,
    Critical,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Low => "low",
            Tier::Medium => "medium",
            Tier::High => "high",
            Tier::Critical => "critical",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    pub id: String,
    pub description: String,
    pub audit_tier: Tier,
    pub agents: Vec<String>,
    pub max_ttl: Dur,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_commands: Option<Vec<String>>,
    /// Whether the capability may be used by `aap-exec` inside another `aap-exec` child.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nested: bool,
    pub backing: Backing,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject: Vec<Inject>,
    /// What the `http-proxy` form lets through (default read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
}

/// What a capability's `http-proxy` passes: `read` only fetches and GET/HEAD.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Read,
    Write,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

impl Capability {
    /// Whether `agent` is listed. Critical capabilities list nobody: they come only from a
    /// break-glass grant.
    pub fn allows_agent(&self, agent: &str) -> bool {
        self.agents.iter().any(|a| a == agent)
    }

    /// The secret this capability fetches from Infisical, if any.
    pub fn secret(&self) -> Option<&SecretRef> {
        match &self.backing {
            Backing::ForgejoPat { secret, .. }
            | Backing::SshAgent { secret, .. }
            | Backing::Secret { secret } => Some(secret),
            Backing::WrappedCommand { secret, .. } => secret.as_ref(),
            Backing::InfisicalToken { .. } => None,
        }
    }
}

/// Where a secret lives in Infisical. Holds no secret itself.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub path: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.environment {
            Some(env) => write!(f, "{env}:{}:{}", self.path, self.key),
            None => write!(f, "{}:{}", self.path, self.key),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Backing {
    ForgejoPat {
        host: String,
        secret: SecretRef,
    },
    SshAgent {
        secret: SecretRef,
        key_lifetime: Dur,
        hosts: Vec<String>,
        /// Sign over a forwarded agent connection (`ssh -A`), hop to hop among `hosts`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_forwarding: bool,
    },
    InfisicalToken {
        identity: String,
        secret_path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        environment: Option<String>,
    },
    WrappedCommand {
        command: String,
        args: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<SecretRef>,
        /// The user the broker starts the command as (default: the broker's own user).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_as: Option<String>,
    },
    Secret {
        secret: SecretRef,
    },
}

impl Backing {
    pub fn type_name(&self) -> &'static str {
        match self {
            Backing::ForgejoPat { .. } => "forgejo-pat",
            Backing::SshAgent { .. } => "ssh-agent",
            Backing::InfisicalToken { .. } => "infisical-token",
            Backing::WrappedCommand { .. } => "wrapped-command",
            Backing::Secret { .. } => "secret",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Inject {
    /// The secret in the named environment variable of the child only.
    Env { name: String },
    /// The secret in an inherited sealed memfd; the named variable holds `/dev/fd/N`.
    Fd { name: String },
    /// A one-shot git credential helper scoped to the backing's host.
    GitCredential,
    /// A private ssh-agent holding the key, with a bounded lifetime.
    SshAgent,
    /// The broker's per-exec loopback HTTP proxy, which adds the token on the wire.
    HttpProxy(HttpProxy),
}

/// The `http-proxy` form's settings; all optional for a `forgejo-pat` backing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProxy {
    /// The variable holding the proxy's base URL for API tools (default `FORGEJO_URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `host[:port]` the proxy forwards to: a `secret` backing's only host (a `forgejo-pat`
    /// backing names its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The request header that carries the secret (default for `forgejo-pat`: `Authorization`
    /// with Basic `aap:TOKEN`; required for a `secret` backing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A word before the secret in the header's value (`Bearer`, `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

/// The variable holding the http-proxy's base URL when the catalog names none.
pub const DEFAULT_PROXY_URL_VAR: &str = "FORGEJO_URL";

impl HttpProxy {
    /// The variable holding the base URL.
    pub fn url_var(&self) -> &str {
        self.name.as_deref().unwrap_or(DEFAULT_PROXY_URL_VAR)
    }
}

impl Inject {
    pub fn type_name(&self) -> &'static str {
        match self {
            Inject::Env { .. } => "env",
            Inject::Fd { .. } => "fd",
            Inject::GitCredential => "git-credential",
            Inject::SshAgent => "ssh-agent",
            Inject::HttpProxy(_) => "http-proxy",
        }
    }
    pub fn var_name(&self) -> Option<&str> {
        match self {
            Inject::Env { name } | Inject::Fd { name } => Some(name),
            Inject::HttpProxy(p) => Some(p.url_var()),
            _ => None,
        }
    }
}
