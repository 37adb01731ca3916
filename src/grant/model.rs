//! The grant: the exact JSON bytes an operator signs.
//!
//! ```json
//! {
//!   "v": 1,
//!   "session": "01JD0000000000000000000000",
//!   "agent": "codex",
//!   "operator": "op@example.org",
//!   "seq": 2,
//!   "issued_at": "2026-11-24T02:30:00Z",
//!   "not_before": "2026-11-24T02:30:00Z",
//!   "expires_at": "2026-11-24T06:30:00Z",
//!   "capabilities": [
//!     { "id": "forgejo-pat-read", "approved_at": "2026-11-24T02:30:00Z", "expires_at": "2026-11-24T06:30:00Z" }
//!   ],
//!   "hosts": [],
//!   "reason": null,
//!   "break_glass": false
//! }
//! ```
//!
//! Decoding is strict: unknown fields, duplicate keys, trailing data, a session id that is not
//! the file's, out-of-order times and repeated capabilities are all refused.

#![forbid(unsafe_code)]

use crate::id::SessionId;
use crate::timefmt::{parse_rfc3339_secs, rfc3339_secs};
use serde::{Deserialize, Serialize};

/// The grant format version.
pub const GRANT_VERSION: u32 = 1;

/// Longest `reason` accepted in a grant, a request or an audit event, in characters.
pub const MAX_REASON: usize = 1000;

/// The grant as stored and signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub v: u32,
    pub session: String,
    pub agent: String,
    /// The operator principal, as listed in allowed_signers (what `ssh-keygen -Y verify -I`
    /// takes).
    pub operator: String,
    /// 1 for the first grant of a session, +1 for each re-signed version.
    pub seq: u64,
    pub issued_at: String,
    pub not_before: String,
    /// When the whole session ends: the latest of its capabilities' expiries.
    pub expires_at: String,
    pub capabilities: Vec<GrantedCap>,
    pub hosts: Vec<String>,
    pub reason: Option<String>,
    pub break_glass: bool,
}

/// One capability in a grant, with its own approval and expiry times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantedCap {
    pub id: String,
    pub approved_at: String,
    pub expires_at: String,
}

/// A grant whose fields passed every check, with its times parsed (seconds since the epoch).
#[derive(Clone, Debug)]
pub struct ValidGrant {
    pub grant: Grant,
    pub id: SessionId,
    pub issued_at: i64,
    pub not_before: i64,
    pub expires_at: i64,
    /// `(capability id, expires_at)` in grant order.
    pub caps: Vec<(String, i64)>,
}

impl ValidGrant {
    /// The expiry of `cap` in this grant, if granted.
    pub fn cap_expiry(&self, cap: &str) -> Option<i64> {
        self.caps.iter().find(|(c, _)| c == cap).map(|&(_, e)| e)
    }

    /// When `cap` was (last) approved in this grant, if granted.
    pub fn cap_approved(&self, cap: &str) -> Option<i64> {
        self.grant
            .capabilities
            .iter()
            .find(|c| c.id == cap)
            .and_then(|c| parse_rfc3339_secs(&c.approved_at))
    }
}

