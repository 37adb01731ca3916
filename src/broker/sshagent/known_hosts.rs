//! The host keys an `ssh-agent` capability's `hosts` may be reached with, from the config's
//! `ssh_known_hosts` files (OpenSSH's known_hosts format), as `ssh-add -h HOST` looks them up:
//! plain and wildcard patterns (`*`, `?`), negations (`!pattern`), comma-separated lists,
//! hashed names (`|1|salt|hash`, HMAC-SHA1), `@revoked` lines (a key listed there is never a
//! destination) and `@cert-authority` lines (not supported: never a match).
//!
//! Only files the operator names are read, by the broker: never the agent's `~/.ssh`.

#![forbid(unsafe_code)]

use base64ct::{Base64, Encoding};
use hmac::{Hmac, Mac};
use ssh_key::public::KeyData;
use std::path::Path;

/// The keys found for the capability's hosts.
#[derive(Debug, Default, Clone)]
pub struct KnownHosts {
    /// (catalog host, one of its keys).
    keys: Vec<(String, KeyData)>,
    /// Keys under `@revoked`, whatever host they name.
    revoked: Vec<KeyData>,
}

/// Why a host key is not a destination.
#[derive(Debug, PartialEq, Eq)]
pub enum NotKnown {
    Revoked,
    Unlisted,
}

impl KnownHosts {
    /// Read `files` for `hosts`. A missing file is skipped (an operator may list the system
    /// file and a local one); an unreadable line is skipped (OpenSSH does the same).
    pub fn load(files: &[impl AsRef<Path>], hosts: &[String]) -> KnownHosts {
        let mut out = KnownHosts::default();
        for f in files {
            let Ok(text) = std::fs::read_to_string(f.as_ref()) else {
                continue;
            };
            out.add_text(&text, hosts);
        }
        out
    }

    /// Add the lines of one known_hosts file.
    pub fn add_text(&mut self, text: &str, hosts: &[String]) {
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let Some(mut first) = fields.next() else {
                continue;
            };
            let mut marker = None;
            if first.starts_with('@') {
                marker = Some(first);
                let Some(next) = fields.next() else { continue };
                first = next;
            }
            let (Some(kind), Some(b64)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(blob) = Base64::decode_vec(b64) else {
                continue;
            };
            let Ok(key) = KeyData::decode_blob(&blob) else {
                continue;
            };
            if key.algorithm().as_str() != kind {
                continue;
            }
            match marker {
                Some("@revoked") => self.revoked.push(key),
                Some(_) => {} // @cert-authority and unknown markers: not a host key
                None => {
                    for h in hosts {
                        if patterns_match(first, h) {
                            self.keys.push((h.clone(), key.clone()));
                        }
                    }
                }
            }
        }
    }

    /// The catalog host `key` belongs to.
    pub fn host_of(&self, key: &KeyData) -> Result<&str, NotKnown> {
        if self.revoked.iter().any(|k| k == key) {
            return Err(NotKnown::Revoked);
        }
        self.keys
            .iter()
            .find(|(_, k)| k == key)
            .map(|(h, _)| h.as_str())
            .ok_or(NotKnown::Unlisted)
    }

    /// How many (host, key) pairs were found (for a start-up warning).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Decode a public key from its SSH wire blob.
trait DecodeBlob: Sized {
    fn decode_blob(b: &[u8]) -> Result<Self, ssh_key::Error>;
}

impl DecodeBlob for KeyData {
    fn decode_blob(b: &[u8]) -> Result<Self, ssh_key::Error> {
        use ssh_encoding::Decode;
        let mut r = b;
        let k = KeyData::decode(&mut r)?;
        if !r.is_empty() {
            return Err(ssh_key::Error::Encoding(
                ssh_encoding::Error::TrailingData { remaining: r.len() },
            ));
        }
        Ok(k)
    }
}

/// Whether the host field of a known_hosts line names `host`: any negated pattern that
/// matches wins (no match), else any positive one.
fn patterns_match(field: &str, host: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        return hashed_match(hashed, host);
    }
    let host = host.to_ascii_lowercase();
    let mut hit = false;
    for p in field.split(',') {
        let (neg, p) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p),
        };
        if wildcard(&p.to_ascii_lowercase(), &host) {
            if neg {
                return false;
            }
            hit = true;
        }
    }
    hit
}

/// `|1|SALT|HASH` (after the `|1|`): HASH = HMAC-SHA1(key SALT, host), both base64.
fn hashed_match(rest: &str, host: &str) -> bool {
    let Some((salt, hash)) = rest.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (Base64::decode_vec(salt), Base64::decode_vec(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(host.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// Glob match with `*` (any run) and `?` (one character), iterative (no recursion depth to
/// exhaust on hostile input).
fn wildcard(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO+eeJY/7F4qZPnqDjnWlsiCZ/";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn key(s: &str) -> KeyData {
        ssh_key::PublicKey::from_openssh(s)
            .unwrap()
            .key_data()
            .clone()
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plain_wildcard_negated_and_lists() {
        assert!(patterns_match("vps-test", "vps-test"));
        assert!(patterns_match("a,VPS-test,b", "vps-test"));
        assert!(patterns_match("*.example.org", "vps.example.org"));
        assert!(patterns_match("vps?.example.org", "vps1.example.org"));
        assert!(!patterns_match("vps?.example.org", "vps10.example.org"));
        assert!(!patterns_match(
            "*.example.org,!bad.example.org",
            "bad.example.org"
        ));
        assert!(!patterns_match("[vps-test]:2222", "vps-test"));
        assert!(!patterns_match("other", "vps-test"));
        assert!(wildcard("*", ""));
        assert!(wildcard("a*b*c", "axxbyyc"));
        assert!(!wildcard("a*b*c", "axxbyy"));
    }

    #[test]
    fn hashed_names_match_by_hmac_sha1() {
        // `ssh-keygen -H` of "vps-test" with salt 20 zero bytes... computed here instead.
        let salt = [7u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"vps-test");
        let h = mac.finalize().into_bytes();
        let field = format!(
            "|1|{}|{}",
            Base64::encode_string(&salt),
            Base64::encode_string(&h)
        );
        assert!(patterns_match(&field, "vps-test"));
        assert!(!patterns_match(&field, "vps-tesT"));
        assert!(!patterns_match("|1|junk|junk", "vps-test"));
        assert!(!patterns_match("|1|", "vps-test"));
    }

    #[test]
    fn revoked_keys_and_cert_authorities_are_never_destinations() {
        let text = format!(
            "# comment\nvps-test {K1}\n@revoked * {K2}\nother {K2}\n@cert-authority vps-test {K2}\njunk line\n"
        );
        let mut k = KnownHosts::default();
        k.add_text(&text, &hosts(&["vps-test", "other"]));
        assert_eq!(k.host_of(&key(K1)), Ok("vps-test"));
        assert_eq!(k.host_of(&key(K2)), Err(NotKnown::Revoked));
        let mut k = KnownHosts::default();
        k.add_text(
            &format!("@cert-authority vps-test {K2}\n"),
            &hosts(&["vps-test"]),
        );
        assert_eq!(k.host_of(&key(K2)), Err(NotKnown::Unlisted));
    }

    #[test]
    fn a_key_type_that_disagrees_with_the_blob_is_skipped() {
        let b64 = K1.split_whitespace().nth(1).unwrap();
        let mut k = KnownHosts::default();
        k.add_text(&format!("vps-test ssh-rsa {b64}\n"), &hosts(&["vps-test"]));
        assert!(k.is_empty());
    }
}
