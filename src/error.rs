//! One error type for every command, mapped to the exit codes of the design's contract.
//!
//! An error carries what failed (`message`) and, almost always, the next command to run (`hint`).
//! Messages name files, lines, ids, lengths and positions; never a secret value.

#![forbid(unsafe_code)]

use std::fmt;

/// Exit status of `aap` and `aap-exec` themselves (sysexits and `env` conventions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 77 (EX_NOPERM): a check said no.
    Denied,
    /// 78 (EX_CONFIG): config or catalog invalid.
    Config,
    /// 69 (EX_UNAVAILABLE): Infisical unreachable or answering garbage.
    Unavailable,
    /// 65 (EX_DATAERR): the audit log or grant data is invalid.
    DataInvalid,
    /// 126: the command exists but cannot be executed.
    CannotExecute,
    /// 127: the command was not found.
    NotFound,
    /// 70 (EX_SOFTWARE): a bug or an unexpected system failure.
    Internal,
    /// 75 (EX_TEMPFAIL): timed out waiting (`aap request --wait`); trying later may work.
    Timeout,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Denied => 77,
            Kind::Config => 78,
            Kind::Unavailable => 69,
            Kind::DataInvalid => 65,
            Kind::CannotExecute => 126,
            Kind::NotFound => 127,
            Kind::Internal => 70,
            Kind::Timeout => 75,
        }
    }
}

impl Kind {
    /// The kind an exit code stands for (the broker's errors cross the socket as codes).
    pub fn from_exit_code(code: u8) -> Kind {
        match code {
            77 => Kind::Denied,
            78 => Kind::Config,
            69 => Kind::Unavailable,
            65 => Kind::DataInvalid,
            126 => Kind::CannotExecute,
            127 => Kind::NotFound,
            75 => Kind::Timeout,
            _ => Kind::Internal,
        }
    }
}

/// An error with its exit kind, a message and an optional hint.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
    hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
        }
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(Kind::Denied, message)
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Kind::Config, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }
    pub fn data(message: impl Into<String>) -> Self {
        Self::new(Kind::DataInvalid, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(Kind::Timeout, message)
    }

    /// Attach the next step for the reader (often an AI agent): an exact command where possible.
    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn hint_text(&self) -> Option<&str> {
        self.hint.as_deref()
    }
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }

    /// The two-line form every command prints: `PROG: error: ...` then `PROG: hint: ...`.
    pub fn render(&self, prog: &str) -> String {
        let mut out = String::new();
        for (i, line) in self.message.lines().enumerate() {
            if i == 0 {
                out.push_str(&format!("{prog}: error: {line}\n"));
            } else {
                out.push_str(&format!("{prog}:   {line}\n"));
            }
        }
        if let Some(h) = &self.hint {
            out.push_str(&format!("{prog}: hint: {h}\n"));
        }
        out
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Shell-quote a path for a hint the reader can paste.
pub fn quote_path(p: &std::path::Path) -> String {
    shell_quote(&p.to_string_lossy())
}

/// Shell-quote a path or word for a hint the reader can paste.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(Kind::Denied.exit_code(), 77);
        assert_eq!(Kind::Config.exit_code(), 78);
        assert_eq!(Kind::Unavailable.exit_code(), 69);
        assert_eq!(Kind::DataInvalid.exit_code(), 65);
        assert_eq!(Kind::CannotExecute.exit_code(), 126);
        assert_eq!(Kind::NotFound.exit_code(), 127);
        assert_eq!(Kind::Internal.exit_code(), 70);
    }

    #[test]
    fn render_has_error_then_hint() {
        let e = Error::config("bad thing").hint("aap catalog check");
        assert_eq!(
            e.render("aap"),
            "aap: error: bad thing\naap: hint: aap catalog check\n"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/etc/aap/x.yaml"), "/etc/aap/x.yaml");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
