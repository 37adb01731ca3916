//! `aap-exec CAP -- CMD [ARG...]`, the client's side, as the stage calls of [`run`]:
//!
//! [`ask`] (resolve the program, send the request; the broker authorizes, fetches, audits
//! exec.start) -> [`prepare`] (what the child is handed: sealed memfds, variable names, the
//! ssh agent's socket) -> [`spawn_and_wait`] (spawn, report the pid, forward signals, wipe and
//! close what we hold) -> [`report`] (the end) -> exit with the child's status.
//!
//! This process is the agent's and holds no credential of its own; whatever it receives, the
//! child would have anyway. The decisions, the audit log and the teardown that matters (a
//! scoped token's revocation) are the broker's, which also acts when this process is killed.

#![forbid(unsafe_code)]

use super::agent_socket::AgentSocket;
use super::child::{self, Ended};
use super::command;
use crate::error::{Error, Result, shell_quote};
use crate::proto::{BrokerMsg, ClientMsg, FdUse, Hello};
use crate::secret::SecretBytes;
use crate::sys::{self, SignalWatch};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

pub(super) type Conn = crate::proto::Conn<std::os::unix::net::UnixStream>;

/// The marker an `aap-exec` child carries, so a nested `aap-exec` can tell it is nested.
pub const NEST_MARKER: &str = "AAP_EXEC_INVOCATION";

