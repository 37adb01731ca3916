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
    // One call on Linux 5.11 and later.
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors; it
    // reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(e);
    }
    // Older kernels: each open descriptor, from /proc.
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
        // closed meanwhile (the read_dir one) fails F_GETFD with EBADF, which is fine; failing
        // to set the flag on an open descriptor is an error: it would leak into the child.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// A child started by [`spawn_clean`]; reaped by [`Spawned::try_wait`] or [`Spawned::wait`].
#[derive(Debug)]
pub struct Spawned {
    pid: libc::pid_t,
    status: Option<std::process::ExitStatus>,
}

/// Start `cmd`'s program with posix_spawn(3): glibc does it with `CLONE_VM | CLONE_VFORK`, so
/// this process's page tables are not copied (std's `Command` forks whenever a `pre_exec` hook
/// is set, and the two hooks this needs, an empty signal mask and inherited descriptors, are
/// done here by the spawn attributes instead). What is used of `cmd`: its program, its
/// arguments, and the variables set on it, which are the child's whole environment (callers
/// `env_clear()` first); not its working directory or stdio (both are this process's).
/// `arg0` is the child's `argv[0]`. The child gets an empty signal mask and `SIGPIPE` at its
/// default (as std's children do), and of this process's close-on-exec descriptors exactly
/// `inherit`, at the same numbers (a `dup2` of a descriptor onto itself clears its
/// close-on-exec flag in the child, as POSIX.1-2024 and glibc specify). The copies of the
/// environment made here (it may hold an `env` secret) are wiped before this returns.
pub fn spawn_clean(
    cmd: &Command,
    arg0: &std::ffi::OsStr,
    inherit: &[RawFd],
) -> io::Result<Spawned> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
    use std::os::unix::ffi::OsStrExt;
    use zeroize::Zeroizing;
    let nul = |b: &[u8]| -> io::Result<Zeroizing<Vec<u8>>> {
        if b.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an argument or variable contains a NUL byte",
            ));
        }
        let mut v = Zeroizing::new(Vec::with_capacity(b.len() + 1));
        v.extend_from_slice(b);
        v.push(0);
        Ok(v)
    };
    let program = nul(cmd.get_program().as_bytes())?;
    let mut argv = vec![nul(arg0.as_bytes())?];
    for a in cmd.get_args() {
        argv.push(nul(a.as_bytes())?);
    }
    let mut envp = Vec::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let mut kv = Zeroizing::new(Vec::with_capacity(k.len() + v.len() + 1));
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(nul(&kv)?);
        }
    }
    fn cstr(v: &Zeroizing<Vec<u8>>) -> io::Result<&CStr> {
        CStr::from_bytes_with_nul(v)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interior NUL byte"))
    }
    let program = cstr(&program)?;
    let argv = argv
        .iter()
        .map(|v| cstr(v))
        .collect::<io::Result<Vec<&CStr>>>()?;
    let envp_c = envp
        .iter()
        .map(|v| cstr(v))
        .collect::<io::Result<Vec<&CStr>>>()?;

    let mut attr = PosixSpawnAttr::init().map_err(nix_io)?;
    attr.set_sigmask(&SigSet::empty()).map_err(nix_io)?;
    // SIGPIPE back at the default (std ignores it in this process, and std's children get it
    // back too). glibc's posix_spawn leaves its two internal signals (32, 33) ignored in the
    // child whatever this set says, as in every posix_spawn of glibc (std's `Command` without
    // a pre_exec hook, Python's): programs that use them install their own handlers.
    let mut dfl = SigSet::empty();
    dfl.add(Signal::SIGPIPE);
    attr.set_sigdefault(&dfl).map_err(nix_io)?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(nix_io)?;
    let mut actions = PosixSpawnFileActions::init().map_err(nix_io)?;
    for &fd in inherit {
        actions.add_dup2(fd, fd).map_err(nix_io)?;
    }
    let pid = nix::spawn::posix_spawn(program, &actions, &attr, &argv, &envp_c).map_err(nix_io)?;
    Ok(Spawned {
        pid: pid.as_raw(),
        status: None,
    })
}

impl Spawned {
    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<std::process::ExitStatus>> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(st) = self.status {
            return Ok(Some(st));
        }
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid(2) on our own child, writing its status into a local c_int.
            let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            if r == -1 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            let st = std::process::ExitStatus::from_raw(status);
            self.status = Some(st);
            return Ok(Some(st));
        }
    }

    /// Its status if it has ended (and reaps it), without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    /// Wait for it to end, and reap it.
    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        loop {
            if let Some(st) = self.reap(0)? {
                return Ok(st);
            }
        }
    }

    /// SIGKILL it, unless it is reaped already (its pid may name another process then).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL)
            .map_err(nix_io)
    }
}

/// Give the child an empty signal mask. `SignalWatch` blocks the forwarded signals in this
/// process and a forked child inherits that mask across exec: a helper such as ssh-agent would
/// then never receive its parent-death SIGTERM (it stays pending), and a child could not be
/// stopped with SIGTERM/SIGINT.
pub fn unblock_signals_in_child(cmd: &mut Command) {
    // SAFETY: runs in the forked child before exec. sigemptyset(3) fills a stack sigset_t and
    // sigprocmask(2) is async-signal-safe; nothing is allocated and no lock is taken.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) == -1 {
                return Err(io::Error::last_os_error());
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
        let set = watched_set();
        set.thread_block().map_err(nix_io)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(nix_io)?;
        Ok(SignalWatch { fd })
    }

    /// The broker's: SIGTERM, SIGINT and SIGHUP, blocked in this thread (and so in every
    /// thread started later) and read from the signalfd, so that stopping runs its shutdown
    /// (revoking the tokens it holds) instead of ending the process in the middle. Call before
    /// any other thread exists.
    pub fn install_stop() -> io::Result<SignalWatch> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(s);
        }
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

    /// Also take SIGCONT from the signalfd (a broker-run command's caller tells the broker when
    /// it is continued, in the foreground or not). Blocking SIGCONT does not keep it from
    /// continuing this process; it only queues the signal here.
    pub fn also_continue(&self) -> io::Result<()> {
        let mut set = watched_set();
        set.add(Signal::SIGCONT);
        set.thread_block().map_err(nix_io)?;
        self.fd.set_mask(&set).map_err(nix_io)
    }
}

