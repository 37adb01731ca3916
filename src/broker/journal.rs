//! The broker's journal of open invocations: a small, non-secret, append-only file
//! (`<state>/broker/journal`) with a `+` line when an exec starts (its `exec.start` is written)
//! and a `-` line when its `exec.end` is. A broker that was killed leaves starts without ends;
//! the next one writes `exec.end` with outcome `unknown` for each, so every start has an end.
//!
//! One file kept open, two appends per exec, and emptied (truncated) whenever no run is open:
//! no file is created or removed per exec. Not fsync'd: the journal is for a broker that was
//! killed, whose writes the page cache keeps; after a power loss the unsynced audit lines of the
//! low and medium tiers are gone as well. A line cut short is still recovered by the
//! invocation id it starts with.

#![forbid(unsafe_code)]

use crate::audit::{Event, EventKind, Log, Outcome};
use crate::error::{Error, Result, quote_path};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    /// The open journal file and how many runs in it are open; created at the first exec.
    inner: Mutex<Option<(File, usize)>>,
}

/// The invocation ids (26 characters) a journal line starts with.
const ID_LEN: usize = 26;

impl Journal {
    /// The journal under the state dir (`<state>/broker/journal`, systemd's
    /// `StateDirectory=aap/broker`). Nothing is created here: the state dir is the operator's,
    /// and a broker that starts first must not be the one to create it.
    pub fn open(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.join("broker"),
            inner: Mutex::new(None),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    fn unavailable(&self, what: &str, e: &dyn std::fmt::Display) -> Error {
        Error::unavailable(format!(
            "cannot {what} the broker's journal {}: {e}",
            self.path().display()
        ))
        .hint(format!(
            "check its directory and file system: ls -ld {0}; df -h {0}",
            quote_path(&self.dir)
        ))
    }

    fn file(&self) -> Result<File> {
        if std::fs::symlink_metadata(&self.dir).is_err() {
            let mut b = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.recursive(true)
                .create(&self.dir)
                .map_err(|e| self.unavailable("create the directory of", &e))?;
        }
        crate::sys::open_append(&self.path(), 0o600).map_err(|e| self.unavailable("open", &e))
    }

    fn append(&self, line: &[u8], delta: isize) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some((self.file()?, 0));
        }
        let Some((f, open)) = g.as_mut() else {
            return Ok(());
        };
        f.write_all(line)
            .map_err(|e| self.unavailable("append to", &e))?;
        *open = open.saturating_add_signed(delta);
        if *open == 0 {
            // Nothing is open: the whole journal is settled. Appends go on at the new end.
            let _ = f.set_len(0);
        }
        Ok(())
    }

    /// Record that `e` started. A journal that cannot be written refuses the exec.
    pub fn add(&self, e: &Entry) -> Result<()> {
        let mut line = format!("+{} ", e.invocation).into_bytes();
        line.extend_from_slice(&serde_json::to_vec(e).unwrap_or_default());
        line.push(b'\n');
        self.append(&line, 1)
    }

    /// Its end is recorded. A failure here only means a later broker writes a second,
    /// `unknown` end for it, so it is logged, not returned.
    pub fn remove(&self, invocation: &str) {
        if let Err(e) = self.append(format!("-{invocation}\n").as_bytes(), -1) {
            tracing::warn!("{}", e.message());
        }
    }

    /// Write `exec.end` (outcome `unknown`) for every run a previous broker never saw end, then
    /// empty the journal. Returns how many there were.
    pub fn recover(&self, log: &mut Log) -> Result<usize> {
        let mut text = Vec::new();
        match File::open(self.path()) {
            Ok(mut f) => {
                f.read_to_end(&mut text)
                    .map_err(|e| self.unavailable("read", &e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.unavailable("read", &e)),
        }
        let mut open: BTreeMap<String, Option<Entry>> = BTreeMap::new();
        for line in text.split(|&b| b == b'\n') {
            let (sign, rest) = match line.split_first() {
                Some((s, r)) => (*s, r),
                None => continue,
            };
            let Some(id) = rest
                .get(..ID_LEN)
                .and_then(|i| std::str::from_utf8(i).ok())
                .filter(|i| crate::id::InvocationId::parse(i).is_ok())
            else {
                continue; // not a line of ours (or cut before its id)
            };
            match sign {
                b'+' => {
                    let entry = rest
                        .get(ID_LEN + 1..)
                        .and_then(|j| serde_json::from_slice::<Entry>(j).ok());
                    open.insert(id.to_owned(), entry);
                }
                b'-' => {
                    open.remove(id);
                }
                _ => {}
            }
        }
        let n = open.len();
        for (id, entry) in open {
            let mut ev = Event::new(EventKind::ExecEnd, Outcome::Unknown);
            ev.invocation = Some(id);
            if let Some(e) = entry {
                ev.uid = e.uid;
                ev.session = Some(e.session);
                ev.agent = Some(e.agent);
                ev.capability = Some(e.capability);
                ev.pid = Some(e.pid);
            }
            ev.error = Some(
                "the broker stopped while this run was open; how the child ended is unknown".into(),
            );
            log.append(&ev)?;
        }
        // Settled: every open run has its end now.
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(self.path()) {
            let _ = f.set_len(0);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            invocation: id.into(),
            session: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
            agent: "codex".into(),
            uid: 1000,
            capability: "db-env".into(),
            pid: 42,
        }
    }

    #[test]
    fn starts_without_ends_are_recovered_once_and_the_journal_empties() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path());
        let a = "01ARZ3NDEKTSV4RRFFQ69G5FA0";
        let b = "01ARZ3NDEKTSV4RRFFQ69G5FA1";
        j.add(&entry(a)).unwrap();
        j.add(&entry(b)).unwrap();
        j.remove(a);
        // A start cut short after its id: still recovered, by the id.
        let mut f = crate::sys::open_append(&j.path(), 0o600).unwrap();
        let c = "01ARZ3NDEKTSV4RRFFQ69G5FA2";
        f.write_all(format!("+{c} {{\"invoc").as_bytes()).unwrap();
        drop(f);
        let logp = d.path().join("audit.jsonl");
        let mut log = Log::open(&logp).unwrap();
        let again = Journal::open(d.path());
        assert_eq!(again.recover(&mut log).unwrap(), 2);
        let text = std::fs::read_to_string(&logp).unwrap();
        assert!(
            text.contains(b) && text.contains(c) && !text.contains(a),
            "{text}"
        );
        assert_eq!(std::fs::metadata(j.path()).unwrap().len(), 0);
        assert_eq!(Journal::open(d.path()).recover(&mut log).unwrap(), 0);
    }

    #[test]
    fn the_journal_is_emptied_whenever_no_run_is_open() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path());
        let a = "01ARZ3NDEKTSV4RRFFQ69G5FA0";
        j.add(&entry(a)).unwrap();
        assert!(std::fs::metadata(j.path()).unwrap().len() > 0);
        j.remove(a);
        assert_eq!(std::fs::metadata(j.path()).unwrap().len(), 0);
    }
}
