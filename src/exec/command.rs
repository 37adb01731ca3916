//! Which program runs: resolve the command like execvp(3) does (so behaviour matches running it
//! directly), then, for capabilities that name their programs, require the resolved file to be
//! one of them. Allowed *names* are looked up only in the trusted `secure_path` (as sudo does),
//! never in the agent's PATH, so an agent cannot put its own `git` first in PATH to receive the
//! token.

#![forbid(unsafe_code)]

use crate::error::{Error, Kind, Result, shell_quote};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The default trusted search path for allowed program names.
pub const DEFAULT_SECURE_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolve `cmd` against `path_var` (the child's PATH) and `cwd`, as execvp would. Exit kinds:
/// 127 when nothing is found, 126 when what is found cannot be executed.
pub fn resolve(cmd: &OsStr, path_var: Option<&OsStr>, cwd: &Path) -> Result<PathBuf> {
    let shown = shell_quote(&cmd.to_string_lossy());
    if cmd.is_empty() {
        return Err(Error::new(Kind::NotFound, "the command is empty").hint(
            "name the program to run after `--`; the capabilities you may use: aap-exec --list",
        ));
    }
    if cmd.as_bytes().contains(&b'/') {
        let p = cwd.join(cmd);
        return check_executable(&p, &shown).map(|()| p);
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/bin:/bin"));
    let mut denied: Option<PathBuf> = None;
    for dir in std::env::split_paths(path_var) {
        let dir = if dir.as_os_str().is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let p = dir.join(cmd);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && crate::sys::can_execute(&p) => return Ok(p),
            Ok(_) => {
                denied.get_or_insert(p);
            }
            Err(_) => {}
        }
    }
    match denied {
        Some(p) => check_executable(&p, &shown).map(|()| p),
        None => Err(Error::new(
            Kind::NotFound,
            format!("command not found: {shown} (searched PATH)"),
        )
        .hint(format!(
            "check the name, or give the full path: command -v {shown}"
        ))),
    }
}

fn check_executable(p: &Path, shown: &str) -> Result<()> {
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::new(
            Kind::NotFound,
            format!("command not found: {shown}"),
        )
        .hint(format!("check the path: ls -l {shown}"))),
        Err(e) => Err(
            Error::new(Kind::CannotExecute, format!("cannot execute {shown}: {e}"))
                .hint(format!("ls -l {shown}")),
        ),
        Ok(m) if m.is_dir() => Err(Error::new(
            Kind::CannotExecute,
            format!("cannot execute {shown}: it is a directory"),
        )
        .hint(format!("name the program inside it: ls {shown}"))),
        Ok(_) if !crate::sys::can_execute(p) => Err(Error::new(
            Kind::CannotExecute,
            format!("cannot execute {shown}: permission denied"),
        )
        .hint(format!(
            "make it executable if it should be: chmod +x {shown}"
        ))),
        Ok(_) => Ok(()),
    }
}

/// For a capability with `allowed_commands`, require `resolved` to be one of them: an absolute
/// entry by identity (same file after resolving symlinks), a name by any file of that name in
/// the trusted `secure_path`. Returns the trusted path that matched: the caller runs *that*
/// path (never the one the agent gave, which it could re-point between this check and the
/// exec), with the allowed name as argv[0] (so a multi-call binary reached through an agent's
/// symlink named `sh` still runs as what the catalog allowed).
pub fn check_allowed(
    cap_id: &str,
    allowed: &[String],
    resolved: &Path,
    secure_path: &str,
) -> Result<PathBuf> {
    let real = std::fs::canonicalize(resolved).unwrap_or_else(|_| resolved.to_path_buf());
    for entry in allowed {
        let candidates: Vec<PathBuf> = if entry.starts_with('/') {
            vec![PathBuf::from(entry)]
        } else {
            std::env::split_paths(OsStr::new(secure_path))
                .filter(|d| d.is_absolute())
                .map(|d| d.join(entry))
                .collect()
        };
        if let Some(c) = candidates
            .into_iter()
            .find(|c| std::fs::canonicalize(c).is_ok_and(|c| c == real))
        {
            return Ok(c);
        }
    }
    Err(Error::denied(format!(
        "capability `{cap_id}` may only be used by {}; {} is not one of them (names are looked up in the trusted path {secure_path}, not in PATH)",
        allowed.join(", "),
        real.display()
    ))
    .hint(format!(
        "use it with {} only; check a command before running it: aap-exec --check {cap_id} -- {}",
        allowed.join(" or "),
        allowed.first().map_or("", String::as_str)
    )))
}

/// The command's argv as audit-safe strings (lossy UTF-8).
pub fn argv_strings(program: &OsStr, args: &[OsString]) -> Vec<String> {
    std::iter::once(program)
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// `name` in the trusted path (like sudo's secure_path), never the caller's PATH: an agent that
/// put its own `ssh-add` first in PATH would otherwise be handed the key.
pub fn find_trusted(name: &str, secure_path: &str) -> crate::error::Result<std::path::PathBuf> {
    std::env::split_paths(std::ffi::OsStr::new(secure_path))
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| p.is_file() && crate::sys::can_execute(p))
        .ok_or_else(|| {
            crate::error::Error::internal(format!(
                "{name} was not found in the trusted path {secure_path}"
            ))
            .hint(format!("install it (Debian: apt-get install -y {}), or add its directory to secure_path in the config", if name == "git" { "git" } else { "openssh-client" }))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        let cwd = Path::new("/");
        let p = resolve(
            OsStr::new("sh"),
            Some(OsStr::new("/nonexistent:/bin:/usr/bin")),
            cwd,
        )
        .unwrap();
        assert_eq!(p, PathBuf::from("/bin/sh"));
        let e = resolve(
            OsStr::new("no-such-program-aap"),
            Some(OsStr::new("/bin")),
            cwd,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 127);
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let e = resolve(plain.as_os_str(), None, cwd).unwrap_err();
        assert_eq!(e.exit_code(), 126, "{}", e.message());
        let e = resolve(OsStr::new("/etc"), None, cwd).unwrap_err();
        assert_eq!(e.exit_code(), 126);
        let e = resolve(OsStr::new("./nope"), None, cwd).unwrap_err();
        assert_eq!(e.exit_code(), 127);
    }

    #[test]
    fn allowed_names_come_from_the_secure_path() {
        let sh = resolve(OsStr::new("sh"), Some(OsStr::new("/bin")), Path::new("/")).unwrap();
        let t = check_allowed("c", &["sh".into()], &sh, "/usr/bin:/bin").unwrap();
        assert!(
            t == Path::new("/usr/bin/sh") || t == Path::new("/bin/sh"),
            "{}",
            t.display()
        );
        assert_eq!(
            check_allowed("c", &["/bin/sh".into()], &sh, "/nonexistent").unwrap(),
            Path::new("/bin/sh")
        );
        let e = check_allowed("c", &["git".into()], &sh, "/usr/bin:/bin").unwrap_err();
        assert_eq!(e.exit_code(), 77);
        // A name found only outside the secure path does not count.
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("sh");
        std::fs::copy("/bin/sh", &fake).unwrap();
        assert!(check_allowed("c", &["sh".into()], &fake, "/usr/bin:/bin").is_err());
    }
}