/// What `aap-exec`'s [`SignalWatch`] takes: the signals it forwards, and SIGCHLD.
fn watched_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

impl AsFd for SignalWatch {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
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

/// Create `path` exclusively (it must not exist; a symlink in its place is an error too), for
/// writing, close-on-exec, with `mode` (before umask).
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
}

/// Open (creating with `mode` if missing) a log file for reading and appending. A final symlink
/// is refused (`O_NOFOLLOW`), so a planted link cannot redirect the audit log.
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
}

/// Which `flock(2)` lock to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// Try once to take a `flock(2)` lock without blocking. `Ok(false)` means another process holds
/// a conflicting lock.
pub fn try_flock(file: &File, kind: LockKind) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock takes a file descriptor and an operation flag; the descriptor is owned by
        // `file`, which outlives this call, and flock touches no memory of ours.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Take a `flock(2)` lock, waiting at most `timeout` (polling with a short back-off, so a
/// stopped process that holds the lock cannot hang us forever). `Ok(false)` on timeout.
pub fn flock_timeout(
    file: &File,
    kind: LockKind,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(50);
    loop {
        if try_flock(file, kind)? {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(10));
    }
}

/// Release a `flock(2)` lock (closing the file releases it too).
pub fn funlock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: as in `try_flock`: a valid owned descriptor and a flag, no memory involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fsync a file's data (and the metadata needed to read it back).
pub fn fsync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// fsync a directory, so that a rename or unlink inside it survives a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(dir)?;
    d.sync_all()
}

/// `bytes` random bytes ([`random_bytes`]) as lower-case hex: names no one can guess.
pub fn random_hex(bytes: usize) -> io::Result<String> {
    let mut r = vec![0u8; bytes];
    random_bytes(&mut r)?;
    Ok(r.iter().map(|b| format!("{b:02x}")).collect())
}

/// Fill `buf` from the kernel's CSPRNG (`getrandom(2)`), for ULIDs and temporary names.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable, exclusively borrowed
        // slice; getrandom writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// This machine's host name (`gethostname(2)`), lossily decoded.
pub fn hostname() -> io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, a live writable array; gethostname writes at
    // most `buf.len()` bytes, and we terminate the read at the first NUL or the end of the array.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The real uid of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::getuid() }
}

static CALLER_TZ: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();

/// Call first thing in `main`, while the process has one thread: take `TZ` out of our own
/// environment, so that the caller (an agent) cannot shift how `valid-after`/`valid-before`
/// times without a `Z` are read (mktime(3) honours `TZ`); the system zone (/etc/localtime)
/// applies. The caller's value is kept for the child ([`caller_tz`]).
pub fn pin_timezone() {
    let tz = std::env::var_os("TZ");
    if tz.is_some() {
        // SAFETY: called at the top of `main`, before any thread exists, so nothing can read
        // or write the environment concurrently.
        unsafe { std::env::remove_var("TZ") };
    }
    let _ = CALLER_TZ.set(tz);
}

/// The caller's `TZ`, as it was before [`pin_timezone`].
pub fn caller_tz() -> Option<&'static std::ffi::OsStr> {
    CALLER_TZ.get().and_then(|t| t.as_deref())
}

/// Seconds since the epoch of a local civil time (`mktime(3)`, honouring TZ), as OpenSSH reads
/// `valid-after`/`valid-before` without a `Z`. `None` when the time does not exist.
pub fn local_to_unix(
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
) -> Option<i64> {
    // SAFETY: `tm` is a plain C struct of integers (and, on glibc, a pointer that may be null);
    // all-zero bytes are a valid value for it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = year - 1900;
    tm.tm_mon = month as i32 - 1;
    tm.tm_mday = day as i32;
    tm.tm_hour = hour as i32;
    tm.tm_min = min as i32;
    tm.tm_sec = sec as i32;
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a valid, exclusively borrowed `struct tm` for the duration of the call;
    // mktime only reads and normalizes it (and reads the process's time zone settings).
    let t = unsafe { libc::mktime(&mut tm) };
    if t == -1 { None } else { Some(t) }
}

/// Block SIGINT, SIGTERM and SIGHUP in the calling thread, so that threads it spawns afterwards
/// inherit the mask and [`wait_for_termination`] can take the signal synchronously.
pub fn block_termination_signals() -> io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(io::Error::from)
}

/// Wait until SIGINT, SIGTERM or SIGHUP arrives (after [`block_termination_signals`]); returns
/// the signal's number.
pub fn wait_for_termination() -> io::Result<i32> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.wait().map(|s| s as i32).map_err(io::Error::from)
}

/// The largest resident set size (KiB) among this process's waited-for descendants.
/// Minor page faults of the waited-for children so far (`getrusage(RUSAGE_CHILDREN)`).
pub fn children_minor_faults() -> io::Result<u64> {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(nix_io)?;
    Ok(u.minor_page_faults().max(0) as u64)
}

pub fn children_peak_rss_kib() -> io::Result<u64> {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(nix_io)?;
    Ok(u.max_rss().max(0) as u64)
}

