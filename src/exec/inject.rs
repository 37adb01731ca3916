//! Handing the secret to the child, in the narrowest form the catalog names, and nothing else
//! of ours: the child's environment is the caller's minus aap's own variables, minus every
//! variable the catalog injects anywhere, minus the Infisical identity variables and anything
//! the config lists in `secret_env`.

#![forbid(unsafe_code)]

use crate::catalog::{Catalog, Inject};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::grant::Authorized;
use crate::secret::SecretBytes;
use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::process::Command;

/// Variables that make a program run code it was not asked to (dynamic loader, shells,
/// interpreters, git and ssh hooks). For a capability that names its programs
/// (`allowed_commands`), the child never inherits them: otherwise an agent could run its own
/// code inside the allowed program, which holds the secret.
const CODE_INJECTING_VARS: &[&str] = &[
    "BASH_ENV",
    "ENV",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "PYTHONHOME",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH",
    "GIT_ASKPASS",
    "SSH_ASKPASS",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_GLOBAL",
    "GIT_CONFIG_SYSTEM",
    "GIT_PROXY_COMMAND",
    "GIT_EXTERNAL_DIFF",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "GIT_PAGER",
    "GIT_EDITOR",
    "LESSOPEN",
    "LESSCLOSE",
];

fn injects_code(name: &str) -> bool {
    name.starts_with("LD_") || name.starts_with("DYLD_") || CODE_INJECTING_VARS.contains(&name)
}

/// Variables that carry Infisical credentials; never passed through to a child.
const IDENTITY_VARS: &[&str] = &[
    "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID",
    "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET",
    "INFISICAL_TOKEN",
];

/// What the child will get. Dropping it wipes the secret, closes the memfds and revokes a
/// scoped Infisical token: that is the teardown, and it runs as soon as the child has exited.
/// [`Prepared::teardown`] does the same and reports a failed revocation.
pub struct Prepared {
    secret: Option<SecretBytes>,
    env: Vec<(String, EnvValue)>,
    memfds: Vec<OwnedFd>,
    /// The private ssh-agent (the `ssh-agent` form); dropping it kills the agent and removes
    /// its socket directory.
    agent: Option<super::sshagent::Agent>,
    scoped_token: Option<ScopedToken>,
    /// The agent's own login token from the fetch. It is never handed on; it is revoked right
    /// after the spawn ([`Prepared::revoke_login`]), so that round trip overlaps the child.
    login: Option<super::run::LoginToken>,
    /// Variables of the caller's environment the child must not get.
    env_remove: Vec<&'static str>,
}

enum EnvValue {
    /// The secret itself (the `env` form).
    Secret,
    /// A non-secret value such as `/dev/fd/N` or a git config entry.
    Plain(OsString),
}

/// An `infisical-token` backing's token and the client that revokes it.
struct ScopedToken {
    client: crate::source::Client,
    token: crate::source::AccessToken,
    identity: String,
}

impl ScopedToken {
    fn revoke(self) -> Result<()> {
        self.client.revoke(&self.token).map_err(|e| {
            Error::unavailable(format!(
                "the scoped Infisical token of identity {} could not be revoked; it stays valid until it expires ({}s after login): {}",
                self.identity,
                self.token.expires_in(),
                e.message()
            ))
            .hint("check that Infisical is reachable: aap config show; the token expires on its own at its TTL")
        })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.revoke_login();
        if let Some(t) = self.scoped_token.take()
            && let Err(e) = t.revoke()
        {
            eprint!("{}", e.render("aap-exec"));
        }
    }
}

impl Prepared {
    /// Revoke the agent's login token now (once); a failure is a warning, since the token was
    /// never handed on and expires at its TTL.
    pub fn revoke_login(&mut self) {
        if let Some(t) = self.login.take()
            && let Err(e) = t.revoke_cached()
        {
            eprintln!("aap-exec: warning: {}", e.message());
        }
    }

    /// Put the injected variables into `cmd` and let it inherit the memfds.
    pub fn apply(&self, cmd: &mut Command) {
        for name in &self.env_remove {
            cmd.env_remove(name);
        }
        for (name, v) in &self.env {
            match v {
                EnvValue::Secret => {
                    if let Some(s) = &self.secret {
                        cmd.env(name, OsString::from_vec(s.expose().to_vec()));
                    }
                }
                EnvValue::Plain(p) => {
                    cmd.env(name, p);
                }
            }
        }
        if let Some(a) = &self.agent {
            // Ours replaces any inherited agent; an inherited pid would name the wrong agent.
            cmd.env("SSH_AUTH_SOCK", a.sock());
            cmd.env_remove("SSH_AGENT_PID");
        }
        if !self.memfds.is_empty() {
            crate::sys::inherit_fds(cmd, self.memfds.iter().map(AsRawFd::as_raw_fd).collect());
        }
    }

