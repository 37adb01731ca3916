//! The client's side of a broker-run command (`wrapped-command`): hand the broker our standard
//! input, output and error and our working directory (`SCM_RIGHTS`), relay the signals we get,
//! and exit with the command's exact status. We never start the command ourselves. On a
//! terminal, the broker gives the command a pty of its own and relays it; we only follow its
//! stops (^Z) with our own, and tell it when we are continued (`fg`, `bg`), for the shell's job
//! control.

#![forbid(unsafe_code)]

use super::run::Conn;
use crate::error::{Error, Result};
use crate::proto::{BrokerMsg, ClientMsg};
use crate::sys::{self, Ready, SignalWatch};
use std::os::fd::{AsFd, OwnedFd};

/// Send fds 0, 1, 2 and the working directory, with `TERM` and `LANG`/`LC_*` (the broker keeps
/// only plain values).
pub fn send_stdio(conn: &Conn) -> Result<()> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned().map_err(|e| {
            Error::internal(format!(
                "cannot pass our standard {what} to the broker: {e}"
            ))
            .hint("run aap-exec with its standard input, output and error open, e.g. < /dev/null")
        })
    };
    let stdin = dup(std::io::stdin().as_fd(), "input")?;
    let stdout = dup(std::io::stdout().as_fd(), "output")?;
    let stderr = dup(std::io::stderr().as_fd(), "error")?;
    let cwd: OwnedFd = sys::open_cwd().map_err(|e| {
        Error::internal(format!(
            "cannot open the working directory for the broker: {e}"
        ))
        .hint("cd to a directory that exists, then run the command again")
    })?;
    let term = std::env::var("TERM").ok();
    let locale: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k == "LANG" || k.starts_with("LC_"))
        .collect();
    conn.send(
        &ClientMsg::Stdio {
            term,
            locale,
            foreground: sys::in_foreground(),
        },
        &[&stdin, &stdout, &stderr, &cwd],
    )
    .map_err(|e| crate::client::broken(&e))
}

/// How often a caller in the background looks whether its shell's `fg` has made it the
/// foreground job (a running job brought to the foreground gets no signal).
const FOREGROUND_POLL_MS: i32 = 100;

/// Pass the signals taken to the broker: a SIGCONT as [`ClientMsg::Continued`] (whether we are
/// in the foreground now, which `background` then records), the others to relay. Whether a
/// SIGCONT was among them.
fn relay_signals(conn: &Conn, watch: &SignalWatch, background: &mut bool) -> bool {
    let mut continued = false;
    while let Ok(Some(c)) = watch.try_next() {
        let msg = match c.signo {
            sys::SIGCHLD => continue,
            sys::SIGCONT => {
                continued = true;
                let foreground = sys::in_foreground();
                *background = !foreground;
                ClientMsg::Continued { foreground }
            }
            signo => ClientMsg::Signal { signo },
        };
        let _ = conn.send(&msg, &[]);
    }
    continued
}

/// Wait for the broker's command to end, relaying signals; exit as it did.
pub fn wait(conn: &mut Conn, watch: &SignalWatch) -> Result<u8> {
    // `fg` and `bg` of a stopped job continue us with SIGCONT: the broker must hear of it.
    watch.also_continue().map_err(|e| {
        Error::internal(format!("cannot watch for SIGCONT: {e}"))
            .hint("check that signalfd(2) works here, then run the command again")
    })?;
    // In the background (`bg`, or started with `&`) the broker leaves our terminal alone; a
    // shell's `fg` of a running job sends no signal, so look every so often.
    let mut background = !sys::in_foreground();
    loop {
        if !conn.has_buffered() {
            let timeout = if background { FOREGROUND_POLL_MS } else { -1 };
            match sys::wait_readable(&[conn.sock().as_fd(), watch.as_fd()], timeout) {
                Ok(Ready::Fd(1)) => {
                    relay_signals(conn, watch, &mut background);
                    continue;
                }
                Ok(Ready::Timeout) => {
                    if sys::in_foreground() {
                        background = false;
                        let _ = conn.send(&ClientMsg::Continued { foreground: true }, &[]);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::internal(format!("cannot wait for the broker: {e}"))
                        .hint("run the command again"));
                }
            }
        }
        match conn.recv::<BrokerMsg>() {
            Ok(BrokerMsg::Progress { message }) => eprintln!("aap-exec: {message}"),
            Ok(BrokerMsg::Notice { text }) => eprint!("{text}"),
            Ok(BrokerMsg::Error {
                code,
                message,
                hint,
            }) => return Err(crate::client::remote_error(code, message, hint)),
            Ok(BrokerMsg::Stopped {}) => {
                // The command stopped on its terminal (^Z) and ours has its modes back: stop
                // too, as ^Z stops any program, so that our shell's job control takes over.
                // Its `fg` or `bg` continues us, and the SIGCONT tells the broker which.
                sys::suspend_self();
                if !relay_signals(conn, watch, &mut background) {
                    // No SIGCONT: the SIGTSTP was discarded (an orphaned process group, which
                    // no shell's job control can continue); a SIGSTOP always stops.
                    sys::stop_self();
                    relay_signals(conn, watch, &mut background);
                }
            }
            Ok(BrokerMsg::Exited { code, signal }) => {
                if let Some(s) = signal {
                    sys::exit_with_signal(s);
                }
                return Ok(code.unwrap_or(70).clamp(0, 255) as u8);
            }
            Ok(_) => {
                return Err(Error::unavailable("the aap broker answered out of order")
                    .hint("install aap and aap-exec of the same release as the broker"));
            }
            Err(e) => return Err(crate::client::broken(&e)),
        }
    }
}
