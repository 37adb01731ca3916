//! Reading the audit log back: strict parsing of one line, and verification of the whole chain.

#![forbid(unsafe_code)]

use super::{EventKind, GENESIS, MAX_LINE, Outcome, VERSION};
use crate::catalog::Tier;
use crate::error::{Error, Result, shell_quote};
use serde::Deserialize;
use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

/// One line as read back. Unknown fields and duplicate keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineIn<'a> {
    pub v: u32,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub ts: Cow<'a, str>,
    pub event: EventKind,
    #[serde(borrow, default)]
    pub session: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub agent: Option<Cow<'a, str>>,
    pub uid: u32,
    #[serde(borrow)]
    pub host: Cow<'a, str>,
    #[serde(borrow, default)]
    pub capability: Option<Cow<'a, str>>,
    #[serde(default)]
    pub tier: Option<Tier>,
    pub outcome: Outcome,
    #[serde(borrow, default)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub invocation: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub program: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub argv: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    pub cwd: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub cwd_used: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub run_as: Option<Cow<'a, str>>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(borrow, default)]
    pub ssh_host: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub ssh_host_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub ssh_user: Option<Cow<'a, str>>,
    #[serde(default)]
    pub ssh_forwarded: Option<bool>,
    #[serde(borrow, default)]
    pub http_phase: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub http_method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub http_path: Option<Cow<'a, str>>,
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub http_requests: Option<u64>,
    #[serde(default)]
    pub http_refused: Option<u64>,
    #[serde(default)]
    pub bytes_up: Option<u64>,
    #[serde(default)]
    pub bytes_down: Option<u64>,
    #[serde(borrow)]
    pub prev: Cow<'a, str>,
}

impl<'a> LineIn<'a> {
    /// Parse and check one line (without its newline): JSON shape, version, id, time, prev.
    pub fn parse(line: &'a [u8]) -> std::result::Result<LineIn<'a>, String> {
        let l: LineIn = serde_json::from_slice(line).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                format!("is not JSON ({} at column {})", kind_word(&e), e.column())
            } else {
                // The message names the field; never the line's content.
                let mut m = e.to_string();
                if let Some(i) = m.find(" at line ") {
                    m.truncate(i);
                }
                format!("is not an audit event: {m}")
            }
        })?;
        if l.v != VERSION {
            return Err(format!(
                "has format version {}; this aap reads {VERSION}",
                l.v
            ));
        }
        if !is_ulid(&l.id) {
            return Err("has an id that is not a ULID".into());
        }
        if crate::timefmt::parse_rfc3339_ms(&l.ts).is_none() {
            return Err("has a ts that is not an RFC 3339 UTC time".into());
        }
        if l.prev.len() != 64
            || !l
                .prev
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("has a prev that is not 64 lower-case hex digits".into());
        }
        Ok(l)
    }
}

fn kind_word(e: &serde_json::Error) -> &'static str {
    if e.is_eof() {
        "it ends early"
    } else {
        "syntax error"
    }
}

fn is_ulid(s: &str) -> bool {
    s.len() == 26
        && s.as_bytes()[0] <= b'7'
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn hash_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let h = super::hash_raw(bytes);
    let mut s = String::with_capacity(64);
    for b in h {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let h = (b[2 * i] as char).to_digit(16)?;
        let l = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (h * 16 + l) as u8;
    }
    Some(out)
}

/// A valid log: how many events, and the hash of the last line (the genesis value when empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub lines: u64,
    pub head: String,
}

/// The first bad line and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: u64,
    pub what: String,
}

