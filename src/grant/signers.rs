//! OpenSSH `allowed_signers` files and in-process SSHSIG verification.
//!
//! Format (ssh-keygen(1), "ALLOWED SIGNERS"): one key per line,
//! `principals [options] keytype base64-key [comment]`, with `#` comments and blank lines.
//! Principals are a comma-separated pattern list (`*`, `?`, `!negation`), optionally in double
//! quotes. Options: `namespaces="a,b"` (a pattern list), `valid-after="T"`, `valid-before="T"`
//! (`YYYYMMDD[Z]` or `YYYYMMDDHHMM[SS][Z]`; without `Z` local time, as OpenSSH reads them), and
//! `cert-authority`.
//!
//! A signature is accepted as ssh-keygen -Y verify -I PRINCIPAL -n aap-grant accepts it: a line
//! lists the signing key, PRINCIPAL matches its principals, `aap-grant` matches its namespaces,
//! and now lies within its validity. `cert-authority` lines are parsed but never match: aap
//! grants are signed with plain keys. Unlike OpenSSH, a line that does not parse is an error
//! for the whole file (exit 78), so a typo cannot silently drop the operator's key.

#![forbid(unsafe_code)]

use crate::error::{Error, Kind, Result, shell_quote};
use crate::fsutil::{self, ReadOpts};
use ssh_key::{HashAlg, PublicKey, SshSig, public::KeyData};
use std::path::Path;

/// The SSHSIG namespace of every grant signature.
pub const NAMESPACE: &str = "aap-grant";

const MAX_SIGNERS_BYTES: u64 = 1024 * 1024;

/// One parsed line.
#[derive(Clone, Debug)]
pub struct Signer {
    pub line: usize,
    pub principals: String,
    pub namespaces: Option<String>,
    pub valid_after: Option<i64>,
    pub valid_before: Option<i64>,
    pub cert_authority: bool,
    pub key: KeyData,
}

/// A parsed allowed_signers file.
#[derive(Clone, Debug)]
pub struct AllowedSigners {
    origin: String,
    signers: Vec<Signer>,
}

/// Who signed, once a signature verified and its signer was allowed.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The principal the grant names (its `operator`), matched against the signer's line.
    pub principal: String,
    /// `SHA256:...` fingerprint of the signing key.
    pub fingerprint: String,
    /// Key algorithm, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// Line of allowed_signers that allowed it.
    pub line: usize,
}

/// Why a signature was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SigError {
    /// The signature is malformed, for another namespace, or does not match the bytes.
    Bad(String),
    /// The signature is sound but its key is not allowed to sign grants (not listed, other
    /// principal or namespace, outside valid-after/valid-before).
    NotAllowed(String),
}

