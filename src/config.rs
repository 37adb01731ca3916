//! The operator's config: found at `$AAP_CONFIG`, else `$XDG_CONFIG_HOME/aap/config.yaml`
//! (`~/.config` when unset), else `/etc/aap/config.yaml`. Every resolved value remembers where it
//! came from, for `aap config show`. Relative paths in a config file are relative to the file's
//! directory.

#![forbid(unsafe_code)]

use crate::duration::Dur;
use crate::error::{Error, Kind, Result, shell_quote};
use crate::fsutil::{self, ReadOpts};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub const DEFAULT_CATALOG: &str = "/etc/aap/agent-capabilities.yaml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/aap";
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/aap/audit.jsonl";
pub const SYSTEM_CONFIG: &str = "/etc/aap/config.yaml";
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Source {
    /// The config file at this path.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// aap's built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Env(v) => write!(f, "${v}"),
            Source::Default => f.write_str("built-in default"),
        }
    }
}

/// A resolved value and its source.
#[derive(Clone, Debug, Serialize)]
pub struct Sourced<T> {
    pub value: T,
    pub from: Source,
}

// ---- the file format (contract: DESIGN.md, "Command-line and config contract") -------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    catalog: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    operator: Option<OperatorConfig>,
    infisical: Option<InfisicalConfig>,
    #[serde(default)]
    agents: BTreeMap<String, AgentConfig>,
    #[serde(default)]
    identities: BTreeMap<String, IdentityConfig>,
    notify: Option<NotifyConfig>,
    requests: Option<RequestsConfig>,
    secure_path: Option<String>,
    #[serde(default)]
    secret_env: Vec<String>,
    /// Known-hosts files `ssh-add -h` reads destination host keys from (ssh-agent backings).
    #[serde(default)]
    ssh_known_hosts: Vec<PathBuf>,
    broker: Option<RawBroker>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    socket: Option<PathBuf>,
    max_connections_per_uid: Option<u32>,
    first_frame_timeout: Option<Dur>,
}

/// The default `broker.socket` (the path `contrib/systemd/aap-broker.socket` listens on).
pub const DEFAULT_BROKER_SOCKET: &str = "/run/aap/broker.sock";
/// The default `broker.max_connections_per_uid`.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: u32 = 1024;
/// The default `broker.first_frame_timeout`: how long a new connection may take to send its
/// whole request.
pub const DEFAULT_FIRST_FRAME_TIMEOUT: Dur = Dur::from_secs(5);
/// The longest `broker.first_frame_timeout` the broker accepts.
pub const MAX_FIRST_FRAME_TIMEOUT: Dur = Dur::from_secs(300);

/// `broker:`: where the broker listens, how many connections one uid may hold open, and how
/// long a new connection may take to send its request.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerConfig {
    pub socket: Sourced<PathBuf>,
    pub max_connections_per_uid: u32,
    pub first_frame_timeout: Dur,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// OpenSSH allowed_signers file that grant signatures are verified against.
    pub allowed_signers: Option<PathBuf>,
    /// Key for `ssh-keygen -Y sign`; a `.pub` is fine when the key is in ssh-agent.
    pub signing_key: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InfisicalConfig {
    pub url: String,
    pub project_id: String,
    /// Default environment for secret references without one.
    #[serde(default = "default_environment")]
    pub environment: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
    /// TCP+TLS connect timeout (default 3s).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Whole-request timeout (default 10s).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
}

fn default_environment() -> String {
    "prod".into()
}
fn default_connect_timeout() -> Dur {
    Dur::from_secs(3)
}
fn default_timeout() -> Dur {
    Dur::from_secs(10)
}

/// An agent ("cousin") and its Infisical machine identity.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// When set, only this uid may act as the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
}

/// A scoped machine identity for `infisical-token` backings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub client_id_file: PathBuf,
    pub client_secret_file: PathBuf,
}

