//! A broker-run command whose caller is on a terminal gets a pseudo-terminal of its own (as
//! `run0` and sudo's `use_pty` do): the broker keeps the master and relays bytes between it and
//! the caller's terminal, which is in raw mode while the command runs, so ^C and ^Z reach the
//! command through its own terminal's line discipline. The command never holds the caller's
//! terminal: it cannot inject input into it (TIOCSTI) or change its modes.
//!
//! When the command stops (^Z: see [`Terminal::relay_input`]), the broker restores the caller's terminal and tells `aap-exec`
//! ([`BrokerMsg::Stopped`]), which stops itself; its shell's `fg` continues it, and its
//! `Signal { SIGCONT }` puts the terminal back in raw mode and continues the command.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use crate::sys::{self, RawTerminal};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// After the command exits, how long its last output may take to drain from the master.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How often the broker looks whether the command has stopped.
pub(super) const STOP_POLL_MS: i32 = 100;

pub(super) struct Terminal {
    master: nix::pty::PtyMaster,
    /// The caller's standard input (a terminal), read and relayed to the master.
    input: OwnedFd,
    /// The caller's terminal the master's output goes to.
    output: OwnedFd,
    raw: Option<RawTerminal>,
    pub(super) input_open: bool,
    pub(super) master_open: bool,
    pub(super) stopped: bool,
}

/// When the caller's standard input is a terminal: a pty for the command, its stdio (the slave
/// in place of each of the caller's descriptors that is a terminal) and the relay. Else the
/// caller's stdio as they are, and no relay.
pub(super) fn setup(stdio: [OwnedFd; 3], owner: u32) -> Result<([OwnedFd; 3], Option<Terminal>)> {
    if !sys::is_terminal(&stdio[0]) {
        return Ok((stdio, None));
    }
    let failed = |e: std::io::Error| {
        Error::unavailable(format!(
            "cannot make a terminal for the command (a pty): {e}"
        ))
        .hint("check that /dev/pts is mounted and /dev/ptmx opens: ls -l /dev/ptmx /dev/pts; or give the command no terminal on its input: add < /dev/null to the aap-exec command line")
    };
    let pty = sys::open_pty_like(&stdio[0], owner).map_err(failed)?;
    let [i, o, e] = stdio;
    let slave = |fd: OwnedFd| -> Result<OwnedFd> {
        if sys::is_terminal(&fd) {
            pty.slave.try_clone().map_err(failed)
        } else {
            Ok(fd)
        }
    };
    let output = if sys::is_terminal(&o) {
        o.try_clone()
    } else if sys::is_terminal(&e) {
        e.try_clone()
    } else {
        i.try_clone()
    }
    .map_err(failed)?;
    let cmd_in = pty.slave.try_clone().map_err(failed)?;
    let cmd_out = slave(o)?;
    let cmd_err = slave(e)?;
    let term = Terminal {
        master: pty.master,
        input: i,
        output,
        raw: None,
        input_open: true,
        master_open: true,
        stopped: false,
    };
    Ok(([cmd_in, cmd_out, cmd_err], Some(term)))
}

impl Terminal {
    /// Switch the caller's terminal to raw mode (once the command runs). A failure is a note:
    /// the relay works, with the caller's line editing and echo on top.
    pub(super) fn enter_raw(&mut self, notes: &mut Vec<String>) {
        match RawTerminal::enter(&self.input) {
            Ok(r) => self.raw = Some(r),
            Err(e) => notes.push(format!("the caller's terminal stayed in its modes: {e}")),
        }
    }

    /// The descriptors to poll now: the caller's input and the master, while open and the
    /// command is not stopped.
    pub(super) fn input_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (self.input_open && !self.stopped).then(|| self.input.as_fd())
    }
    pub(super) fn master_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (self.master_open && !self.stopped).then(|| self.master.as_fd())
    }

    /// The caller typed: pass it to the command's terminal. The suspend key (^Z) also stops
    /// the terminal's foreground group (else `command`'s) with SIGSTOP: the command's session
    /// has no process outside its group (its parent is the broker), so the kernel discards
    /// the SIGTSTP its line discipline sends (POSIX: an orphaned process group is not stopped
    /// by terminal signals).
    pub(super) fn relay_input(&mut self, command: u32) {
        let mut buf = [0u8; 4096];
        match sys::read_fd(&self.input, &mut buf) {
            Ok(0) => self.input_open = false,
            Ok(n) => {
                if sys::write_all_fd(&self.master, &buf[..n]).is_err() {
                    self.master_open = false;
                }
                if sys::suspend_key(&self.master).is_some_and(|k| buf[..n].contains(&k)) {
                    let group = sys::foreground_group(&self.master).unwrap_or(command);
                    let _ = sys::signal_group(group, sys::SIGSTOP);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.input_open = false,
        }
    }

    /// The command wrote: pass it to the caller's terminal. False when nothing was there.
    pub(super) fn relay_output(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match sys::read_fd(&self.master, &mut buf) {
            Ok(0) => {
                self.master_open = false;
                false
            }
            Ok(n) => {
                // A caller's terminal that is gone loses the output; the command runs on.
                let _ = sys::write_all_fd(&self.output, &buf[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            // EIO: every slave descriptor is closed.
            Err(_) => {
                self.master_open = false;
                false
            }
        }
    }

    /// The command has exited: relay what it wrote last (bounded: a process it left behind
    /// may hold the terminal open and keep writing).
    pub(super) fn drain(&mut self) {
        if sys::set_nonblocking(&self.master).is_err() {
            return;
        }
        let until = Instant::now() + DRAIN_LIMIT;
        while self.master_open && Instant::now() < until {
            match sys::wait_readable(&[self.master.as_fd()], 50) {
                Ok(sys::Ready::Fd(_)) => {
                    if !self.relay_output() {
                        break;
                    }
                }
                _ => break,
            }
        }
    }

    /// The caller's window changed: the command's terminal gets its size (and its foreground
    /// group SIGWINCH from the kernel).
    pub(super) fn resize(&self) {
        let _ = sys::copy_window_size(&self.input, &self.master);
    }

    /// The command stopped: give the caller's terminal back its modes.
    pub(super) fn stop(&mut self) {
        self.stopped = true;
        if let Some(r) = &self.raw {
            let _ = r.restore();
        }
    }

    /// The caller continued: raw mode again, the window size it has now.
    pub(super) fn resume(&mut self) {
        self.stopped = false;
        if let Some(r) = &self.raw {
            let _ = r.raw();
        }
        self.resize();
    }
}