impl AllowedSigners {
    /// Read and parse the file named by `operator.allowed_signers`.
    pub fn load(path: &Path) -> Result<AllowedSigners> {
        let bytes = fsutil::read_file(
            path,
            ReadOpts::config_file("allowed_signers file", MAX_SIGNERS_BYTES),
        )?;
        let text = fsutil::utf8(bytes, "the allowed_signers file", path, Kind::Config)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse allowed_signers text; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> Result<AllowedSigners> {
        let mut signers = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let s = parse_line(l, line).map_err(|msg| {
                Error::config(format!("{origin}:{line}: {msg}")).hint(format!(
                    "each line is: PRINCIPAL namespaces=\"aap-grant\" KEYTYPE BASE64 (see ssh-keygen(1) ALLOWED SIGNERS); fix line {line} of {}",
                    shell_quote(origin)
                ))
            })?;
            signers.push(s);
        }
        Ok(AllowedSigners {
            origin: origin.to_owned(),
            signers,
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    /// The principal to write into a grant signed by `key`: the first plain (wildcard-free,
    /// non-negated) principal of the first line that lists the key for `aap-grant` and is
    /// valid at `now`.
    pub fn principal_for(&self, key: &KeyData, now: i64) -> std::result::Result<String, String> {
        let mut why = format!("the key is not listed in {}", self.origin);
        for s in self
            .signers
            .iter()
            .filter(|s| !s.cert_authority && &s.key == key)
        {
            if let Err(w) = s.usable(now) {
                why = format!("{}:{}: {w}", self.origin, s.line);
                continue;
            }
            if let Some(p) = s
                .principals
                .split(',')
                .find(|p| !p.is_empty() && !p.contains(['*', '?', '!']))
            {
                return Ok(p.to_owned());
            }
            why = format!(
                "{}:{}: the line lists only wildcard principals; add a plain one (e.g. operator@example.org)",
                self.origin, s.line
            );
        }
        Err(why)
    }

    /// Verify `sig_text` (an armored SSHSIG) over `msg`, as signed by `principal`, at `now`.
    pub fn verify(
        &self,
        msg: &[u8],
        sig_text: &[u8],
        principal: &str,
        now: i64,
    ) -> std::result::Result<Verified, SigError> {
        let sig = parse_sig(sig_text)?;
        verify_crypto(msg, &sig)?;
        self.allowed(&sig, principal, now)
    }

    /// Whether the key that made `sig` may sign grants for `principal` at `now` (the
    /// cryptographic check is [`verify_crypto`]).
    pub fn allowed(
        &self,
        sig: &SshSig,
        principal: &str,
        now: i64,
    ) -> std::result::Result<Verified, SigError> {
        let key = sig.public_key();
        let fp = PublicKey::from(key.clone())
            .fingerprint(HashAlg::Sha256)
            .to_string();
        let mut why = format!(
            "the signing key {fp} is not listed in {} (for principal {principal:?})",
            self.origin
        );
        let mut listed = false;
        for s in self
            .signers
            .iter()
            .filter(|s| !s.cert_authority && s.key == *key)
        {
            if !match_list(principal, &s.principals) {
                if !listed {
                    why = format!(
                        "{}:{} lists the signing key {fp} for {:?}, not for the grant's operator {principal:?}",
                        self.origin, s.line, s.principals
                    );
                }
                continue;
            }
            listed = true;
            match s.usable(now) {
                Ok(()) => {
                    return Ok(Verified {
                        principal: principal.to_owned(),
                        fingerprint: fp,
                        algorithm: key.algorithm().as_str().to_owned(),
                        line: s.line,
                    });
                }
                Err(w) => why = format!("{}:{}: {w} (key {fp})", self.origin, s.line),
            }
        }
        Err(SigError::NotAllowed(why))
    }
}

impl Signer {
    /// Whether this line allows signing grants at `now`.
    fn usable(&self, now: i64) -> std::result::Result<(), String> {
        if let Some(ns) = &self.namespaces {
            if !match_list(NAMESPACE, ns) {
                return Err(format!(
                    "the key is allowed only for namespaces {ns:?}, not {NAMESPACE:?}"
                ));
            }
        }
        if let Some(a) = self.valid_after {
            if now < a {
                return Err(format!(
                    "the key is valid only after {}",
                    crate::timefmt::rfc3339_secs(a)
                ));
            }
        }
        if let Some(b) = self.valid_before {
            if now > b {
                return Err(format!(
                    "the key expired at {} (valid-before)",
                    crate::timefmt::rfc3339_secs(b)
                ));
            }
        }
        Ok(())
    }
}

/// Parse an armored SSHSIG and check what does not need a key: version, namespace, hash.
pub fn parse_sig(sig_text: &[u8]) -> std::result::Result<SshSig, SigError> {
    let text = std::str::from_utf8(sig_text)
        .map_err(|_| SigError::Bad("the signature file is not text".into()))?;
    let sig = SshSig::from_pem(text.trim_end())
        .map_err(|e| SigError::Bad(format!("the signature file is not an SSH signature ({e})")))?;
    if sig.version() != 1 {
        return Err(SigError::Bad(format!(
            "unsupported SSHSIG version {}",
            sig.version()
        )));
    }
    if sig.namespace() != NAMESPACE {
        return Err(SigError::Bad(format!(
            "the signature is for namespace {:?}, not {NAMESPACE:?}",
            crate::yaml::truncate(sig.namespace(), 40)
        )));
    }
    Ok(sig)
}

/// Check that `sig` is a valid `aap-grant` signature over `msg` by the key it names.
/// [`verify_crypto`], remembering successes for this process. Whether a signature is
/// cryptographically valid for its embedded key is a pure function of the message and the
/// armored signature, so a long-running broker need not redo the curve arithmetic for every
/// exec of the same grant. Only that is remembered: whether the key is allowed (allowed_signers,
/// its principals, namespaces and validity) is judged again every time, by the caller. The key
/// is SHA-256 over both lengths and both byte strings; at most 4,096 are kept.
pub fn verify_crypto_cached(
    msg: &[u8],
    armored: &[u8],
    sig: &SshSig,
) -> std::result::Result<(), SigError> {
    use sha2::{Digest, Sha256};
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static VERIFIED: OnceLock<Mutex<HashSet<[u8; 32]>>> = OnceLock::new();
    let mut h = Sha256::new();
    h.update((msg.len() as u64).to_be_bytes());
    h.update(msg);
    h.update((armored.len() as u64).to_be_bytes());
    h.update(armored);
    let key: [u8; 32] = h.finalize().into();
    let cache = VERIFIED.get_or_init(|| Mutex::new(HashSet::new()));
    if cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&key)
    {
        return Ok(());
    }
    verify_crypto(msg, sig)?;
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() >= 4096 {
        c.clear();
    }
    c.insert(key);
    Ok(())
}

pub fn verify_crypto(msg: &[u8], sig: &SshSig) -> std::result::Result<(), SigError> {
    PublicKey::from(sig.public_key().clone())
        .verify(NAMESPACE, msg, sig)
        .map_err(|e| match e {
            ssh_key::Error::AlgorithmUnknown | ssh_key::Error::AlgorithmUnsupported { .. } => {
                SigError::Bad(format!(
                    "the signature uses an unsupported algorithm {} (aap verifies ed25519, sk-ssh-ed25519, ecdsa P-256/P-384 and rsa-sha2-256/512)",
                    sig.algorithm()
                ))
            }
            _ => SigError::Bad(
                "the signature does not match the grant's bytes (the grant or its signature was altered)"
                    .into(),
            ),
        })
}

/// OpenSSH `match_pattern_list`: comma-separated patterns with `*` and `?`; a matching `!`
/// pattern rejects outright; otherwise any positive match accepts.
pub fn match_list(s: &str, list: &str) -> bool {
    let mut got = false;
    for p in list.split(',') {
        if let Some(neg) = p.strip_prefix('!') {
            if glob(neg.as_bytes(), s.as_bytes()) {
                return false;
            }
        } else if glob(p.as_bytes(), s.as_bytes()) {
            got = true;
        }
    }
    got
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with single-star backtracking: linear-ish, no recursion.
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Split off one token: a double-quoted string (for principals) or up to whitespace; inside
/// an options token, quoted parts may hold spaces.
fn take_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut quoted = false;
    while i < b.len() {
        match b[i] {
            b'"' => quoted = !quoted,
            b'\\' if quoted => i += 1,
            b' ' | b'\t' if !quoted => break,
            _ => {}
        }
        i += 1;
    }
    let i = i.min(b.len());
    Some((&s[..i], &s[i..]))
}

fn is_key_type(t: &str) -> bool {
    t.starts_with("ssh-")
        || t.starts_with("ecdsa-sha2-")
        || t.starts_with("sk-ssh-")
        || t.starts_with("sk-ecdsa-")
}

fn unquote(t: &str) -> std::result::Result<String, String> {
    if let Some(inner) = t.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| format!("unterminated quote in {}", crate::id::shown(t)))?;
        Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
    } else {
        Ok(t.to_owned())
    }
}

