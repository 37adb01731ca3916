//! The audit log: JSON Lines, one event per line, each line carrying the SHA-256 of the line
//! before it (`prev`), the first chaining from [`GENESIS`].
//!
//! Appends take an exclusive `flock` on the log, read the hash of the last line, and write the
//! new line with `O_APPEND` in one `write`, all while holding the lock, so writers in many
//! processes never interleave or fork the chain. Events of tier high and critical, every
//! session event and every answered request are fsync'd before `append` returns. If the log
//! cannot be opened, locked or written, `append` fails, and the caller must not act.
//!
//! Nothing secret is written here: events carry ids, names, argv (the exec path never puts a
//! secret in argv), and the operator's or agent's reason.

#![forbid(unsafe_code)]

mod verify;

pub use verify::{
    BadLine, LineIn, VerifyReport, hash_hex, verify_file, verify_file_at, verify_reader,
};

use crate::catalog::Tier;
use crate::error::{Error, Result, quote_path as q};
use crate::id::EventId;
use crate::sys::{self, LockKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The audit line format version.
pub const VERSION: u32 = 1;

/// `prev` of the first line: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line accepted (argv is shortened to fit well below this).
pub const MAX_LINE: usize = 64 * 1024;

/// argv is kept to this many bytes in total, each argument to `MAX_ARG`.
const MAX_ARGV_BYTES: usize = 16 * 1024;
const MAX_ARG: usize = 2048;

/// How long an append waits for the log lock.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "session.start")]
    SessionStart,
    #[serde(rename = "session.approve")]
    SessionApprove,
    #[serde(rename = "session.revoke")]
    SessionRevoke,
    #[serde(rename = "session.gc")]
    SessionGc,
    /// A grant signed elsewhere, verified and installed here (`aap session import`).
    #[serde(rename = "session.import")]
    SessionImport,
    #[serde(rename = "request")]
    Request,
    #[serde(rename = "request.approve")]
    RequestApprove,
    #[serde(rename = "request.deny")]
    RequestDeny,
    #[serde(rename = "deny")]
    Deny,
    #[serde(rename = "exec.start")]
    ExecStart,
    /// A broker-run command was started: its pid (known only after `exec.start` is written,
    /// as nothing may run before it is).
    #[serde(rename = "exec.spawned")]
    ExecSpawned,
    #[serde(rename = "exec.end")]
    ExecEnd,
    /// One signing request to the broker's ssh agent, made or refused.
    #[serde(rename = "ssh.sign")]
    SshSign,
    /// One request to the broker's http-proxy (tier medium and up), or one it refused (any
    /// tier).
    #[serde(rename = "http.request")]
    HttpRequest,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session.start",
            EventKind::SessionApprove => "session.approve",
            EventKind::SessionRevoke => "session.revoke",
            EventKind::SessionGc => "session.gc",
            EventKind::SessionImport => "session.import",
            EventKind::Request => "request",
            EventKind::RequestApprove => "request.approve",
            EventKind::RequestDeny => "request.deny",
            EventKind::Deny => "deny",
            EventKind::ExecStart => "exec.start",
            EventKind::ExecSpawned => "exec.spawned",
            EventKind::ExecEnd => "exec.end",
            EventKind::SshSign => "ssh.sign",
            EventKind::HttpRequest => "http.request",
        }
    }

    /// Session events and answered requests change what is granted: always fsync'd.
    pub fn always_synced(self) -> bool {
        matches!(
            self,
            EventKind::SessionStart
                | EventKind::SessionImport
                | EventKind::SessionApprove
                | EventKind::SessionRevoke
                | EventKind::SessionGc
                | EventKind::RequestApprove
                | EventKind::RequestDeny
        )
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The action happened (for `exec.end`: the child ran; see `exit_code`/`signal`).
    Ok,
    /// A check said no.
    Denied,
    /// The action failed for another reason (see `error`).
    Error,
    /// `exec.end`: the wrapper's connection to the broker closed, or the child ended, without
    /// the wrapper reporting how the child ended; the broker tore down without it.
    #[serde(rename = "wrapper-lost")]
    WrapperLost,
    /// `exec.end` written by a restarted broker for a run it started and never saw end.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
            Outcome::WrapperLost => "wrapper-lost",
            Outcome::Unknown => "unknown",
        }
    }
}

