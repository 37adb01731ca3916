//! What a child must never inherit from the agent's environment when its capability names its
//! programs (`allowed_commands`): the delivery itself (memfds, variables) is the broker's
//! answer, handed over in `run.rs`.

#![forbid(unsafe_code)]

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

pub fn injects_code(name: &str) -> bool {
    name.starts_with("LD_") || name.starts_with("DYLD_") || CODE_INJECTING_VARS.contains(&name)
}