/// The break-glass notify command: argv, run with the audit event as JSON on stdin.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub command: Vec<String>,
    /// When false (the default), a failed notification denies the break-glass use.
    #[serde(default)]
    pub allow_on_failure: bool,
    /// How long the notify command may run before it is killed and counted as failed
    /// (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsConfig {
    /// How long a pending agent request stays answerable (default 1h).
    #[serde(default = "default_request_ttl")]
    pub ttl: Dur,
    /// Run by the broker for each new request, with the request as one JSON line on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<RequestNotify>,
}

/// `requests.notify`: tell the operator of each new agent request (a pager, ntfy, a chat
/// webhook). Run by the broker, as its own user, with only `PATH` (the `secure_path`) in its
/// environment. A failure does not stop the request; the agent is told to say so itself.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestNotify {
    pub command: Vec<String>,
    /// How long it may run before it is killed and counted as failed (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
}

fn default_request_ttl() -> Dur {
    Dur::from_secs(3600)
}

// ---- the resolved config ---------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct Config {
    /// The file read, and why it was chosen; `None` when no config file exists.
    pub file: Option<Sourced<PathBuf>>,
    pub catalog: Sourced<PathBuf>,
    pub state_dir: Sourced<PathBuf>,
    pub audit_log: Sourced<PathBuf>,
    pub operator: OperatorConfig,
    pub infisical: Option<InfisicalConfig>,
    pub agents: BTreeMap<String, AgentConfig>,
    pub identities: BTreeMap<String, IdentityConfig>,
    pub notify: Option<NotifyConfig>,
    pub request_ttl: Dur,
    /// `requests.notify`: run by the broker for each new request.
    pub request_notify: Option<RequestNotify>,
    /// Trusted directories where `allowed_commands` names are looked up (like sudo's).
    pub secure_path: String,
    /// Extra variables never passed through to a child (besides every variable the catalog
    /// injects and the Infisical identity variables).
    pub secret_env: Vec<String>,
    /// Known-hosts files (absolute) holding the host keys of ssh-agent destination constraints
    /// (`ssh-add -H`); empty: OpenSSH's defaults.
    pub ssh_known_hosts: Vec<PathBuf>,
    pub broker: BrokerConfig,
}

/// Which config file to read, by the contract's order.
pub fn find_file() -> Result<Option<Sourced<PathBuf>>> {
    find_file_in(&|k| std::env::var_os(k))
}

