//! A broker-run command whose caller is on a terminal gets a pseudo-terminal of its own (as
//! `run0` and sudo's `use_pty` do): the broker keeps the master and relays bytes between it and
//! the caller's terminal, which is in raw mode while the command runs, so ^C and ^Z reach the
//! command through its own terminal's line discipline. The command never holds the caller's
//! terminal: it cannot inject input into it (TIOCSTI) or change its modes.
//!
//! When the command stops (^Z: see [`Terminal::flush_input`]), the broker restores the
//! caller's terminal and tells `aap-exec` ([`BrokerMsg::Stopped`]), which stops itself; its
//! shell's `fg` or `bg` continues it, and its `Continued { foreground }` continues the command.
//! In the foreground the caller's terminal is raw again and its input relayed; in the background
//! (`bg`, or `aap-exec ... &` from the start) the broker leaves the terminal's modes and its input
//! to the caller's shell, and relays only the command's output, as for any background job. A
//! background command that reads its terminal waits until `fg`.
//!
//! Input is relayed without blocking: what the command's terminal cannot take yet (a large paste
//! into a command that is busy writing) waits in a bounded buffer while the command's output
//! keeps flowing, so neither direction can stall the other.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use crate::sys::{self, RawTerminal};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// After the command exits, how long its last output may take to drain from the master.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How often the broker looks whether the command has stopped.
pub(super) const STOP_POLL_MS: i32 = 100;
/// Caller input read but not yet taken by the command's terminal: at most this much, then the
/// caller's input is not read until the command takes some.
const PENDING_MAX: usize = 64 * 1024;

pub(super) struct Terminal {
    master: nix::pty::PtyMaster,
    /// The caller's standard input (a terminal), read and relayed to the master.
    input: OwnedFd,
    /// The caller's terminal the master's output goes to.
    output: OwnedFd,
    /// Present while the caller's terminal is raw by our doing; its drop restores the modes.
    raw: Option<RawTerminal>,
    /// Input read from the caller, not yet written to the master.
    pending: Vec<u8>,
    pub(super) input_open: bool,
    pub(super) master_open: bool,
    pub(super) stopped: bool,
    /// The caller (aap-exec) is its terminal's foreground job: only then is the terminal raw
    /// and its input read.
    foreground: bool,
}

/// When the caller's standard input is a terminal: a pty for the command, its stdio (the slave
/// in place of each of the caller's descriptors that is a terminal) and the relay. Else the
/// caller's stdio as they are, and no relay.
pub(super) fn setup(
    stdio: [OwnedFd; 3],
    owner: u32,
    foreground: bool,
) -> Result<([OwnedFd; 3], Option<Terminal>)> {
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
    // Ours alone (the caller's descriptors keep their flags): reads and writes never block.
    sys::set_nonblocking(&pty.master).map_err(failed)?;
    let cmd_in = pty.slave.try_clone().map_err(failed)?;
    let cmd_out = slave(o)?;
    let cmd_err = slave(e)?;
    let term = Terminal {
        master: pty.master,
        input: i,
        output,
        raw: None,
        pending: Vec::new(),
        input_open: true,
        master_open: true,
        stopped: false,
        foreground,
    };
    Ok(([cmd_in, cmd_out, cmd_err], Some(term)))
}

impl Terminal {
    /// Switch the caller's terminal to raw mode (once the command runs, and only while the
    /// caller is in the foreground). A failure is a note: the relay works, with the caller's
    /// line editing and echo on top.
    pub(super) fn enter_raw(&mut self, notes: &mut Vec<String>) {
        if !self.foreground || self.raw.is_some() {
            return;
        }
        match RawTerminal::enter(&self.input) {
            Ok(r) => self.raw = Some(r),
            Err(e) => notes.push(format!("the caller's terminal stayed in its modes: {e}")),
        }
    }

    /// The descriptor to poll for the caller's input: while it is open, the caller is in the
    /// foreground, the command runs and the pending input has room.
    pub(super) fn input_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (self.input_open
            && self.foreground
            && !self.stopped
            && self.master_open
            && self.pending.len() < PENDING_MAX)
            .then(|| self.input.as_fd())
    }
    /// The master, to poll for the command's output while the command runs.
    pub(super) fn master_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (self.master_open && !self.stopped).then(|| self.master.as_fd())
    }
    /// The master, to poll for room while input is pending.
    pub(super) fn master_write_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (self.master_open && !self.stopped && !self.pending.is_empty()).then(|| self.master.as_fd())
    }

    /// The caller typed: take it, and pass what the command's terminal takes now.
    pub(super) fn relay_input(&mut self, command: u32) {
        let mut buf = [0u8; 4096];
        let room = PENDING_MAX
            .saturating_sub(self.pending.len())
            .min(buf.len());
        if room == 0 {
            return;
        }
        match sys::read_fd(&self.input, &mut buf[..room]) {
            Ok(0) => self.input_open = false,
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.flush_input(command);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.input_open = false,
        }
        buf.fill(0);
    }

    /// Write what the command's terminal takes of the pending input, without blocking. The
    /// suspend key (^Z), once written, also stops the terminal's foreground group (else
    /// `command`'s) with SIGSTOP: the command's session has no process outside its group (its
    /// parent is the broker), so the kernel discards the SIGTSTP its line discipline sends
    /// (POSIX: an orphaned process group is not stopped by terminal signals).
    pub(super) fn flush_input(&mut self, command: u32) {
        while !self.pending.is_empty() && self.master_open {
            match sys::write_fd(&self.master, &self.pending) {
                Ok(0) => break,
                Ok(n) => {
                    let suspend = sys::suspend_key(&self.master)
                        .is_some_and(|k| self.pending[..n].contains(&k));
                    self.pending.drain(..n);
                    if suspend {
                        let group = sys::foreground_group(&self.master).unwrap_or(command);
                        let _ = sys::signal_group(group, sys::SIGSTOP);
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.master_open = false;
                    self.pending.clear();
                }
            }
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
        // Dropped: the modes it had are back, and stay the shell's from now on (a command that
        // ends while stopped or in the background leaves them alone).
        self.raw = None;
    }

    /// The caller was continued, in its terminal's foreground or not (`fg`, `bg`): in the
    /// foreground, raw mode (again) and the window size it has now; in the background, the
    /// terminal's modes are its shell's.
    pub(super) fn resume(&mut self, foreground: bool, notes: &mut Vec<String>) {
        self.stopped = false;
        self.foreground = foreground;
        if foreground {
            self.enter_raw(notes);
            self.resize();
        } else {
            self.raw = None;
        }
    }
}
