//! Shared helpers for the integration tests: run the real binaries in a private temp dir with a
//! clean, controlled environment.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const AAP: &str = env!("CARGO_BIN_EXE_aap");
pub const AAP_EXEC: &str = env!("CARGO_BIN_EXE_aap-exec");

/// The repository root (where Cargo.toml is).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command for one of our binaries with an environment that cannot pick up the machine's
/// config: HOME and XDG_CONFIG_HOME point into `dir`, AAP_* are cleared.
pub fn cmd(bin: &str, dir: &Path) -> Command {
    let mut c = Command::new(bin);
    c.current_dir(dir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join(".config"))
        .env("TMPDIR", dir);
    c
}

/// Run and capture, asserting nothing.
pub fn run(c: &mut Command) -> Output {
    c.output().expect("spawn test binary")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A private temp dir (0700), removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aap-test-")
        .tempdir()
        .expect("tempdir")
}

/// Write a file with mode 0644 (operator files must not be group/world-writable).
pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Exit code, panicking with stderr when the process was killed by a signal.
pub fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {o:?}"))
}
