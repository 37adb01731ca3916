//! Break-glass uses (a critical capability, or any grant made with `--break-glass`): never
//! silent. Every audit event of the use is fsync'd (see `Event::sync`), a banner goes to
//! stderr, and the operator's `notify.command` runs with the `exec.start` line on its stdin
//! before the child starts. A notify command that is missing, fails, or outlives its timeout
//! denies the use, unless the config says `notify.allow_on_failure: true`.

#![forbid(unsafe_code)]

use crate::config::Config;
use crate::error::{Error, Result, shell_quote};
use crate::grant::Authorized;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long the notify command may run when the config sets no `timeout`.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this use is break-glass.
pub fn applies(auth: &Authorized) -> bool {
    auth.break_glass() || auth.tier() == crate::catalog::Tier::Critical
}

/// The banner printed on stderr before the child starts.
pub fn banner(auth: &Authorized, argv: &[String], invocation: &str) -> String {
    let rule = "!".repeat(72);
    let cmd: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    let mut cmd = cmd.join(" ");
    if cmd.chars().count() > 200 {
        cmd = format!("{}...", cmd.chars().take(200).collect::<String>());
    }
    format!(
        "aap-exec: {rule}\n\
         aap-exec: !! BREAK-GLASS: critical access to `{cap}` ({tier} tier)\n\
         aap-exec: !!   session {session}, agent {agent}, approved by {operator}\n\
         aap-exec: !!   reason: {reason}\n\
         aap-exec: !!   grant expires {expires}\n\
         aap-exec: !!   command: {cmd}\n\
         aap-exec: !!   invocation {invocation}: audited (fsync'd), operator notified\n\
         aap-exec: {rule}\n",
        cap = auth.capability_id(),
        tier = auth.tier(),
        session = auth.session(),
        agent = auth.agent(),
        operator = auth.operator(),
        reason = auth
            .reason()
            .map(|r| r.replace(['\n', '\r'], " "))
            .unwrap_or_else(|| "none given".into()),
        expires = auth.expires_at_rfc3339(),
    )
}

/// Run the notify command with `event_line` (one JSON audit line) on its stdin. `Ok(None)`: it
/// succeeded. `Ok(Some(why))`: it failed but the config allows the use anyway. `Err`: denied.
pub fn notify(
    cfg: &Config,
    event_line: &str,
    child_env: &[(std::ffi::OsString, std::ffi::OsString)],
    cap: &str,
) -> Result<Option<String>> {
    let shown_cfg = cfg.file.as_ref().map_or_else(
        || "the config".to_string(),
        |f| f.value.display().to_string(),
    );
    let Some(n) = &cfg.notify else {
        return Err(Error::denied(format!(
            "break-glass use of `{cap}` denied: no notify command is configured, and break-glass is never silent"
        ))
        .hint(format!(
            "add to {shown_cfg}: notify: {{ command: [/usr/local/bin/page-operator] }}; then check it: aap config show"
        )));
    };
    match run_notify(&n.command, n.timeout, event_line, child_env) {
        Ok(()) => Ok(None),
        Err(why) if n.allow_on_failure => Ok(Some(why)),
        Err(why) => Err(Error::denied(format!(
            "break-glass use of `{cap}` denied: the notify command failed: {why}"
        ))
        .hint(format!(
            "fix notify.command in {shown_cfg} and test it: echo '{{}}' | {}",
            n.command
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        ))),
    }
}

/// Run a notify command (`notify.command`, `requests.notify.command`) with `event_line` and a
/// newline on its stdin and only `env` in its environment, killed after `timeout` (default
/// 10 s). Its stdout goes to our stderr. `Err`: why it failed.
pub fn run_notify(
    command: &[String],
    timeout: Option<crate::duration::Dur>,
    event_line: &str,
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> std::result::Result<(), String> {
    let Some((prog, args)) = command.split_first() else {
        return Err("the notify command is empty".into());
    };
    let shown = shell_quote(prog);
    let limit = timeout.map_or(DEFAULT_NOTIFY_TIMEOUT, |d| Duration::from_secs(d.secs()));
    // Its stdout goes to our stderr: the child's stdout stays the child's alone.
    let out = {
        use std::os::fd::AsFd;
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate stderr for {shown}: {e}"))?
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::inherit());
    crate::sys::unblock_signals_in_child(&mut cmd);
    let mut ch = cmd
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    // Written on a thread: a notify command that never reads cannot block us past the timeout.
    let writer = ch.stdin.take().map(|mut i| {
        let mut line = event_line.as_bytes().to_vec();
        line.push(b'\n');
        std::thread::spawn(move || i.write_all(&line))
    });
    let st = super::child::wait_timeout(ch, limit);
    let wrote = writer.map(|w| w.join());
    match st {
        None => Err(format!(
            "{shown} did not finish within {}s and was killed",
            limit.as_secs()
        )),
        Some(st) if !st.success() => Err(format!("{shown} exited with {st}")),
        Some(_) => match wrote {
            Some(Ok(Err(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(format!("cannot write the event to {shown}: {e}"))
            }
            _ => Ok(()),
        },
    }
}