/// A name as the catalog writes agents and capability ids: kebab-case, 1-64 characters.
pub fn is_kebab(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A host name: letters, digits, `.`, `-`, `_`, at most 253 characters.
pub fn is_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// Reasons are free text for people: bounded and without control characters.
pub fn check_reason(r: &str) -> Result<(), String> {
    if r.trim().is_empty() {
        return Err("the reason is empty".into());
    }
    if r.chars().count() > MAX_REASON {
        return Err(format!(
            "the reason is {} characters long; the limit is {MAX_REASON}",
            r.chars().count()
        ));
    }
    if r.chars().any(char::is_control) {
        return Err("the reason contains control characters (newlines, escapes)".into());
    }
    Ok(())
}

impl Grant {
    /// The bytes to sign and store: pretty JSON plus a final newline, so `cat` shows it well.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a grant always serializes");
        v.push(b'\n');
        v
    }

    /// Decode and validate bytes read from `<id>.grant`.
    pub fn decode(bytes: &[u8], file_id: &SessionId) -> Result<ValidGrant, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "the grant is not UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            )
        })?;
        let grant: Grant = serde_json::from_str(text).map_err(|e| {
            // serde_json's message names the field (unknown, duplicate, missing) and position.
            format!("the grant is not a valid grant document: {e}")
        })?;
        grant.validate(file_id)
    }

    /// Check every field; `file_id` is the id the file is named by.
    pub fn validate(self, file_id: &SessionId) -> Result<ValidGrant, String> {
        if self.v != GRANT_VERSION {
            return Err(format!(
                "the grant has format version {}; this aap reads version {GRANT_VERSION}",
                self.v
            ));
        }
        let id = SessionId::parse(&self.session)
            .map_err(|e| format!("the grant's session field: {e}"))?;
        if id != *file_id {
            return Err(format!(
                "the grant names session {id}, but its file is for session {file_id}"
            ));
        }
        if !is_kebab(&self.agent) {
            return Err(format!(
                "the grant's agent {} is not a kebab-case name",
                crate::id::shown(&self.agent)
            ));
        }
        if self.operator.is_empty()
            || self.operator.len() > 256
            || self
                .operator
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err("the grant's operator is empty, too long or has spaces".into());
        }
        if self.seq == 0 {
            return Err("the grant's seq is 0; it starts at 1".into());
        }
        let t = |name: &str, v: &str| {
            parse_rfc3339_secs(v).ok_or_else(|| {
                format!(
                    "the grant's {name} {} is not a UTC time like 2026-11-24T02:30:00Z",
                    crate::id::shown(v)
                )
            })
        };
        let issued_at = t("issued_at", &self.issued_at)?;
        let not_before = t("not_before", &self.not_before)?;
        let expires_at = t("expires_at", &self.expires_at)?;
        if expires_at < not_before {
            return Err("the grant expires before it becomes valid".into());
        }
        if self.capabilities.is_empty() {
            return Err("the grant lists no capabilities".into());
        }
        let mut caps = Vec::with_capacity(self.capabilities.len());
        for c in &self.capabilities {
            if !is_kebab(&c.id) {
                return Err(format!(
                    "the grant's capability {} is not a kebab-case id",
                    crate::id::shown(&c.id)
                ));
            }
            if caps.iter().any(|(id, _)| id == &c.id) {
                return Err(format!("the grant lists capability {} twice", c.id));
            }
            t("approved_at", &c.approved_at)?;
            let e = t("expires_at", &c.expires_at)?;
            if e > expires_at {
                return Err(format!(
                    "capability {} expires after the session does",
                    c.id
                ));
            }
            caps.push((c.id.clone(), e));
        }
        for h in &self.hosts {
            if !is_host(h) {
                return Err(format!(
                    "the grant's host {} is not a host name",
                    crate::id::shown(h)
                ));
            }
        }
        if let Some(r) = &self.reason {
            check_reason(r).map_err(|e| format!("the grant's reason: {e}"))?;
        }
        Ok(ValidGrant {
            grant: self,
            id,
            issued_at,
            not_before,
            expires_at,
            caps,
        })
    }

    /// Recompute `expires_at` as the latest capability expiry.
    pub fn refresh_expiry(&mut self) {
        let latest = self
            .capabilities
            .iter()
            .filter_map(|c| parse_rfc3339_secs(&c.expires_at))
            .max()
            .unwrap_or(0);
        self.expires_at = rfc3339_secs(latest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &SessionId) -> Grant {
        Grant {
            v: 1,
            session: id.to_string(),
            agent: "codex".into(),
            operator: "op@x.org".into(),
            seq: 1,
            issued_at: "2026-11-24T02:30:00Z".into(),
            not_before: "2026-11-24T02:30:00Z".into(),
            expires_at: "2026-11-24T06:30:00Z".into(),
            capabilities: vec![GrantedCap {
                id: "forgejo-pat-read".into(),
                approved_at: "2026-11-24T02:30:00Z".into(),
                expires_at: "2026-11-24T06:30:00Z".into(),
            }],
            hosts: vec![],
            reason: None,
            break_glass: false,
        }
    }

    #[test]
    fn round_trip() {
        let id = SessionId::parse("01JD0000000000000000000000").unwrap();
        let g = sample(&id);
        let v = Grant::decode(&g.to_bytes(), &id).unwrap();
        assert_eq!(v.grant, g);
        assert_eq!(v.caps.len(), 1);
    }

    #[test]
    fn strict_decoding() {
        let id = SessionId::parse("01JD0000000000000000000000").unwrap();
        let other = SessionId::parse("01JD0000000000000000000001").unwrap();
        let good = String::from_utf8(sample(&id).to_bytes()).unwrap();
        let cases = [
            (
                good.replacen("\"v\": 1,", "\"v\": 1, \"admin\": true,", 1),
                "unknown field",
            ),
            (
                good.replacen("\"v\": 1,", "\"v\": 1, \"agent\": \"claude\",", 1),
                "duplicate field",
            ),
            (format!("{good}{{}}"), "trailing"),
            (good.replacen("\"seq\": 1", "\"seq\": 0", 1), "seq"),
            (
                good.replacen("\"break_glass\": false", "\"break_glass\": 1", 1),
                "invalid type",
            ),
        ];
        for (text, want) in cases {
            let e = Grant::decode(text.as_bytes(), &id).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = Grant::decode(good.as_bytes(), &other).unwrap_err();
        assert!(e.contains("but its file is for session"), "{e}");
        let mut g = sample(&id);
        g.capabilities.push(g.capabilities[0].clone());
        assert!(
            Grant::decode(&g.to_bytes(), &id)
                .unwrap_err()
                .contains("twice")
        );
        let mut g = sample(&id);
        g.capabilities[0].expires_at = "2026-11-25T00:00:00Z".into();
        assert!(
            Grant::decode(&g.to_bytes(), &id)
                .unwrap_err()
                .contains("after the session")
        );
        let mut g = sample(&id);
        g.agent = "../root".into();
        assert!(Grant::decode(&g.to_bytes(), &id).is_err());
    }

    #[test]
    fn names_and_reasons() {
        assert!(is_kebab("ssh-vps1000-iskra-readonly"));
        assert!(!is_kebab("Codex"));
        assert!(!is_kebab("a--b"));
        assert!(is_host("vps1000.example.org"));
        assert!(!is_host("a b"));
        assert!(check_reason("deploy the fix").is_ok());
        assert!(check_reason("a\nb").is_err());
        assert!(check_reason(&"x".repeat(MAX_REASON + 1)).is_err());
    }
}