/// How long aap-exec waits for the broker to confirm the end is recorded.
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Invocation {
    pub cap: String,
    pub session: Option<String>,
    pub reason: Option<String>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

/// The working directory as the broker is told it (empty when it cannot be read), and the path
/// to resolve a program against (`/` then).
pub fn caller_cwd() -> (String, std::path::PathBuf) {
    let here = std::env::current_dir();
    let shown = here
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    (shown, here.unwrap_or_else(|_| "/".into()))
}

/// `program` resolved against our PATH and `cwd`, as the broker is told it: the absolute path,
/// or why it could not be resolved (the broker records and judges either).
pub fn resolve_for_broker(
    program: &std::ffi::OsStr,
    cwd: &std::path::Path,
) -> (String, Option<crate::proto::ProgramError>) {
    let child_path = std::env::var_os("PATH");
    match command::resolve(program, child_path.as_deref(), cwd).and_then(|p| {
        p.into_os_string().into_string().map_err(|p| {
            Error::new(
                crate::error::Kind::NotFound,
                format!("the program path {:?} is not UTF-8", p),
            )
            .hint("run it through a UTF-8 path")
        })
    }) {
        Ok(p) => (p, None),
        Err(e) => (
            String::new(),
            Some(crate::proto::ProgramError {
                code: e.exit_code(),
                message: e.message().to_owned(),
                hint: e.hint_text().map(str::to_owned),
            }),
        ),
    }
}

/// Run the exec path. Returns the exit code, or does not return when the child died of a signal
/// (the wrapper re-raises it).
pub fn run(inv: Invocation, watch: &SignalWatch) -> Result<u8> {
    let (mut conn, delivered, held) = match ask(&inv)? {
        Asked::Deliver(c, d, h) => (c, d, h),
        Asked::BrokerRuns(mut c) => return super::brokerrun::wait(&mut c, watch),
    };
    let (cmd, held) = prepare(&inv, &mut conn, delivered, held)?;
    // A ^C or kill that arrived while the broker worked stops us here, before any child exists.
    if let Some(sig) = pending_fatal(watch) {
        drop(cmd);
        drop(held);
        sys::exit_with_signal(sig);
    }
    let (ended, socket) = spawn_and_wait(&inv, &mut conn, cmd, held, watch)?;
    report(&mut conn, &ended, socket);
    match ended? {
        Ended::Exited(c) => Ok(c.clamp(0, 255) as u8),
        Ended::Signaled(s) => sys::exit_with_signal(s),
    }
}

/// The broker's answer: what to hand the child we start, or (a wrapped command) that the
/// broker starts it itself and we wait.
#[allow(clippy::large_enum_variant)] // one value per run, moved once
enum Asked {
    Deliver(Conn, Delivered, Held),
    BrokerRuns(Conn),
}

/// What the broker hands over for the child.
struct Delivered {
    invocation: String,
    program: String,
    arg0: String,
    strip: Vec<String>,
    strip_code_vars: bool,
    uses: Vec<FdUse>,
    warning: Option<String>,
    ssh_auth_sock: Option<String>,
    http_proxy: Option<crate::proto::ProxyUse>,
}

/// Stage 1, ask: resolve the program, harden this process, send the request, and wait for the
/// broker's answer (showing its progress lines and notices; for an ssh-agent capability,
/// making the socket the broker's agent serves on). A denial comes back as the error to print,
/// with the broker's exit code.
fn ask(inv: &Invocation) -> Result<Asked> {
    let (cwd, cwd_path) = caller_cwd();
    // A command that cannot be resolved is still the broker's to record (and to deny).
    let (program, program_error) = resolve_for_broker(&inv.program, &cwd_path);
    // Before anything secret arrives: not dumpable, no core dumps, no inherited descriptors.
    sys::harden_process().map_err(|e| {
        Error::internal(format!(
            "cannot harden the process before receiving a secret: {e}"
        ))
        .hint("check that prctl(2) and setrlimit(2) are allowed here")
    })?;
    sys::cloexec_from_3().map_err(|e| {
        Error::internal(format!(
            "cannot mark inherited descriptors close-on-exec: {e}"
        ))
        .hint("check the open descriptors of the caller: ls -l /proc/$$/fd")
    })?;

    let mut conn = crate::client::connect()?;
    crate::client::send_request(
        &mut conn,
        &ClientMsg::Exec {
            hello: Hello::current(),
            cap: inv.cap.clone(),
            session: crate::client::session(inv.session.clone()),
            reason: inv.reason.clone(),
            argv: std::iter::once(&inv.program)
                .chain(inv.args.iter())
                .map(|a| a.as_encoded_bytes().to_vec())
                .collect(),
            program,
            program_error,
            cwd,
            nested: std::env::var_os(NEST_MARKER).map(|v| v.to_string_lossy().into_owned()),
        },
    )?;
    let mut patience = crate::client::Patience::new("aap-exec");
    let mut held = Held::default();
    loop {
        match patience.recv(&mut conn)? {
            BrokerMsg::Progress { message } => eprintln!("aap-exec: {message}"),
            BrokerMsg::Notice { text } => eprint!("{text}"),
            BrokerMsg::Error {
                code,
                message,
                hint,
            } => return Err(crate::client::remote_error(code, message, hint)),
            BrokerMsg::Deliver {
                invocation,
                program,
                arg0,
                strip,
                strip_code_vars,
                fds: uses,
                warning,
                ssh_auth_sock,
                http_proxy,
            } => {
                let d = Delivered {
                    invocation,
                    program,
                    arg0,
                    strip,
                    strip_code_vars,
                    uses,
                    warning,
                    ssh_auth_sock,
                    http_proxy,
                };
                return Ok(Asked::Deliver(conn, d, held));
            }
            BrokerMsg::Stdio {} => {
                drop(held);
                super::brokerrun::send_stdio(&conn)?;
                return Ok(Asked::BrokerRuns(conn));
            }
            BrokerMsg::AgentSocket {} if held.agent_socket.is_none() => {
                // The broker's ssh agent serves on a socket of ours; it keeps the key.
                let s = held.agent_socket.insert(AgentSocket::create()?);
                s.send(&conn)?;
            }
            _ => {
                return Err(Error::unavailable("the aap broker answered out of order")
                    .hint("install aap and aap-exec of the same release as the broker"));
            }
        }
    }
}

/// The child's command: its program, arguments and environment, and its `argv[0]` as the
/// broker named it (std's `Command` keeps no `argv[0]` that could be read back).
struct ChildCommand {
    cmd: std::process::Command,
    arg0: OsString,
}

/// Stage 2, inject: the child's command with its environment (ours, stripped) and each
/// delivered descriptor in the form the broker named.
fn prepare(
    inv: &Invocation,
    conn: &mut Conn,
    d: Delivered,
    mut held: Held,
) -> Result<(ChildCommand, Held)> {
    let fds = conn
        .take_fds(d.uses.len())
        .map_err(|e| crate::client::broken(&e))?;
    let mut cmd = std::process::Command::new(&d.program);
    cmd.args(&inv.args);
    cmd.env_clear();
    cmd.envs(child_env(&d.strip, d.strip_code_vars, &d.invocation));
    for (u, fd) in d.uses.iter().zip(fds) {
        hand_over(&inv.cap, u, fd, &mut cmd, &mut held)?;
    }
    if let Some(sock) = d.ssh_auth_sock {
        // The broker's agent replaces any inherited one; an inherited pid would name the
        // wrong agent.
        cmd.env("SSH_AUTH_SOCK", sock);
        cmd.env_remove("SSH_AGENT_PID");
    }
    if let Some(p) = &d.http_proxy {
        hand_over_proxy(p, &mut cmd);
    }
    // The child's argv[0], its empty signal mask (not aap-exec's blocked set: std would keep
    // it, and the child could never be stopped with SIGTERM) and the descriptors it inherits
    // are set at the spawn (`sys::spawn_clean`).
    let arg0 = OsString::from(d.arg0);
    if let Some(w) = d.warning {
        eprintln!("aap-exec: warning: {w}");
    }
    Ok((ChildCommand { cmd, arg0 }, held))
}

/// Stage 3, run: spawn, tell the broker the child's pid, forward signals until it ends, then
/// wipe and close what we held for it. A spawn failure is reported to the broker as the end.
/// The ssh agent socket (a dead socket once the child is gone: the broker
/// stops serving when told of the end) is handed on, to be removed while the broker records.
fn spawn_and_wait(
    inv: &Invocation,
    conn: &mut Conn,
    child: ChildCommand,
    mut held: Held,
    watch: &SignalWatch,
) -> Result<(Result<Ended>, Option<AgentSocket>)> {
    let ChildCommand { cmd, arg0 } = child;
    let shown = shell_quote(&inv.program.to_string_lossy());
    let early = drain_pending(watch);
    let inherit: Vec<_> = held.inherit.iter().map(AsRawFd::as_raw_fd).collect();
    let spawned = child::spawn(&cmd, &arg0, &inherit, &shown);
    drop(cmd); // the Command's copy of the environment goes now, not at the end
    let mut ch = match spawned {
        Ok(ch) => ch,
        Err(e) => {
            drop(held);
            // The broker records the end (wrapper-lost) when we go; say why first.
            let _ = conn.send(
                &ClientMsg::Ended {
                    code: Some(i32::from(e.exit_code())),
                    signal: None,
                },
                &[],
            );
            return Err(e);
        }
    };
    let _ = conn.send(&ClientMsg::Started { pid: ch.id() }, &[]);
    let ended = child::supervise(&mut ch, watch, &early);
    // Teardown first: wipe, close.
    let socket = held.agent_socket.take();
    drop(held);
    Ok((ended, socket))
}

/// Stage 4, report: how the child ended, and wait for the broker to confirm `exec.end` is
/// recorded. Its failure is a warning: the child's status stands. The agent socket is removed
/// between the two, while the broker works.
fn report(conn: &mut Conn, ended: &Result<Ended>, socket: Option<AgentSocket>) {
    let report = match ended {
        Ok(Ended::Exited(c)) => ClientMsg::Ended {
            code: Some(*c),
            signal: None,
        },
        Ok(Ended::Signaled(s)) => ClientMsg::Ended {
            code: None,
            signal: Some(*s),
        },
        Err(_) => ClientMsg::Ended {
            code: None,
            signal: None,
        },
    };
    let recorded = conn.send(&report, &[]).and_then(|()| {
        drop(socket);
        let _ = conn.sock().set_read_timeout(Some(RECORD_TIMEOUT));
        loop {
            match conn.recv::<BrokerMsg>()? {
                BrokerMsg::Recorded {} => return Ok(()),
                BrokerMsg::Progress { message } => eprintln!("aap-exec: {message}"),
                _ => return Err(crate::proto::ProtoError::Malformed("not Recorded".into())),
            }
        }
    });
    if let Err(e) = recorded {
        eprintln!(
            "aap-exec: warning: the broker did not confirm that the end of this run was recorded ({e}); the child's status stands"
        );
    }
}

/// What this process holds for the child until it has exited: descriptors it inherits, the
/// secret behind an `env` variable (wiped on drop), the ssh agent socket (removed on drop).
#[derive(Default)]
struct Held {
    inherit: Vec<OwnedFd>,
    secrets: Vec<SecretBytes>,
    agent_socket: Option<AgentSocket>,
}

fn read_memfd(fd: OwnedFd) -> Result<SecretBytes> {
    use std::io::Read;
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(256));
    std::fs::File::from(fd).read_to_end(&mut buf).map_err(|e| {
        Error::internal(format!("cannot read the secret the broker sent: {e}"))
            .hint("run the command again")
    })?;
    Ok(SecretBytes::new(buf))
}