fn find_file_in(
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Option<Sourced<PathBuf>>> {
    if let Some(p) = env("AAP_CONFIG").filter(|p| !p.is_empty()) {
        // An explicit choice must exist: never fall back silently.
        return Ok(Some(Sourced {
            value: PathBuf::from(p),
            from: Source::Env("AAP_CONFIG".into()),
        }));
    }
    let xdg = match env("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => Some((PathBuf::from(x), Source::Env("XDG_CONFIG_HOME".into()))),
        None => env("HOME")
            .filter(|p| !p.is_empty())
            .map(|h| (PathBuf::from(h).join(".config"), Source::Env("HOME".into()))),
    };
    if let Some((dir, from)) = xdg {
        let p = dir.join("aap/config.yaml");
        if std::fs::symlink_metadata(&p).is_ok() {
            return Ok(Some(Sourced { value: p, from }));
        }
    }
    let sys = PathBuf::from(SYSTEM_CONFIG);
    if std::fs::symlink_metadata(&sys).is_ok() {
        return Ok(Some(Sourced {
            value: sys,
            from: Source::Default,
        }));
    }
    Ok(None)
}

impl Config {
    /// Find and load the config. No file at all yields built-in defaults.
    pub fn load() -> Result<Config> {
        match find_file()? {
            Some(file) => Self::load_file(file),
            None => Ok(Self::resolve(RawConfig::default(), None)),
        }
    }

    /// The config for agent-side commands (`aap-exec`). When the system config
    /// (`/etc/aap/config.yaml`) exists, it is the only config: it must be owned by root, and a
    /// different file chosen through `$AAP_CONFIG` or `~/.config` is refused, because the config
    /// names the allowed_signers, the catalog and the audit log, and an agent must not choose
    /// its own approvals. Without a system config (a single-user machine, tests), the
    /// contract's search order applies.
    pub fn load_for_agent() -> Result<Config> {
        Self::load_for_agent_with(Path::new(SYSTEM_CONFIG), find_file()?)
    }

    fn load_for_agent_with(system: &Path, chosen: Option<Sourced<PathBuf>>) -> Result<Config> {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(system) else {
            return match chosen {
                Some(f) => Self::load_file(f),
                None => Ok(Self::resolve(RawConfig::default(), None)),
            };
        };
        if let Some(f) = &chosen {
            let same = f.value == system
                || std::fs::canonicalize(&f.value).ok() == std::fs::canonicalize(system).ok();
            if !same {
                return Err(Error::denied(format!(
                    "the system config {} exists, so aap-exec uses only it; {} (from {}) is refused: an agent must not choose its own allowed_signers, catalog or audit log",
                    system.display(),
                    f.value.display(),
                    f.from
                ))
                .hint("unset AAP_CONFIG (and move ~/.config/aap/config.yaml away), then retry"));
            }
        }
        // The entry itself must be root's (a symlink too: else its owner could repoint it);
        // what it leads to is judged on the opened file below (fstat), so a root-owned link to
        // an agent-owned file, or a swap between this check and the open, is refused as well.
        if meta.uid() != 0 {
            return Err(Error::config(format!(
                "the system config {} is owned by uid {}, not root",
                system.display(),
                meta.uid()
            ))
            .hint(format!(
                "chown root:root {} && chmod 644 {}",
                system.display(),
                system.display()
            )));
        }
        Self::load_file_with(
            Sourced {
                value: system.to_path_buf(),
                from: Source::Default,
            },
            true,
        )
    }

    /// Load a specific file.
    pub fn load_path(path: &Path) -> Result<Config> {
        Self::load_file(Sourced {
            value: path.to_path_buf(),
            from: Source::Default,
        })
    }

    fn load_file(file: Sourced<PathBuf>) -> Result<Config> {
        Self::load_file_with(file, false)
    }

    /// `require_root`: the file as opened must be root's (the system config for aap-exec).
    fn load_file_with(file: Sourced<PathBuf>, require_root: bool) -> Result<Config> {
        let path = &file.value;
        let opts = ReadOpts {
            require_root,
            ..ReadOpts::config_file("config", MAX_CONFIG_BYTES)
        };
        let bytes = fsutil::read_file(path, opts).map_err(|e| {
            if file.from == Source::Env("AAP_CONFIG".into()) {
                let hint = format!(
                    "{} (it was named by $AAP_CONFIG; unset it to use the default search order)",
                    e.hint_text().unwrap_or("check the path")
                );
                e.hint(hint)
            } else {
                e
            }
        })?;
        let text = fsutil::utf8(bytes, "the config", path, Kind::Config)?;
        let raw = parse(&text, path)?;
        Ok(Self::resolve(raw, Some(file)))
    }

    fn resolve(raw: RawConfig, file: Option<Sourced<PathBuf>>) -> Config {
        let base = file
            .as_ref()
            .and_then(|f| f.value.parent().map(Path::to_path_buf));
        let abs = |p: PathBuf| match &base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let pick = |v: Option<PathBuf>, default: &str| match (v, &file) {
            (Some(p), Some(f)) => Sourced {
                value: abs(p),
                from: Source::File(f.value.clone()),
            },
            _ => Sourced {
                value: PathBuf::from(default),
                from: Source::Default,
            },
        };
        let mut operator = raw.operator.unwrap_or_default();
        operator.allowed_signers = operator.allowed_signers.map(abs);
        operator.signing_key = operator.signing_key.map(abs);
        let mut infisical = raw.infisical;
        if let Some(inf) = infisical.as_mut() {
            inf.ca_bundle = inf.ca_bundle.take().map(abs);
        }
        let agents = raw
            .agents
            .into_iter()
            .map(|(k, mut a)| {
                a.client_id_file = a.client_id_file.map(abs);
                a.client_secret_file = a.client_secret_file.map(abs);
                (k, a)
            })
            .collect();
        let identities = raw
            .identities
            .into_iter()
            .map(|(k, mut i)| {
                i.client_id_file = abs(i.client_id_file);
                i.client_secret_file = abs(i.client_secret_file);
                (k, i)
            })
            .collect();
        let raw_broker = raw.broker.unwrap_or_default();
        let broker = BrokerConfig {
            socket: pick(raw_broker.socket, DEFAULT_BROKER_SOCKET),
            max_connections_per_uid: raw_broker
                .max_connections_per_uid
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_UID),
            first_frame_timeout: raw_broker
                .first_frame_timeout
                .unwrap_or(DEFAULT_FIRST_FRAME_TIMEOUT),
        };
        Config {
            broker,
            catalog: pick(raw.catalog, DEFAULT_CATALOG),
            state_dir: pick(raw.state_dir, DEFAULT_STATE_DIR),
            audit_log: pick(raw.audit_log, DEFAULT_AUDIT_LOG),
            file,
            operator,
            infisical,
            agents,
            identities,
            notify: raw.notify,
            request_ttl: raw
                .requests
                .as_ref()
                .map_or_else(default_request_ttl, |r| r.ttl),
            request_notify: raw.requests.and_then(|r| r.notify),
            secure_path: raw
                .secure_path
                .unwrap_or_else(|| crate::exec::command::DEFAULT_SECURE_PATH.to_string()),
            secret_env: raw.secret_env,
            ssh_known_hosts: raw.ssh_known_hosts.into_iter().map(abs).collect(),
        }
    }

    /// Where a non-path value came from: the file when there is one.
    pub fn file_source(&self) -> Source {
        self.file
            .as_ref()
            .map_or(Source::Default, |f| Source::File(f.value.clone()))
    }

    /// Every identity's client secret file, named by its config key
    /// (`agents.NAME.client_secret_file`, `identities.NAME.client_secret_file`): the files the
    /// broker alone may read.
    pub fn client_secret_files(&self) -> Vec<(String, &Path)> {
        let agents = self.agents.iter().filter_map(|(name, a)| {
            a.client_secret_file
                .as_deref()
                .map(|f| (format!("agents.{name}.client_secret_file"), f))
        });
        let named = self.identities.iter().map(|(name, i)| {
            (
                format!("identities.{name}.client_secret_file"),
                i.client_secret_file.as_path(),
            )
        });
        agents.chain(named).collect()
    }

    /// The agent that runs as `uid` (`agents.<name>.uid`), if exactly one does. The broker maps
    /// every peer through this: a uid no agent names is no agent.
    pub fn agent_for_uid(&self, uid: u32) -> Option<&str> {
        let mut found = self
            .agents
            .iter()
            .filter(|(_, a)| a.uid == Some(uid))
            .map(|(n, _)| n.as_str());
        let first = found.next()?;
        // Two agents on one uid cannot be told apart: neither is that uid's.
        found.next().is_none().then_some(first)
    }

    /// The `[infisical]` section, or an error saying how to add it.
    pub fn infisical(&self) -> Result<&InfisicalConfig> {
        self.infisical.as_ref().ok_or_else(|| {
            Error::config(format!(
                "no `infisical:` section in {}",
                self.describe_file()
            ))
            .hint(
                "add infisical: { url: ..., project_id: ... } to the config; see: aap config show",
            )
        })
    }

    pub fn describe_file(&self) -> String {
        match &self.file {
            Some(f) => f.value.display().to_string(),
            None => format!("the config (no file found; create {SYSTEM_CONFIG} or set AAP_CONFIG)"),
        }
    }
}

