//! `aap session log ID [--json]`: one session's story, from the audit log. Grants (signed here
//! or imported) and re-signings, requests and their answers, revocation, every exec (argv, exit
//! status, duration; `exec.start` and `exec.end` joined by their invocation), denials, and any
//! other event of the session by its name (`ssh.sign`, `http.request`), with its fields.
//!
//! Lines are read as JSON values, not as the event kinds this build knows, so events of a newer
//! broker show up too. The chain is not checked here: that is `aap audit verify`.

#![forbid(unsafe_code)]

use super::audit::argv_text;
use crate::config::Config;
use crate::error::{Error, Result, shell_quote};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufRead;

/// Fields every line has, or that are shown in their own place.
const SHOWN_ELSEWHERE: &[&str] = &[
    "v",
    "id",
    "ts",
    "event",
    "session",
    "agent",
    "uid",
    "host",
    "capability",
    "tier",
    "outcome",
    "prev",
    "invocation",
    "pid",
    "argv",
    "exit_code",
    "signal",
    "duration_ms",
    "reason",
    "error",
];

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// Free text, quoted when it is not plain (control characters never reach the terminal).
fn text(t: &str) -> String {
    if t.bytes().all(|b| b.is_ascii_graphic()) {
        t.to_owned()
    } else {
        format!("{t:?}")
    }
}

fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}.{:01}s", ms / 1000, (ms % 1000) / 100)
    }
}

fn label(event: &str) -> &str {
    match event {
        "session.start" => "granted",
        "session.approve" => "re-signed",
        "session.revoke" => "revoked",
        "session.import" => "imported",
        "request" => "requested",
        "request.approve" => "approved",
        "request.deny" => "request denied",
        "deny" => "DENIED",
        "exec.start" | "exec.spawned" | "exec.end" => "exec",
        "ssh.sign" => "ssh signature",
        "http.request" => "proxied request",
        other => other,
    }
}

/// One event's line (an exec: its start joined with its end, when there is one).
fn line(v: &Value, end: Option<&Value>) -> String {
    let event = s(v, "event").unwrap_or("?");
    let mut out = format!(
        "{}  {:<15}  {:<28}",
        s(v, "ts").unwrap_or("?"),
        label(event),
        s(v, "capability").unwrap_or("-")
    );
    if let Some(argv) = v.get("argv").and_then(Value::as_array) {
        let a: Vec<&str> = argv.iter().filter_map(Value::as_str).collect();
        let _ = write!(out, "  {}", text_cmd(&argv_text(&a)));
    }
    if event == "exec.start" {
        match end {
            Some(e) => {
                if let Some(c) = e.get("exit_code").and_then(Value::as_i64) {
                    let _ = write!(out, "  exit {c}");
                }
                if let Some(sig) = e.get("signal").and_then(Value::as_i64) {
                    let _ = write!(out, "  killed by signal {sig}");
                }
                if let Some(o) = s(e, "outcome").filter(|o| *o != "ok") {
                    let _ = write!(out, "  ({o})");
                }
                if let Some(ms) = e.get("duration_ms").and_then(Value::as_u64) {
                    let _ = write!(out, "  in {}", duration(ms));
                }
            }
            None => out.push_str("  (no end recorded: still running, or the log ends here)"),
        }
    } else {
        if event == "exec.end" {
            if let Some(c) = v.get("exit_code").and_then(Value::as_i64) {
                let _ = write!(out, "  exit {c}");
            }
            if let Some(o) = s(v, "outcome").filter(|o| *o != "ok") {
                let _ = write!(out, "  ({o})");
            }
        } else if let Some(o) = s(v, "outcome").filter(|o| *o != "ok") {
            let _ = write!(out, "  {o}");
        }
        if let Some(obj) = v.as_object() {
            for (k, val) in obj {
                if SHOWN_ELSEWHERE.contains(&k.as_str()) || k == "cwd" || k == "program" {
                    continue;
                }
                let shown = match val {
                    Value::String(t) => text(t),
                    Value::Null => continue,
                    other => other.to_string(),
                };
                let _ = write!(out, "  {k}={shown}");
            }
        }
    }
    if let Some(r) = s(v, "reason") {
        let _ = write!(out, "  reason={r:?}");
    }
    if let Some(e) = s(v, "error") {
        let _ = write!(out, "  error={e:?}");
    }
    out
}

