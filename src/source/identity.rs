//! Machine identities (Universal Auth client id + client secret) from the config or the
//! environment. The client secret is a [`SecretBytes`] from the moment it is read.

#![forbid(unsafe_code)]

use crate::config::Config;
use crate::error::{Error, Kind, Result, shell_quote};
use crate::fsutil::{self, ReadOpts};
use crate::secret::SecretBytes;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

pub const ENV_CLIENT_ID: &str = "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID";
pub const ENV_CLIENT_SECRET: &str = "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET";

/// Largest client id / client secret file we read. Real ones are under 100 bytes.
const MAX_CREDENTIAL_FILE: u64 = 4096;

/// A Universal Auth machine identity. `Debug` shows the label and client id, never the secret.
pub struct Identity {
    label: String,
    client_id: String,
    client_secret: SecretBytes,
    /// Where the secret came from, for hints: a file path or an environment variable.
    secret_source: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("label", &self.label)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .finish()
    }
}

impl Identity {
    /// Build an identity from values already in hand (tests, the bench, the dev-server demo).
    pub fn new(label: &str, client_id: &str, client_secret: SecretBytes) -> Identity {
        Identity {
            label: label.to_string(),
            client_id: client_id.to_string(),
            client_secret,
            secret_source: "the caller".into(),
        }
    }

    /// The identity of agent `agent`: `agents.<agent>.client_id_file`/`client_secret_file`, else
    /// `$INFISICAL_UNIVERSAL_AUTH_CLIENT_ID`/`$INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET`.
    pub fn for_agent(cfg: &Config, agent: &str) -> Result<Identity> {
        let label = format!("agent {agent}");
        let a = cfg.agents.get(agent);
        match (
            a.and_then(|a| a.client_id_file.as_deref()),
            a.and_then(|a| a.client_secret_file.as_deref()),
        ) {
            (Some(id), Some(secret)) => Self::from_files(label, id, secret),
            (Some(_), None) | (None, Some(_)) => Err(Error::config(format!(
                "agents.{agent} in {} sets only one of client_id_file and client_secret_file",
                cfg.describe_file()
            ))
            .hint(format!(
                "set both agents.{agent}.client_id_file and agents.{agent}.client_secret_file, then: aap config show"
            ))),
            (None, None) => Self::from_env(label, &|k| std::env::var_os(k)).map_err(|e| {
                let hint = format!(
                    "add agents.{agent}.client_id_file and client_secret_file to {} (or export {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}), then: aap config show",
                    cfg.describe_file()
                );
                e.hint(hint)
            }),
        }
    }

    /// A named identity from the config's `identities:` (used by `infisical-token` backings).
    pub fn named(cfg: &Config, name: &str) -> Result<Identity> {
        let i = cfg.identities.get(name).ok_or_else(|| {
            Error::config(format!(
                "no identity {name:?} under identities: in {}",
                cfg.describe_file()
            ))
            .hint(format!(
                "add identities.{name}.client_id_file and client_secret_file, then: aap config show"
            ))
        })?;
        Self::from_files(
            format!("identity {name}"),
            &i.client_id_file,
            &i.client_secret_file,
        )
    }

    fn from_files(label: String, id_file: &Path, secret_file: &Path) -> Result<Identity> {
        let id = fsutil::read_file(
            id_file,
            ReadOpts::config_file("client id file", MAX_CREDENTIAL_FILE),
        )?;
        let id = fsutil::utf8(id, "the client id file", id_file, Kind::Config)?;
        let client_id = id.trim().to_string();
        if client_id.is_empty() {
            return Err(
                Error::config(format!("client id file {} is empty", id_file.display())).hint(
                    format!(
                        "write the identity's client id into it: ls -l {}",
                        shell_quote(&id_file.to_string_lossy())
                    ),
                ),
            );
        }
        let client_secret = read_secret_file(secret_file, "client secret file")?;
        Ok(Identity {
            label,
            client_id,
            client_secret,
            secret_source: secret_file.display().to_string(),
        })
    }

