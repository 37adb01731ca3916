//! The broker's journal of open invocations: one small, non-secret file per exec that has an
//! `exec.start` and no `exec.end` yet. A broker that was killed leaves them behind; the next one
//! writes `exec.end` with outcome `unknown` for each, so every start has an end.

#![forbid(unsafe_code)]

use crate::audit::{Event, EventKind, Log, Outcome};
use crate::error::{Error, Result, quote_path};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub invocation: String,
    pub session: String,
    pub agent: String,
    pub uid: u32,
    pub capability: String,
    pub pid: u32,
}

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal under the state dir (`<state>/broker`, systemd's `StateDirectory=aap/broker`).
    /// It is created (0700) at the first exec, not here: the state dir is the operator's, and a
    /// broker that starts first must not be the one to create it.
    pub fn open(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.join("broker"),
        }
    }

    fn ensure_dir(&self) -> Result<()> {
        if std::fs::symlink_metadata(&self.dir).is_ok() {
            return Ok(());
        }
        let mut b = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.recursive(true).create(&self.dir).map_err(|e| {
            Error::config(format!(
                "cannot create the broker's journal {}: {e}",
                self.dir.display()
            ))
            .hint(format!(
                "create it for the broker's user: install -d -m 0700 -o \"$(id -un)\" {}",
                quote_path(&self.dir)
            ))
        })
    }

    fn path(&self, invocation: &str) -> Option<PathBuf> {
        // Invocation ids are ULIDs we made; anything else never becomes a path.
        crate::id::InvocationId::parse(invocation)
            .ok()
            .map(|_| self.dir.join(invocation))
    }

    /// Record that `e` started. A journal that cannot be written refuses the exec.
    ///
    /// Not fsync'd: the journal is for a broker that was killed, whose writes the page cache
    /// keeps; after a power loss the unsynced audit lines of low and medium tiers are gone as
    /// well. An entry cut short is still recovered by its file name (the invocation id).
    pub fn add(&self, e: &Entry) -> Result<()> {
        use std::io::Write;
        self.ensure_dir()?;
        let path = self.dir.join(&e.invocation);
        let bytes = serde_json::to_vec(e).unwrap_or_default();
        crate::sys::create_new(&path, 0o600)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(|err| {
                let _ = std::fs::remove_file(&path);
                Error::unavailable(format!(
                    "cannot write the broker's journal entry {}: {err}",
                    path.display()
                ))
                .hint(format!(
                    "check the journal directory and its file system: ls -ld {0}; df -h {0}",
                    quote_path(&self.dir)
                ))
            })
    }

    /// Its end is recorded.
    pub fn remove(&self, invocation: &str) {
        if let Some(p) = self.path(invocation) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Write `exec.end` (outcome `unknown`) for every run a previous broker never saw end, and
    /// forget them. Returns how many there were.
    pub fn recover(&self, log: &mut Log) -> Result<usize> {
        let mut n = 0;
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(path) = self.path(&name) else {
                continue; // staging files and strays are not ours to judge
            };
            let entry = crate::state::read_state_file(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok());
            let mut ev = Event::new(EventKind::ExecEnd, Outcome::Unknown);
            ev.invocation = Some(name.clone());
            match entry {
                Some(e) => {
                    ev.uid = e.uid;
                    ev.session = Some(e.session);
                    ev.agent = Some(e.agent);
                    ev.capability = Some(e.capability);
                    ev.pid = Some(e.pid);
                }
                // Cut short by a crash: the invocation id (the file name) still ties it to its
                // exec.start.
                None => tracing::warn!(file = %path.display(), "unreadable journal entry"),
            }
            ev.error = Some(
                "the broker stopped while this run was open; how the child ended is unknown".into(),
            );
            log.append(&ev)?;
            let _ = std::fs::remove_file(&path);
            n += 1;
        }
        Ok(n)
    }
}
