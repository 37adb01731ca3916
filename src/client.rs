//! The broker's clients: `aap-exec`, `aap session check`, `aap request`. They find the broker's
//! socket, send one request and print what comes back. They hold no credential and read no
//! grant, catalog or identity: the broker decides.
//!
//! Finding the socket links no YAML parser into `aap-exec`: the config's `broker.socket` is read
//! with a small scanner of the block form that `aap config show` prints (`broker:` at the start
//! of a line, `socket: PATH` indented below it). A config that writes it any other way is an
//! error naming the line to write; without the key the default `/run/aap/broker.sock` applies.

#![forbid(unsafe_code)]

use crate::error::{Error, Kind, Result, quote_path};
use crate::proto::{BrokerMsg, ClientMsg, Conn, Hello};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The broker's socket, by the config (found by the contract's order) or the default.
pub fn socket_path() -> Result<PathBuf> {
    let Some(file) = crate::config::find_file()? else {
        return Ok(PathBuf::from(crate::config::DEFAULT_BROKER_SOCKET));
    };
    let explicit = matches!(file.from, crate::config::Source::Env(ref v) if v == "AAP_CONFIG");
    let path = file.value;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit => {
            return Err(Error::config(format!(
                "the config {} (from AAP_CONFIG) does not exist",
                path.display()
            ))
            .hint("unset AAP_CONFIG or point it at the config file: aap config show"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(PathBuf::from(crate::config::DEFAULT_BROKER_SOCKET));
        }
        Err(e) => {
            return Err(
                Error::config(format!("cannot read the config {}: {e}", path.display())).hint(
                    format!("check its permissions: ls -l {}", quote_path(&path)),
                ),
            );
        }
    };
    match scan_socket(&text) {
        Ok(Some(p)) => {
            let p = PathBuf::from(p);
            Ok(if p.is_relative() {
                path.parent().unwrap_or(Path::new("/")).join(p)
            } else {
                p
            })
        }
        Ok(None) => Ok(PathBuf::from(crate::config::DEFAULT_BROKER_SOCKET)),
        Err(line) => Err(Error::config(format!(
            "{} line {line}: aap-exec reads broker.socket only in block form",
            path.display()
        ))
        .hint("write it as two lines: `broker:` then `  socket: /run/aap/broker.sock`")),
    }
}

/// `broker.socket` from the config's text: `Ok(None)` when absent, `Err(line)` when `broker:`
/// is written in a form this scanner does not read.
pub fn scan_socket(text: &str) -> std::result::Result<Option<String>, usize> {
    let mut in_broker = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or("").trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indented = line.starts_with(' ') || line.starts_with('\t');
        if !indented {
            in_broker = false;
            if let Some(rest) = line.strip_prefix("broker:") {
                if !rest.trim().is_empty() {
                    return Err(i + 1);
                }
                in_broker = true;
            }
            continue;
        }
        if in_broker && let Some(v) = line.trim_start().strip_prefix("socket:") {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            if v.is_empty() || v.contains(['{', '[', '&', '*', '!', '|', '>']) {
                return Err(i + 1);
            }
            return Ok(Some(v.to_owned()));
        }
    }
    Ok(None)
}

/// Connect to the broker. Not running (no socket, nobody listening): 69 at once, with how to
/// start it.
pub fn connect() -> Result<Conn<UnixStream>> {
    let path = socket_path()?;
    match UnixStream::connect(&path) {
        Ok(s) => Ok(Conn::new(s)),
        Err(e) => Err(Error::unavailable(format!(
            "cannot reach the aap broker at {}: {e}",
            path.display()
        ))
        .hint(format!(
            "start it: systemctl start aap-broker.socket (or in the foreground: aap broker --socket {})",
            quote_path(&path)
        ))),
    }
}

/// Send the one request of a connection. A broker that refused the connection at once (its
/// uid holds too many) may have answered and closed before the request got there: then the
/// send fails (EPIPE), and the broker's answer, already waiting, is what to show.
pub fn send_request(conn: &mut Conn<UnixStream>, msg: &ClientMsg) -> Result<()> {
    let Err(sent) = conn.send(msg, &[]) else {
        return Ok(());
    };
    match conn.recv::<BrokerMsg>() {
        Ok(BrokerMsg::Error {
            code,
            message,
            hint,
        }) => Err(remote_error(code, message, hint)),
        _ => Err(broken(&sent)),
    }
}

/// The broker went away or answered garbage.
pub fn broken(e: &crate::proto::ProtoError) -> Error {
    Error::unavailable(format!("the aap broker stopped answering: {e}")).hint(
        "check the broker: systemctl status aap-broker (or its log), then run the command again",
    )
}

/// The session: `--session`, else `$AAP_SESSION`.
pub fn session(flag: Option<String>) -> Option<String> {
    // An explicit `--session ""` is sent as given (and refused as malformed by the broker);
    // only an empty $AAP_SESSION counts as unset.
    flag.or_else(|| std::env::var("AAP_SESSION").ok().filter(|s| !s.is_empty()))
}

