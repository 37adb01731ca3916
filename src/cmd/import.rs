//! `aap session import FILE.grant [--sig FILE.grant.sig]`: install a grant signed on another
//! host (approve on a laptop, copy the two files), with the checks a use would make done first,
//! so that a grant that could never be used here is refused at the door:
//!
//! 1. both files are read as state files are (no symlink, regular file, at most 64 KiB);
//! 2. the signature must verify against *this* host's `allowed_signers` (namespace
//!    `aap-grant`, the grant's `operator` principal) and the grant must be well-formed;
//! 3. its agent must be configured here, its `hosts` (when any) must name this host, and it
//!    must not have expired;
//! 4. a session revoked here stays revoked; an installed grant is only replaced by a newer
//!    version (higher `seq`, i.e. re-signed by `aap session approve`), never by an older one;
//! 5. under the exclusive state lock, the signature then the grant are renamed into place (as
//!    `aap session start` does), and `session.import` is appended to the audit log (fsync'd);
//!    if that append fails, the previous state is put back.
//!
//! Exit codes: 65 when the grant or its signature does not verify (forged, altered, signed by a
//! key this host does not trust), 77 when it verifies but is expired, for another host or
//! revoked here, 78 when this host's config lacks what it needs.

#![forbid(unsafe_code)]

use crate::audit::{Event, EventKind, Log, Outcome};
use crate::config::Config;
use crate::error::{Error, Result, shell_quote};
use crate::grant::{self, Grant, LoadError, signers};
use crate::id::SessionId;
use crate::state::{StateDir, read_state_file};
use crate::sys::LockKind;
use crate::timefmt::unix_secs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn q(p: &Path) -> String {
    shell_quote(&p.to_string_lossy())
}

fn read(path: &Path, what: &str, grant: &Path) -> Result<Vec<u8>> {
    read_state_file(path).map_err(|e| {
        Error::data(format!("the {what} {} {}", path.display(), e.describe())).hint(format!(
            "copy the grant's two files again (<SESSION>.grant and <SESSION>.grant.sig from the signing host's grants/), then: aap session import {}",
            q(grant)
        ))
    })
}

