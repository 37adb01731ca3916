//! A `wrapped-command` run: the broker starts the fixed command itself, as the capability's
//! `run_as` user, with an environment built from nothing and the caller's stdio (sent by
//! `aap-exec` with `SCM_RIGHTS`). `aap-exec` only relays signals and waits; the command never
//! runs as the agent's uid and never sees the agent's environment.
//!
//! [`Run::broker_run`]: who (the `run_as` user) -> stdio (the caller's descriptors and its
//! `TERM`/locale) -> environment -> record (exec.start) -> spawn -> exec.spawned (the pid) -> watch (the command, the
//! connection, the wrapper) -> exec.end, then [`BrokerMsg::Exited`].

#![forbid(unsafe_code)]

use super::{Given, Run};
use crate::audit::{EventKind, Outcome};
use crate::catalog::Backing;
use crate::error::{Error, Result};
use crate::grant::Authorized;
use crate::proto::{BrokerMsg, ClientMsg, Conn, FdUse};
use crate::sys::{self, Ready, RunAs, Want};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::{Duration, Instant};

/// How long `aap-exec` has to send its descriptors.
const STDIO_DEADLINE: Duration = Duration::from_secs(5);
/// After the connection closes, how long the command has between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// The caller's variables a command may get, when their values are plain.
const LOCALE_MAX: usize = 16;

/// A value of `TERM`, `LANG` or `LC_*` the command may get: short, and only letters, digits
/// and `._-@+`: no path (a terminfo or locale file of the agent's), no shell syntax.
pub(super) fn plain_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@+".contains(&b))
        && !v.starts_with(['.', '-'])
}

fn locale_name(k: &str) -> bool {
    k == "LANG"
        || k.strip_prefix("LC_").is_some_and(|r| {
            !r.is_empty() && r.len() <= 20 && r.bytes().all(|b| b.is_ascii_uppercase())
        })
}

/// The command's environment, from nothing (sudo's `env_reset`): `PATH` is the config's
/// `secure_path`; `HOME`, `USER`, `LOGNAME` and `SHELL` are `run_as`'s; `TERM` and
/// `LANG`/`LC_*` are the caller's only when plain; then the nesting marker.
pub(super) fn base_env(
    secure_path: &str,
    user: &RunAs,
    term: Option<&str>,
    locale: &[(String, String)],
    invocation: &str,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), secure_path.into()),
        ("HOME".into(), user.home.clone().into_os_string()),
        ("USER".into(), user.name.clone().into()),
        ("LOGNAME".into(), user.name.clone().into()),
        ("SHELL".into(), user.shell.clone().into_os_string()),
    ];
    if let Some(t) = term.filter(|t| plain_value(t)) {
        env.push(("TERM".into(), t.into()));
    }
    for (k, v) in locale.iter().take(LOCALE_MAX) {
        if locale_name(k) && plain_value(v) && !env.iter().any(|(e, _)| e == k.as_str()) {
            env.push((k.into(), v.into()));
        }
    }
    env.push((crate::exec::run::NEST_MARKER.into(), invocation.into()));
    env
}

/// The user a wrapped-command capability runs as, and whether this broker can start a process
/// as it. The catalog's `run_as`, else the broker's own user.
pub(crate) fn run_as_user(cap_id: &str, backing: &Backing) -> Result<RunAs> {
    let Backing::WrappedCommand { run_as, .. } = backing else {
        return Err(
            Error::internal(format!("capability `{cap_id}` is not a wrapped command"))
                .hint(format!("aap catalog show {cap_id}")),
        );
    };
    let lookup = match run_as {
        Some(name) => sys::user_by_name(name),
        None => sys::user_by_uid(sys::euid()),
    };
    let shown = run_as
        .clone()
        .unwrap_or_else(|| format!("uid {} (the broker's own user)", sys::euid()));
    let user = match lookup {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(Error::config(format!(
                "capability `{cap_id}` runs as {shown}, which has no passwd entry on this host"
            ))
            .hint(format!(
                "create the user or change run_as in the catalog, then: getent passwd {}; aap catalog check",
                run_as.as_deref().unwrap_or("$(id -un)")
            )));
        }
        Err(e) => {
            return Err(Error::config(format!(
                "cannot look up user {shown} of capability `{cap_id}`: {e}"
            ))
            .hint("check the passwd database: getent passwd"));
        }
    };
    if !sys::can_switch_to(&user) {
        return Err(Error::config(format!(
            "capability `{cap_id}` runs as {} (uid {}), but the broker (uid {}) holds no CAP_SETUID/CAP_SETGID to start a process as another user",
            user.name,
            user.uid,
            sys::euid()
        ))
        .hint("install contrib/systemd/run-as-other-users.conf as a drop-in of aap-broker.service (docs/systemd.md), or remove run_as from the capability; then: aap catalog check"));
    }
    Ok(user)
}

