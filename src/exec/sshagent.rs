//! The `ssh-agent` inject form: a private OpenSSH `ssh-agent` for one child.
//!
//! `ssh-agent -D -a SOCK` runs in the foreground (its pid is held) in its own process group (a
//! terminal's ^C does not reach it), bound to a socket in a fresh 0700 directory.
//!
//! Dying with `aap-exec`, even when `aap-exec` is SIGKILLed: a parent-death signal set on
//! ssh-agent itself does not survive its exec where ssh-agent is set-group-id (Debian installs
//! it `root:_ssh 2755`; the kernel clears PR_SET_PDEATHSIG on a set-gid exec). So the agent runs
//! under a *keeper*: `aap-exec` re-executed as argv[0] `aap-agent-keeper`, which is not set-gid
//! and so keeps the parent-death SIGTERM set for it. The keeper starts ssh-agent and waits on a
//! signalfd: when `aap-exec` dies (or tears down) it gets SIGTERM, kills the agent, reaps it and
//! exits; when the agent dies, it exits too. The key reaches
//! it through `ssh-add -` on a pipe: never a file, never argv, never the environment. It is
//! loaded with `-t` = min(key_lifetime, the grant's remaining time) and one `-h` per catalog
//! host. Both programs are looked up in the trusted `secure_path`, never in the agent's PATH.
//! Dropping the [`Agent`] kills the agent, waits for it and removes the directory.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long `ssh-add` may take to load one key before it is killed.
const SSH_ADD_TIMEOUT: Duration = Duration::from_secs(10);

/// A running private agent. Dropping it is the teardown.
pub struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    /// The keeper's stdout, until the agent said it is ready.
    out: Option<std::process::ChildStdout>,
    agent_bin: PathBuf,
    add_bin: PathBuf,
}

/// What to load, and how.
pub struct Load<'a> {
    pub cap_id: &'a str,
    pub key: &'a [u8],
    pub hosts: &'a [String],
    /// Known-hosts files `ssh-add -h` reads the destinations' host keys from (`-H`); empty:
    /// OpenSSH's defaults (~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts).
    pub known_hosts: &'a [PathBuf],
    pub secure_path: &'a str,
}

impl Agent {
    /// The socket the child gets as `SSH_AUTH_SOCK`.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The agent's pid (for the audit log and tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start a private agent (empty). Done before the key is fetched, so that the agent's
    /// start-up overlaps the Infisical round trips; [`Agent::load`] then waits for it.
    pub fn spawn(cap: &str, secure_path: &str) -> Result<Agent> {
        let agent_bin = find_trusted("ssh-agent", secure_path)?;
        let add_bin = find_trusted("ssh-add", secure_path)?;
        let dir = private_dir()?;
        let sock = dir.join("agent.sock");
        let mut agent = Agent {
            child: None,
            dir,
            sock,
            out: None,
            agent_bin,
            add_bin,
        };
        let me = std::env::current_exe().map_err(|e| {
            Error::internal(format!("cannot find aap-exec's own executable: {e}"))
                .hint("check that /proc is mounted: ls -l /proc/self/exe")
        })?;
        let mut cmd = Command::new(&me);
        cmd.arg0(KEEPER_ARGV0)
            .arg(&agent.agent_bin)
            .arg(&agent.sock)
            .env_clear()
            .env("PATH", secure_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        crate::sys::unblock_signals_in_child(&mut cmd);
        crate::sys::die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGTERM);
        let mut child = cmd.spawn().map_err(|e| {
            Error::internal(format!(
                "cannot start the ssh-agent keeper {} for `{cap}`: {e}",
                me.display()
            ))
            .hint(format!("check the program: ls -l {}", me.display()))
        })?;
        agent.out = child.stdout.take();
        agent.child = Some(child);
        Ok(agent)
    }

