//! `aap audit verify [FILE]` and `aap audit tail [-f] [--session ID] [--agent A] [--json]`.

#![forbid(unsafe_code)]

use crate::audit::LineIn;
use crate::cli::AuditCmd;
use crate::config::Config;
use crate::error::{Error, Result, shell_quote};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

pub fn run(cmd: AuditCmd) -> Result<u8> {
    match cmd {
        AuditCmd::Verify { file, json } => {
            let path = match file {
                Some(f) => f,
                None => Config::load()?.audit_log.value,
            };
            let r = match crate::audit::verify_file_at(&path) {
                Ok(r) => r,
                Err((e, line)) => {
                    // A machine reading --json gets a result on stdout either way; the error
                    // and its hint still go to stderr, and the exit code is the error's.
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"file": path, "valid": false, "line": line, "error": e.message()})
                        );
                    }
                    return Err(e);
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": path, "valid": true, "events": r.lines, "head": r.head})
                );
            } else {
                println!(
                    "{}: valid, {} events, head {}",
                    path.display(),
                    r.lines,
                    r.head
                );
            }
            Ok(0)
        }
        AuditCmd::Tail {
            follow,
            session,
            agent,
            json,
            lines,
        } => {
            let path = Config::load()?.audit_log.value;
            let f = Filter {
                session,
                agent,
                json,
            };
            tail(&path, &f, lines, follow)
        }
    }
}

struct Filter {
    session: Option<String>,
    agent: Option<String>,
    json: bool,
}

impl Filter {
    fn keep(&self, l: &LineIn) -> bool {
        self.session
            .as_deref()
            .is_none_or(|s| l.session.as_deref() == Some(s))
            && self
                .agent
                .as_deref()
                .is_none_or(|a| l.agent.as_deref() == Some(a))
    }
}

/// One event, human-readable. Free text is Debug-quoted, so control characters never reach the
/// terminal.
pub fn render(l: &LineIn) -> String {
    let mut s = format!(
        "{} {:<15} {:<6}",
        l.ts,
        l.event.as_str(),
        l.outcome.as_str()
    );
    field(&mut s, "session", l.session.as_deref());
    field(&mut s, "agent", l.agent.as_deref());
    field(&mut s, "cap", l.capability.as_deref());
    field(&mut s, "tier", l.tier.map(|t| t.as_str()));
    field(&mut s, "program", l.program.as_deref());
    if let Some(argv) = &l.argv {
        let _ = write!(s, " argv={:?}", argv_text(argv));
    }
    let _ = write!(s, " uid={} host={}", l.uid, l.host.escape_debug());
    if let Some(c) = l.exit_code {
        let _ = write!(s, " exit={c}");
    }
    if let Some(c) = l.signal {
        let _ = write!(s, " signal={c}");
    }
    if let Some(d) = l.duration_ms {
        let _ = write!(s, " duration={d}ms");
    }
    // Where a signature went, and what the http-proxy passed (all public; never a token).
    field(&mut s, "ssh_user", l.ssh_user.as_deref());
    field(&mut s, "ssh_host", l.ssh_host.as_deref());
    field(&mut s, "ssh_host_key", l.ssh_host_key.as_deref());
    field(
        &mut s,
        "ssh_forwarded",
        l.ssh_forwarded.filter(|f| *f).map(|_| "true"),
    );
    field(&mut s, "http_method", l.http_method.as_deref());
    field(&mut s, "http_path", l.http_path.as_deref());
    let numbers = [
        ("http_status", l.http_status.map(u64::from)),
        ("http_requests", l.http_requests),
        ("http_refused", l.http_refused),
        ("bytes_up", l.bytes_up),
        ("bytes_down", l.bytes_down),
    ];
    for (k, v) in numbers {
        if let Some(v) = v {
            let _ = write!(s, " {k}={v}");
        }
    }
    if let Some(r) = &l.reason {
        let _ = write!(s, " reason={:?}", r.as_ref());
    }
    if let Some(e) = &l.error {
        let _ = write!(s, " error={:?}", e.as_ref());
    }
    s
}

