//! Agent requests: `<state>/requests/<REQUEST>.json`, written by the broker when an agent runs
//! `aap request CAP --reason R`, answered by the operator with `aap approve`/`aap deny`, whose
//! answer (`<state>/answers/<REQUEST>.json`) the broker reads for an agent that waits.
//!
//! A request is unsigned and grants nothing by itself: approving it re-signs the session's
//! grant (whose agent, not the request's claim, decides). Its file is hostile input: parsed
//! strictly, named by a canonical ULID, read without following symlinks, at most 64 KiB.

#![forbid(unsafe_code)]

use crate::grant::{check_reason, is_host, is_kebab};
use crate::id::{RequestId, SessionId};
use crate::state::{ReadError, StateDir, read_state_file};
use crate::timefmt::parse_rfc3339_secs;
use serde::{Deserialize, Serialize};

pub const REQUEST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub id: String,
    pub session: String,
    pub agent: String,
    pub capability: String,
    pub reason: String,
    pub created_at: String,
    pub expires_at: String,
    pub uid: u32,
    pub host: String,
}

/// A request whose fields passed every check.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub req: Request,
    pub id: RequestId,
    pub session: SessionId,
    pub created_at: i64,
    pub expires_at: i64,
}

impl Request {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a request always serializes");
        v.push(b'\n');
        v
    }

    pub fn decode(bytes: &[u8], file_id: &RequestId) -> Result<ValidRequest, String> {
        let r: Request = serde_json::from_slice(bytes)
            .map_err(|e| format!("the request is not a valid request document: {e}"))?;
        if r.v != REQUEST_VERSION {
            return Err(format!("the request has format version {}", r.v));
        }
        let id = RequestId::parse(&r.id).map_err(|e| format!("the request's id: {e}"))?;
        if id != *file_id {
            return Err(format!(
                "the request names id {id}, but its file is for request {file_id}"
            ));
        }
        let session =
            SessionId::parse(&r.session).map_err(|e| format!("the request's session: {e}"))?;
        if !is_kebab(&r.agent) || !is_kebab(&r.capability) {
            return Err("the request's agent or capability is not a kebab-case name".into());
        }
        check_reason(&r.reason).map_err(|e| format!("the request's reason: {e}"))?;
        if !is_host(&r.host) {
            return Err("the request's host is not a host name".into());
        }
        let created_at = parse_rfc3339_secs(&r.created_at)
            .ok_or("the request's created_at is not a UTC time")?;
        let expires_at = parse_rfc3339_secs(&r.expires_at)
            .ok_or("the request's expires_at is not a UTC time")?;
        Ok(ValidRequest {
            req: r,
            id,
            session,
            created_at,
            expires_at,
        })
    }
}

/// The operator's answer to a request, `<state>/answers/<REQUEST>.json`, written by
/// `aap approve` and `aap deny` before the request file is removed. It is what the broker
/// tells an agent waiting on the request (`aap request --wait`). It grants nothing: the
/// broker reports an approval only when the session's signed grant allows the capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub v: u32,
    /// The request answered (its file's fields: who asked, for what).
    pub request: Request,
    /// `approved` or `denied`.
    pub verdict: Verdict,
    /// The operator's reason, if given.
    pub reason: Option<String>,
    pub answered_at: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approved,
    Denied,
}

impl Answer {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("an answer always serializes");
        v.push(b'\n');
        v
    }

    /// Parse strictly; the request inside must pass [`Request::decode`] for `file_id`.
    pub fn decode(bytes: &[u8], file_id: &RequestId) -> Result<(Answer, ValidRequest), String> {
        let a: Answer = serde_json::from_slice(bytes)
            .map_err(|e| format!("the answer is not a valid answer document: {e}"))?;
        if a.v != REQUEST_VERSION {
            return Err(format!("the answer has format version {}", a.v));
        }
        let inner = serde_json::to_vec(&a.request).expect("a request always serializes");
        let r = Request::decode(&inner, file_id)?;
        if let Some(reason) = &a.reason {
            check_reason(reason).map_err(|e| format!("the answer's reason: {e}"))?;
        }
        parse_rfc3339_secs(&a.answered_at).ok_or("the answer's answered_at is not a UTC time")?;
        Ok((a, r))
    }
}

/// Read `<state>/answers/<id>.json`. `Ok(None)` when it does not exist.
pub fn load_answer(
    st: &StateDir,
    id: &RequestId,
) -> Result<Option<(Answer, ValidRequest)>, String> {
    let p = st.answer_path(id);
    match read_state_file(&p) {
        Ok(b) => Answer::decode(&b, id).map(Some),
        Err(ReadError::NotFound) => Ok(None),
        Err(e) => Err(format!("{} {}", p.display(), e.describe())),
    }
}

/// Read `<state>/requests/<id>.json`. `Ok(None)` when it does not exist.
pub fn load(st: &StateDir, id: &RequestId) -> Result<Option<ValidRequest>, String> {
    let p = st.request_path(id);
    match read_state_file(&p) {
        Ok(b) => Request::decode(&b, id).map(Some),
        Err(ReadError::NotFound) => Ok(None),
        Err(e) => Err(format!("{} {}", p.display(), e.describe())),
    }
}

/// Every request file name in `<state>/requests/` that is a canonical id, sorted (oldest
/// first). Other names are ignored.
pub fn list_ids(st: &StateDir) -> std::io::Result<Vec<RequestId>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(st.requests_dir()) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".json") {
            if let Ok(id) = RequestId::parse(stem) {
                out.push(id);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_round_trip() {
        let id = RequestId::parse("01JD0000000000000000000009").unwrap();
        let r = Request {
            v: 1,
            id: id.to_string(),
            session: "01JD0000000000000000000001".into(),
            agent: "codex".into(),
            capability: "forgejo-pat-read".into(),
            reason: "fetch the review branch".into(),
            created_at: "2026-11-24T02:30:00Z".into(),
            expires_at: "2026-11-24T03:30:00Z".into(),
            uid: 1000,
            host: "h".into(),
        };
        let v = Request::decode(&r.to_bytes(), &id).unwrap();
        assert_eq!(v.req, r);
        let other = RequestId::parse("01JD0000000000000000000008").unwrap();
        assert!(Request::decode(&r.to_bytes(), &other).is_err());
        let text = String::from_utf8(r.to_bytes()).unwrap();
        let evil = text.replacen("\"v\": 1,", "\"v\": 1, \"grant\": true,", 1);
        assert!(
            Request::decode(evil.as_bytes(), &id)
                .unwrap_err()
                .contains("unknown field")
        );
    }
}
