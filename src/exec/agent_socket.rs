//! The socket of the broker's ssh agent for one exec (the `ssh-agent` form), made by `aap-exec`
//! as the agent's uid: `agent-<32 random hex>.sock`, listening in a directory of ours with mode
//! 0700. The listening socket goes to the broker (`SCM_RIGHTS`), which serves the SSH agent
//! protocol on it with the key it alone holds; we close our copy at once, so the child never
//! inherits it. At the end of the run the socket is removed.
//!
//! Where: `$XDG_RUNTIME_DIR` when it is a directory (not a symlink) of our uid with mode 0700,
//! else `/dev/shm` when it is a sticky directory of root's (a tmpfs on every Linux with glibc:
//! a socket's inode there costs no journal transaction, where ext4's `/tmp` takes one to make
//! it and one to free it), else `/tmp`. In it, the uid's own directory `aap-agent-<uid>` (as tmux keeps
//! `/tmp/tmux-<uid>`), made once and kept: on ext4 making and removing a directory for every
//! run cost about 0.25 ms of each. It is used only when lstat(2) finds it ours, a directory
//! (not a symlink) and mode 0700; in a sticky `/tmp` no other uid can then rename, replace or
//! enter it. When another uid holds the name (or anything else is there), a fresh directory
//! `aap-agent-<32 random hex>` is made instead, with mkdir(2) (which never follows a symlink:
//! an existing name is `EEXIST`, and another is tried), checked the same way, and removed with
//! the socket. No other uid can enter either, so none can connect; the broker still checks every
//! connection's peer uid. A socket left behind by a killed `aap-exec` listens nowhere.

#![forbid(unsafe_code)]

use crate::error::{Error, Result, quote_path};
use crate::proto::{ClientMsg, Conn, ProtoError};
use crate::sys;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

const SOCKET_NAME: &str = "agent.sock";
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// The socket of one exec's agent (and its directory, when it is a fresh one); removed on drop.
pub struct AgentSocket {
    /// A fresh directory of this run's, removed with the socket (`None`: the uid's own).
    fresh: Option<PathBuf>,
    path: PathBuf,
    /// Our copy of the listening socket, until it is sent.
    listener: Option<OwnedFd>,
}

impl AgentSocket {
    /// Find or make the directory and listen in it.
    pub fn create() -> Result<AgentSocket> {
        let base = base(std::env::var_os("XDG_RUNTIME_DIR"));
        if let Some(dir) = own_dir(&base) {
            // A name taken (a socket a killed run left, or a guess) is EADDRINUSE: another.
            for _ in 0..8 {
                let path = dir.join(format!("agent-{}.sock", random_hex()?));
                match UnixListener::bind(&path) {
                    Ok(l) => return AgentSocket::listening(None, path, l),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    Err(_) => break,
                }
            }
        }
        let dir = fresh_dir(&base)?;
        let path = dir.join(SOCKET_NAME);
        let l = UnixListener::bind(&path).map_err(|e| {
            let _ = std::fs::remove_dir(&dir);
            Error::internal(format!(
                "cannot listen on the ssh agent socket {}: {e}",
                path.display()
            ))
            .hint(format!("ls -ld {}", quote_path(&dir)))
        })?;
        AgentSocket::listening(Some(dir), path, l)
    }

    fn listening(fresh: Option<PathBuf>, path: PathBuf, listener: UnixListener) -> Result<Self> {
        let mut made = AgentSocket {
            fresh,
            path,
            listener: None,
        };
        let shown = quote_path(made.path.parent().unwrap_or(Path::new("/")));
        // Only our uid may connect (the directory says so already).
        std::fs::set_permissions(&made.path, std::fs::Permissions::from_mode(0o600)).map_err(
            |e| {
                Error::internal(format!("cannot chmod {}: {e}", made.path.display()))
                    .hint(format!("ls -l {shown}"))
            },
        )?;
        made.listener = Some(OwnedFd::from(listener));
        Ok(made)
    }

    /// The socket's path: the child's `SSH_AUTH_SOCK`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hand the listening socket to the broker, then close our copy (sent or not).
    pub fn send(&mut self, conn: &Conn<std::os::unix::net::UnixStream>) -> Result<()> {
        let Some(fd) = self.listener.take() else {
            return Err(Error::internal("the ssh agent socket was already sent")
                .hint("run the command again"));
        };
        let path = self.path.to_str().ok_or_else(|| {
            Error::config(format!(
                "the ssh agent socket's path {} is not UTF-8",
                self.path.display()
            ))
            .hint("set XDG_RUNTIME_DIR to a UTF-8 path, e.g. export XDG_RUNTIME_DIR=/run/user/$(id -u)")
        })?;
        let sent = conn.send(
            &ClientMsg::AgentSocket {
                path: path.to_owned(),
            },
            &[&fd],
        );
        drop(fd);
        sent.map_err(|e: ProtoError| crate::client::broken(&e))
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        drop(self.listener.take());
        let _ = std::fs::remove_file(&self.path);
        if let Some(d) = &self.fresh {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// 32 random hex digits, for a name no one can guess.
fn random_hex() -> Result<String> {
    sys::random_hex(16).map_err(|e| {
        Error::internal(format!(
            "cannot read random bytes for the ssh agent socket's name: {e}"
        ))
        .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
    })
}

/// The uid's own directory `aap-agent-<uid>` in `base`, made when missing; `None` when what is
/// there (or what mkdir made, a umask's bits aside) is not a 0700 directory of ours.
fn own_dir(base: &Path) -> Option<PathBuf> {
    let uid = sys::uid();
    let dir = base.join(format!("aap-agent-{uid}"));
    let m = match std::fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(_) => return None,
            }
            std::fs::symlink_metadata(&dir).ok()?
        }
        Err(_) => return None,
    };
    is_private_dir(&m, uid).then_some(dir)
}