/// ` KEY=VALUE` when there is a value; Debug-quoted unless it is plain.
fn field(s: &mut String, k: &str, v: Option<&str>) {
    if let Some(v) = v {
        if v.bytes().all(|b| b.is_ascii_graphic()) {
            let _ = write!(s, " {k}={v}");
        } else {
            let _ = write!(s, " {k}={v:?}");
        }
    }
}

/// argv as a shell would read it back (`git fetch 'my branch'`).
pub fn argv_text<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| shell_quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn emit(out: &mut impl Write, f: &Filter, line: &[u8], n: u64) -> std::io::Result<()> {
    match LineIn::parse(line) {
        Ok(l) if f.keep(&l) => {
            if f.json {
                out.write_all(line)?;
                out.write_all(b"\n")
            } else {
                writeln!(out, "{}", render(&l))
            }
        }
        Ok(_) => Ok(()),
        Err(e) => {
            eprintln!("aap: warning: line {n} {e} (run: aap audit verify)");
            Ok(())
        }
    }
}

fn tail(path: &Path, f: &Filter, n: usize, follow: bool) -> Result<u8> {
    let quoted = shell_quote(&path.to_string_lossy());
    let open = || {
        crate::sys::open_read_nonblocking(path, true).map_err(|e| {
            Error::data(format!("cannot open the audit log {}: {e}", path.display())).hint(format!(
                "check the path (see: aap config show): ls -l {quoted}"
            ))
        })
    };
    let mut file = open()?;
    let mut ring: VecDeque<(u64, Vec<u8>)> = VecDeque::with_capacity(n.min(10_000));
    let mut lineno = 0u64;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let stdout = std::io::stdout();
    // Read everything once, keeping the last n matching lines.
    loop {
        let k = file.read(&mut buf).map_err(|e| read_err(path, e))?;
        if k == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..k]);
        let mut start = 0;
        while let Some(p) = pending[start..].iter().position(|&b| b == b'\n') {
            lineno += 1;
            let line = &pending[start..start + p];
            if n > 0 && LineIn::parse(line).map(|l| f.keep(&l)).unwrap_or(true) {
                if ring.len() == n {
                    ring.pop_front();
                }
                ring.push_back((lineno, line.to_vec()));
            }
            start += p + 1;
        }
        pending.drain(..start);
    }
    {
        let mut out = stdout.lock();
        for (no, l) in &ring {
            if emit(&mut out, f, l, *no).is_err() {
                return Ok(0); // stdout closed: stop quietly, like tail(1)
            }
        }
        let _ = out.flush();
    }
    if !follow {
        return Ok(0);
    }
    let mut ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
    let mut pos = file.stream_position().unwrap_or(0);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // Rotation (new inode) or truncation: start over from the top of the new file.
        let meta = std::fs::metadata(path).ok();
        let rotated = meta.as_ref().is_some_and(|m| m.ino() != ino);
        let truncated = meta.as_ref().is_some_and(|m| m.len() < pos);
        if rotated || truncated {
            if let Ok(nf) = open() {
                file = nf;
                ino = meta.map(|m| m.ino()).unwrap_or(0);
                pos = 0;
                lineno = 0;
                pending.clear();
                let _ = file.seek(SeekFrom::Start(0));
            }
        }
        loop {
            let k = file.read(&mut buf).map_err(|e| read_err(path, e))?;
            if k == 0 {
                break;
            }
            pos += k as u64;
            pending.extend_from_slice(&buf[..k]);
        }
        let mut out = stdout.lock();
        let mut start = 0;
        while let Some(p) = pending[start..].iter().position(|&b| b == b'\n') {
            lineno += 1;
            if emit(&mut out, f, &pending[start..start + p], lineno).is_err() {
                return Ok(0);
            }
            start += p + 1;
        }
        pending.drain(..start);
        if out.flush().is_err() {
            return Ok(0);
        }
    }
}

fn read_err(path: &Path, e: std::io::Error) -> Error {
    Error::data(format!("cannot read the audit log {}: {e}", path.display())).hint(format!(
        "check the file: ls -l {}",
        shell_quote(&path.to_string_lossy())
    ))
}