    /// Wipe the secret, close the memfds and revoke a scoped token, now. The error is a failed
    /// revocation (the child already ran; the caller reports it).
    pub fn teardown(mut self) -> Result<()> {
        let token = self.scoped_token.take();
        drop(self);
        match token {
            Some(t) => t.revoke(),
            None => Ok(()),
        }
    }
}

/// The absolute path of `aap` (the git credential helper): next to the running `aap-exec`.
fn helper_program(cap: &str) -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::internal(format!("cannot find the path of aap-exec itself: {e}"))
            .hint("check that /proc is mounted: ls /proc/self/exe")
    })?;
    let aap = exe.with_file_name("aap");
    if !crate::sys::can_execute(&aap) {
        return Err(Error::config(format!(
            "capability `{cap}` needs the git credential helper {}, which is missing or not executable",
            aap.display()
        ))
        .hint(format!(
            "install aap next to aap-exec: ls -l {}",
            crate::error::shell_quote(&aap.to_string_lossy())
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

/// Fetch (through the proof) and shape the secret for the capability's inject forms.
pub fn prepare(cfg: &Config, _catalog: &Catalog, auth: &Authorized) -> Result<Prepared> {
    let cap = auth.capability();
    // The agent starts before the fetch (authorization is already done), so its start-up runs
    // while we wait on Infisical; a failed fetch drops it again.
    let mut agent = match (&cap.backing, cap.inject.contains(&Inject::SshAgent)) {
        (crate::catalog::Backing::SshAgent { .. }, true) => {
            Some(super::sshagent::Agent::spawn(&cap.id, &cfg.secure_path)?)
        }
        _ => None,
    };
    let mut p = Prepared {
        secret: None,
        env: Vec::new(),
        memfds: Vec::new(),
        agent: None,
        scoped_token: None,
        login: None,
        env_remove: Vec::new(),
    };
    if let Some((client, token)) = super::run::scoped_token_authorized(cfg, auth)? {
        // The child's secret is the scoped token itself; `p` revokes it when dropped, so an
        // error below still revokes it.
        p.secret = Some(SecretBytes::from_slice(token.expose()));
        let identity = match &cap.backing {
            crate::catalog::Backing::InfisicalToken { identity, .. } => identity.clone(),
            _ => String::new(),
        };
        p.scoped_token = Some(ScopedToken {
            client,
            token,
            identity,
        });
    } else {
        if let Some((value, login)) = super::run::fetch_authorized(cfg, auth)? {
            p.secret = Some(value);
            p.login = login;
        }
    }
    for inj in &cap.inject {
        match inj {
            Inject::Env { name } => {
                let s = p.secret.as_ref().ok_or_else(|| {
                    Error::config(format!(
                        "capability `{}` injects {name} but has no secret",
                        cap.id
                    )).hint(format!("give the capability a secret in the catalog, then: aap catalog check; aap catalog show {}", cap.id))
                })?;
                if s.expose().contains(&0) {
                    return Err(Error::config(format!(
                        "the secret for `{}` contains a NUL byte, which an environment variable cannot hold",
                        cap.id
                    ))
                    .hint(format!("use the fd form for it in the catalog (inject: - type: fd, name: {name}_FILE)")));
                }
                p.env.push((name.clone(), EnvValue::Secret));
            }
            Inject::Fd { name } => {
                let s = p.secret.as_ref().ok_or_else(|| {
                    Error::config(format!(
                        "capability `{}` injects {name} but has no secret",
                        cap.id
                    )).hint(format!("give the capability a secret in the catalog, then: aap catalog check; aap catalog show {}", cap.id))
                })?;
                let fd = crate::sys::sealed_memfd(c"aap-secret", s.expose()).map_err(|e| {
                    Error::internal(format!("cannot create the memfd for `{}`: {e}", cap.id))
                        .hint("memfd_create(2) needs Linux 3.17+; check seccomp filters")
                })?;
                p.env.push((
                    name.clone(),
                    EnvValue::Plain(format!("/dev/fd/{}", fd.as_raw_fd()).into()),
                ));
                p.memfds.push(fd);
            }
            Inject::SshAgent => {
                let crate::catalog::Backing::SshAgent {
                    key_lifetime,
                    hosts,
                    ..
                } = &cap.backing
                else {
                    return Err(Error::config(format!(
                        "capability `{}` injects ssh-agent but its backing is {}",
                        cap.id,
                        cap.backing.type_name()
                    ))
                    .hint(format!("aap catalog show {}", cap.id)));
                };
                let key = p.secret.as_ref().ok_or_else(|| {
                    Error::config(format!("capability `{}` has no key to load", cap.id)).hint(format!("give the ssh-agent backing a secret (an OpenSSH private key), then: aap catalog show {}", cap.id))
                })?;
                let Some(mut a) = agent.take() else {
                    continue; // listed twice: one agent
                };
                let lifetime =
                    std::time::Duration::from_secs(key_lifetime.secs()).min(auth.remaining());
                a.load(
                    &super::sshagent::Load {
                        cap_id: &cap.id,
                        key: key.expose(),
                        hosts,
                        known_hosts: &cfg.ssh_known_hosts,
                        secure_path: &cfg.secure_path,
                    },
                    lifetime,
                )?;
                p.agent = Some(a);
            }
            Inject::GitCredential => {
                let crate::catalog::Backing::ForgejoPat { host, .. } = &cap.backing else {
                    return Err(Error::config(format!(
                        "capability `{}` injects git-credential, which needs a forgejo-pat backing",
                        cap.id
                    ))
                    .hint(format!("aap catalog show {}", cap.id)));
                };
                let s = p.secret.as_ref().ok_or_else(|| {
                    Error::config(format!("capability `{}` has no token to hand git", cap.id)).hint(
                        format!(
                            "give the forgejo-pat backing a secret, then: aap catalog show {}",
                            cap.id
                        ),
                    )
                })?;
                if !super::gitcred::token_is_sendable(s.expose()) {
                    return Err(Error::config(format!(
                        "the token for `{}` is empty or contains a line break or NUL, which the git credential protocol cannot carry",
                        cap.id
                    ))
                    .hint("store the token in Infisical as a single line without a trailing newline"));
                }
                let helper = helper_program(&cap.id)?;
                let fd = crate::sys::sealed_memfd(c"aap-git-token", s.expose()).map_err(|e| {
                    Error::internal(format!("cannot create the memfd for `{}`: {e}", cap.id))
                        .hint("memfd_create(2) needs Linux 3.17+; check seccomp filters")
                })?;
                let vars = super::gitcred::git_config_env(
                    &|k| std::env::var_os(k),
                    &helper,
                    host,
                    fd.as_raw_fd(),
                );
                for (k, v) in vars {
                    p.env.retain(|(n, _)| *n != k);
                    p.env.push((k, EnvValue::Plain(v)));
                }
                // `git -c` settings inherited from a calling git are read after GIT_CONFIG_COUNT,
                // so a credential helper among them would come back after our reset: drop them.
                if super::gitcred::parameters_touch_credentials(
                    std::env::var_os(super::gitcred::PARAMETERS_VAR).as_deref(),
                ) {
                    p.env_remove.push(super::gitcred::PARAMETERS_VAR);
                }
                p.memfds.push(fd);
            }
        }
    }
    Ok(p)
}

/// The child's base environment: ours, minus what must never pass through, plus the nesting
/// marker. With `hardened` (the capability names its programs), also minus every variable that
/// would make the allowed program run the caller's code.
pub fn child_env(
    cfg: &Config,
    catalog: &Catalog,
    invocation: &str,
    hardened: bool,
) -> Vec<(OsString, OsString)> {
    let mut strip: HashSet<&str> = IDENTITY_VARS.iter().copied().collect();
    for cap in catalog.capabilities() {
        for inj in &cap.inject {
            if let Some(n) = inj.var_name() {
                strip.insert(n);
            }
        }
    }
    for n in &cfg.secret_env {
        strip.insert(n);
    }
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            let drop = k.starts_with("AAP_")
                || strip.contains(k.as_ref())
                || (hardened && injects_code(&k));
            !drop
        })
        .collect();
    if let Some(tz) = crate::sys::caller_tz() {
        env.push(("TZ".into(), tz.to_os_string()));
    }
    env.push((super::run::NEST_MARKER.into(), invocation.into()));
    env
}
