//! The state directory: `grants/`, `revoked/`, `requests/`, and a lock file.
//!
//! Layout (all names are canonical ULIDs, so a lookup is one `open` by name, never a scan):
//!
//! ```text
//! <state>/grants/<SESSION>.grant       the exact JSON bytes the operator signed
//! <state>/grants/<SESSION>.grant.sig   armored SSHSIG over them, namespace aap-grant
//! <state>/revoked/<SESSION>            exists => the session is revoked (JSON: when, why)
//! <state>/requests/<REQUEST>.json      an agent's pending request (unsigned; grants nothing)
//! <state>/answers/<REQUEST>.json       the operator's answer to it (what a waiting agent is told)
//! <state>/.lock                        flock: writers exclusive, readers shared on retry
//! ```
//!
//! Every read opens without following symlinks and refuses FIFOs, devices and files over
//! 64 KiB. Every write goes to a temporary file in the same directory, is fsync'd, then renamed
//! over the target, and the directory is fsync'd: a reader sees the old file or the new one.

#![forbid(unsafe_code)]

use crate::config::Config;
use crate::error::{Error, Result, quote_path as q};
use crate::id::{RequestId, SessionId};
use crate::sys::{self, LockKind};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest grant, signature, revocation marker or request file accepted.
pub const MAX_STATE_FILE: u64 = 64 * 1024;

/// How long a command waits for the state lock before giving up.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a state file could not be read.
#[derive(Debug)]
pub enum ReadError {
    NotFound,
    Symlink,
    NotRegular,
    TooLarge(u64),
    Io(io::Error),
}

impl ReadError {
    /// A phrase for messages: "is a symlink", "is 70000 bytes (limit 65536)".
    pub fn describe(&self) -> String {
        match self {
            ReadError::NotFound => "does not exist".into(),
            ReadError::Symlink => "is a symlink (refused: state files are never followed)".into(),
            ReadError::NotRegular => {
                "is not a regular file (a FIFO, socket, device or directory)".into()
            }
            ReadError::TooLarge(n) => format!("is {n} bytes (the limit is {MAX_STATE_FILE})"),
            ReadError::Io(e) => format!("cannot be read: {e}"),
        }
    }
}