/// `xdg` (`$XDG_RUNTIME_DIR`) when it is a 0700 directory of ours (lstat: a symlink is not)
/// short enough for a socket path in it, else the shared base ([`shared_base`]).
fn base(xdg: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(x) = xdg.map(PathBuf::from) {
        // "<x>/aap-agent-<uid>/agent-<32 hex>.sock", the longer of the two forms (the other
        // is "<x>/aap-agent-<32 hex>/agent.sock").
        let room =
            x.as_os_str().len() + "/aap-agent-".len() + 10 + "/agent-".len() + 32 + ".sock".len();
        if x.is_absolute()
            && room <= MAX_SOCKET_PATH
            && std::fs::symlink_metadata(&x).is_ok_and(|m| is_private_dir(&m, sys::uid()))
        {
            return x;
        }
    }
    shared_base(Path::new(SHM))
}

const SHM: &str = "/dev/shm";

/// `shm` when it is a directory (lstat: not a symlink) of root's with the sticky bit, as `/tmp`
/// is: only the owner of a name in it can rename or remove it. Else `/tmp`.
fn shared_base(shm: &Path) -> PathBuf {
    let sticky_roots = std::fs::symlink_metadata(shm)
        .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o1000 != 0);
    if sticky_roots {
        shm.to_path_buf()
    } else {
        PathBuf::from("/tmp")
    }
}

/// Whether `m` (from lstat) is a directory of `uid` with mode exactly 0700.
fn is_private_dir(m: &std::fs::Metadata, uid: u32) -> bool {
    m.is_dir() && m.uid() == uid && m.mode() & 0o7777 == 0o700
}