/// One event, before `append` gives it `v`, `id`, `ts` and `prev`.
#[derive(Clone, Debug)]
pub struct Event {
    pub event: EventKind,
    pub session: Option<String>,
    pub agent: Option<String>,
    /// Real uid of the process that acted.
    pub uid: u32,
    pub host: String,
    pub capability: Option<String>,
    pub tier: Option<Tier>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub error: Option<String>,
    // Filled by the exec path.
    /// ULID shared by the `exec.start` and `exec.end` of one run.
    pub invocation: Option<String>,
    pub program: Option<String>,
    pub argv: Option<Vec<String>>,
    pub cwd: Option<String>,
    /// A broker-run command: the directory it started in (`cwd` when `run_as` could enter
    /// it, else `/`).
    pub cwd_used: Option<String>,
    /// A broker-run command: the user it ran as.
    pub run_as: Option<String>,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: Option<u64>,
    /// `ssh.sign`: what the signature was for.
    pub ssh: Option<SshSign>,
    /// `http.request`: the request; `exec.end` of an http-proxy run: the totals.
    pub http: Option<HttpAudit>,
    /// Fsync this event whatever its tier (every event of a break-glass use).
    pub sync: bool,
}

impl Event {
    /// An event of `kind` with `outcome`, by this process's uid on this host.
    pub fn new(kind: EventKind, outcome: Outcome) -> Event {
        Event {
            event: kind,
            session: None,
            agent: None,
            uid: sys::uid(),
            host: this_host(),
            capability: None,
            tier: None,
            outcome,
            reason: None,
            error: None,
            invocation: None,
            program: None,
            argv: None,
            cwd: None,
            cwd_used: None,
            run_as: None,
            pid: None,
            exit_code: None,
            signal: None,
            duration_ms: None,
            ssh: None,
            http: None,
            sync: false,
        }
    }

    /// An event about an authorized use: session, agent, capability and tier filled in.
    pub fn for_authorized(
        kind: EventKind,
        outcome: Outcome,
        a: &crate::grant::Authorized,
    ) -> Event {
        let mut e = Event::new(kind, outcome);
        e.session = Some(a.session().to_string());
        e.agent = Some(a.agent().to_owned());
        e.capability = Some(a.capability_id().to_owned());
        e.tier = Some(a.tier());
        e
    }

    /// Whether `append` fsyncs this event: tier high or critical, or a session event.
    pub fn needs_fsync(&self) -> bool {
        self.sync
            || self.event.always_synced()
            || matches!(self.tier, Some(Tier::High | Tier::Critical))
    }
}

/// This machine's host name, or `unknown` when it cannot be read.
/// Read once per process: every event carries it, and `aap-exec` writes several.
pub fn this_host() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| sys::hostname().unwrap_or_else(|_| "unknown".into()))
        .clone()
}

/// The serialized form, in the documented field order.
#[derive(Serialize)]
struct LineOut<'a> {
    v: u32,
    id: &'a str,
    ts: &'a str,
    event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'a str>,
    uid: u32,
    host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    capability: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tier: Option<Tier>,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invocation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    program: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    argv: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd_used: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_as: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_host_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_forwarded: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_phase: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_requests: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_refused: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_down: Option<u64>,
    prev: &'a str,
}

/// The destination of one `ssh.sign`, as far as the request showed it (all public: host names,
/// a host key's fingerprint, a user name). The reason for a refusal goes in `error`.
#[derive(Clone, Debug, Default)]
pub struct SshSign {
    /// The catalog host whose known host key the session was bound to, if one matched.
    pub host: Option<String>,
    /// `SHA256:...` of the host key of the last `session-bind@openssh.com`, if any.
    pub host_key: Option<String>,
    /// The user name in the signed `SSH_MSG_USERAUTH_REQUEST`, if it parsed.
    pub user: Option<String>,
    /// Whether any binding of the connection was a forwarding one.
    pub forwarded: bool,
}

/// What the broker's http-proxy saw: one request (`http.request`: method, the path after the
/// per-exec prefix, status, bytes), or a run's totals (`exec.end`: requests, refusals, bytes).
/// Never the token, never the prefix.
#[derive(Clone, Debug, Default)]
pub struct HttpAudit {
    /// `start` for the line written (and fsync'd) before a request is forwarded at tier high
    /// and critical, `end` for the one after it; absent below high (one line, after).
    pub phase: Option<&'static str>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub requests: Option<u64>,
    pub refused: Option<u64>,
    pub bytes_up: Option<u64>,
    pub bytes_down: Option<u64>,
}

