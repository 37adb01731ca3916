//! `aap requests --watch`: the queue of pending requests, live in a terminal; `a` approves and
//! `d` denies the selected one (each asks for a reason, Enter for none), `j`/`k` or the arrows
//! move, `q` quits. It answers exactly as `aap approve` and `aap deny` do (same checks, same
//! audit lines, same answers for a waiting agent).

#![forbid(unsafe_code)]

use super::request::{approve_one, deny_one, pending};
use super::session::{Ctx, left};
use crate::error::{Error, Result};
use crate::timefmt::unix_secs;
use std::io::Write;
use std::time::SystemTime;

/// One screen: the queue, the selection, the last action's outcome.
fn draw(rows: &[crate::request::ValidRequest], sel: usize, status: &str, now_s: i64) -> String {
    let mut s = String::from("\x1b[H\x1b[2J");
    s.push_str("aap requests --watch    a: approve   d: deny   j/k: move   q: quit\n\n");
    if rows.is_empty() {
        s.push_str("  no pending requests\n");
    } else {
        s.push_str(&format!(
            "  {:<26}  {:<10}  {:<28}  {:>6}  {:>7}  REASON\n",
            "REQUEST", "AGENT", "CAPABILITY", "AGE", "EXPIRES"
        ));
        for (i, r) in rows.iter().enumerate() {
            let mark = if i == sel { '>' } else { ' ' };
            s.push_str(&format!(
                "{mark} {:<26}  {:<10}  {:<28}  {:>6}  {:>7}  {}\n",
                r.req.id,
                r.req.agent,
                r.req.capability,
                left(now_s - r.created_at),
                left(r.expires_at - now_s),
                r.req.reason
            ));
        }
    }
    if !status.is_empty() {
        s.push('\n');
        s.push_str(status);
        s.push('\n');
    }
    s
}

fn shown(e: &Error) -> String {
    match e.hint_text() {
        Some(h) => format!("error: {}\nhint: {h}", e.message()),
        None => format!("error: {}", e.message()),
    }
}

pub fn run() -> Result<u8> {
    let ctx = Ctx::load()?;
    super::session::operator_only(&ctx.cfg, "aap requests --watch", None, &[])?;
    let mut term = crate::sys::KeyTerminal::enter().map_err(|e| {
        Error::config(format!("aap requests --watch needs a terminal on stdin: {e}"))
            .hint("list them instead: aap requests; answer: aap approve REQ / aap deny REQ --reason '...'")
    })?;
    let mut out = std::io::stdout();
    let mut sel = 0usize;
    let mut status = String::new();
    loop {
        let now_s = unix_secs(SystemTime::now());
        let (rows, warnings) = pending(&ctx.st, now_s)?;
        if let Some(w) = warnings.first()
            && status.is_empty()
        {
            status = format!("warning: {w}");
        }
        sel = sel.min(rows.len().saturating_sub(1));
        let _ = out.write_all(draw(&rows, sel, &status, now_s).as_bytes());
        let _ = out.flush();
        let keys = term.keys(1000).map_err(|e| {
            Error::unavailable(format!("cannot read the terminal: {e}"))
                .hint("run it again: aap requests --watch")
        })?;
        let mut i = 0;
        while i < keys.len() {
            let k = keys[i];
            i += 1;
            match k {
                // q, Ctrl-D, Ctrl-C (a key here: the terminal is restored on the way out).
                b'q' | 0x04 | 0x03 => {
                    let _ = out.write_all(b"\n");
                    return Ok(0);
                }
                b'j' => sel = (sel + 1).min(rows.len().saturating_sub(1)),
                b'k' => sel = sel.saturating_sub(1),
                0x1b if keys.get(i) == Some(&b'[') => {
                    match keys.get(i + 1) {
                        Some(b'B') => sel = (sel + 1).min(rows.len().saturating_sub(1)),
                        Some(b'A') => sel = sel.saturating_sub(1),
                        _ => {}
                    }
                    i += 2;
                }
                b'a' | b'd' if !rows.is_empty() => {
                    let r = &rows[sel];
                    let verb = if k == b'a' { "approve" } else { "deny" };
                    let _ = write!(
                        out,
                        "\n{verb} request {} ({} for {})? reason (Enter for none, Ctrl-C quits): ",
                        r.id, r.req.capability, r.req.agent
                    );
                    let _ = out.flush();
                    let reason = term.line().map_err(|e| {
                        Error::unavailable(format!("cannot read the terminal: {e}"))
                            .hint("run it again: aap requests --watch")
                    })?;
                    let reason = reason.trim();
                    let reason = (!reason.is_empty()).then_some(reason);
                    status = if k == b'a' {
                        match approve_one(&ctx, &r.id, None, reason) {
                            Ok(v) => format!(
                                "approved request {}: session {} may use {} until {}",
                                r.id, r.session, r.req.capability, v.grant.expires_at
                            ),
                            Err(e) => shown(&e),
                        }
                    } else {
                        match deny_one(&ctx, &r.id, reason) {
                            Ok(()) => format!("denied request {}", r.id),
                            Err(e) => shown(&e),
                        }
                    };
                    // The rest of what was typed belonged to the prompt.
                    break;
                }
                _ => {}
            }
        }
    }
}