/// Hand one delivered descriptor to the child in the form the broker named.
fn hand_over(
    cap: &str,
    u: &FdUse,
    fd: OwnedFd,
    cmd: &mut std::process::Command,
    held: &mut Held,
) -> Result<()> {
    match u {
        FdUse::Env { name } => {
            let s = read_memfd(fd)?;
            cmd.env(name, OsString::from_vec(s.expose().to_vec()));
            held.secrets.push(s);
        }
        FdUse::Fd { name } => {
            cmd.env(name, format!("/dev/fd/{}", fd.as_raw_fd()));
            held.inherit.push(fd);
        }
        FdUse::GitCredential { host } => {
            let helper = helper_program(cap)?;
            let vars = super::gitcred::git_config_env(
                &|k| std::env::var_os(k),
                &helper,
                host,
                fd.as_raw_fd(),
            );
            for (k, v) in vars {
                cmd.env(k, v);
            }
            // `git -c` settings inherited from a calling git are read after GIT_CONFIG_COUNT,
            // so a credential helper among them would come back after our reset: drop them.
            if super::gitcred::parameters_touch_credentials(
                std::env::var_os(super::gitcred::PARAMETERS_VAR).as_deref(),
            ) {
                cmd.env_remove(super::gitcred::PARAMETERS_VAR);
            }
            held.inherit.push(fd);
        }
    }
    Ok(())
}

