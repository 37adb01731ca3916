//! Running the child: spawn (never exec over the wrapper: it must outlive the child to tear
//! down and audit), forward signals, wait, and report how it ended.

#![forbid(unsafe_code)]

use crate::error::{Error, Kind, Result};
use crate::sys::Spawned;
use crate::sys::{self, SignalWatch};
use std::os::fd::RawFd;
use std::process::{Command, ExitStatus};

/// How the child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

impl Ended {
    pub fn from_status(st: ExitStatus) -> Ended {
        use std::os::unix::process::ExitStatusExt;
        match (st.code(), st.signal()) {
            (Some(c), _) => Ended::Exited(c),
            (None, Some(s)) => Ended::Signaled(s),
            (None, None) => Ended::Exited(255),
        }
    }
    /// The status a shell shows: the code, or 128+N for signal N.
    pub fn shell_status(self) -> i32 {
        match self {
            Ended::Exited(c) => c,
            Ended::Signaled(s) => 128 + s,
        }
    }
}

/// Spawn `cmd` (its program, arguments and set variables; see `sys::spawn_clean`) with `arg0`
/// as `argv[0]`, an empty signal mask and exactly `inherit` of our descriptors, mapping spawn
/// failures to the contract's 126/127.
pub fn spawn(
    cmd: &Command,
    arg0: &std::ffi::OsStr,
    inherit: &[RawFd],
    shown: &str,
) -> Result<Spawned> {
    sys::spawn_clean(cmd, arg0, inherit).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            Kind::NotFound
        } else {
            Kind::CannotExecute
        };
        Error::new(kind, format!("cannot start {shown}: {e}"))
            .hint(format!("check the program: ls -l {shown}"))
    })
}

/// Wait for `child`, forwarding signals that reach the wrapper (see `sys::should_forward`).
/// `early` are signals that arrived before the child existed: it did not receive them, so they
/// are forwarded whoever sent them. If supervising fails, the child is killed and reaped: it
/// never runs on with a secret and nobody watching.
pub fn supervise(child: &mut Spawned, watch: &SignalWatch, early: &[i32]) -> Result<Ended> {
    for &sig in early {
        let _ = sys::send_signal(child.id(), sig);
    }
    let r = supervise_inner(child, watch);
    if r.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    r
}

fn supervise_inner(child: &mut Spawned, watch: &SignalWatch) -> Result<Ended> {
    let pid = child.id();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| {
            Error::internal(format!("cannot wait for the child (pid {pid}): {e}"))
                .hint("the child was killed; run the command again: aap-exec CAP -- CMD")
        })? {
            return Ok(Ended::from_status(st));
        }
        match watch.next(-1) {
            Ok(Some(c)) if sys::should_forward(&c, pid) => {
                tracing::debug!(
                    signal = c.signo,
                    from = c.pid,
                    "forwarding signal to the child"
                );
                let _ = sys::send_signal(pid, c.signo);
            }
            Ok(Some(c)) => tracing::trace!(signal = c.signo, from = c.pid, "not forwarded"),
            Ok(None) => {}
            Err(e) => return Err(Error::internal(format!("signal watch failed: {e}")).hint("the child was killed; check that signalfd(2) works here and run again: aap-exec CAP -- CMD")),
        }
    }
}

/// Wait for a helper process (ssh-add, the notify command) at most `limit`; on timeout kill it,
/// reap it and return `None`. The wait blocks on a thread and the caller waits on a channel, so
/// the exit is seen at once (no polling interval added to every run).
pub fn wait_timeout(mut ch: std::process::Child, limit: std::time::Duration) -> Option<ExitStatus> {
    let pid = ch.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(ch.wait());
    });
    let r = match rx.recv_timeout(limit) {
        Ok(st) => st.ok(),
        Err(_) => {
            // Still ours to signal: it cannot be reaped until the waiter's wait returns.
            let _ = sys::send_signal(pid, libc::SIGKILL);
            let _ = rx.recv();
            None
        }
    };
    let _ = waiter.join();
    r
}