/// An error the broker sent, as ours.
pub fn remote_error(code: u8, message: String, hint: Option<String>) -> Error {
    let e = Error::new(Kind::from_exit_code(code), message);
    match hint {
        Some(h) => e.hint(h),
        None => e,
    }
}

/// How long an answer may take before the client says what it waits for.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Receives the broker's messages for one request. Once the request has waited longer than
/// [`PATIENCE`], it says on stderr, once, what it is waiting for: the broker, or what the broker
/// said it waits for ([`BrokerMsg::Stage`], e.g. Infisical).
pub struct Patience {
    prog: &'static str,
    started: std::time::Instant,
    said: bool,
    waiting_for: String,
}

impl Patience {
    /// Start counting now (call it just after sending the request).
    pub fn new(prog: &'static str) -> Patience {
        Patience {
            prog,
            started: std::time::Instant::now(),
            said: false,
            waiting_for: "the broker".into(),
        }
    }

    /// The next message that is not a `stage`.
    pub fn recv(&mut self, conn: &mut Conn<UnixStream>) -> Result<BrokerMsg> {
        loop {
            let msg = if self.said {
                conn.recv::<BrokerMsg>()
            } else {
                match conn.recv_by(self.started + PATIENCE) {
                    Ok(body) => crate::proto::decode::<BrokerMsg>(&body),
                    Err(crate::proto::ProtoError::Deadline) => {
                        eprintln!(
                            "{}: waiting for {} ({} s)...",
                            self.prog,
                            self.waiting_for,
                            PATIENCE.as_secs()
                        );
                        self.said = true;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            .map_err(|e| broken(&e))?;
            if let BrokerMsg::Stage { waiting_for } = msg {
                self.waiting_for = waiting_for;
                continue;
            }
            return Ok(msg);
        }
    }
}

/// Send one request, relay progress to stderr, print the answer's stdout; its exit code.
fn ask(prog: &'static str, msg: &ClientMsg) -> Result<u8> {
    let mut conn = connect()?;
    send_request(&mut conn, msg)?;
    let mut patience = Patience::new(prog);
    loop {
        match patience.recv(&mut conn)? {
            BrokerMsg::Progress { message } => eprintln!("{prog}: {message}"),
            BrokerMsg::Done { code, stdout } => {
                print!("{stdout}");
                return Ok(code);
            }
            BrokerMsg::Error {
                code,
                message,
                hint,
            } => return Err(remote_error(code, message, hint)),
            _ => {
                return Err(Error::unavailable("the aap broker answered out of order")
                    .hint("install aap and aap-exec of the same release as the broker"));
            }
        }
    }
}

/// `aap session check` / `aap-exec --check CAP [-- CMD ARG...]`: with a command, the broker
/// judges it as an exec would (the program resolved here, as for an exec).
pub fn check(
    prog: &'static str,
    session_flag: Option<String>,
    cap: &str,
    command: &[std::ffi::OsString],
) -> Result<u8> {
    let command = command.first().map(|program| {
        let (cwd, cwd_path) = crate::exec::run::caller_cwd();
        let (resolved, program_error) = crate::exec::run::resolve_for_broker(program, &cwd_path);
        crate::proto::CheckCommand {
            argv: command
                .iter()
                .map(|a| a.as_encoded_bytes().to_vec())
                .collect(),
            program: resolved,
            program_error,
            cwd,
            nested: std::env::var_os(crate::exec::run::NEST_MARKER)
                .map(|v| v.to_string_lossy().into_owned()),
        }
    });
    ask(
        prog,
        &ClientMsg::Check {
            hello: Hello::current(),
            cap: cap.to_owned(),
            session: session(session_flag),
            command,
        },
    )
}

/// `aap doctor`: ask the broker listening on `sock` whether it can start each wrapped-command
/// capability as its `run_as` user.
pub fn run_as_checks(sock: &std::path::Path) -> Result<Vec<crate::proto::RunAsCheck>> {
    let mut conn = match UnixStream::connect(sock) {
        Ok(s) => Conn::new(s),
        Err(e) => {
            return Err(Error::unavailable(format!(
                "cannot reach the aap broker at {}: {e}",
                sock.display()
            ))
            .hint(format!(
                "start it: systemctl start aap-broker.socket (or in the foreground: aap broker --socket {})",
                quote_path(sock)
            )));
        }
    };
    send_request(
        &mut conn,
        &ClientMsg::RunAs {
            hello: Hello::current(),
        },
    )?;
    let mut patience = Patience::new("aap");
    loop {
        match patience.recv(&mut conn)? {
            BrokerMsg::Progress { .. } | BrokerMsg::Notice { .. } => {}
            BrokerMsg::Done { stdout, .. } => {
                return serde_json::from_str(&stdout).map_err(|e| {
                    Error::internal(format!("the broker's run_as answer does not parse: {e}"))
                        .hint("run the broker and aap of the same release: aap --version")
                });
            }
            BrokerMsg::Error { message, hint, .. } => {
                let e = Error::unavailable(message);
                return Err(match hint {
                    Some(h) => e.hint(h),
                    None => e.hint("see the broker's log: journalctl -u aap-broker.service"),
                });
            }
            other => {
                return Err(Error::internal(format!(
                    "the broker answered a run_as check with {other:?}"
                ))
                .hint("run the broker and aap of the same release: aap --version"));
            }
        }
    }
}

/// `aap-exec --list [--json]`.
pub fn list(session_flag: Option<String>, json: bool) -> Result<u8> {
    ask(
        "aap-exec",
        &ClientMsg::List {
            hello: Hello::current(),
            session: session(session_flag),
            json,
        },
    )
}

/// `aap request CAP --reason R [--wait [--timeout D]]`.
pub fn request(
    cap: &str,
    reason: &str,
    session_flag: Option<String>,
    wait: bool,
    timeout: Option<crate::duration::Dur>,
) -> Result<u8> {
    let msg = ClientMsg::Request {
        hello: Hello::current(),
        cap: cap.to_owned(),
        session: session(session_flag),
        reason: reason.to_owned(),
        wait,
        timeout_secs: timeout.map(|t| t.secs()),
    };
    if wait {
        ask_waiting(&msg)
    } else {
        ask("aap", &msg)
    }
}

/// `aap request --wait-on REQ [--timeout D]`.
pub fn wait_on(request: &str, timeout: Option<crate::duration::Dur>) -> Result<u8> {
    ask_waiting(&ClientMsg::RequestWait {
        hello: Hello::current(),
        request: request.to_owned(),
        timeout_secs: timeout.map(|t| t.secs()),
    })
}

/// The status line of a waiting client: whole minutes above two minutes (`4m left`).
pub fn waiting_line(request: &str, left_secs: u64) -> String {
    let shown = if left_secs > 120 {
        left_secs.div_ceil(60) * 60
    } else {
        left_secs
    };
    format!(
        "waiting for the operator: request {request} ({} left)",
        crate::duration::Dur::from_secs(shown)
    )
}

/// Like [`ask`], for a request the broker answers only when the operator does: one status
/// line on stderr, rewritten in place on a terminal and printed once otherwise.
fn ask_waiting(msg: &ClientMsg) -> Result<u8> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut conn = connect()?;
    send_request(&mut conn, msg)?;
    // The broker beats about once a second; silence this long means it is gone.
    let _ = conn
        .sock()
        .set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let mut shown: Option<String> = None;
    let clear = |shown: &Option<String>| {
        if tty && shown.is_some() {
            eprint!("\r\x1b[2K");
        }
    };
    loop {
        let m = conn.recv::<BrokerMsg>().map_err(|e| {
            clear(&shown);
            broken(&e)
        })?;
        match m {
            BrokerMsg::Pending { request, left_secs } => {
                let line = waiting_line(&request, left_secs);
                if tty {
                    if shown.as_deref() != Some(line.as_str()) {
                        eprint!("\r\x1b[2Kaap: {line}");
                        let _ = std::io::stderr().flush();
                    }
                } else if shown.is_none() {
                    eprintln!("aap: {line}");
                }
                shown = Some(line);
            }
            BrokerMsg::Progress { message } => {
                clear(&shown);
                shown = None;
                eprintln!("aap: {message}");
            }
            BrokerMsg::Notice { text } => {
                clear(&shown);
                shown = None;
                for l in text.lines() {
                    eprintln!("aap: {l}");
                }
            }
            BrokerMsg::Done { code, stdout } => {
                clear(&shown);
                print!("{stdout}");
                return Ok(code);
            }
            BrokerMsg::Error {
                code,
                message,
                hint,
            } => {
                clear(&shown);
                return Err(remote_error(code, message, hint));
            }
            _ => {
                clear(&shown);
                return Err(Error::unavailable("the aap broker answered out of order")
                    .hint("install aap and aap-exec of the same release as the broker"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::scan_socket;

    #[test]
    fn the_socket_is_read_from_the_block_form_only() {
        assert_eq!(scan_socket("catalog: x\n"), Ok(None));
        assert_eq!(
            scan_socket("catalog: x\nbroker:\n  socket: /tmp/b.sock  # here\nagents: {}\n"),
            Ok(Some("/tmp/b.sock".into()))
        );
        assert_eq!(
            scan_socket("broker:\n  max_connections_per_uid: 3\n  socket: \"/a b\"\n"),
            Ok(Some("/a b".into()))
        );
        // Another section's `socket:` is not the broker's.
        assert_eq!(scan_socket("other:\n  socket: /x\n"), Ok(None));
        assert_eq!(scan_socket("broker: { socket: /x }\n"), Err(1));
        assert_eq!(scan_socket("broker:\n  socket: *anchor\n"), Err(2));
    }
}