/// The user name and every group id (primary and supplementary) of `uid`, from the passwd and
/// group databases; `None` when `uid` has no passwd entry.
pub fn user_groups(uid: u32) -> io::Result<Option<(String, Vec<u32>)>> {
    use nix::unistd::{Uid, User, getgrouplist};
    let Some(user) = User::from_uid(Uid::from_raw(uid)).map_err(nix_io)? else {
        return Ok(None);
    };
    let name = std::ffi::CString::new(user.name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "user name holds a NUL"))?;
    let groups = getgrouplist(&name, user.gid).map_err(nix_io)?;
    Ok(Some((
        user.name,
        groups.into_iter().map(|g| g.as_raw()).collect(),
    )))
}

/// Whether the passwd database has a user named `name`.
pub fn user_exists(name: &str) -> io::Result<bool> {
    nix::unistd::User::from_name(name)
        .map(|u| u.is_some())
        .map_err(nix_io)
}

/// The `a` attribute of chattr(1) (FS_APPEND_FL in linux/fs.h).
const FS_APPEND_FL: libc::c_int = 0x20;

/// Whether `path` carries the append-only attribute (`chattr +a`): no process, root included,
/// can truncate, rewrite, rename or unlink it until the attribute is removed. Symlinks are not
/// followed. File systems without attributes answer `Err` (ENOTTY/EOPNOTSUPP).
pub fn is_append_only(path: &Path) -> io::Result<bool> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    // The request is declared with `long`, but the kernel reads and writes an `int`.
    let mut flags: libc::c_int = 0;
    // SAFETY: `f` is an open descriptor for the call's duration; FS_IOC_GETFLAGS writes one
    // `int` (what the kernel's ioctl_getflags copies out) into `flags`, a live local `int`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & FS_APPEND_FL != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// What `spawn_clean` promises the exec path's child: an empty signal mask though the
    /// spawning thread blocks SIGTERM, `argv[0]` as given, exactly the variables set on the
    /// Command, exactly the listed descriptors (a second close-on-exec pipe stays closed), and
    /// SIGPIPE at its default; then its exit status, reaped.
    #[test]
    fn spawn_clean_gives_an_empty_mask_the_named_fds_and_only_the_set_environment() {
        let (mut r, w) = std::io::pipe().unwrap();
        let (_r2, w2) = std::io::pipe().unwrap();
        let (wfd, w2fd) = (w.as_raw_fd(), w2.as_raw_fd());
        // Through /proc, not `>&N`: dash takes one digit there, and with other tests' sockets
        // open the pipe's number is often 10 or more.
        let script = format!(
            "exec >/proc/self/fd/{wfd}; grep -E '^(SigBlk|SigIgn):' /proc/self/status; echo \"argv0=$0\"; tr '\\0' '\\n' </proc/$$/environ; \
             if [ -e /proc/self/fd/{w2fd} ]; then echo leaked; else echo closed; fi; exit 7"
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.env_clear().env("FOO", "bar").arg("-c").arg(&script);
        // Only this thread's mask: the child inherits the spawning thread's.
        let mut term = SigSet::empty();
        term.add(Signal::SIGTERM);
        term.thread_block().unwrap();
        let spawned = spawn_clean(&cmd, std::ffi::OsStr::new("my-name"), &[wfd]);
        term.thread_unblock().unwrap();
        let mut child = spawned.unwrap();
        drop(w);
        drop(w2);
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(7), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let ign = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(
            ign & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE ignored: {out}"
        );
        assert!(out.contains("argv0=my-name\nFOO=bar\nclosed"), "{out}");
        // Reaped once: the status stays, and kill does not reach a reused pid.
        assert_eq!(child.try_wait().unwrap().and_then(|s| s.code()), Some(7));
        child.kill().unwrap();
    }

    #[test]
    fn spawn_clean_reports_a_missing_program_as_not_found() {
        let cmd = Command::new("/nonexistent/aap-test-program");
        let e = spawn_clean(&cmd, std::ffi::OsStr::new("x"), &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

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

    /// Resident KiB of the mapping of this process that holds `addr`, from /proc/self/smaps.
    fn resident_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            let first = l.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(v) = l.strip_prefix("Rss:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn release_stack_below_here_gives_back_dead_frames_and_the_stack_still_works() {
        #[inline(never)]
        fn deep(n: u8) -> u64 {
            let mut a = [0u8; 256 * 1024];
            for (i, b) in a.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(n);
            }
            std::hint::black_box(&mut a);
            a.iter().map(|&b| u64::from(b)).sum()
        }
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(|| {
                let first = deep(3);
                let marker = 0u8;
                let here = std::hint::black_box(&marker) as *const u8 as usize;
                let before = resident_kib_at(here);
                let released = release_stack_below_here().unwrap();
                let after = resident_kib_at(here);
                assert!(released >= 256 * 1024, "released only {released} bytes");
                assert!(
                    before >= after + 200,
                    "the stack's resident size went from {before} KiB to {after} KiB"
                );
                // The released pages come back (zeroed) when the stack grows again.
                assert_eq!(deep(3), first);
                assert!(resident_kib_at(here) >= after + 200);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}

// ---- the broker's socket: peers, descriptors, pidfds -------------------------------------------

/// The peer of a Unix socket connection, as the kernel recorded it when the peer connected
/// (`SO_PEERCRED`): nothing the peer sends can change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

pub fn peer_cred(sock: &impl AsFd) -> io::Result<PeerCred> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let c = getsockopt(sock, PeerCredentials).map_err(nix_io)?;
    if c.pid() <= 0 {
        return Err(io::Error::other(
            "the peer has no pid (it is in another pid namespace)",
        ));
    }
    Ok(PeerCred {
        uid: c.uid(),
        gid: c.gid(),
        pid: c.pid() as u32,
    })
}

/// `fd` as a listening Unix stream socket, or why it is not one: it must be a socket
/// (`SO_DOMAIN` answers), of family `AF_UNIX`, type `SOCK_STREAM` (`SO_TYPE`), and listening
/// (`SO_ACCEPTCONN`). For a descriptor a peer sent (the agent socket `aap-exec` hands the
/// broker); anything else is refused, and `fd` is closed with the error.
pub fn unix_listener(fd: OwnedFd) -> io::Result<std::os::unix::net::UnixListener> {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (the size of `domain`, a live, exclusively
    // borrowed c_int) and the new length into `len`; `fd` is open for the call's duration.
    // nix has no wrapper for SO_DOMAIN.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&raw mut domain).cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            return refuse("it is not a socket".into());
        }
        return Err(e);
    }
    if domain != libc::AF_UNIX {
        let name = match domain {
            libc::AF_INET => "AF_INET",
            libc::AF_INET6 => "AF_INET6",
            libc::AF_NETLINK => "AF_NETLINK",
            _ => "another family",
        };
        return refuse(format!(
            "it is a socket of family {domain} ({name}), not AF_UNIX"
        ));
    }
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => {
            return refuse(format!(
                "it is a Unix socket of type {t:?}, not SOCK_STREAM"
            ));
        }
        Err(e) => return refuse(format!("its socket type is not SOCK_STREAM ({e})")),
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(nix_io)? {
        return refuse(
            "it is a Unix stream socket that is not listening (a connected or unbound one)".into(),
        );
    }
    Ok(std::os::unix::net::UnixListener::from(fd))
}

/// Shut a socket down both ways. On a listening Unix socket this refuses every later
/// `connect(2)` at once (`ECONNREFUSED`), before its last descriptor is closed, and wakes a
/// thread that polls it.
pub fn shut_down(sock: &impl AsFd) -> io::Result<()> {
    use nix::sys::socket::{Shutdown, shutdown};
    shutdown(sock.as_fd().as_raw_fd(), Shutdown::Both).map_err(nix_io)
}

/// Send all of `data` on a Unix stream socket, with `fds` attached to its first byte
/// (`SCM_RIGHTS`). The receiver gets its own copies of the descriptors.
pub fn send_with_fds(sock: &impl AsFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let mut sent = 0;
    while sent < data.len() {
        let iov = [io::IoSlice::new(&data[sent..])];
        let cmsgs_storage;
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !fds.is_empty() {
            cmsgs_storage = [ControlMessage::ScmRights(fds)];
            &cmsgs_storage
        } else {
            &[]
        };
        match sendmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(nix_io(e)),
        }
    }
    Ok(())
}

/// At most this many descriptors arrive with one message.
pub const MAX_FDS_PER_MESSAGE: usize = 8;

/// The kernel's limit on descriptors in one `sendmsg` (`SCM_MAX_FD`). One `recvmsg` on a
/// stream socket returns the descriptors of at most one `sendmsg`, so a control buffer this
/// large is never truncated: every descriptor a peer sends is received, and closed when unwanted.
const SCM_MAX_FD: usize = 253;

/// Read up to `buf.len()` bytes from a Unix stream socket; descriptors that arrive with them
/// (`SCM_RIGHTS`) are appended to `fds`, close-on-exec. Returns 0 at end of stream. More than
/// [`MAX_FDS_PER_MESSAGE`] with one message is an error; they are closed, none leaks.
pub fn recv_with_fds(
    sock: &impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd;
    // A truncated control buffer would leave descriptors the kernel installed in our table
    // unreachable (nix does not iterate a truncated buffer): a leak a hostile peer could repeat
    // until accept(2) fails with EMFILE. Room for SCM_MAX_FD rules truncation out.
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(io::Error::other(
                        "the peer's control message was truncated (more descriptors than the kernel allows in one message)",
                    ));
                }
                let mut got: Vec<OwnedFd> = Vec::new();
                for c in msg.cmsgs().map_err(nix_io)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in our table for us
                            // (SCM_RIGHTS); nothing else owns it, so taking ownership is sound.
                            got.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                if got.len() > MAX_FDS_PER_MESSAGE {
                    // `got` is dropped: every one of them is closed.
                    return Err(io::Error::other(format!(
                        "the peer sent {} descriptors with one message, more than {MAX_FDS_PER_MESSAGE}",
                        got.len()
                    )));
                }
                fds.append(&mut got);
                return Ok(msg.bytes);
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(nix_io(e)),
        }
    }
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+): it names that one process even after the pid
/// is reused, and becomes readable when the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// What [`wait_readable`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// The descriptor at this index of the slice is readable (or hung up).
    Fd(usize),
    /// The timeout passed.
    Timeout,
}