    /// Wait until the agent listens, then load the key with a lifetime of `lifetime`.
    pub fn load(&mut self, load: &Load<'_>, lifetime: Duration) -> Result<()> {
        let cap = load.cap_id;
        let lifetime = lifetime.as_secs();
        if lifetime == 0 {
            return Err(Error::denied(format!(
                "the grant for `{cap}` has less than a second left, too little to load an ssh key"
            ))
            .hint(super::hints::grant_ran_out(cap)));
        }
        // In -D mode ssh-agent prints `SSH_AUTH_SOCK=...` and `echo Agent pid N;` once its
        // socket listens: that is our readiness signal, with no polling.
        let out = self.out.take();
        let mut ready = false;
        if let Some(out) = out {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("echo Agent pid") {
                    ready = true;
                    break;
                }
            }
        }
        if !ready || !self.sock.exists() {
            return Err(Error::internal(format!(
                "{} exited before its socket {} was ready",
                self.agent_bin.display(),
                self.sock.display()
            ))
            .hint(format!(
                "try it by hand: {} -D -a /tmp/aap-test.sock",
                self.agent_bin.display()
            )));
        }

        let mut add = Command::new(&self.add_bin);
        add.arg("-q").arg("-t").arg(lifetime.to_string());
        for h in load.hosts {
            add.arg("-h").arg(h);
        }
        for k in load.known_hosts {
            add.arg("-H").arg(k);
        }
        add.arg("-")
            .env_clear()
            .env("PATH", load.secure_path)
            .env("SSH_AUTH_SOCK", &self.sock)
            // Never prompt: an encrypted key is an error, not a hang on a passphrase.
            .env("SSH_ASKPASS_REQUIRE", "never")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        crate::sys::unblock_signals_in_child(&mut add);
        crate::sys::die_with_parent(&mut add, nix::sys::signal::Signal::SIGKILL);
        let mut ch = add.spawn().map_err(|e| {
            Error::internal(format!("cannot start {}: {e}", self.add_bin.display())).hint(format!(
                "check the program: ls -l {}",
                self.add_bin.display()
            ))
        })?;
        let wrote = ch.stdin.take().map(|mut i| i.write_all(load.key));
        // stdin is closed here (dropped), so ssh-add sees the end of the key.
        let mut errbuf = Vec::new();
        let status = wait_timeout(ch, SSH_ADD_TIMEOUT, &mut errbuf);
        let err_text = String::from_utf8_lossy(&errbuf);
        let err_text = err_text.trim();
        match status {
            Some(st) if st.success() && matches!(wrote, Some(Ok(()))) => {}
            Some(_) => {
                return Err(Error::internal(format!(
                    "ssh-add could not load the key of `{cap}` into the private agent: {}",
                    if err_text.is_empty() {
                        "no message"
                    } else {
                        err_text
                    }
                ))
                .hint(if load.hosts.is_empty() {
                    format!("check the key's format: aap catalog show {cap}")
                } else {
                    super::hints::no_host_key(load.hosts, load.known_hosts)
                }));
            }
            None => {
                return Err(Error::internal(format!(
                    "ssh-add did not load the key of `{cap}` within {}s; it was killed",
                    SSH_ADD_TIMEOUT.as_secs()
                ))
                .hint(format!(
                    "check that the key is not passphrase-protected: aap catalog show {cap}"
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM to the keeper: it kills and reaps the agent before it exits, so once the
            // keeper is reaped no agent of ours is left.
            if crate::sys::send_signal(c.id(), libc::SIGTERM).is_err() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// argv[0] that makes `aap-exec` run [`keeper_main`].
pub const KEEPER_ARGV0: &str = "aap-agent-keeper";

/// The keeper: `aap-agent-keeper SSH_AGENT SOCK`. Runs `SSH_AGENT -D -a SOCK` (its stdout,
/// with the readiness lines, is ours, a pipe to `aap-exec`) and lives exactly as long as it:
/// SIGTERM/SIGINT/SIGHUP (the parent-death signal among them) kill the agent; the agent's
/// exit ends the keeper. `watch` already blocks those signals and SIGCHLD.
pub fn keeper_main(watch: &crate::sys::SignalWatch) -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let [agent_bin, sock] = args.as_slice() else {
        eprintln!("aap-exec: error: aap-agent-keeper is internal to aap-exec");
        eprintln!("aap-exec: hint: aap-exec CAP -- CMD [ARG...]");
        return std::process::ExitCode::from(64);
    };
    let mut cmd = Command::new(agent_bin);
    cmd.arg("-D")
        .arg("-a")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    crate::sys::unblock_signals_in_child(&mut cmd);
    let mut agent = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "aap-exec: error: cannot start {}: {e}",
                Path::new(agent_bin).display()
            );
            eprintln!("aap-exec: hint: apt-get install openssh-client");
            return std::process::ExitCode::from(70);
        }
    };
    loop {
        if let Ok(Some(_)) = agent.try_wait() {
            return std::process::ExitCode::SUCCESS;
        }
        match watch.next(-1) {
            Ok(Some(c)) if c.signo == libc::SIGCHLD => {}
            Ok(Some(c))
                if [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT]
                    .contains(&c.signo) =>
            {
                // SIGTERM lets ssh-agent unlink its socket itself; then reap it.
                let _ = crate::sys::send_signal(agent.id(), libc::SIGTERM);
                let _ = agent.wait();
                return std::process::ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(_) => {
                let _ = agent.kill();
                let _ = agent.wait();
                return std::process::ExitCode::from(70);
            }
        }
    }
}

/// `name` in the trusted path (like sudo's secure_path), never the caller's PATH: an agent that
/// put its own `ssh-add` first in PATH would otherwise be handed the key.
pub fn find_trusted(name: &str, secure_path: &str) -> Result<PathBuf> {
    std::env::split_paths(std::ffi::OsStr::new(secure_path))
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| p.is_file() && crate::sys::can_execute(p))
        .ok_or_else(|| {
            Error::internal(format!(
                "{name} was not found in the trusted path {secure_path}"
            ))
            .hint("install OpenSSH's client tools: apt-get install openssh-client")
        })
}

/// A fresh directory, mode 0700, with a random name under $XDG_RUNTIME_DIR (when it is an
/// absolute directory owned by us) or /tmp. `mkdir` fails on anything already there, a symlink
/// included, so nobody can pre-plant it.
fn private_dir() -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| {
            p.is_absolute()
                && std::fs::symlink_metadata(p)
                    .is_ok_and(|m| m.is_dir() && m.uid() == crate::sys::uid())
        })
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let mut last = None;
    for _ in 0..8 {
        let mut r = [0u8; 12];
        crate::sys::random_bytes(&mut r).map_err(|e| {
            Error::internal(format!("cannot read random bytes for the agent dir: {e}"))
                .hint("check that getrandom(2) works here: head -c 8 /dev/urandom | od -x")
        })?;
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let dir = base.join(format!("aap-agent-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask can only remove bits; make sure it is exactly 0700.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
                    |e| {
                        Error::internal(format!("cannot chmod 0700 {}: {e}", dir.display())).hint(
                            format!("check the runtime directory: ls -ld {}", dir.display()),
                        )
                    },
                )?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot create a private directory for the ssh-agent socket in {}: {e}",
                    base.display()
                ))
                .hint(format!("check the directory: ls -ld {}", base.display())));
            }
        }
    }
    Err(Error::internal(format!(
        "cannot create a fresh agent directory in {}: {}",
        base.display(),
        last.map_or_else(String::new, |e| e.to_string())
    ))
    .hint(format!("check the directory: ls -ld {}", base.display())))
}

/// Wait for `ch` at most `limit`, collecting (the start of) its stderr.
fn wait_timeout(
    mut ch: Child,
    limit: Duration,
    err: &mut Vec<u8>,
) -> Option<std::process::ExitStatus> {
    // ssh-add writes at most a few lines; read them on a thread so a full pipe cannot block it.
    let reader = ch.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = e.read_to_end(&mut b);
            b
        })
    });
    let st = super::child::wait_timeout(ch, limit);
    if let Some(r) = reader {
        if let Ok(b) = r.join() {
            err.extend(b.into_iter().take(4096));
        }
    }
    st
}
