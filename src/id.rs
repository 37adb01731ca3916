//! Session and request ids: ULIDs, parsed strictly before any of them touches a path.
//!
//! Only the canonical spelling is accepted (26 characters of upper-case Crockford base32, as
//! `aap` prints them), so one id has exactly one file name: `../x`, `/etc/passwd`, NUL bytes,
//! lower-case aliases and overlong strings are all refused.

#![forbid(unsafe_code)]

use std::fmt;
use std::time::SystemTime;
use ulid::Ulid;

/// Why a string is not an id. Carries a safe, truncated rendering of the input for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadId {
    pub shown: String,
    pub why: &'static str,
}

impl fmt::Display for BadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not a valid id: {}", self.shown, self.why)
    }
}

/// Render untrusted input for a message: escaped (no control characters reach the terminal)
/// and cut to 40 characters.
pub fn shown(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    let mut out = format!("{cut:?}");
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

fn parse(s: &str) -> Result<Ulid, BadId> {
    let bad = |why| BadId {
        shown: shown(s),
        why,
    };
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if s.len() != 26 {
        return Err(bad("an id is a 26-character ULID"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
    {
        return Err(bad(
            "an id uses only 0-9 and upper-case A-Z without I, L, O, U",
        ));
    }
    let u = Ulid::from_string(s).map_err(|_| bad("it is out of the ULID range"))?;
    if u.to_string() != s {
        return Err(bad("it is not in canonical form"));
    }
    Ok(u)
}

fn generate(now: SystemTime) -> std::io::Result<Ulid> {
    let mut r = [0u8; 16];
    crate::sys::random_bytes(&mut r[6..])?;
    let random = u128::from_be_bytes(r);
    let ms = u64::try_from(crate::timefmt::unix_ms(now)).unwrap_or(0);
    Ok(Ulid::from_parts(ms, random))
}

macro_rules! ulid_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A ", $what, " id (a canonical ULID).")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Ulid);

        impl $name {
            /// Parse the canonical form; anything else is refused.
            pub fn parse(s: &str) -> Result<Self, BadId> {
                parse(s).map($name)
            }
            /// A fresh id: the time now and 80 bits from the kernel's CSPRNG.
            pub fn generate(now: SystemTime) -> std::io::Result<Self> {
                generate(now).map($name)
            }
            /// Milliseconds since the epoch encoded in the id.
            pub fn timestamp_ms(self) -> u64 {
                self.0.timestamp_ms()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Ulid's Display is the canonical 26-character form.
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

ulid_id!(SessionId, "session");
ulid_id!(RequestId, "request");
ulid_id!(EventId, "audit event");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_ulids_only() {
        let id = SessionId::generate(SystemTime::now()).unwrap();
        let s = id.to_string();
        assert_eq!(SessionId::parse(&s).unwrap(), id);
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "01J00000000000000000000000\0",
            "01j0000000000000000000000a",
            "01J0000000000000000000000O",
            "81J00000000000000000000000",
            "01J00000000000000000000000/..",
            &"0".repeat(4096),
        ] {
            assert!(SessionId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            SessionId::parse("../../../../etc/shadow")
                .unwrap_err()
                .to_string()
                .contains("26-character")
        );
    }

    #[test]
    fn shown_escapes_and_truncates() {
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert!(shown(&"x".repeat(100)).ends_with('…'));
    }

    #[test]
    fn generated_ids_differ_and_sort_by_time() {
        let t = SystemTime::now();
        let a = SessionId::generate(t).unwrap();
        let b = SessionId::generate(t + std::time::Duration::from_millis(5)).unwrap();
        assert_ne!(a, b);
        assert!(a < b);
    }
}

ulid_id!(InvocationId, "aap-exec invocation");