/// Wait until one of `fds` is readable or hung up, at most `timeout_ms` (-1: forever).
pub fn wait_readable(fds: &[std::os::fd::BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Ready> {
    let fds: Vec<_> = fds.iter().map(|fd| (*fd, Want::Read)).collect();
    wait_ready(&fds, timeout_ms)
}

/// What [`wait_ready`] waits for on one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Read,
    Write,
}

/// Wait until one of `fds` is ready as asked (or hung up, or in error), at most `timeout_ms`
/// (-1: forever). A descriptor may be listed twice, once for each.
pub fn wait_ready(
    fds: &[(std::os::fd::BorrowedFd<'_>, Want)],
    timeout_ms: i32,
) -> io::Result<Ready> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, want)| {
            let ev = match want {
                Want::Read => PollFlags::POLLIN,
                Want::Write => PollFlags::POLLOUT,
            };
            PollFd::new(*fd, ev)
        })
        .collect();
    let timeout = if timeout_ms < 0 {
        PollTimeout::NONE
    } else {
        PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX)
    };
    loop {
        match poll(&mut pfds, timeout) {
            Ok(0) => return Ok(Ready::Timeout),
            Ok(_) => {
                for (i, p) in pfds.iter().enumerate() {
                    if p.revents().is_some_and(|r| !r.is_empty()) {
                        return Ok(Ready::Fd(i));
                    }
                }
                return Ok(Ready::Timeout);
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(nix_io(e)),
        }
    }
}