pub fn import(file: &Path, sig: Option<&Path>) -> Result<u8> {
    let sig_path: PathBuf = match sig {
        Some(p) => p.to_path_buf(),
        None => {
            let mut p = file.as_os_str().to_owned();
            p.push(".sig");
            PathBuf::from(p)
        }
    };
    if let Some(g) = file
        .to_str()
        .and_then(|f| f.strip_suffix(".sig"))
        .filter(|g| g.ends_with(".grant"))
    {
        return Err(Error::data(format!(
            "{} is a grant's signature, not an aap grant",
            file.display()
        ))
        .hint(format!(
            "import the grant; its .sig is found next to it: aap session import {}",
            shell_quote(g)
        )));
    }
    let bytes = read(file, "grant", file)?;
    let sig = read(&sig_path, "signature file", file)?;

    // Which session: the grant says, and a file named <ULID>.grant must agree.
    let session = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["session"].as_str().map(str::to_owned))
        .ok_or_else(|| {
            Error::data(format!(
                "{} is not an aap grant (no `session` in its JSON)",
                file.display()
            ))
            .hint("import the .grant file that `aap session start` wrote (in the grants/ directory of the signing host's state_dir, named by the session id), not its .sig")
        })?;
    let id = SessionId::parse(&session).map_err(|e| {
        Error::data(format!(
            "{}: the grant's session {} is not a session id: {}",
            file.display(),
            e.shown,
            e.why
        ))
        .hint("import the .grant file that `aap session start` wrote (in the grants/ directory of the signing host's state_dir, named by the session id)")
    })?;
    if let Some(stem) = file
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".grant"))
        && SessionId::parse(stem).is_ok()
        && stem != id.to_string()
    {
        return Err(Error::data(format!(
            "{} names session {stem} but the grant inside is for session {id}",
            file.display()
        ))
        .hint(format!(
            "copy the right pair from the signing host's grants/ ({id}.grant and {id}.grant.sig), then: aap session import {id}.grant"
        )));
    }

    let cfg = Config::load()?;
    let signers_file = cfg.operator.allowed_signers.clone().unwrap_or_default();
    let signers = grant::allowed_signers(&cfg)?;
    let now = unix_secs(SystemTime::now());

    // The signature, then the grant's own rules (the same checks every use makes).
    let parsed = signers::parse_sig(&sig).map_err(|e| refused(&id, sig_error(e), file))?;
    signers::verify_crypto_cached(&bytes, &sig, &parsed)
        .map_err(|e| refused(&id, sig_error(e), file))?;
    let valid =
        Grant::decode(&bytes, &id).map_err(|w| refused(&id, LoadError::BadGrant(w), file))?;
    let signer = signers
        .allowed(&parsed, &valid.grant.operator, now)
        .map_err(|e| refused(&id, sig_error(e), file))?;

    let g = &valid.grant;
    if !cfg.agents.contains_key(&g.agent) {
        return Err(Error::config(format!(
            "session {id} is for agent {}, which {} does not configure",
            g.agent,
            cfg.describe_file()
        ))
        .hint(format!(
            "add `agents: {{ {}: {{ uid: UID, ... }} }}` to the config (see: aap config show), restart the broker, then: aap session import {}",
            g.agent,
            q(file)
        )));
    }
    if now >= valid.expires_at {
        return Err(Error::denied(format!(
            "session {id} expired at {}; an expired grant is not imported",
            g.expires_at
        ))
        .hint(format!(
            "on the signing host, start a new session: aap session start --agent {} --cap {}",
            g.agent,
            g.capabilities
                .first()
                .map(|c| c.id.as_str())
                .unwrap_or("CAP")
        )));
    }
    let host = crate::sys::hostname().map_err(|e| {
        Error::unavailable(format!("cannot read this host's name: {e}")).hint("check it: hostname")
    })?;
    if !g.hosts.is_empty() && !g.hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err(Error::denied(format!(
            "session {id} is limited to {} and this host is {host}",
            g.hosts.join(", ")
        ))
        .hint(format!(
            "on the signing host, start the session for this host: aap session start --agent {} --host {host} {}",
            g.agent,
            cap_flags(g)
        )));
    }

    let st = StateDir::of(&cfg);
    let revoked = |st: &StateDir| {
        st.is_revoked(&id).map_err(|e| {
            Error::unavailable(format!("cannot tell whether session {id} is revoked: {e}")).hint(
                format!("check the state directory: ls -la {}", q(&st.revoked_dir())),
            )
        })
    };
    if revoked(&st)? {
        return Err(Error::denied(format!(
            "session {id} was revoked on this host; revoked sessions stay revoked"
        ))
        .hint(format!(
            "start a new session on the signing host: aap session start --agent {} {}",
            g.agent,
            cap_flags(g)
        )));
    }
    // Checked again at every use; here only a warning, since the catalog may be edited later.
    let catalog = crate::catalog::Catalog::load(&cfg.catalog.value).ok();
    let unknown: Vec<&str> = g
        .capabilities
        .iter()
        .map(|c| c.id.as_str())
        .filter(|c| catalog.as_ref().is_some_and(|cat| cat.get(c).is_none()))
        .collect();

    // Open the log first: if it cannot be written, nothing is installed.
    let mut log = Log::open(&cfg.audit_log.value)?;
    let _lock = st.lock(LockKind::Exclusive)?;
    if revoked(&st)? {
        return Err(Error::denied(format!(
            "session {id} was revoked on this host; revoked sessions stay revoked"
        ))
        .hint("list sessions: aap session list --all"));
    }
    let previous = match (
        read_state_file(&st.grant_path(&id)),
        read_state_file(&st.sig_path(&id)),
    ) {
        (Ok(b), Ok(s)) => Some((b, s)),
        _ => None,
    };
    if let Some((old, old_sig)) = &previous {
        if *old == bytes && *old_sig == sig {
            println!(
                "unchanged: session {id} is already installed ({})",
                st.grant_path(&id).display()
            );
            return Ok(0);
        }
        let old_seq = Grant::decode(old, &id).map(|v| v.grant.seq).unwrap_or(0);
        if old_seq >= g.seq {
            return Err(Error::denied(format!(
                "session {id} is already installed here as version {old_seq}; this grant is version {}, not newer",
                g.seq
            ))
            .hint(format!(
                "copy the newest grant (after aap session approve on the signing host), or look at the installed one: aap session show {id}"
            )));
        }
    }
    grant::store(&st, &id, &bytes, &sig)?;
    let mut ev = Event::new(EventKind::SessionImport, Outcome::Ok);
    ev.session = Some(id.to_string());
    ev.agent = Some(g.agent.clone());
    ev.capability = Some(
        g.capabilities
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    ev.reason = g.reason.clone();
    if let Err(e) = log.append(&ev) {
        let _ = grant::store_undo(
            &st,
            &id,
            previous.as_ref().map(|(b, s)| (b.as_slice(), s.as_slice())),
        );
        return Err(e);
    }
    println!(
        "imported: session {id} for {}: {} until {}, signed by {} ({} {}, {} line {}){}",
        g.agent,
        g.capabilities
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        g.expires_at,
        signer.principal,
        signer.algorithm,
        signer.fingerprint,
        signers_file.display(),
        signer.line,
        if previous.is_some() {
            " (replaces the older version)"
        } else {
            ""
        }
    );
    if !unknown.is_empty() {
        eprintln!(
            "aap: warning: this host's catalog has no {}: uses of it are denied until it does (aap catalog list)",
            unknown.join(", ")
        );
    }
    println!("the agent uses it with: export AAP_SESSION={id}");
    Ok(0)
}

fn sig_error(e: signers::SigError) -> LoadError {
    match e {
        signers::SigError::Bad(w) => LoadError::BadSignature(w),
        signers::SigError::NotAllowed(w) => LoadError::NotAllowed(w),
    }
}

/// A grant that does not verify: exit 65, with what to do about a copy that may be forged.
fn refused(id: &SessionId, e: LoadError, file: &Path) -> Error {
    let (msg, hint) = match e {
        LoadError::BadSignature(w) => (
            format!("the grant of session {id} in {} does not verify: {w}; nothing was installed", file.display()),
            "the grant or its signature was altered, or they are not a pair: copy both files again from the signing host, never edit them".to_string(),
        ),
        LoadError::NotAllowed(w) => (
            format!("the grant of session {id} in {} is signed by a key this host does not trust: {w}; nothing was installed", file.display()),
            "if the signer is a real operator, add their key to this host's operator.allowed_signers with namespaces=\"aap-grant\" (see: aap config show), then import again".to_string(),
        ),
        LoadError::BadGrant(w) => (
            format!("the grant of session {id} in {} is refused: {w}; nothing was installed", file.display()),
            "copy both files again from the signing host, never edit them".to_string(),
        ),
        LoadError::NotFound => (
            format!("no grant for session {id} in {}", file.display()),
            "copy both files again from the signing host".to_string(),
        ),
    };
    Error::data(msg).hint(hint)
}

/// The grant's capabilities as `aap session start` flags: `--cap A --cap B`.
fn cap_flags(g: &crate::grant::Grant) -> String {
    g.capabilities
        .iter()
        .map(|c| format!("--cap {}", c.id))
        .collect::<Vec<_>>()
        .join(" ")
}
