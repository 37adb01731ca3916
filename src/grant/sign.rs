//! Signing grants with `ssh-keygen -Y sign` (so keys held in ssh-agent and FIDO keys work) and
//! storing them atomically; revocation markers.

#![forbid(unsafe_code)]

use super::signers::NAMESPACE;
use crate::config::Config;
use crate::error::{Error, Result, shell_quote};
use crate::fsutil::{self, ReadOpts};
use crate::id::SessionId;
use crate::state::{self, StateDir};
use serde::{Deserialize, Serialize};
use ssh_key::{PublicKey, public::KeyData};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The content of `<state>/revoked/<SESSION>`. Its existence alone revokes; the content is for
/// people and for `aap session gc`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedMarker {
    pub v: u32,
    pub session: String,
    pub revoked_at: String,
    pub by_uid: u32,
    pub reason: Option<String>,
    /// The grant's expiry when it was revoked, if it could be read.
    pub expires_at: Option<String>,
}

/// The operator's signing key from the config, and its public half (`KEY.pub`, or KEY itself
/// when it is a `.pub`, as when the private key lives in ssh-agent).
pub fn operator_key(cfg: &Config) -> Result<(PathBuf, KeyData)> {
    let key = cfg.operator.signing_key.clone().ok_or_else(|| {
        Error::config(format!(
            "operator.signing_key is not set in {}",
            cfg.describe_file()
        ))
        .hint("add `operator: { signing_key: ~/.ssh/id_ed25519 }` (a .pub is fine when the key is in ssh-agent) to the config; see: aap config show")
    })?;
    let pubp = if key.extension().is_some_and(|e| e == "pub") {
        key.clone()
    } else {
        let mut p = key.clone().into_os_string();
        p.push(".pub");
        PathBuf::from(p)
    };
    let opts = ReadOpts {
        check_mode: false,
        ..ReadOpts::config_file("operator public key", 64 * 1024)
    };
    let bytes = fsutil::read_file(&pubp, opts).map_err(|e| {
        let hint = format!(
            "aap needs the public half next to the signing key: ssh-keygen -y -f {} > {}",
            shell_quote(&key.to_string_lossy()),
            shell_quote(&pubp.to_string_lossy())
        );
        e.hint(hint)
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let pk = PublicKey::from_openssh(text.trim()).map_err(|e| {
        Error::config(format!(
            "{} is not an OpenSSH public key ({e})",
            pubp.display()
        ))
        .hint(format!(
            "regenerate it: ssh-keygen -y -f {} > {}",
            shell_quote(&key.to_string_lossy()),
            shell_quote(&pubp.to_string_lossy())
        ))
    })?;
    Ok((key, pk.key_data().clone()))
}

/// Sign `bytes` with `ssh-keygen -Y sign -n aap-grant -f KEY`, reading the message on stdin and
/// the armored signature on stdout (no temporary files). When stderr is a terminal, ssh-keygen
/// shares it, so passphrase and FIDO touch prompts reach the operator.
pub fn sign_bytes(key: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let tty = std::io::stderr().is_terminal();
    let keyq = shell_quote(&key.to_string_lossy());
    let mut child = Command::new("ssh-keygen")
        .arg("-Y")
        .arg("sign")
        .arg("-n")
        .arg(NAMESPACE)
        .arg("-f")
        .arg(key)
        .args(if tty { &[][..] } else { &["-q"][..] })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if tty { Stdio::inherit() } else { Stdio::piped() })
        .spawn()
        .map_err(|e| {
            Error::config(format!("cannot run ssh-keygen to sign the grant: {e}"))
                .hint("install OpenSSH's client tools (Debian: apt-get install openssh-client), then retry")
        })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let msg = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let r = stdin.write_all(&msg);
        drop(stdin);
        r
    });
    let mut sig = Vec::new();
    let mut err = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut sig);
    }
    if let Some(e) = child.stderr.take() {
        let _ = e.take(4096).read_to_end(&mut err);
    }
    let status = child
        .wait()
        .map_err(|e| Error::internal(format!("cannot wait for ssh-keygen: {e}")).hint("retry"))?;
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread panicked")));
    if !status.success() || wrote.is_err() {
        let said = String::from_utf8_lossy(&err);
        let said = said.trim();
        let detail = if said.is_empty() {
            String::new()
        } else {
            format!(": {}", said.lines().last().unwrap_or(said))
        };
        return Err(Error::config(format!(
            "the operator key {} cannot sign (ssh-keygen -Y sign failed, {status}){detail}",
            key.display()
        ))
        .hint(format!(
            "check the key signs at all: echo test | ssh-keygen -Y sign -n aap-grant -f {keyq}  (for a key in ssh-agent: ssh-add -l)"
        )));
    }
    Ok(sig)
}

/// Store a signed grant: both files are staged and fsync'd, then the signature is renamed into
/// place before the grant (see [`super::load_verified`] for why), then the directory is
/// fsync'd. Call with the exclusive state lock held.
pub fn store(st: &StateDir, id: &SessionId, bytes: &[u8], sig: &[u8]) -> Result<()> {
    st.ensure_dirs()?;
    let dir = st.grants_dir();
    let gname = format!("{id}.grant");
    let sname = format!("{id}.grant.sig");
    let sig_tmp = state::stage(&dir, &sname, sig, 0o644)?;
    let grant_tmp = match state::stage(&dir, &gname, bytes, 0o644) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&sig_tmp);
            return Err(e);
        }
    };
    state::commit(
        &dir,
        &[
            (&sig_tmp, &st.sig_path(id)),
            (&grant_tmp, &st.grant_path(id)),
        ],
    )
}

/// Undo a [`store`] after a later step failed: put the previous grant back, or remove a new
/// session's files (grant first, so no reader sees a grant without its signature).
pub fn store_undo(st: &StateDir, id: &SessionId, previous: Option<(&[u8], &[u8])>) -> Result<()> {
    match previous {
        Some((bytes, sig)) => store(st, id, bytes, sig),
        None => {
            let _ = std::fs::remove_file(st.grant_path(id));
            let _ = std::fs::remove_file(st.sig_path(id));
            crate::sys::fsync_dir(&st.grants_dir()).map_err(|e| {
                Error::unavailable(format!("cannot fsync {}: {e}", st.grants_dir().display())).hint(
                    format!("check the file system: df -h {}", st.grants_dir().display()),
                )
            })
        }
    }
}