/// The descriptors systemd passed us by socket activation (`LISTEN_PID`/`LISTEN_FDS`, starting
/// at 3), when they are meant for this process; the variables are removed either way so that no
/// child inherits them. Only the first is returned: the broker listens on one socket.
pub fn listen_fd() -> io::Result<Option<std::os::unix::net::UnixListener>> {
    use std::os::fd::FromRawFd;
    let pid = std::env::var("LISTEN_PID").ok();
    let n = std::env::var("LISTEN_FDS").ok();
    // SAFETY: called at start-up, before the broker starts any thread, so no other thread reads
    // the environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(n)) = (pid, n) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: i32 = n
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("LISTEN_FDS={n:?} is not a number")))?;
    if n < 1 {
        return Ok(None);
    }
    if n > 1 {
        return Err(io::Error::other(format!(
            "systemd passed {n} sockets; the broker listens on exactly one (ListenStream= once in aap-broker.socket)"
        )));
    }
    const FIRST: RawFd = 3;
    // SAFETY: fstat on an integer descriptor writes only into `st`, which we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(FIRST, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other(
            "descriptor 3 from systemd is not a socket (check aap-broker.socket)",
        ));
    }
    // SAFETY: systemd handed descriptor 3 to this process (LISTEN_PID is ours) and nothing else
    // in it owns the descriptor; we take ownership once.
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(FIRST) };
    // SAFETY: F_SETFD on a descriptor we own touches no memory.
    unsafe { libc::fcntl(FIRST, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(l))
}

// ---- terminals -------------------------------------------------------------------------------

/// A terminal switched to key-at-a-time input without echo or signal keys (`ICANON`, `ECHO` and
/// `ISIG` off: Ctrl-C arrives as a key, so the caller quits through its own path and the drop
/// restores the terminal), restored on drop. For `aap requests --watch`.
pub struct KeyTerminal {
    tty: File,
    saved: nix::sys::termios::Termios,
}

impl KeyTerminal {
    /// Switch the terminal on stdin; an error when stdin is not a terminal.
    pub fn enter() -> io::Result<KeyTerminal> {
        use nix::sys::termios::{
            LocalFlags, SetArg, SpecialCharacterIndices, tcgetattr, tcsetattr,
        };
        let tty = File::from(io::stdin().as_fd().try_clone_to_owned()?);
        let saved = tcgetattr(&tty).map_err(nix_io)?;
        let mut t = saved.clone();
        t.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
        t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        tcsetattr(&tty, SetArg::TCSANOW, &t).map_err(nix_io)?;
        Ok(KeyTerminal { tty, saved })
    }

    /// The keys typed within `timeout_ms` (empty when none): one read of what is there.
    pub fn keys(&mut self, timeout_ms: i32) -> io::Result<Vec<u8>> {
        use std::io::Read;
        match wait_readable(&[self.tty.as_fd()], timeout_ms)? {
            Ready::Timeout => Ok(Vec::new()),
            Ready::Fd(_) => {
                let mut buf = [0u8; 64];
                let n = self.tty.read(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the terminal closed",
                    ));
                }
                Ok(buf[..n].to_vec())
            }
        }
    }

    /// Read one line with the terminal's usual editing and echo, then go back to keys.
    pub fn line(&mut self) -> io::Result<String> {
        use nix::sys::termios::{SetArg, tcgetattr, tcsetattr};
        use std::io::Read;
        let keys = tcgetattr(&self.tty).map_err(nix_io)?;
        tcsetattr(&self.tty, SetArg::TCSANOW, &self.saved).map_err(nix_io)?;
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        let r = loop {
            match self.tty.read(&mut b) {
                Ok(0) => break Ok(()),
                Ok(_) if b[0] == b'\n' => break Ok(()),
                Ok(_) => out.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
            if out.len() > 4096 {
                break Ok(());
            }
        };
        tcsetattr(&self.tty, SetArg::TCSANOW, &keys).map_err(nix_io)?;
        r.map(|()| {
            String::from_utf8_lossy(&out)
                .trim_end_matches('\r')
                .to_owned()
        })
    }
}

impl Drop for KeyTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            &self.tty,
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// Give back the pages of this thread's stack below the caller's frame (less a margin for the
/// calls made from here): the deep frames of work that is over (a TLS request, the catalog
/// load) stay resident otherwise, and a broker thread that then holds an open run for hours
/// keeps them. The pages come back zero-filled if the stack grows again. Returns the bytes
/// released. Not for the main thread (its stack's bounds come from `/proc/self/maps`).
pub fn release_stack_below_here() -> io::Result<usize> {
    const MARGIN: usize = 2048;
    let page = 4096usize;
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np initializes `attr` for the calling thread (pthread_self() is
    // always valid for the caller); on success it must be destroyed, which we do below.
    let rc = unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialized by the successful call above; the out-pointers are our
    // own locals. The attribute object is destroyed exactly once, after its last use.
    let rc = unsafe {
        let rc = libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        rc
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let low = (addr as usize).div_ceil(page) * page;
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let high = here.saturating_sub(MARGIN) & !(page - 1);
    if high <= low || here > addr as usize + size {
        return Ok(0);
    }
    // SAFETY: [low, high) lies inside this thread's own stack mapping (between its lowest
    // address and MARGIN below a local of this frame). The stack grows down, so that range
    // holds only the frames of calls that have returned; the calls made from here (madvise's
    // wrapper) use far less than MARGIN. No other thread uses this stack, and a signal handler
    // runs only after the call returns, on pages that then read as zero, which a fresh frame
    // never relies on. MADV_DONTNEED on a private anonymous mapping frees the pages; the next
    // touch maps a zero page.
    let rc = unsafe { libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(high - low)
}

// ---- broker-run commands (wrapped-command) -----------------------------------------------------

/// The user a broker-run command starts as, from the passwd and group databases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Every group of the user (primary and supplementary), as `initgroups(3)` would set.
    pub groups: Vec<u32>,
    pub home: std::path::PathBuf,
    pub shell: std::path::PathBuf,
}

fn run_as_of(user: nix::unistd::User) -> io::Result<RunAs> {
    let name = std::ffi::CString::new(user.name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "user name holds a NUL"))?;
    let groups = nix::unistd::getgrouplist(&name, user.gid).map_err(nix_io)?;
    Ok(RunAs {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
        home: user.dir,
        shell: user.shell,
    })
}

/// The passwd entry of user `name`, with its groups; `None` when there is none.
pub fn user_by_name(name: &str) -> io::Result<Option<RunAs>> {
    match nix::unistd::User::from_name(name).map_err(nix_io)? {
        Some(u) => run_as_of(u).map(Some),
        None => Ok(None),
    }
}

/// The passwd entry of `uid`, with its groups; `None` when there is none.
pub fn user_by_uid(uid: u32) -> io::Result<Option<RunAs>> {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).map_err(nix_io)? {
        Some(u) => run_as_of(u).map(Some),
        None => Ok(None),
    }
}