/// Shorten argv so the line stays small: each argument to 2 KiB, all of them to 16 KiB, with a
/// marker saying what was cut.
fn bounded_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut total = 0;
    for (i, a) in argv.iter().enumerate() {
        let mut s = if a.len() > MAX_ARG {
            let mut end = MAX_ARG;
            while !a.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…[{} bytes cut]", &a[..end], a.len() - end)
        } else {
            a.clone()
        };
        if total + s.len() > MAX_ARGV_BYTES {
            s = format!("…[{} more arguments cut]", argv.len() - i);
            out.push(s);
            break;
        }
        total += s.len();
        out.push(s);
    }
    out
}

/// What an append wrote.
#[derive(Clone, Debug)]
pub struct Appended {
    pub id: String,
    pub ts: String,
    /// Hex SHA-256 of the written line: the next line's `prev`.
    pub hash: String,
    /// The written line itself, without its newline (what break-glass notify gets on stdin).
    pub line: String,
}

/// An open audit log.
#[derive(Debug)]
pub struct Log {
    file: File,
    path: PathBuf,
}

impl Log {
    /// Open (creating, mode 0640, if missing) the log for appending. A symlink, a FIFO or a
    /// directory in its place is refused.
    pub fn open(path: &Path) -> Result<Log> {
        let shown = path.display();
        let file = sys::open_append(path, 0o640).map_err(|e| {
            let (msg, hint) = match e.kind() {
                io::ErrorKind::NotFound => (
                    format!("cannot create the audit log {shown}: its directory does not exist"),
                    format!(
                        "create it: mkdir -p {}",
                        q(path.parent().unwrap_or(Path::new("/")))
                    ),
                ),
                io::ErrorKind::PermissionDenied => (
                    format!("cannot open the audit log {shown} for appending: permission denied"),
                    format!("check its owner and mode: ls -l {}", q(path)),
                ),
                _ if sys::is_symlink_loop(&e) => (
                    format!("the audit log {shown} is a symlink; refusing to follow it"),
                    format!("replace the link with the real file: ls -l {}", q(path)),
                ),
                _ => (
                    format!("cannot open the audit log {shown}: {e}"),
                    format!("check the path: ls -l {}", q(path)),
                ),
            };
            Error::data(format!("{msg}; nothing was done")).hint(hint)
        })?;
        let meta = file.metadata().map_err(|e| {
            Error::data(format!(
                "cannot stat the audit log {shown}: {e}; nothing was done"
            ))
            .hint(format!("check the path: ls -l {}", q(path)))
        })?;
        if !meta.is_file() {
            return Err(Error::data(format!(
                "the audit log {shown} is not a regular file; nothing was done"
            ))
            .hint(format!(
                "point audit_log at a regular file: ls -l {}",
                q(path)
            )));
        }
        Ok(Log {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event: lock, read the tail hash, write, fsync when the event needs it,
    /// unlock. On any failure nothing is left half-written and an error is returned.
    pub fn append(&mut self, ev: &Event) -> Result<Appended> {
        self.append_then(ev, true).map(|(a, _)| a)
    }

    /// Append like [`Log::append`], but without waiting for the disk: the event's fsync, if
    /// it needs one, is owed (`true`), for the caller to do with [`Log::sync`] once it has
    /// answered whoever waits. Only for an event nothing is gated on (`exec.end`): what must be
    /// on disk before something happens goes through [`Log::append`].
    pub fn append_sync_later(&mut self, ev: &Event) -> Result<(Appended, bool)> {
        self.append_then(ev, false)
    }

    /// fsync the log (what [`Log::append_sync_later`] left owed).
    pub fn sync(&self) -> Result<()> {
        Self::sync_file(&self.file, &self.path)
    }

    /// Another descriptor of the log file and its path, to fsync with [`Log::sync_file`] without
    /// holding whatever orders appends (an fsync waits on the disk; the next append need not).
    pub fn sync_handle(&self) -> Result<(File, PathBuf)> {
        let f = self.file.try_clone().map_err(|e| {
            Error::data(format!(
                "cannot duplicate the audit log's descriptor {}: {e}",
                self.path.display()
            ))
            .hint("check the broker's descriptor limit: ulimit -n")
        })?;
        Ok((f, self.path.clone()))
    }

    /// fsync `file`, the log at `path`.
    pub fn sync_file(file: &File, path: &Path) -> Result<()> {
        sys::fsync(file).map_err(|e| {
            Error::data(format!(
                "cannot fsync the audit log {}: {e}",
                path.display()
            ))
            .hint(format!("check the disk: df -h {}", q(path)))
        })
    }

    fn append_then(&mut self, ev: &Event, sync_now: bool) -> Result<(Appended, bool)> {
        let shown = self.path.display().to_string();
        match sys::flock_timeout(&self.file, LockKind::Exclusive, LOCK_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::data(format!(
                    "the audit log {shown} is still locked after {}s by another process; nothing was done",
                    LOCK_TIMEOUT.as_secs()
                ))
                .hint(format!("find the holder: fuser -v {}", q(&self.path))));
            }
            Err(e) => {
                return Err(Error::data(format!(
                    "cannot lock the audit log {shown}: {e}; nothing was done"
                ))
                .hint(format!("check the file system: df -h {}", q(&self.path))));
            }
        }
        let r = self.append_locked(ev, sync_now);
        let _ = sys::funlock(&self.file);
        r
    }

    fn append_locked(&mut self, ev: &Event, sync_now: bool) -> Result<(Appended, bool)> {
        let shown = self.path.display().to_string();
        let io_err = |what: &str, e: io::Error| {
            Error::data(format!(
                "cannot {what} the audit log {shown}: {e}; nothing was done"
            ))
            .hint(format!(
                "check the disk and the file: df -h {0}; ls -l {0}",
                q(&self.path)
            ))
        };
        let size = self.file.metadata().map_err(|e| io_err("stat", e))?.len();
        let prev = if size == 0 {
            GENESIS.to_owned()
        } else {
            self.tail_hash(size)?
        };
        let now = SystemTime::now();
        let id = EventId::generate(now)
            .map_err(|e| io_err("get random bytes for an event id of", e))?
            .to_string();
        let ts = crate::timefmt::rfc3339_ms(crate::timefmt::unix_ms(now));
        let argv = ev.argv.as_deref().map(bounded_argv);
        let out = LineOut {
            v: VERSION,
            id: &id,
            ts: &ts,
            event: ev.event,
            session: ev.session.as_deref(),
            agent: ev.agent.as_deref(),
            uid: ev.uid,
            host: &ev.host,
            capability: ev.capability.as_deref(),
            tier: ev.tier,
            outcome: ev.outcome,
            reason: ev.reason.as_deref(),
            error: ev.error.as_deref(),
            invocation: ev.invocation.as_deref(),
            program: ev.program.as_deref(),
            argv: argv.as_deref(),
            cwd: ev.cwd.as_deref(),
            cwd_used: ev.cwd_used.as_deref(),
            run_as: ev.run_as.as_deref(),
            pid: ev.pid,
            exit_code: ev.exit_code,
            signal: ev.signal,
            duration_ms: ev.duration_ms,
            ssh_host: ev.ssh.as_ref().and_then(|s| s.host.as_deref()),
            ssh_host_key: ev.ssh.as_ref().and_then(|s| s.host_key.as_deref()),
            ssh_user: ev.ssh.as_ref().and_then(|s| s.user.as_deref()),
            ssh_forwarded: ev.ssh.as_ref().map(|s| s.forwarded),
            http_phase: ev.http.as_ref().and_then(|h| h.phase),
            http_method: ev.http.as_ref().and_then(|h| h.method.as_deref()),
            http_path: ev.http.as_ref().and_then(|h| h.path.as_deref()),
            http_status: ev.http.as_ref().and_then(|h| h.status),
            http_requests: ev.http.as_ref().and_then(|h| h.requests),
            http_refused: ev.http.as_ref().and_then(|h| h.refused),
            bytes_up: ev.http.as_ref().and_then(|h| h.bytes_up),
            bytes_down: ev.http.as_ref().and_then(|h| h.bytes_down),
            prev: &prev,
        };
        let mut line = serde_json::to_vec(&out).expect("an audit event always serializes");
        if line.len() > MAX_LINE {
            return Err(Error::internal(format!(
                "an audit event would be {} bytes, over the {MAX_LINE}-byte limit; nothing was done",
                line.len()
            ))
            .hint("shorten the reason or the working directory, then retry"));
        }
        let hash = hash_hex(&line);
        let text = String::from_utf8_lossy(&line).into_owned();
        line.push(b'\n');
        if let Err(e) = (&self.file).write_all(&line) {
            // Never leave a partial line: cut the file back to where it was.
            let _ = self.file.set_len(size);
            return Err(io_err("write", e));
        }
        let owed = ev.needs_fsync() && !sync_now;
        if ev.needs_fsync() && sync_now {
            sys::fsync(&self.file).map_err(|e| io_err("fsync", e))?;
        }
        Ok((
            Appended {
                id,
                ts,
                hash,
                line: text,
            },
            owed,
        ))
    }

    /// Hash of the last line, which must end in a newline.
    fn tail_hash(&self, size: u64) -> Result<String> {
        let shown = self.path.display();
        let mut want = 4096u64.min(size);
        loop {
            let mut buf = vec![0u8; want as usize];
            self.file
                .read_exact_at(&mut buf, size - want)
                .map_err(|e| {
                    Error::data(format!(
                        "cannot read the end of the audit log {shown}: {e}; nothing was done"
                    ))
                    .hint("check the audit log: aap audit verify")
                })?;
            if buf.last() != Some(&b'\n') {
                return Err(Error::data(format!(
                    "the audit log {shown} ends in a partial line (no newline at byte {size}); refusing to extend a damaged chain, so nothing was done"
                ))
                .hint(format!("see where it breaks: aap audit verify {}", q(&self.path))));
            }
            let body = &buf[..buf.len() - 1];
            match body.iter().rposition(|&b| b == b'\n') {
                Some(p) => return Ok(hash_hex(&body[p + 1..])),
                None if want == size => return Ok(hash_hex(body)),
                None if want as usize > 2 * MAX_LINE => {
                    return Err(Error::data(format!(
                        "the last line of the audit log {shown} is longer than {} bytes; refusing to extend it, so nothing was done",
                        2 * MAX_LINE
                    ))
                    .hint(format!("see where it breaks: aap audit verify {}", q(&self.path))));
                }
                None => want = (want * 4).min(size),
            }
        }
    }
}

/// SHA-256 of a line's bytes (without its newline), as raw bytes.
pub fn hash_raw(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_chains_from_genesis() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut log = Log::open(&p).unwrap();
        let mut e = Event::new(EventKind::Deny, Outcome::Denied);
        e.reason = Some("test".into());
        let a = log.append(&e).unwrap();
        let b = log.append(&e).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(&format!("\"prev\":\"{GENESIS}\"}}")));
        assert_eq!(hash_hex(lines[0].as_bytes()), a.hash);
        assert!(lines[1].contains(&format!("\"prev\":\"{}\"", a.hash)));
        assert_eq!(hash_hex(lines[1].as_bytes()), b.hash);
        assert!(lines[0].starts_with("{\"v\":1,\"id\":\""));
        let r = verify_file(&p).unwrap();
        assert_eq!(r.lines, 2);
        assert_eq!(r.head, b.hash);
    }

    /// `append_sync_later` writes the line at once (it chains and verifies before any sync)
    /// and owes an fsync exactly when `append` would have done one.
    #[test]
    fn append_sync_later_writes_now_and_owes_the_fsync_of_high_tiers_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let mut log = Log::open(&p).unwrap();
        let mut high = Event::new(EventKind::ExecEnd, Outcome::Ok);
        high.tier = Some(Tier::High);
        let mut low = Event::new(EventKind::ExecEnd, Outcome::Ok);
        low.tier = Some(Tier::Low);
        let (a, owed_high) = log.append_sync_later(&high).unwrap();
        let (_, owed_low) = log.append_sync_later(&low).unwrap();
        assert!(owed_high, "a tier-high line owes its fsync");
        assert!(!owed_low, "a tier-low line owes none");
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(hash_hex(text.lines().next().unwrap().as_bytes()), a.hash);
        assert_eq!(verify_file(&p).unwrap().lines, 2);
        log.sync().unwrap();
    }

    #[test]
    fn refuses_to_extend_a_partial_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        std::fs::write(&p, b"{\"v\":1").unwrap();
        let mut log = Log::open(&p).unwrap();
        let e = log
            .append(&Event::new(EventKind::Deny, Outcome::Denied))
            .unwrap_err();
        assert!(e.message().contains("partial line"), "{}", e.message());
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"v\":1");
    }

    #[test]
    fn refuses_symlinks_and_fifos() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::write(&target, b"").unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Log::open(&link).unwrap_err();
        assert!(e.message().contains("symlink"), "{}", e.message());
        assert_eq!(e.exit_code(), 65);
        let e = Log::open(&d.path().join("missing/dir/log")).unwrap_err();
        assert!(e.hint_text().unwrap().starts_with("create it: mkdir -p"));
    }

    #[test]
    fn long_argv_is_bounded() {
        let argv: Vec<String> = (0..100)
            .map(|i| format!("{i}{}", "x".repeat(3000)))
            .collect();
        let b = bounded_argv(&argv);
        let total: usize = b.iter().map(String::len).sum();
        assert!(total < MAX_ARGV_BYTES + 100);
        assert!(b.last().unwrap().contains("more arguments cut"));
        assert!(b[0].contains("bytes cut"));
    }
}
