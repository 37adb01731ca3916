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