/// Verify a whole log read from `r`, streaming (memory stays bounded by the longest line).
pub fn verify_reader<R: Read>(
    mut r: R,
) -> std::result::Result<VerifyReport, std::result::Result<BadLine, std::io::Error>> {
    let genesis = parse_hex32(GENESIS).expect("genesis is hex");
    let mut expected = genesis;
    let mut n: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut start = 0usize;
    let mut chunk = vec![0u8; 1 << 20];
    let mut eof = false;
    loop {
        // Process every complete line in buf[start..].
        while let Some(off) = memchr(&buf[start..]) {
            let line = &buf[start..start + off];
            n += 1;
            check_line(line, n, &expected).map_err(Ok)?;
            expected = super::hash_raw(line);
            start += off + 1;
        }
        if eof {
            break;
        }
        // Keep the partial tail, read more.
        buf.drain(..start);
        start = 0;
        if buf.len() > 2 * MAX_LINE {
            return Err(Ok(BadLine {
                line: n + 1,
                what: format!("is longer than {} bytes", 2 * MAX_LINE),
            }));
        }
        let got = loop {
            match r.read(&mut chunk) {
                Ok(k) => break k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Err(e)),
            }
        };
        if got == 0 {
            eof = true;
        } else {
            buf.extend_from_slice(&chunk[..got]);
        }
    }
    if start < buf.len() {
        return Err(Ok(BadLine {
            line: n + 1,
            what: "is truncated: the file ends without a newline (a write was cut short, or the end was cut off)".into(),
        }));
    }
    let mut head = String::with_capacity(64);
    for b in expected {
        head.push_str(&format!("{b:02x}"));
    }
    Ok(VerifyReport { lines: n, head })
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

fn check_line(line: &[u8], n: u64, expected: &[u8; 32]) -> std::result::Result<(), BadLine> {
    let bad = |what: String| BadLine { line: n, what };
    if line.len() > MAX_LINE {
        return Err(bad(format!(
            "is {} bytes, over the {MAX_LINE}-byte limit",
            line.len()
        )));
    }
    let l = LineIn::parse(line).map_err(bad)?;
    let prev = parse_hex32(&l.prev).expect("checked by parse");
    if &prev != expected {
        return Err(bad(if n == 1 {
            "does not chain from the genesis value: the log's first lines were deleted, or line 1 was edited or inserted".into()
        } else {
            format!(
                "does not chain from line {}: line {} was edited, or lines were inserted, deleted or reordered between lines {} and {n}",
                n - 1,
                n - 1,
                n - 1
            )
        }));
    }
    Ok(())
}

/// `aap audit verify`: the report, or an error naming the first bad line (exit 65).
pub fn verify_file(path: &Path) -> Result<VerifyReport> {
    verify_file_at(path).map_err(|(e, _)| e)
}