fn parse_line(l: &str, line: usize) -> std::result::Result<Signer, String> {
    let (principals, rest) = take_token(l).ok_or("empty line")?;
    let principals = unquote(principals)?;
    if principals.is_empty() {
        return Err("no principals".into());
    }
    let (next, mut rest) = take_token(rest).ok_or("no key after the principals")?;
    let mut opts = Options::default();
    let keytype = if is_key_type(next) {
        next
    } else {
        parse_options(next, &mut opts)?;
        let (k, r) = take_token(rest).ok_or("no key after the options")?;
        rest = r;
        k
    };
    let (b64, _comment) = take_token(rest).ok_or("no base64 key after the key type")?;
    let key = PublicKey::from_openssh(&format!("{keytype} {b64}"))
        .map_err(|e| format!("cannot parse the {keytype} key ({e})"))?;
    Ok(Signer {
        line,
        principals,
        namespaces: opts.namespaces,
        valid_after: opts.valid_after,
        valid_before: opts.valid_before,
        cert_authority: opts.cert_authority,
        key: key.key_data().clone(),
    })
}

#[derive(Default)]
struct Options {
    namespaces: Option<String>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    cert_authority: bool,
}

fn parse_options(opts: &str, s: &mut Options) -> std::result::Result<(), String> {
    // Split at commas outside quotes.
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    let b = opts.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                parts.push(&opts[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated quote in the options".into());
    }
    parts.push(&opts[start..]);
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n, Some(unquote(v)?)),
            None => (p, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("cert-authority", None) => s.cert_authority = true,
            ("namespaces", Some(v)) => s.namespaces = Some(v),
            ("valid-after", Some(v)) => s.valid_after = Some(parse_ssh_time(&v)?),
            ("valid-before", Some(v)) => s.valid_before = Some(parse_ssh_time(&v)?),
            (n, _) => {
                return Err(format!(
                    "unknown or malformed option {} (known: namespaces=\"...\", valid-after=\"...\", valid-before=\"...\", cert-authority)",
                    crate::id::shown(n)
                ));
            }
        }
    }
    Ok(())
}