/// CAP_SETGID and CAP_SETUID (capability numbers 6 and 7) in the effective set of this process,
/// read from `/proc/self/status`.
fn has_setid_capabilities() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let want = (1u64 << 6) | (1u64 << 7);
    eff & want == want
}

/// Whether this process can start a child as `target`: it is that user already (uid, primary
/// group), or it holds CAP_SETUID and CAP_SETGID (root, or the systemd drop-in's ambient
/// capabilities).
pub fn can_switch_to(target: &RunAs) -> bool {
    let same = nix::unistd::geteuid().as_raw() == target.uid
        && nix::unistd::getuid().as_raw() == target.uid
        && nix::unistd::getegid().as_raw() == target.gid;
    same || has_setid_capabilities()
}

/// This process's working directory as an `O_PATH` descriptor (no read permission needed), for
/// a broker-run command to start in: `fchdir(2)` into it checks search permission as the user
/// the command runs as.
pub fn open_cwd() -> io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(".")
        .map(OwnedFd::from)
}

/// Whether the descriptor is an open directory (what `open_cwd` sends).
pub fn is_directory_fd(fd: &impl AsFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd())
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .unwrap_or(false)
}

/// How a broker-run child is set up between fork and exec.
pub struct BrokerChild {
    /// Switch to this uid, gid and groups (None: stay the broker's user).
    pub switch: Option<(u32, u32, Vec<u32>)>,
    /// The caller's working directory (`open_cwd`); `/` when the user cannot enter it.
    pub cwd: RawFd,
    /// Where the child writes one byte before exec: `c` (it entered `cwd`) or `/`.
    pub report: RawFd,
    /// Descriptors the command inherits with their numbers (the `fd` injection form).
    pub inherit: Vec<RawFd>,
    /// Its standard input is a pty slave: start a new session with it as the controlling
    /// terminal (the session's process group is the command's own, as without a terminal).
    pub terminal: bool,
}

/// The byte [`BrokerChild::report`] gets when the command starts in the caller's directory.
pub const STARTED_IN_CWD: u8 = b'c';

/// Set up `cmd` as a broker-run command: its own process group (the broker signals the group),
/// an empty signal mask, no ambient capabilities, then the user switch (groups, gid, uid), the
/// working directory, and the inherited descriptors. A failure of any step fails the spawn:
/// nothing runs with the broker's identity by mistake.
pub fn broker_child(cmd: &mut Command, setup: BrokerChild) {
    let BrokerChild {
        switch,
        cwd,
        report,
        inherit,
        terminal,
    } = setup;
    if !terminal {
        // With a terminal, setsid makes the group (a group leader could not call it).
        cmd.process_group(0);
    }
    let groups: Vec<libc::gid_t> = switch
        .as_ref()
        .map(|(_, _, g)| g.iter().map(|&g| g as libc::gid_t).collect())
        .unwrap_or_default();
    let ids = switch.map(|(u, g, _)| (u as libc::uid_t, g as libc::gid_t));
    // SAFETY: runs in the forked child before exec. It calls only async-signal-safe functions
    // (sigemptyset, sigprocmask, prctl, setsid, ioctl, setgroups, setgid, setuid, getuid,
    // getgid, fchdir, chdir, write, fcntl) and reads `groups` and `inherit`, allocated before
    // the fork; it allocates nothing and takes no locks. TIOCSCTTY takes an integer argument.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) == -1 {
                return Err(io::Error::last_os_error());
            }
            // Capabilities the broker holds for switching (the systemd drop-in's ambient set)
            // never reach the command. EINVAL: a kernel without ambient capabilities.
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(io::Error::last_os_error());
            }
            // Standard input is already the pty slave (std sets up stdio before this hook).
            if terminal && (libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1) {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid)) = ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) == -1
                    || libc::setgid(gid) == -1
                    || libc::setuid(uid) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != gid {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            let flag: u8 = if libc::fchdir(cwd) == 0 {
                STARTED_IN_CWD
            } else if libc::chdir(c"/".as_ptr()) == 0 {
                b'/'
            } else {
                return Err(io::Error::last_os_error());
            };
            if libc::write(report, (&flag as *const u8).cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A pipe, both ends close-on-exec.
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(nix_io)
}

/// Send `signo` to the process group `pgid`.
pub fn signal_group(pgid: u32, signo: i32) -> io::Result<()> {
    let sig = Signal::try_from(signo).map_err(nix_io)?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), sig).map_err(nix_io)
}

