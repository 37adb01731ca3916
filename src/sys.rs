//! The only module that talks to libc/nix directly. Every `unsafe` block in the crate lives here
//! and carries a `// SAFETY:` comment. Everything else in the crate is `#![forbid(unsafe_code)]`.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