impl Run<'_> {
    /// Stages 4 to 6 for a broker-run command (the fetch is done; `given` holds the memfds of
    /// an `env` or `fd` injection).
    pub(super) fn broker_run(
        &self,
        conn: &mut Conn<UnixStream>,
        pinned: Option<&OwnedFd>,
        auth: &Authorized,
        given: Given,
        program: String,
        arg0: String,
    ) -> Result<()> {
        let b = self.b;
        let cap = auth.capability();
        let user = match run_as_user(&cap.id, &cap.backing) {
            Ok(u) => u,
            Err(e) => return self.deny(auth, e),
        };
        let (stdio, cwd, term, locale, foreground) = match take_stdio(conn) {
            Ok(x) => x,
            Err(e) => return self.deny(auth, e),
        };
        let (stdio, mut terminal) = match super::tty::setup(stdio, user.uid, foreground) {
            Ok(x) => x,
            Err(e) => return self.deny(auth, e),
        };
        let Given {
            mut teardown,
            fds,
            uses,
            ..
        } = given;
        let mut env = base_env(
            &b.cfg.secure_path,
            &user,
            term.as_deref(),
            &locale,
            &self.invocation,
        );
        let mut inherit = Vec::new();
        for (u, fd) in uses.iter().zip(fds) {
            match u {
                FdUse::Env { name } => {
                    let v = match read_memfd(&fd) {
                        Ok(v) => v,
                        Err(e) => return self.deny(auth, e),
                    };
                    env.retain(|(k, _)| k != name.as_str());
                    env.push((name.into(), OsString::from_vec(v.to_vec())));
                }
                FdUse::Fd { name } => {
                    env.retain(|(k, _)| k != name.as_str());
                    env.push((name.into(), format!("/dev/fd/{}", fd.as_raw_fd()).into()));
                    inherit.push(fd);
                }
                FdUse::GitCredential { .. } => {
                    return self.deny(
                        auth,
                        Error::config(format!(
                            "capability `{}` injects git-credential, which a wrapped command cannot take",
                            cap.id
                        ))
                        .hint("aap catalog check"),
                    );
                }
            }
        }
        // Never owed for a broker-run command (`run_as` is given).
        let (warning, mut notes, _) = self.record_start(conn, auth, &program, Some(&user.name))?;
        if let Some(w) = warning {
            let _ = conn.send(
                &BrokerMsg::Progress {
                    message: format!("warning: {w}"),
                },
                &[],
            );
        }
        let t0 = Instant::now();
        let spawned = spawn(
            &program,
            &arg0,
            &self.r.args,
            env,
            &user,
            stdio,
            &cwd,
            &inherit,
            terminal.is_some(),
        );
        drop(inherit);
        drop(cwd);
        let mut end = self.event(EventKind::ExecEnd, Outcome::Ok, auth);
        end.program = Some(program);
        end.run_as = Some(user.name.clone());
        let (mut child, started_in_cwd) = match spawned {
            Ok(x) => x,
            Err(e) => {
                end.outcome = Outcome::Error;
                end.error = Some(e.message().to_owned());
                end.duration_ms = Some(t0.elapsed().as_millis() as u64);
                let r = b.append(&end);
                b.journal.remove(&self.invocation);
                r?;
                return Err(e);
            }
        };
        let pid = child.id();
        end.pid = Some(pid);
        end.cwd_used = Some(if started_in_cwd {
            self.r.cwd.clone()
        } else {
            "/".into()
        });
        // The pid, recorded as soon as it is known; a command whose pid cannot be recorded is
        // killed rather than left running unaccounted for.
        let mut spawned = self.event(EventKind::ExecSpawned, Outcome::Ok, auth);
        spawned.program = end.program.clone();
        spawned.run_as = end.run_as.clone();
        spawned.pid = Some(pid);
        spawned.cwd_used = end.cwd_used.clone();
        if let Err(e) = b.append(&spawned) {
            let _ = child.kill();
            let st = child.wait().ok();
            end.outcome = Outcome::Error;
            end.error = Some(format!(
                "exec.spawned not recorded, command killed: {}",
                e.message()
            ));
            end.exit_code = st.and_then(|s| s.code());
            end.signal = st.and_then(|s| s.signal());
            end.duration_ms = Some(t0.elapsed().as_millis() as u64);
            let _ = b.append(&end);
            b.journal.remove(&self.invocation);
            return Err(e);
        }
        drop(spawned);
        if let Some(t) = terminal.as_mut() {
            t.enter_raw(&mut notes);
        }
        let status = watch(conn, pinned, &mut child, &mut notes, terminal.as_mut());
        // The caller's terminal gets its modes back before aap-exec is told of the end.
        drop(terminal);
        teardown.run();
        if let Some(w) = teardown.failure.take() {
            notes.push(w);
        }
        end.duration_ms = Some(t0.elapsed().as_millis() as u64);
        let (code, signal) = match status {
            Some(st) => (st.code(), st.signal()),
            None => (None, None),
        };
        end.exit_code = code;
        end.signal = signal;
        if notes.iter().any(|n| n.starts_with("lost:")) {
            end.outcome = Outcome::WrapperLost;
        }
        if !notes.is_empty() {
            end.error = Some(notes.join("; "));
        }
        let recorded = b.append(&end);
        b.journal.remove(&self.invocation);
        recorded?;
        let _ = conn.send(&BrokerMsg::Exited { code, signal }, &[]);
        Ok(())
    }
}