/// [`verify_file`], with the number of the first bad line when the log itself is invalid
/// (`None` when it could not be opened or read).
pub fn verify_file_at(
    path: &Path,
) -> std::result::Result<VerifyReport, (crate::error::Error, Option<u64>)> {
    let shown = path.display();
    let quoted = shell_quote(&path.to_string_lossy());
    let file = crate::sys::open_read_nonblocking(path, true)
        .map_err(|e| {
            Error::data(format!("cannot open the audit log {shown}: {e}")).hint(format!(
                "check the path (see: aap config show): ls -l {quoted}"
            ))
        })
        .map_err(|e| (e, None))?;
    let meta = file
        .metadata()
        .map_err(|e| {
            Error::data(format!("cannot stat the audit log {shown}: {e}"))
                .hint(format!("check the file: ls -l {shown}"))
        })
        .map_err(|e| (e, None))?;
    if !meta.is_file() {
        return Err((
            Error::data(format!("the audit log {shown} is not a regular file"))
                .hint(format!("name the log file: ls -l {quoted}")),
            None,
        ));
    }
    match verify_reader(file) {
        Ok(r) => Ok(r),
        Err(Err(e)) => Err((
            Error::data(format!("cannot read the audit log {shown}: {e}"))
                .hint(format!("check the file: ls -l {quoted}")),
            None,
        )),
        Err(Ok(b)) => Err((Error::data(format!(
            "{shown}:{}: the audit log is invalid: line {} {}",
            b.line, b.line, b.what
        ))
        .hint(format!(
            "keep a copy as evidence and look at the lines around it: cp -p {quoted} {quoted}.evidence; sed -n '{},{}p' {quoted}",
            b.line.saturating_sub(1).max(1),
            b.line
        )), Some(b.line))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(prev: &str, n: u32) -> String {
        format!(
            "{{\"v\":1,\"id\":\"01JD00000000000000000000{n:02}\",\"ts\":\"2026-11-24T02:30:00.000Z\",\"event\":\"deny\",\"uid\":0,\"host\":\"h\",\"outcome\":\"denied\",\"prev\":\"{prev}\"}}"
        )
    }

    fn log(n: u32) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (0..n)
            .map(|i| {
                let l = line(&prev, i);
                prev = hash_hex(l.as_bytes());
                l
            })
            .collect()
    }

    fn verify(
        lines: &[String],
        trailing_newline: bool,
    ) -> std::result::Result<VerifyReport, BadLine> {
        let mut t = lines.join("\n");
        if trailing_newline && !lines.is_empty() {
            t.push('\n');
        }
        verify_reader(t.as_bytes()).map_err(|e| e.unwrap())
    }

    #[test]
    fn valid_and_empty() {
        let l = log(5);
        let r = verify(&l, true).unwrap();
        assert_eq!(r.lines, 5);
        assert_eq!(r.head, hash_hex(l[4].as_bytes()));
        let r = verify(&[], true).unwrap();
        assert_eq!((r.lines, r.head.as_str()), (0, GENESIS));
    }

    #[test]
    fn exec_events_are_accepted() {
        let l = format!(
            "{{\"v\":1,\"id\":\"01JD0000000000000000000000\",\"ts\":\"2026-11-24T02:30:00.000Z\",\"event\":\"exec.end\",\"session\":\"01JD0000000000000000000001\",\"agent\":\"codex\",\"uid\":1001,\"host\":\"h\",\"capability\":\"forgejo-pat-read\",\"tier\":\"low\",\"outcome\":\"ok\",\"invocation\":\"01JD0000000000000000000002\",\"program\":\"git\",\"argv\":[\"git\",\"fetch\"],\"cwd\":\"/w\",\"pid\":42,\"exit_code\":0,\"duration_ms\":12,\"prev\":\"{GENESIS}\"}}"
        );
        assert_eq!(verify(&[l], true).unwrap().lines, 1);
    }

    #[test]
    fn tampering_is_found_at_the_right_line() {
        let good = log(6);
        // Edited line 3: line 4 no longer chains.
        let mut l = good.clone();
        l[2] = l[2].replace("\"uid\":0", "\"uid\":1");
        assert_eq!(verify(&l, true).unwrap_err().line, 4);
        // Inserted line after 2 (chaining correctly from 2): line 4 breaks.
        let mut l = good.clone();
        l.insert(2, line(&hash_hex(good[1].as_bytes()), 50));
        assert_eq!(verify(&l, true).unwrap_err().line, 4);
        // Deleted line 3: the new line 3 breaks.
        let mut l = good.clone();
        l.remove(2);
        assert_eq!(verify(&l, true).unwrap_err().line, 3);
        // Reordered 3 and 4.
        let mut l = good.clone();
        l.swap(2, 3);
        assert_eq!(verify(&l, true).unwrap_err().line, 3);
        // Truncated last line.
        let mut l = good.clone();
        let last = l.pop().unwrap();
        l.push(last[..last.len() - 10].to_string());
        let e = verify(&l, false).unwrap_err();
        assert_eq!(e.line, 6);
        assert!(e.what.contains("truncated"), "{}", e.what);
        // Missing final newline alone is also a truncation.
        assert_eq!(verify(&good, false).unwrap_err().line, 6);
        // Not JSON.
        let mut l = good.clone();
        l[1] = "hello".into();
        let e = verify(&l, true).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.what.contains("not JSON"), "{}", e.what);
        // Unknown field and duplicate key.
        let mut l = good.clone();
        l[0] = l[0].replace("\"v\":1,", "\"v\":1,\"x\":1,");
        assert!(verify(&l, true).unwrap_err().what.contains("unknown field"));
        let mut l = good.clone();
        l[0] = l[0].replace("\"v\":1,", "\"v\":1,\"uid\":5,");
        assert!(
            verify(&l, true)
                .unwrap_err()
                .what
                .contains("duplicate field")
        );
        // First line deleted.
        assert_eq!(verify(&good[1..], true).unwrap_err().line, 1);
    }
}