/// OpenSSH's `parse_absolute_time`: `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, with an
/// optional `Z` for UTC; otherwise local time.
pub fn parse_ssh_time(v: &str) -> std::result::Result<i64, String> {
    let bad = || format!("time {} is not YYYYMMDD[HHMM[SS]][Z]", crate::id::shown(v));
    let (digits, utc) = match v.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (v, false),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return Err(bad());
    }
    let n = |r: std::ops::Range<usize>| digits[r].parse::<u32>().map_err(|_| bad());
    let (y, mo, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi) = if digits.len() >= 12 {
        (n(8..10)?, n(10..12)?)
    } else {
        (0, 0)
    };
    let sec = if digits.len() == 14 { n(12..14)? } else { 0 };
    // Validate ranges the same way in both cases.
    let utc_secs =
        crate::timefmt::civil_to_unix(i64::from(y), mo, d, h, mi, sec).ok_or_else(bad)?;
    if utc {
        Ok(utc_secs)
    } else {
        crate::sys::local_to_unix(y as i32, mo, d, h, mi, sec).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOeSyBQb/f6VvlwzBGXkSOLwl1awV4rZirNWfALFlxU1";

    #[test]
    fn patterns() {
        assert!(match_list("aap-grant", "git,aap-grant"));
        assert!(match_list("aap-grant", "aap-*"));
        assert!(!match_list("aap-grant", "git"));
        assert!(!match_list("aap-grant", "*,!aap-grant"));
        assert!(match_list("op@x.org", "*@x.org"));
        assert!(match_list("a", "?"));
        assert!(!match_list("ab", "?"));
        assert!(!match_list("x", ""));
    }

    #[test]
    fn lines_with_and_without_options() {
        let text = format!(
            "# comment\n\nop@x.org {KEY} laptop\n\"a@x,b@x\" namespaces=\"git,aap-grant\",valid-before=\"20300101Z\" {KEY}\nc@x cert-authority,valid-after=\"202001010000\" {KEY}\n"
        );
        let a = AllowedSigners::parse(&text, "as").unwrap();
        assert_eq!(a.signers().len(), 3);
        assert_eq!(a.signers()[0].line, 3);
        assert_eq!(a.signers()[1].principals, "a@x,b@x");
        assert_eq!(a.signers()[1].namespaces.as_deref(), Some("git,aap-grant"));
        assert_eq!(
            a.signers()[1].valid_before,
            crate::timefmt::parse_rfc3339_secs("2030-01-01T00:00:00Z")
        );
        assert!(a.signers()[2].cert_authority);
        assert!(a.signers()[2].valid_after.is_some());
    }

    #[test]
    fn bad_lines_name_the_line() {
        for bad in [
            format!("op@x.org bogus=1 {KEY}"),
            "op@x.org ssh-ed25519 AAAA".to_string(),
            "op@x.org".to_string(),
            format!("op@x.org valid-before=\"2030\" {KEY}"),
            format!("op@x.org namespaces=\"aap-grant {KEY}"),
        ] {
            let e = AllowedSigners::parse(&format!("# c\n{bad}\n"), "as").unwrap_err();
            assert!(e.message().starts_with("as:2: "), "{bad}: {}", e.message());
            assert_eq!(e.kind(), Kind::Config);
        }
    }

    #[test]
    fn principal_for_skips_wildcards_and_other_namespaces() {
        let text = format!(
            "*@x.org {KEY}\nop@x.org namespaces=\"git\" {KEY}\n\"*,op2@x.org\" namespaces=\"aap-grant\" {KEY}\n"
        );
        let a = AllowedSigners::parse(&text, "as").unwrap();
        let key = a.signers()[0].key.clone();
        assert_eq!(a.principal_for(&key, 0).unwrap(), "op2@x.org");
    }
}