type Stdio = (
    [OwnedFd; 3],
    OwnedFd,
    Option<String>,
    Vec<(String, String)>,
    bool,
);

/// Ask `aap-exec` for its stdio and working directory, and take them.
fn take_stdio(conn: &mut Conn<UnixStream>) -> Result<Stdio> {
    let lost = |e: crate::proto::ProtoError| {
        Error::unavailable(format!(
            "aap-exec did not send its standard input, output and error: {e}"
        ))
        .hint("install aap and aap-exec of the same release as the broker (aap-exec --version; aap --version)")
    };
    conn.send(&BrokerMsg::Stdio {}, &[]).map_err(lost)?;
    let body = conn
        .recv_by(Instant::now() + STDIO_DEADLINE)
        .map_err(lost)?;
    let (term, locale, foreground) = match crate::proto::decode::<ClientMsg>(&body) {
        Ok(ClientMsg::Stdio {
            term,
            locale,
            foreground,
        }) => (term, locale, foreground),
        Ok(_) => {
            return Err(lost(crate::proto::ProtoError::Malformed(
                "another message than stdio".into(),
            )));
        }
        Err(e) => return Err(lost(e)),
    };
    let mut fds = conn.take_fds(4).map_err(lost)?.into_iter();
    let (Some(i), Some(o), Some(e), Some(cwd)) = (fds.next(), fds.next(), fds.next(), fds.next())
    else {
        return Err(lost(crate::proto::ProtoError::Malformed(
            "fewer than 4 descriptors".into(),
        )));
    };
    if !sys::is_directory_fd(&cwd) {
        return Err(Error::denied(
            "the working directory aap-exec sent is not a directory".to_string(),
        )
        .hint("run aap-exec from a directory: cd ~ && aap-exec ..."));
    }
    Ok(([i, o, e], cwd, term, locale, foreground))
}

fn read_memfd(fd: &OwnedFd) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone().map_err(|e| {
        Error::internal(format!("cannot duplicate the secret's memfd: {e}"))
            .hint("check the broker's descriptor limit: ulimit -n")
    })?);
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 64 * 1024]);
    let mut n = 0;
    loop {
        if n == buf.len() {
            return Err(Error::config(
                "the secret is over 64 KiB, too long for an environment variable".to_string(),
            )
            .hint("use the fd form for it in the catalog (inject: - type: fd)"));
        }
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => {
                return Err(
                    Error::internal(format!("cannot read the secret's memfd: {e}"))
                        .hint("run the command again"),
                );
            }
        }
    }
    buf.truncate(n);
    if buf.contains(&0) {
        return Err(Error::config(
            "the secret contains a NUL byte, which an environment variable cannot hold".to_string(),
        )
        .hint("use the fd form for it in the catalog (inject: - type: fd)"));
    }
    Ok(buf)
}