/// Read a whole state file: no symlinks, regular files only, at most `MAX_STATE_FILE` bytes,
/// never blocking on a FIFO.
pub fn read_state_file(path: &Path) -> std::result::Result<Vec<u8>, ReadError> {
    let file = match sys::open_read_nonblocking(path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::NotFound),
        Err(e) if sys::is_symlink_loop(&e) => return Err(ReadError::Symlink),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > MAX_STATE_FILE {
        return Err(ReadError::TooLarge(meta.len()));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() as u64 > MAX_STATE_FILE {
        return Err(ReadError::TooLarge(buf.len() as u64));
    }
    Ok(buf)
}

/// The state directory of a config.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

/// A held `flock` on `<state>/.lock`; released on drop.
pub struct StateLock {
    file: File,
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = sys::funlock(&self.file);
    }
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }
    pub fn of(cfg: &Config) -> StateDir {
        StateDir::new(cfg.state_dir.value.clone())
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn grants_dir(&self) -> PathBuf {
        self.root.join("grants")
    }
    pub fn revoked_dir(&self) -> PathBuf {
        self.root.join("revoked")
    }
    pub fn requests_dir(&self) -> PathBuf {
        self.root.join("requests")
    }
    pub fn grant_path(&self, id: &SessionId) -> PathBuf {
        self.grants_dir().join(format!("{id}.grant"))
    }
    pub fn sig_path(&self, id: &SessionId) -> PathBuf {
        self.grants_dir().join(format!("{id}.grant.sig"))
    }
    pub fn revoked_path(&self, id: &SessionId) -> PathBuf {
        self.revoked_dir().join(id.to_string())
    }
    pub fn request_path(&self, id: &RequestId) -> PathBuf {
        self.requests_dir().join(format!("{id}.json"))
    }
    /// The operator's answers to requests (`aap approve`, `aap deny`): what a waiting agent
    /// is told. The operator's, like `grants/`.
    pub fn answers_dir(&self) -> PathBuf {
        self.root.join("answers")
    }
    pub fn answer_path(&self, id: &RequestId) -> PathBuf {
        self.answers_dir().join(format!("{id}.json"))
    }
    fn lock_path(&self) -> PathBuf {
        self.root.join(".lock")
    }

    /// Whether a revocation marker exists. Any entry by that name counts (a symlink, a
    /// directory): only "certainly absent" means not revoked.
    pub fn is_revoked(&self, id: &SessionId) -> io::Result<bool> {
        match std::fs::symlink_metadata(self.revoked_path(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Create `grants/` and `revoked/` (0755) when missing. `requests/` is not made here: it
    /// is the broker's, which writes every request itself ([`StateDir::ensure_requests_dir`]),
    /// so that its owner is the broker's user whoever ran first.
    pub fn ensure_dirs(&self) -> Result<()> {
        mkdir(&self.root, 0o755)?;
        mkdir(&self.grants_dir(), 0o755)?;
        mkdir(&self.revoked_dir(), 0o755)?;
        Ok(())
    }

    /// The operator's `answers/` (0755, like `grants/`), created when missing.
    pub fn ensure_answers_dir(&self) -> Result<()> {
        mkdir(&self.root, 0o755)?;
        mkdir(&self.answers_dir(), 0o755)
    }

    /// The broker's `requests/` (0750, its own), created when missing.
    pub fn ensure_requests_dir(&self) -> Result<()> {
        mkdir(&self.root, 0o755)?;
        mkdir(&self.requests_dir(), 0o750)
    }

    /// Take the state lock: exclusive for writers of grants, shared for readers that retry
    /// after a failed verification. `Ok(None)` when a shared lock is asked for and no lock
    /// file exists yet (then no writer has ever run, so there is nothing to wait for), or when
    /// the reader may not open it (the broker as its own user): then it waits a moment instead.
    ///
    /// The lock file is the operator's alone (0600): a file an agent could open, it could
    /// flock, and so hold off `aap session revoke`. An older, readable one is narrowed to 0600
    /// by the next writer.
    pub fn lock(&self, kind: LockKind) -> Result<Option<StateLock>> {
        let path = self.lock_path();
        let file = match kind {
            LockKind::Exclusive => {
                self.ensure_dirs()?;
                match sys::create_new(&path, 0o600) {
                    Ok(f) => Ok(f),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        sys::open_read_nonblocking(&path, false).inspect(|f| {
                            use std::os::unix::fs::PermissionsExt;
                            if f.metadata()
                                .is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
                            {
                                let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
                            }
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            LockKind::Shared => match sys::open_read_nonblocking(&path, false) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    // A writer renames two files within microseconds; past this, a grant
                    // that still fails to verify is really bad.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    return Ok(None);
                }
                r => r,
            },
        }
        .map_err(|e| {
            Error::unavailable(format!(
                "cannot open the state lock {}: {e}",
                path.display()
            ))
            .hint(format!(
                "check the state directory: ls -la {}",
                q(&self.root)
            ))
        })?;
        match sys::flock_timeout(&file, kind, LOCK_TIMEOUT) {
            Ok(true) => Ok(Some(StateLock { file })),
            Ok(false) => Err(Error::unavailable(format!(
                "the state lock {} is still held after {}s by another aap process",
                path.display(),
                LOCK_TIMEOUT.as_secs()
            ))
            .hint(format!("find the holder: fuser -v {}", q(&path)))),
            Err(e) => Err(
                Error::unavailable(format!("cannot lock {}: {e}", path.display())).hint(format!(
                    "check the state directory: ls -la {}",
                    q(&self.root)
                )),
            ),
        }
    }
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(
                Error::config(format!("{} exists but is not a directory", p.display()))
                    .hint(format!("move it away: mv {} {}.bak", q(p), q(p))),
            );
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(
                Error::unavailable(format!("cannot stat {}: {e}", p.display()))
                    .hint(format!("check permissions: ls -ld {}", q(p))),
            );
        }
        Err(_) => {}
    }
    match std::fs::DirBuilder::new().mode(mode).create(p) {
        Ok(()) => {
            // The umask may have removed bits we meant (the sticky bit on requests/).
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(
            Error::unavailable(format!("cannot create directory {}: {e}", p.display()))
                .hint(format!("create it as the operator: mkdir -p {}", q(p))),
        ),
    }
}

/// A random name for a temporary file next to `final_name`.
fn temp_name(final_name: &str) -> io::Result<String> {
    Ok(format!(".tmp-{}-{final_name}", sys::random_hex(8)?))
}

/// Write `bytes` into a fresh temporary file in `dir` and fsync it; returns its path. The
/// caller renames it into place with [`commit`].
pub fn stage(dir: &Path, final_name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let err = |e: io::Error, what: &str| {
        Error::unavailable(format!("cannot {what} in {}: {e}", dir.display())).hint(format!(
            "check the directory's owner and mode: ls -ld {}",
            q(dir)
        ))
    };
    let name = temp_name(final_name).map_err(|e| err(e, "get random bytes for a file name"))?;
    let path = dir.join(name);
    let mut f = sys::create_new(&path, mode).map_err(|e| err(e, "create a temporary file"))?;
    let res = f
        .write_all(bytes)
        .and_then(|()| sys::fsync(&f))
        .map_err(|e| err(e, "write a temporary file"));
    if res.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    res.map(|()| path)
}

/// Rename staged files into place, in order, then fsync the directory once.
pub fn commit(dir: &Path, moves: &[(&Path, &Path)]) -> Result<()> {
    for (from, to) in moves {
        if let Err(e) = std::fs::rename(from, to) {
            for (f, _) in moves {
                let _ = std::fs::remove_file(f);
            }
            return Err(Error::unavailable(format!(
                "cannot rename {} to {}: {e}",
                from.display(),
                to.display()
            ))
            .hint(format!("check the directory: ls -ld {}", q(dir))));
        }
    }
    match sys::fsync_dir(dir) {
        Ok(()) => Ok(()),
        // An agent may write into requests/ (mode 1733) without being allowed to open it for
        // reading, which fsync needs. The rename is done; only its durability is best effort.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(
            Error::unavailable(format!("cannot fsync directory {}: {e}", dir.display()))
                .hint(format!("check the file system: df -h {}", q(dir))),
        ),
    }
}

/// Write one file atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, final_name: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = stage(dir, final_name, bytes, mode)?;
    commit(dir, &[(&tmp, &dir.join(final_name))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_refuse_links_fifos_and_big_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"ok").unwrap();
        assert_eq!(read_state_file(&f).unwrap(), b"ok");
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(matches!(read_state_file(&l), Err(ReadError::Symlink)));
        let big = d.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_STATE_FILE as usize + 1]).unwrap();
        assert!(matches!(read_state_file(&big), Err(ReadError::TooLarge(_))));
        assert!(matches!(
            read_state_file(d.path()),
            Err(ReadError::NotRegular)
        ));
        assert!(matches!(
            read_state_file(&d.path().join("none")),
            Err(ReadError::NotFound)
        ));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), "x", b"one", 0o644).unwrap();
        write_atomic(d.path(), "x", b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x")]);
    }
}