    fn from_env(
        label: String,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Identity> {
        let id = env(ENV_CLIENT_ID).filter(|v| !v.is_empty());
        let secret = env(ENV_CLIENT_SECRET).filter(|v| !v.is_empty());
        match (id, secret) {
            (Some(id), Some(secret)) => {
                let secret = Zeroizing::new(secret.into_encoded_bytes());
                Ok(Identity {
                    label,
                    client_id: id.to_string_lossy().trim().to_string(),
                    client_secret: SecretBytes::from_slice(trim_ascii(&secret)),
                    secret_source: format!("${ENV_CLIENT_SECRET}"),
                })
            }
            _ => Err(Error::config(format!(
                "no Infisical identity for {label}: no client_id_file/client_secret_file in the config and ${ENV_CLIENT_ID}/${ENV_CLIENT_SECRET} are not both set"
            )).hint(format!("set client_id_file and client_secret_file for it in the config (aap config show), or export {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}"))),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    pub fn client_secret(&self) -> &SecretBytes {
        &self.client_secret
    }
    pub fn secret_source(&self) -> &str {
        &self.secret_source
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// Read a small secret file into a zeroizing buffer: a regular file, at most 4 KiB, readable by
/// its owner only. Surrounding whitespace (a trailing newline) is dropped.
pub fn read_secret_file(path: &Path, what: &str) -> Result<SecretBytes> {
    let shown = path.display();
    let quoted = shell_quote(&path.to_string_lossy());
    let mut file = crate::sys::open_read_nonblocking(path, true).map_err(|e| {
        Error::config(format!("cannot open {what} {shown}: {e}")).hint(format!(
            "check the path and its permissions: ls -l {quoted}"
        ))
    })?;
    let meta = file.metadata().map_err(|e| {
        Error::config(format!("cannot stat {what} {shown}: {e}"))
            .hint(format!("check the file: ls -l {shown}"))
    })?;
    if !meta.is_file() {
        return Err(
            Error::config(format!("{what} {shown} is not a regular file"))
                .hint(format!("point to a regular file: ls -l {quoted}")),
        );
    }
    if meta.mode() & 0o077 != 0 {
        return Err(Error::config(format!(
            "{what} {shown} is readable or writable by group or others (mode {:o}); a secret file must be private",
            meta.mode() & 0o7777
        ))
        .hint(format!("chmod 600 {quoted}")));
    }
    if meta.len() > MAX_CREDENTIAL_FILE {
        return Err(Error::config(format!(
            "{what} {shown} is {} bytes; the limit is {MAX_CREDENTIAL_FILE} bytes",
            meta.len()
        ))
        .hint(format!("check that {quoted} holds only the client secret")));
    }
    // One allocation sized for the whole file; a read past the limit is refused, not grown into.
    let mut buf = Zeroizing::new(vec![0u8; MAX_CREDENTIAL_FILE as usize + 1]);
    let mut n = 0;
    loop {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if n > MAX_CREDENTIAL_FILE as usize {
                    return Err(Error::config(format!(
                        "{what} {shown} is over {MAX_CREDENTIAL_FILE} bytes"
                    ))
                    .hint(format!("check that {quoted} holds only the client secret")));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::config(format!("cannot read {what} {shown}: {e}"))
                    .hint(format!("check the file and its permissions: ls -l {shown}")));
            }
        }
    }
    let secret = SecretBytes::from_slice(trim_ascii(&buf[..n]));
    buf.zeroize();
    if secret.is_empty() {
        return Err(
            Error::config(format!("{what} {shown} is empty")).hint(format!(
                "write the client secret into it, then: chmod 600 {quoted}"
            )),
        );
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn env_identity_and_debug_redaction() {
        let env = |k: &str| match k {
            ENV_CLIENT_ID => Some(OsString::from("cid-1")),
            ENV_CLIENT_SECRET => Some(OsString::from("very-secret-value\n")),
            _ => None,
        };
        let i = Identity::from_env("agent x".into(), &env).unwrap();
        assert_eq!(i.client_id(), "cid-1");
        assert_eq!(i.client_secret().expose(), b"very-secret-value");
        let d = format!("{i:?}");
        assert!(!d.contains("very-secret"), "{d}");
        let none = |_: &str| None;
        let e = Identity::from_env("agent x".into(), &none).unwrap_err();
        assert_eq!(e.exit_code(), 78);
    }

    #[test]
    fn secret_file_mode_is_checked() {
        let dir = std::env::temp_dir().join(format!("aap-id-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("secret");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_file(&p, "client secret file").unwrap_err();
        assert_eq!(e.exit_code(), 78);
        assert!(e.hint_text().unwrap().starts_with("chmod 600 "), "{e:?}");
        assert!(!e.message().contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_secret_file(&p, "client secret file").unwrap().expose(),
            b"s3cret"
        );
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert!(read_secret_file(&p, "client secret file").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