/// Start the command; returns it and whether it started in the caller's directory.
#[allow(clippy::too_many_arguments)]
fn spawn(
    program: &str,
    arg0: &str,
    args: &[OsString],
    env: Vec<(OsString, OsString)>,
    user: &RunAs,
    [i, o, e]: [OwnedFd; 3],
    cwd: &OwnedFd,
    inherit: &[OwnedFd],
    terminal: bool,
) -> Result<(std::process::Child, bool)> {
    let (report_r, report_w) = sys::pipe_cloexec().map_err(|e| {
        Error::internal(format!("cannot make a pipe: {e}"))
            .hint("check the broker's descriptor limit: ulimit -n")
    })?;
    let mut cmd = std::process::Command::new(program);
    cmd.arg0(arg0)
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(i)
        .stdout(o)
        .stderr(e);
    let switch = (user.uid != sys::euid() || user.gid != sys::egid())
        .then(|| (user.uid, user.gid, user.groups.clone()));
    sys::broker_child(
        &mut cmd,
        sys::BrokerChild {
            switch,
            cwd: cwd.as_raw_fd(),
            report: report_w.as_raw_fd(),
            inherit: inherit.iter().map(AsRawFd::as_raw_fd).collect(),
            terminal,
        },
    );
    let child = cmd.spawn();
    drop(cmd);
    drop(report_w);
    let child = child.map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => crate::error::Kind::NotFound,
            std::io::ErrorKind::PermissionDenied => crate::error::Kind::CannotExecute,
            _ => crate::error::Kind::Internal,
        };
        Error::new(
            code,
            format!("the broker could not start {program} as {}: {e}", user.name),
        )
        .hint(format!(
            "check the program and the user: ls -l {program}; getent passwd {}",
            user.name
        ))
    })?;
    let mut flag = [0u8; 1];
    let in_cwd = std::io::Read::read(&mut std::fs::File::from(report_r), &mut flag)
        .map(|n| n == 1 && flag[0] == sys::STARTED_IN_CWD)
        .unwrap_or(false);
    Ok((child, in_cwd))
}

/// Relay signals (and, on a terminal, bytes) until the command exits; when the connection
/// closes or the wrapper dies, end the command's process group (SIGTERM, then SIGKILL).
/// Returns its status (None: it could not be waited for).
fn watch(
    conn: &mut Conn<UnixStream>,
    pinned: Option<&OwnedFd>,
    child: &mut std::process::Child,
    notes: &mut Vec<String>,
    mut term: Option<&mut super::tty::Terminal>,
) -> Option<std::process::ExitStatus> {
    let pid = child.id();
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            notes.push(format!(
                "cannot watch the command (pidfd_open: {e}); it was killed"
            ));
            let _ = sys::signal_group(pid, sys::SIGKILL);
            return child.wait().ok();
        }
    };
    let mut peer_open = true;
    let mut killed_at: Option<Instant> = None;
    loop {
        if !(peer_open && conn.has_buffered()) {
            let mut fds = vec![pidfd.as_fd()];
            let mut conn_at = None;
            let mut pinned_at = None;
            if peer_open {
                conn_at = Some(fds.len());
                fds.push(conn.sock().as_fd());
                if let Some(p) = pinned {
                    pinned_at = Some(fds.len());
                    fds.push(p.as_fd());
                }
            }
            let (mut input_at, mut master_at, mut room_at) = (None, None, None);
            if let Some(t) = term.as_deref() {
                if let Some(fd) = t.input_fd() {
                    input_at = Some(fds.len());
                    fds.push(fd);
                }
                if let Some(fd) = t.master_fd() {
                    master_at = Some(fds.len());
                    fds.push(fd);
                }
                if let Some(fd) = t.master_write_fd() {
                    room_at = Some(fds.len());
                    fds.push(fd);
                }
            }
            let mut timeout = match killed_at {
                Some(t) => KILL_GRACE.saturating_sub(t.elapsed()).as_millis() as i32,
                None => -1,
            };
            // A command on a terminal may stop (^Z): look every so often.
            let watch_stop = term.as_deref().is_some_and(|t| !t.stopped) && peer_open;
            if watch_stop && !(0..=super::tty::STOP_POLL_MS).contains(&timeout) {
                timeout = super::tty::STOP_POLL_MS;
            }
            let wants: Vec<_> = fds
                .iter()
                .enumerate()
                .map(|(i, fd)| {
                    let w = if Some(i) == room_at {
                        Want::Write
                    } else {
                        Want::Read
                    };
                    (*fd, w)
                })
                .collect();
            let ready = sys::wait_ready(&wants, timeout);
            drop(wants);
            drop(fds);
            match ready {
                Ok(Ready::Fd(0)) => {
                    if let Some(t) = term.as_deref_mut() {
                        t.drain();
                    }
                    return child.wait().ok();
                }
                Ok(Ready::Fd(i)) if Some(i) == conn_at => {}
                Ok(Ready::Fd(i)) if Some(i) == pinned_at => {
                    lose(
                        pid,
                        notes,
                        "lost: the wrapper process exited while the command ran; its process group was ended",
                        &mut peer_open,
                        &mut killed_at,
                    );
                    continue;
                }
                Ok(Ready::Fd(i)) => {
                    if let Some(t) = term.as_deref_mut() {
                        if Some(i) == input_at {
                            t.relay_input(pid);
                        } else if Some(i) == master_at {
                            t.relay_output();
                        } else if Some(i) == room_at {
                            t.flush_input(pid);
                        }
                    }
                    continue;
                }
                Ok(Ready::Timeout) => {
                    if killed_at.is_some_and(|t| t.elapsed() >= KILL_GRACE) {
                        let _ = sys::signal_group(pid, sys::SIGKILL);
                        // The next poll (no timeout) waits for its exit.
                        killed_at = None;
                    } else if watch_stop
                        && let Some(t) = term.as_deref_mut()
                        && sys::child_stopped(pid).unwrap_or(false)
                    {
                        t.stop();
                        let _ = conn.send(&BrokerMsg::Stopped {}, &[]);
                    }
                    continue;
                }
                Err(e) => {
                    notes.push(format!("cannot watch the command ({e}); it was killed"));
                    let _ = sys::signal_group(pid, sys::SIGKILL);
                    return child.wait().ok();
                }
            }
        }
        match conn.recv::<ClientMsg>() {
            Ok(ClientMsg::Signal { signo }) if sys::is_relayable(signo) => {
                match term.as_deref_mut() {
                    // The kernel sends SIGWINCH to the command's terminal's foreground group.
                    Some(t) if signo == sys::SIGWINCH => t.resize(),

                    _ => {
                        let _ = sys::signal_group(pid, signo);
                    }
                }
            }
            // The caller was continued (`fg`, `bg`, or a SIGCONT): so is the command.
            Ok(ClientMsg::Continued { foreground }) => {
                if let Some(t) = term.as_deref_mut() {
                    t.resume(foreground, notes);
                }
                let _ = sys::signal_group(pid, sys::SIGCONT);
            }
            Ok(_) => {
                lose(
                    pid,
                    notes,
                    "lost: the wrapper sent a message out of order; the command's process group was ended",
                    &mut peer_open,
                    &mut killed_at,
                );
            }
            Err(_) => {
                lose(
                    pid,
                    notes,
                    "lost: the wrapper's connection closed while the command ran; its process group was ended",
                    &mut peer_open,
                    &mut killed_at,
                );
            }
        }
    }
}