fn parse(text: &str, path: &Path) -> Result<RawConfig> {
    let shown = path.display();
    let check = format!(
        "aap config show  # after fixing {}",
        shell_quote(&path.to_string_lossy())
    );
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    // Strict pass first: duplicate keys, tags and alias bombs are refused with a position.
    crate::yaml::to_json(text).map_err(|e| {
        Error::config(format!(
            "{shown}:{}:{}: invalid config: {}",
            e.line.unwrap_or(1),
            e.column.unwrap_or(1),
            e.message
        ))
        .hint(check.clone())
    })?;
    serde_yaml_ng::from_str::<RawConfig>(text).map_err(|e| {
        let (l, c) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        let mut msg = e.to_string();
        if let Some(i) = msg.find(" at line ") {
            msg.truncate(i);
        }
        Error::config(format!("{shown}:{l}:{c}: invalid config: {msg}")).hint(check)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn explicit_config_wins_and_is_not_probed() {
        let env = |k: &str| match k {
            "AAP_CONFIG" => Some(OsString::from("/nonexistent/x.yaml")),
            _ => None,
        };
        let f = find_file_in(&env).unwrap().unwrap();
        assert_eq!(f.value, PathBuf::from("/nonexistent/x.yaml"));
        assert_eq!(f.from, Source::Env("AAP_CONFIG".into()));
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let e = parse("catalog: /x\ncatalgo: /y\n", Path::new("c.yaml")).unwrap_err();
        assert!(
            e.message()
                .starts_with("c.yaml:2:1: invalid config: unknown field `catalgo`"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn a_system_config_pins_agent_side_commands() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("system.yaml");
        std::fs::write(&sys, "state_dir: /sys-state\n").unwrap();
        let own = d.path().join("own.yaml");
        std::fs::write(&own, "state_dir: /agent-state\n").unwrap();
        let chosen = Some(Sourced {
            value: own.clone(),
            from: Source::Env("AAP_CONFIG".into()),
        });
        let e = Config::load_for_agent_with(&sys, chosen).unwrap_err();
        assert_eq!(e.exit_code(), 77, "{}", e.message());
        assert!(
            e.message()
                .contains("an agent must not choose its own allowed_signers"),
            "{}",
            e.message()
        );
        // The system file itself, when owned by root (we are root in CI), is used.
        if crate::sys::uid() == 0 {
            let c = Config::load_for_agent_with(&sys, None).unwrap();
            assert_eq!(c.state_dir.value, PathBuf::from("/sys-state"));
            // A root-owned symlink to a file root does not own is refused.
            let agents = d.path().join("agents.yaml");
            std::fs::write(&agents, "state_dir: /agent-state\n").unwrap();
            std::os::unix::fs::lchown(&agents, Some(65534), None).unwrap();
            let link = d.path().join("link.yaml");
            std::os::unix::fs::symlink(&agents, &link).unwrap();
            let e = Config::load_for_agent_with(&link, None).unwrap_err();
            assert_eq!(e.exit_code(), 78, "{}", e.message());
            assert!(
                e.message().contains("owned by uid 65534"),
                "{}",
                e.message()
            );
            // ... and a root-owned link to a root-owned file is fine.
            let good = d.path().join("good-link.yaml");
            std::os::unix::fs::symlink(&sys, &good).unwrap();
            let c = Config::load_for_agent_with(&good, None).unwrap();
            assert_eq!(c.state_dir.value, PathBuf::from("/sys-state"));
        } else {
            eprintln!("skipped the root-owned half: not running as root");
        }
        // No system config: the chosen file is used.
        let c = Config::load_for_agent_with(
            &d.path().join("absent.yaml"),
            Some(Sourced {
                value: own,
                from: Source::Env("AAP_CONFIG".into()),
            }),
        )
        .unwrap();
        assert_eq!(c.state_dir.value, PathBuf::from("/agent-state"));
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let raw = parse(
            "catalog: cat.yaml\nstate_dir: /abs/state\n",
            Path::new("/etc/aap/config.yaml"),
        )
        .unwrap();
        let c = Config::resolve(
            raw,
            Some(Sourced {
                value: "/etc/aap/config.yaml".into(),
                from: Source::Default,
            }),
        );
        assert_eq!(c.catalog.value, PathBuf::from("/etc/aap/cat.yaml"));
        assert_eq!(c.state_dir.value, PathBuf::from("/abs/state"));
        assert_eq!(c.audit_log.from, Source::Default);
    }
}
