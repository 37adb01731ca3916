//! Careful reading of operator files: bounded size, regular files only, no blocking on FIFOs,
//! and mode checks on files that grant power.

#![forbid(unsafe_code)]

use crate::error::{Error, Kind, Result, shell_quote};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// How a file is read.
#[derive(Clone, Copy)]
pub struct ReadOpts<'a> {
    /// What the file is, for messages: "catalog", "config", "grant".
    pub what: &'a str,
    /// Largest accepted size in bytes.
    pub max_len: u64,
    /// Follow a final symlink (operator files in /etc often are links; grants never are).
    pub follow_symlinks: bool,
    /// Refuse a group- or world-writable file (it grants power; sudo does the same).
    pub check_mode: bool,
    /// Refuse a file not owned by root, judged on the opened file itself (fstat), so that no
    /// swap between a check and the open can slip another file in.
    pub require_root: bool,
    /// Exit kind for problems with the file.
    pub kind: Kind,
}

impl<'a> ReadOpts<'a> {
    pub fn config_file(what: &'a str, max_len: u64) -> Self {
        ReadOpts {
            what,
            max_len,
            follow_symlinks: true,
            check_mode: true,
            require_root: false,
            kind: Kind::Config,
        }
    }
}

/// Read a whole operator file, refusing directories, FIFOs, devices, dangling symlinks and
/// oversized files with a clear error. Never blocks.
pub fn read_file(path: &Path, o: ReadOpts<'_>) -> Result<Vec<u8>> {
    let shown = path.display();
    let quoted = shell_quote(&path.to_string_lossy());
    let file = match crate::sys::open_read_nonblocking(path, o.follow_symlinks) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dangling =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            let msg = if dangling {
                format!(
                    "{} {shown} is a dangling symlink (its target does not exist)",
                    o.what
                )
            } else {
                format!("{} {shown} does not exist", o.what)
            };
            return Err(Error::new(o.kind, msg).hint(format!(
                "create it, or point to the right file: ls -l {quoted}"
            )));
        }
        Err(e) if !o.follow_symlinks && crate::sys::is_symlink_loop(&e) => {
            return Err(Error::new(
                o.kind,
                format!("{} {shown} is a symlink; refusing to follow it", o.what),
            )
            .hint(format!(
                "replace the link with the real file: ls -l {quoted}"
            )));
        }
        Err(e) => {
            return Err(
                Error::new(o.kind, format!("cannot open {} {shown}: {e}", o.what)).hint(format!(
                    "check the path and its permissions: ls -l {quoted}"
                )),
            );
        }
    };
    let meta = file.metadata().map_err(|e| {
        Error::new(o.kind, format!("cannot stat {} {shown}: {e}", o.what))
            .hint(format!("check the file: ls -l {quoted}"))
    })?;
    if meta.is_dir() {
        return Err(Error::new(
            o.kind,
            format!("{} {shown} is a directory, not a file", o.what),
        )
        .hint(format!(
            "name the file inside it, e.g. {}",
            shell_quote(&path.join("…").to_string_lossy())
        )));
    }
    if !meta.is_file() {
        return Err(Error::new(
            o.kind,
            format!(
                "{} {shown} is not a regular file (a FIFO, socket or device)",
                o.what
            ),
        )
        .hint(format!("point to a regular file: ls -l {quoted}")));
    }
    if o.require_root && meta.uid() != 0 {
        return Err(Error::new(
            o.kind,
            format!(
                "{} {shown} is owned by uid {}, not root",
                o.what,
                meta.uid()
            ),
        )
        .hint(format!("chown root:root {quoted} && chmod 644 {quoted}")));
    }
    if o.check_mode && meta.mode() & 0o022 != 0 {
        return Err(Error::new(
            o.kind,
            format!("{} {shown} is writable by group or others (mode {:o}); it grants power, so it is refused", o.what, meta.mode() & 0o7777),
        )
        .hint(format!("chmod go-w {quoted}")));
    }
    if meta.len() > o.max_len {
        return Err(Error::new(
            o.kind,
            format!(
                "{} {shown} is {} bytes; the limit is {} bytes",
                o.what,
                meta.len(),
                o.max_len
            ),
        )
        .hint(format!(
            "check that {quoted} is the right file; a real {} is far smaller",
            o.what
        )));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // Read one byte past the limit, in case the file grew after fstat.
    file.take(o.max_len + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            Error::new(o.kind, format!("cannot read {} {shown}: {e}", o.what)).hint(format!(
                "check the file and its permissions: ls -l {quoted}"
            ))
        })?;
    if buf.len() as u64 > o.max_len {
        return Err(Error::new(
            o.kind,
            format!(
                "{} {shown} grew past the limit of {} bytes while being read",
                o.what, o.max_len
            ),
        )
        .hint(format!(
            "something is writing to it; check the file, then retry: ls -l {quoted}"
        )));
    }
    Ok(buf)
}

/// Decode UTF-8, naming the line and column of the first bad byte.
pub fn utf8(bytes: Vec<u8>, what: &str, path: &Path, kind: Kind) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let (line, col) = line_col(bytes, at);
        Error::new(
            kind,
            format!(
                "{}:{line}:{col}: {what} is not valid UTF-8 (bad byte at offset {at})",
                path.display()
            ),
        )
        .hint({
            let p = shell_quote(&path.to_string_lossy());
            let tmp = shell_quote(&format!("{}.utf8", path.to_string_lossy()));
            format!(
                "re-save it as UTF-8, e.g. from Latin-1: iconv -f LATIN1 -t UTF-8 {p} > {tmp} && mv {tmp} {p}"
            )
        })
    })
}

/// 1-based line and column (in characters, counting bytes of an invalid sequence as one each)
/// of byte offset `at`.
pub fn line_col(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = &bytes[..at.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_root_judges_the_opened_file() {
        if crate::sys::uid() != 0 {
            eprintln!("skipped: needs root to give a file away");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.yaml");
        std::fs::write(&f, "x: 1\n").unwrap();
        let opts = ReadOpts {
            require_root: true,
            ..ReadOpts::config_file("config", 1024)
        };
        assert_eq!(read_file(&f, opts).unwrap(), b"x: 1\n");
        std::os::unix::fs::lchown(&f, Some(65534), None).unwrap();
        let e = read_file(&f, opts).unwrap_err();
        assert!(
            e.message().contains("owned by uid 65534, not root"),
            "{}",
            e.message()
        );
        assert_eq!(e.exit_code(), 78);
        // Without the flag the same file is fine (operator files need not be root's).
        assert!(read_file(&f, ReadOpts::config_file("config", 1024)).is_ok());
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col(b"abc", 0), (1, 1));
        assert_eq!(line_col(b"ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nxé".as_bytes(), 6), (2, 3));
    }
}