/// A fresh directory `aap-agent-<32 random hex>` in `base`, mode 0700, checked by lstat.
fn fresh_dir(base: &Path) -> Result<PathBuf> {
    let uid = sys::uid();
    let shown = quote_path(base);
    for _ in 0..8 {
        let name = random_hex()?;
        let dir = base.join(format!("aap-agent-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot create a directory for the ssh agent socket in {}: {e}",
                    base.display()
                ))
                .hint(format!("ls -ld {shown}")));
            }
        }
        let looked = || std::fs::symlink_metadata(&dir);
        let mut m = looked();
        // A umask may have taken bits of 0700 away: put them back on the directory we just
        // made (it is ours and a directory, checked first), then look again.
        if m.as_ref()
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o7777 != 0o700)
        {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            m = looked();
        }
        match m {
            Ok(m) if is_private_dir(&m, uid) => return Ok(dir),
            Ok(m) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(Error::internal(format!(
                    "the directory {} made for the ssh agent socket is not a 0700 directory of uid {uid} (mode {:o}, uid {})",
                    dir.display(),
                    m.mode() & 0o7777,
                    m.uid()
                ))
                .hint(format!("ls -ld {shown}")));
            }
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot lstat the directory {} made for the ssh agent socket: {e}",
                    dir.display()
                ))
                .hint(format!("ls -ld {shown}")));
            }
        }
    }
    Err(Error::internal(format!(
        "cannot create a fresh directory for the ssh agent socket in {}",
        base.display()
    ))
    .hint(format!("ls -la {shown}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The uid's own directory is ours and 0700, the socket listens in it and goes on drop; the
    /// directory stays for the next run.
    #[test]
    fn the_socket_listens_in_the_uids_own_private_directory_and_goes_on_drop() {
        let s = AgentSocket::create().unwrap();
        let dir = s.path().parent().unwrap().to_path_buf();
        assert!(s.fresh.is_none(), "a fresh directory: {}", dir.display());
        assert!(
            dir.file_name().unwrap().to_str().unwrap() == format!("aap-agent-{}", sys::uid()),
            "{}",
            dir.display()
        );
        let m = std::fs::symlink_metadata(&dir).unwrap();
        assert!(is_private_dir(&m, sys::uid()), "mode {:o}", m.mode());
        assert_eq!(
            std::fs::symlink_metadata(s.path()).unwrap().mode() & 0o777,
            0o600
        );
        let again = AgentSocket::create().unwrap();
        assert_ne!(s.path(), again.path(), "two runs share a socket");
        std::os::unix::net::UnixStream::connect(s.path()).unwrap();
        let path = s.path().to_path_buf();
        drop(s);
        assert!(!path.exists(), "{} left behind", path.display());
        assert!(dir.is_dir(), "the uid's directory went");
    }

    /// When the uid's name in the base is not a 0700 directory of ours (another uid's
    /// directory, a symlink, a file, a wider mode), a fresh private directory is used and
    /// removed with the socket.
    #[test]
    fn a_name_held_by_something_else_gets_a_fresh_directory() {
        let b = std::env::temp_dir().join(format!("aap-agent-base-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&b);
        std::fs::create_dir(&b).unwrap();
        let own = b.join(format!("aap-agent-{}", sys::uid()));
        let target = b.join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&target, &own).unwrap();
        assert_eq!(own_dir(&b), None, "a symlink was taken");
        std::fs::remove_file(&own).unwrap();
        std::fs::write(&own, "").unwrap();
        assert_eq!(own_dir(&b), None, "a file was taken");
        std::fs::remove_file(&own).unwrap();
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(own_dir(&b), None, "a 0755 directory was taken");
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
        if sys::uid() == 0 {
            std::os::unix::fs::chown(&own, Some(65534), None).unwrap();
            assert_eq!(own_dir(&b), None, "another uid's directory was taken");
            std::os::unix::fs::chown(&own, Some(0), None).unwrap();
        }
        assert_eq!(own_dir(&b), Some(own.clone()));
        std::fs::remove_dir(&own).unwrap();
        // Missing: made, 0700.
        assert_eq!(own_dir(&b), Some(own.clone()));
        let m = std::fs::symlink_metadata(&own).unwrap();
        assert!(is_private_dir(&m, sys::uid()), "mode {:o}", m.mode());
        // The fresh fallback: removed with its socket.
        let dir = fresh_dir(&b).unwrap();
        let m = std::fs::symlink_metadata(&dir).unwrap();
        assert!(is_private_dir(&m, sys::uid()), "mode {:o}", m.mode());
        let path = dir.join(SOCKET_NAME);
        let l = UnixListener::bind(&path).unwrap();
        let s = AgentSocket::listening(Some(dir.clone()), path, l).unwrap();
        drop(s);
        assert!(!dir.exists(), "{} left behind", dir.display());
        let _ = std::fs::remove_dir_all(&b);
    }

    /// `/dev/shm` is used only as `/tmp` would be: a sticky directory of root's, not a symlink.
    #[test]
    fn the_shared_base_is_dev_shm_only_when_it_is_a_sticky_directory_of_roots() {
        if sys::uid() != 0 {
            // The full run (scripts/test-all.sh, as root) must not pass without it.
            assert!(
                std::env::var_os("AAP_TEST_FULL").is_none(),
                "needs root (chown to make directories of root's)"
            );
            eprintln!("SKIPPED: needs root to make directories of root's with chown");
            return;
        }
        let b = std::env::temp_dir().join(format!("aap-agent-shm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&b);
        std::fs::create_dir(&b).unwrap();
        let shm = b.join("shm");
        std::fs::create_dir(&shm).unwrap();
        let with = |mode: u32, owner: u32| {
            std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&shm, Some(owner), None).unwrap();
            shared_base(&shm)
        };
        assert_eq!(with(0o1777, 0), shm);
        assert_eq!(with(0o777, 0), Path::new("/tmp"), "not sticky");
        assert_eq!(with(0o1777, 65534), Path::new("/tmp"), "not root's");
        let link = b.join("link");
        with(0o1777, 0);
        std::os::unix::fs::symlink(&shm, &link).unwrap();
        assert_eq!(shared_base(&link), Path::new("/tmp"), "a symlink");
        assert_eq!(shared_base(&b.join("missing")), Path::new("/tmp"));
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn a_runtime_dir_that_is_not_private_is_not_used() {
        let d = std::env::temp_dir().join(format!("aap-agent-sock-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        let base_with = |mode: u32| {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            base(Some(d.clone().into_os_string()))
        };
        assert_eq!(base_with(0o700), d);
        let shared = shared_base(Path::new(SHM));
        for mode in [0o755, 0o711, 0o750, 0o1700, 0o500] {
            assert_eq!(base_with(mode), shared, "mode {mode:o}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A symlink to a private directory is not one; nor is a relative path, a missing
        // directory, or one too long for a socket path.
        let link = d.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert_eq!(base(Some(link.clone().into_os_string())), shared);
        assert_eq!(base(Some("relative".into())), shared);
        assert_eq!(base(Some(d.join("missing").into_os_string())), shared);
        let long = d.join("x".repeat(80));
        std::fs::create_dir(&long).unwrap();
        std::fs::set_permissions(&long, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(base(Some(long.into_os_string())), shared);
        assert_eq!(base(None), shared);
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir_all(&d);
    }
}