/// The `http-proxy` form: git's URLs for a Forgejo host go to the broker's endpoint (and no
/// credential helper is asked for anything), and API tools get its base URL in the variable
/// the catalog names. There is no token here to hand over: the broker adds it on the wire.
fn hand_over_proxy(p: &crate::proto::ProxyUse, cmd: &mut std::process::Command) {
    if !p.host.is_empty() {
        for (k, v) in super::gitcred::proxy_config_env(&|k| std::env::var_os(k), &p.base, &p.host) {
            cmd.env(k, v);
        }
        // A credential helper among inherited `git -c` settings would come back after the
        // reset.
        if super::gitcred::parameters_touch_credentials(
            std::env::var_os(super::gitcred::PARAMETERS_VAR).as_deref(),
        ) {
            cmd.env_remove(super::gitcred::PARAMETERS_VAR);
        }
    }
    cmd.env(&p.var, &p.base);
}

/// The absolute path of `aap` (the git credential helper): next to the running `aap-exec`.
fn helper_program(cap: &str) -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::internal(format!("cannot find the path of aap-exec itself: {e}"))
            .hint("check that /proc is mounted: ls /proc/self/exe")
    })?;
    let aap = exe.with_file_name("aap");
    if !sys::can_execute(&aap) {
        return Err(Error::config(format!(
            "capability `{cap}` needs the git credential helper {}, which is missing or not executable",
            aap.display()
        ))
        .hint(format!(
            "install aap next to aap-exec: ls -l {}",
            shell_quote(&aap.to_string_lossy())
        )));
    }
    aap.into_os_string().into_string().map_err(|p| {
        Error::config(format!(
            "the path of aap, {}, is not UTF-8 and cannot go into a git config value",
            std::path::Path::new(&p).display()
        ))
        .hint("install aap and aap-exec under a UTF-8 path, e.g. /usr/local/bin")
    })
}

/// The child's base environment: ours, minus aap's own variables and every variable in
/// `strip`, plus the nesting marker. With `strip_code_vars` (the capability names its
/// programs), also minus every variable that would make the allowed program run the caller's
/// code.
fn child_env(
    strip: &[String],
    strip_code_vars: bool,
    invocation: &str,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            let drop = k.starts_with("AAP_")
                || strip.iter().any(|s| s == k.as_ref())
                || (strip_code_vars && super::inject::injects_code(&k));
            !drop
        })
        .collect();
    if let Some(tz) = sys::caller_tz() {
        env.push(("TZ".into(), tz.to_os_string()));
    }
    env.push((NEST_MARKER.into(), invocation.into()));
    env
}

/// Every pending signal but SIGCHLD.
fn drain_pending(watch: &SignalWatch) -> Vec<i32> {
    let mut out = Vec::new();
    while let Ok(Some(c)) = watch.try_next() {
        if c.signo != libc::SIGCHLD {
            out.push(c.signo);
        }
    }
    out
}

/// A terminating signal that is pending (SIGWINCH and SIGCHLD are not).
fn pending_fatal(watch: &SignalWatch) -> Option<i32> {
    while let Ok(Some(c)) = watch.try_next() {
        if c.signo != libc::SIGWINCH && c.signo != libc::SIGCHLD {
            return Some(c.signo);
        }
    }
    None
}