/// A command line, quoted as a whole when it holds control characters.
fn text_cmd(t: &str) -> String {
    if t.chars().any(char::is_control) {
        format!("{t:?}")
    } else {
        t.to_owned()
    }
}

pub fn run(id: &str, json: bool) -> Result<u8> {
    let id = super::session::parse_id(id)?;
    let cfg = Config::load()?;
    let path = cfg.audit_log.value.clone();
    let quoted = shell_quote(&path.to_string_lossy());
    let file = crate::sys::open_read_nonblocking(&path, true).map_err(|e| {
        Error::data(format!("cannot open the audit log {}: {e}", path.display())).hint(format!(
            "check the path (see: aap config show): ls -l {quoted}"
        ))
    })?;
    let want = id.to_string();
    let mut events: Vec<Value> = Vec::new();
    let mut raw: Vec<String> = Vec::new();
    for (n, l) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let l = l.map_err(|e| {
            Error::data(format!("cannot read the audit log {}: {e}", path.display()))
                .hint(format!("check the file: ls -l {quoted}"))
        })?;
        let v: Value = match serde_json::from_slice(&l) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "aap: warning: line {} of {} is not JSON ({e}); see: aap audit verify",
                    n + 1,
                    path.display()
                );
                continue;
            }
        };
        if s(&v, "session") == Some(want.as_str()) {
            if json {
                raw.push(String::from_utf8_lossy(&l).into_owned());
            }
            events.push(v);
        }
    }
    if json {
        for l in raw {
            println!("{l}");
        }
        return Ok(0);
    }
    if events.is_empty() {
        println!(
            "no events of session {id} in {} (see: aap session show {id})",
            path.display()
        );
        return Ok(0);
    }
    let agent = events.iter().find_map(|v| s(v, "agent")).unwrap_or("?");
    println!(
        "session {id}, agent {agent}: {} event(s) in {}",
        events.len(),
        path.display()
    );
    // Join each exec.end to its exec.start by invocation.
    let mut ends: HashMap<&str, &Value> = HashMap::new();
    let mut started = std::collections::HashSet::new();
    for v in &events {
        if let Some(inv) = s(v, "invocation") {
            match s(v, "event") {
                Some("exec.end") => {
                    ends.insert(inv, v);
                }
                Some("exec.start") => {
                    started.insert(inv);
                }
                _ => {}
            }
        }
    }
    let (mut execs, mut failed, mut denials, mut requests, mut signs, mut proxied) =
        (0, 0, 0, 0, 0, 0);
    for v in &events {
        let event = s(v, "event").unwrap_or("");
        let inv = s(v, "invocation");
        match event {
            "exec.end" | "exec.spawned" if inv.is_some_and(|i| started.contains(i)) => continue,
            "exec.start" => {
                execs += 1;
                let end = inv.and_then(|i| ends.get(i).copied());
                let ok = end.is_some_and(|e| {
                    e.get("exit_code").and_then(Value::as_i64) == Some(0)
                        && s(e, "outcome") == Some("ok")
                });
                if !ok {
                    failed += 1;
                }
                println!("{}", line(v, end));
                continue;
            }
            "deny" => denials += 1,
            "request" => requests += 1,
            "ssh.sign" => signs += 1,
            "http.request" => proxied += 1,
            _ => {}
        }
        println!("{}", line(v, None));
    }
    let mut summary = format!(
        "{execs} exec(s), {failed} not ending in exit 0; {denials} denial(s); {requests} request(s)"
    );
    if signs > 0 {
        let _ = write!(summary, "; {signs} ssh signature(s)");
    }
    if proxied > 0 {
        let _ = write!(summary, "; {proxied} proxied request(s)");
    }
    println!("{summary}");
    Ok(0)
}