/// The wrapper is gone (or broke the protocol): note why, ask the command's group to end, stop
/// reading the connection, and start the grace period after which it is killed.
fn lose(
    pid: u32,
    notes: &mut Vec<String>,
    why: &str,
    peer_open: &mut bool,
    killed_at: &mut Option<Instant>,
) {
    *peer_open = false;
    *killed_at = Some(Instant::now());
    notes.push(why.to_owned());
    let _ = sys::signal_group(pid, sys::SIGTERM);
    // A stopped command gets the SIGTERM only once it runs again.
    let _ = sys::signal_group(pid, sys::SIGCONT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_values_pass() {
        for ok in [
            "xterm-256color",
            "en_US.UTF-8",
            "C",
            "screen.xterm",
            "de_DE@euro",
        ] {
            assert!(plain_value(ok), "{ok}");
        }
        for bad in [
            "",
            "/tmp/x",
            "../x",
            "a b",
            "$(id)",
            "x;y",
            "-x",
            ".x",
            &"a".repeat(65),
        ] {
            assert!(!plain_value(bad), "{bad}");
        }
        assert!(locale_name("LC_ALL") && locale_name("LANG"));
        assert!(!locale_name("LC_") && !locale_name("LD_PRELOAD") && !locale_name("LC_x"));
    }

    #[test]
    fn the_environment_is_built_from_nothing() {
        let u = RunAs {
            name: "web".into(),
            uid: 5,
            gid: 5,
            groups: vec![5],
            home: "/srv/web".into(),
            shell: "/bin/sh".into(),
        };
        let env = base_env(
            "/usr/bin:/bin",
            &u,
            Some("xterm"),
            &[
                ("LANG".into(), "C.UTF-8".into()),
                ("LC_ALL".into(), "/tmp/evil".into()),
                ("LD_PRELOAD".into(), "x.so".into()),
                ("BASH_FUNC_curl%%".into(), "() { :; }".into()),
            ],
            "01INV",
        );
        let keys: Vec<String> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "PATH",
                "HOME",
                "USER",
                "LOGNAME",
                "SHELL",
                "TERM",
                "LANG",
                crate::exec::run::NEST_MARKER
            ]
        );
        assert!(env.contains(&("HOME".into(), "/srv/web".into())));
    }
}