/// Whether `signo` is one a caller may relay to its broker-run command (the ones aap-exec
/// forwards, plus SIGTSTP and SIGCONT for job control).
pub fn is_relayable(signo: i32) -> bool {
    FORWARDED.iter().any(|s| *s as i32 == signo) || signo == libc::SIGTSTP || signo == libc::SIGCONT
}

/// Signal numbers, for code outside this module.
pub const SIGKILL: i32 = libc::SIGKILL;
pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGCONT: i32 = libc::SIGCONT;
pub const SIGCHLD: i32 = libc::SIGCHLD;
pub const SIGWINCH: i32 = libc::SIGWINCH;

/// The effective uid and gid of this process.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
pub fn egid() -> u32 {
    nix::unistd::getegid().as_raw()
}

// ---- broker-run commands under a terminal --------------------------------------------------

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: &impl AsFd) -> bool {
    nix::unistd::isatty(fd.as_fd()).unwrap_or(false)
}

/// A pseudo-terminal for a broker-run command whose caller is on a terminal: the master stays
/// with the broker, which relays bytes between it and the caller's terminal; the slave becomes
/// the command's controlling terminal. Both are close-on-exec from the start (the broker runs
/// other children from other threads).
pub struct Pty {
    pub master: nix::pty::PtyMaster,
    pub slave: OwnedFd,
}

/// Open a pty whose slave has the modes and window size of the caller's terminal `like`, and
/// belongs to `owner` (as login and sudo do: the command may open its own terminal by name).
pub fn open_pty_like(like: &impl AsFd, owner: u32) -> io::Result<Pty> {
    use nix::fcntl::OFlag;
    use nix::sys::termios::{SetArg, tcgetattr, tcsetattr};
    let modes = tcgetattr(like.as_fd()).map_err(nix_io)?;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(nix_io)?;
    nix::pty::grantpt(&master).map_err(nix_io)?;
    nix::pty::unlockpt(&master).map_err(nix_io)?;
    let name = nix::pty::ptsname_r(&master).map_err(nix_io)?;
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)?
        .into();
    tcsetattr(&slave, SetArg::TCSANOW, &modes).map_err(nix_io)?;
    copy_window_size(like, &master)?;
    nix::unistd::fchown(&slave, Some(nix::unistd::Uid::from_raw(owner)), None).map_err(nix_io)?;
    Ok(Pty { master, slave })
}

/// Give terminal `to` the window size of terminal `from` (the kernel then sends SIGWINCH to
/// the foreground process group of `to` when it changed).
pub fn copy_window_size(from: &impl AsFd, to: &impl AsFd) -> io::Result<()> {
    // SAFETY: an all-zero winsize is a valid value of the plain C struct.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which we own and which lives across the
    // call.
    if unsafe { libc::ioctl(from.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSWINSZ reads one winsize from `ws`, which lives across the call.
    if unsafe { libc::ioctl(to.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The caller's terminal, put into raw mode while its broker-run command runs on a pty (every
/// key, ^C and ^Z included, goes to the command's own terminal), restored on drop.
pub struct RawTerminal {
    tty: OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// Save the modes of `tty` (a duplicate of it is kept) and switch it to raw mode.
    pub fn enter(tty: &impl AsFd) -> io::Result<RawTerminal> {
        let tty = tty.as_fd().try_clone_to_owned()?;
        let saved = nix::sys::termios::tcgetattr(&tty).map_err(nix_io)?;
        let t = RawTerminal { tty, saved };
        t.raw()?;
        Ok(t)
    }

    /// Raw mode again (after [`RawTerminal::restore`]).
    pub fn raw(&self) -> io::Result<()> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcsetattr};
        let mut t = self.saved.clone();
        cfmakeraw(&mut t);
        tcsetattr(&self.tty, SetArg::TCSANOW, &t).map_err(nix_io)
    }

    /// The modes the terminal had.
    pub fn restore(&self) -> io::Result<()> {
        use nix::sys::termios::{SetArg, tcsetattr};
        tcsetattr(&self.tty, SetArg::TCSANOW, &self.saved).map_err(nix_io)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// One read from `fd` (EINTR retried).
pub fn read_fd(fd: &impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd.as_fd(), buf) {
            Err(nix::Error::EINTR) => {}
            r => return r.map_err(nix_io),
        }
    }
}

/// One write of what `fd` takes of `buf` now (EINTR retried); how much it took.
pub fn write_fd(fd: &impl AsFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::write(fd.as_fd(), buf) {
            Err(nix::Error::EINTR) => {}
            r => return r.map_err(nix_io),
        }
    }
}

/// Write all of `buf` to `fd` (EINTR retried).
pub fn write_all_fd(fd: &impl AsFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd.as_fd(), buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(nix_io(e)),
        }
    }
    Ok(())
}

/// Make `fd` (one of ours, never a caller's: the flag is shared by every holder of the open
/// file) non-blocking.
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let fl = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(nix_io)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
    )
    .map_err(nix_io)?;
    Ok(())
}

/// Whether child `pid` has stopped since last asked (its stop is taken; its exit is not).
pub fn child_stopped(pid: u32) -> io::Result<bool> {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    match waitid(
        Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
        WaitPidFlag::WSTOPPED | WaitPidFlag::WNOHANG,
    ) {
        Ok(WaitStatus::Stopped(..)) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(nix_io(e)),
    }
}

/// Stop this process as ^Z stops a program (SIGTSTP: its shell reports it stopped, `$?` 148)
/// until a SIGCONT.
pub fn suspend_self() {
    let _ = nix::sys::signal::raise(Signal::SIGTSTP);
}

/// Stop this process (SIGSTOP: it cannot be blocked, caught or discarded) until a SIGCONT. For
/// when [`suspend_self`] did not stop it: the kernel discards SIGTSTP in an orphaned process
/// group.
pub fn stop_self() {
    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
}

