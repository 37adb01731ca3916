//! The only module that talks to libc/nix directly. Every `unsafe` block in the crate lives here
//! and carries a `// SAFETY:` comment; every other module is `#![forbid(unsafe_code)]`.
//!
//! What is here: careful opens, process hardening (no core dumps, not ptrace-able by the same
//! user), sealed memfds for secrets, descriptor hygiene for children, a signalfd-based signal
//! watch for forwarding, and re-raising a child's fatal signal on ourselves.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

// ---- files -----------------------------------------------------------------------------------

/// Open `path` read-only without blocking (a FIFO opens at once instead of waiting for a
/// writer), close-on-exec, and optionally without following a final symlink.
pub fn open_read_nonblocking(path: &Path, follow_symlinks: bool) -> io::Result<File> {
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    if !follow_symlinks {
        flags |= libc::O_NOFOLLOW;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
}

/// The errno value that `O_NOFOLLOW` gives for a symlink.
pub fn is_symlink_loop(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ELOOP)
}

/// Whether the real uid may execute `path` (execute bit and permission, as `execve` would).
pub fn can_execute(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
}

// ---- identity --------------------------------------------------------------------------------

pub fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

// ---- hardening -------------------------------------------------------------------------------

/// Before any secret is in memory: no core dumps (RLIMIT_CORE 0) and not dumpable, which also
/// stops other processes of the same user from ptrace-attaching or reading /proc/PID/mem.
pub fn harden_process() -> io::Result<()> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(nix_io)?;
    nix::sys::prctl::set_dumpable(false).map_err(nix_io)?;
    Ok(())
}

/// Whether this process is currently dumpable (for tests and `aap doctor`).
pub fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(true)
}

// ---- secrets in memfds -------------------------------------------------------------------------

/// An anonymous memory file holding `data`, sealed against writes, growth and shrinking (and
/// further sealing), rewound to offset 0, close-on-exec. It never has a name on any filesystem.
pub fn sealed_memfd(name: &CStr, data: &[u8]) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd =
        memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(nix_io)?;
    let mut file = File::from(fd);
    file.write_all(data)?;
    nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekSet).map_err(nix_io)?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(nix_io)?;
    Ok(OwnedFd::from(file))
}

// ---- descriptors for children ------------------------------------------------------------------

/// Mark every descriptor from 3 up close-on-exec in this process, so no child inherits one we
/// did not choose (sudo does the same with closefrom). Descriptors we create are already
/// close-on-exec; this catches those inherited from whoever started us.
pub fn cloexec_from_3() -> io::Result<()> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        {
            if fd >= 3 {
                fds.push(fd);
            }
        }
    }
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD on an integer descriptor touch no memory. A descriptor that
        // closed meanwhile (the read_dir one) fails with EBADF, which we ignore.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Let the child (only) inherit `fds`, keeping their numbers: close-on-exec is cleared between
/// fork and exec, so the wrapper and any other child never hold them open across exec.
pub fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the forked child before exec. It only calls fcntl(2), which
    // is async-signal-safe, and reads `fds`, a Vec allocated before the fork; it allocates
    // nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Have the kernel send `sig` to the child when this process dies (even by SIGKILL). If we are
/// already gone by the time the child runs, the child exits at once.
pub fn die_with_parent(cmd: &mut Command, sig: Signal) {
    let parent = std::process::id() as libc::pid_t;
    let signo = sig as libc::c_int;
    // SAFETY: runs in the forked child before exec; prctl(2), getppid(2) and _exit(2) are
    // async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signo as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

// ---- signals -----------------------------------------------------------------------------------

/// Signals `aap-exec` forwards to its child.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// One signal taken from the signalfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caught {
    pub signo: i32,
    /// Sender pid (0 for the kernel, e.g. a terminal's ^C).
    pub pid: i32,
    /// Sent by a process with kill(2)/sigqueue(2), as opposed to by the kernel.
    pub from_process: bool,
}

/// The forwarded signals and SIGCHLD, blocked in this thread (and so in every thread started
/// later) and read from a signalfd instead: no signal handler ever runs. Children started with
/// std's `Command` get an empty signal mask.
pub struct SignalWatch {
    fd: SignalFd,
}

impl SignalWatch {
    /// Block the signals and open the signalfd. Call first thing in `main`, before any thread.
    pub fn install() -> io::Result<SignalWatch> {
        let mut set = SigSet::empty();
        for s in FORWARDED {
            set.add(s);
        }
        set.add(Signal::SIGCHLD);
        set.thread_block().map_err(nix_io)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(nix_io)?;
        Ok(SignalWatch { fd })
    }

    /// Wait up to `timeout_ms` (-1: forever) for the next signal.
    pub fn next(&self, timeout_ms: i32) -> io::Result<Option<Caught>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        if let Some(c) = self.try_next()? {
            return Ok(Some(c));
        }
        let timeout = if timeout_ms < 0 {
            PollTimeout::NONE
        } else {
            PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX)
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::Error::EINTR) => self.try_next(),
            Err(e) => Err(nix_io(e)),
        }
    }

    /// The next pending signal, without waiting.
    pub fn try_next(&self) -> io::Result<Option<Caught>> {
        match self.fd.read_signal() {
            Ok(Some(si)) => Ok(Some(Caught {
                signo: si.ssi_signo as i32,
                pid: si.ssi_pid as i32,
                from_process: si.ssi_code == libc::SI_USER || si.ssi_code == libc::SI_QUEUE,
            })),
            Ok(None) | Err(nix::Error::EAGAIN) => Ok(None),
            Err(e) => Err(nix_io(e)),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

/// Should a caught signal be forwarded to `child` (which shares our process group)? Not when
/// the kernel sent it (a terminal's ^C/^\ already reached the whole foreground group), and not
/// when it came from a process in the child's own process group (a group-wide kill already
/// reached the child): the rule sudo follows.
pub fn should_forward(c: &Caught, child: u32) -> bool {
    if c.signo == libc::SIGCHLD || !c.from_process {
        return false;
    }
    if c.pid <= 0 {
        return true;
    }
    let sender = nix::unistd::Pid::from_raw(c.pid);
    let child_pgrp = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(child as i32)));
    match (nix::unistd::getpgid(Some(sender)), child_pgrp) {
        (Ok(s), Ok(ch)) => s != ch,
        // The sender is gone: skip only if it was the child itself.
        _ => c.pid != child as i32,
    }
}

/// Send signal number `signo` to `pid`.
pub fn send_signal(pid: u32, signo: i32) -> io::Result<()> {
    let sig = Signal::try_from(signo).map_err(nix_io)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).map_err(nix_io)
}

/// Die the way the child died: default disposition, unblocked, raised. Falls back to exiting
/// 128+N for a signal whose default action does not end the process.
pub fn exit_with_signal(signo: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if let Ok(sig) = Signal::try_from(signo) {
        // SAFETY: installing SIG_DFL does not run any code of ours in signal context, so no
        // async-signal-safety question arises; it replaces std's SIGPIPE ignore as well.
        unsafe {
            let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl);
        }
        let mut set = SigSet::empty();
        set.add(sig);
        let _ = set.thread_unblock();
        let _ = nix::sys::signal::raise(sig);
    }
    std::process::exit(128 + signo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn memfd_is_sealed_and_rewound() {
        let fd = sealed_memfd(c"aap-test", b"hello").unwrap();
        let mut f = File::from(fd);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert!(
            f.write_all(b"x").is_err(),
            "sealed memfd must refuse writes"
        );
        assert!(f.set_len(0).is_err(), "sealed memfd must refuse shrinking");
    }
}