/// Whether this process is in the foreground process group of its terminal on stdin (true
/// when that cannot be told: stdin is not our controlling terminal).
pub fn in_foreground() -> bool {
    !matches!(nix::unistd::tcgetpgrp(io::stdin().as_fd()), Ok(p) if p != nix::unistd::getpgrp())
}

/// The suspend key (`VSUSP`, ^Z) of the terminal whose pty master is `master`, when its line
/// discipline turns it into a signal (`ISIG` on).
pub fn suspend_key(master: &impl AsFd) -> Option<u8> {
    use nix::sys::termios::{LocalFlags, SpecialCharacterIndices, tcgetattr};
    let t = tcgetattr(master.as_fd()).ok()?;
    let c = t.control_chars[SpecialCharacterIndices::VSUSP as usize];
    (t.local_flags.contains(LocalFlags::ISIG) && c != 0).then_some(c)
}

/// The foreground process group of the terminal whose pty master is `master`.
pub fn foreground_group(master: &impl AsFd) -> Option<u32> {
    nix::unistd::tcgetpgrp(master.as_fd())
        .ok()
        .and_then(|p| u32::try_from(p.as_raw()).ok())
        .filter(|&p| p > 1)
}

pub const SIGSTOP: i32 = libc::SIGSTOP;

// ---- sock_diag -------------------------------------------------------------------------------

/// The owner uid of the loopback TCP socket whose local end is `local` and remote end `remote`,
/// from the kernel (NETLINK_SOCK_DIAG, `SOCK_DIAG_BY_FAMILY` with the exact 4-tuple; the
/// answer's `idiag_uid`). The broker's http-proxy asks it for the peer of each connection it
/// accepts: `local` is the peer's address, `remote` the listener's. The messages are built and
/// read as bytes (native endian where the kernel's structs are, network order for ports and
/// addresses), so no unsafe code is needed. Any failure (no such socket, another family, an
/// answer for another socket) is an error: the caller fails closed.
pub fn tcp_socket_uid(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> io::Result<u32> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::net::SocketAddr;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const HDR: usize = 16; // struct nlmsghdr
    const REQ: usize = 56; // struct inet_diag_req_v2
    let (family, src, dst): (u8, [u8; 16], [u8; 16]) = match (local, remote) {
        (SocketAddr::V4(l), SocketAddr::V4(r)) => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s[..4].copy_from_slice(&l.ip().octets());
            d[..4].copy_from_slice(&r.ip().octets());
            (libc::AF_INET as u8, s, d)
        }
        (SocketAddr::V6(l), SocketAddr::V6(r)) => {
            (libc::AF_INET6 as u8, l.ip().octets(), r.ip().octets())
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the two ends are of different address families",
            ));
        }
    };
    let seq: u32 = 1;
    let mut msg = Vec::with_capacity(HDR + REQ);
    msg.extend_from_slice(&((HDR + REQ) as u32).to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes()); // nlmsg_flags: one socket, no dump
    msg.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    msg.push(family); // sdiag_family
    msg.push(libc::IPPROTO_TCP as u8); // sdiag_protocol
    msg.push(0); // idiag_ext: nothing extra
    msg.push(0); // pad
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any state
    // struct inet_diag_sockid: the socket's own end first.
    msg.extend_from_slice(&local.port().to_be_bytes());
    msg.extend_from_slice(&remote.port().to_be_bytes());
    msg.extend_from_slice(&src);
    msg.extend_from_slice(&dst);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if: any
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_cookie: INET_DIAG_NOCOOKIE
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    debug_assert_eq!(msg.len(), HDR + REQ);

    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(nix_io)?;
    let kernel = NetlinkAddr::new(0, 0);
    sendto(fd.as_raw_fd(), &msg, &kernel, MsgFlags::empty()).map_err(nix_io)?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(nix_io)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let ans = &buf[..n];
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let len = u32_at(ans, 0).ok_or_else(|| bad("short sock_diag answer"))? as usize;
    let kind = ans
        .get(4..6)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or_else(|| bad("short sock_diag answer"))?;
    if len > ans.len() || len < HDR || u32_at(ans, 8) != Some(seq) {
        return Err(bad("malformed sock_diag answer"));
    }
    if kind == NLMSG_ERROR {
        let errno = u32_at(ans, HDR).map(|v| v as i32).unwrap_or(0);
        return Err(if errno < 0 {
            io::Error::from_raw_os_error(-errno)
        } else {
            bad("sock_diag answered with an error message")
        });
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad("sock_diag answered with another message"));
    }
    // struct inet_diag_msg: family at 0, the sockid at 4 (sport, dport, src, dst, ...), the
    // uid at 64.
    let body = &ans[HDR..len];
    let same_socket = body.first() == Some(&family)
        && body.get(4..6) == Some(&local.port().to_be_bytes()[..])
        && body.get(6..8) == Some(&remote.port().to_be_bytes()[..])
        && body.get(8..24) == Some(&src[..])
        && body.get(24..40) == Some(&dst[..]);
    if !same_socket {
        return Err(bad("sock_diag answered for another socket"));
    }
    u32_at(body, 64).ok_or_else(|| bad("short sock_diag answer"))
}

#[cfg(test)]
mod sock_diag_tests {
    #[test]
    fn the_owner_of_a_loopback_peer_is_this_uid_and_an_unknown_one_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let uid = super::tcp_socket_uid(peer, s.local_addr().unwrap()).unwrap();
        assert_eq!(uid, super::uid());
        // A 4-tuple no socket has.
        let mut other = peer;
        other.set_port(if peer.port() == 1 { 2 } else { 1 });
        assert!(super::tcp_socket_uid(other, s.local_addr().unwrap()).is_err());
    }
}
