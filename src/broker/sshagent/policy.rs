//! Which signatures the broker's agent makes: our own rules, after the ones OpenSSH's
//! `ssh-agent` applies to a key added with `ssh-add -h` (its `identity_permitted` and
//! `permitted_by_dest_constraints`), narrowed to what a capability says.
//!
//! A connection is *bound* by `session-bind@openssh.com` messages (OpenSSH 8.9+ sends one per
//! connection it uses, naming the server's host key, the session id, a signature of that id by
//! the host key, and whether the connection is a forwarded one). A signature is made only when:
//!
//! - the connection is bound, and the data to sign is an `SSH_MSG_USERAUTH_REQUEST` for the
//!   `publickey` method (or its host-bound variant), with our key, whose session id is the
//!   last binding's (and whose host key, if it names one, is the last binding's);
//! - the last binding is not a forwarding one (a signature is for logging in, not for a hop);
//! - every earlier binding is a forwarding one (nothing binds after a login binding);
//! - with more than one binding (`ssh -A`, then a login from the remote side), the
//!   capability allows forwarding, and every hop's host key is one of `hosts`';
//! - the last binding's host key is listed for one of `hosts` in `ssh_known_hosts`, and not
//!   under `@revoked`.

#![forbid(unsafe_code)]

use super::known_hosts::{KnownHosts, NotKnown};
use ssh_encoding::Decode;
use ssh_key::HashAlg;
use ssh_key::public::KeyData;

/// `SSH_MSG_USERAUTH_REQUEST` (RFC 4252).
const USERAUTH_REQUEST: u8 = 50;
/// OpenSSH's limit on bindings per connection (a chain of forwarding hops).
pub const MAX_BINDINGS: usize = 16;

/// One `session-bind@openssh.com` of a connection, its signature checked.
#[derive(Clone, Debug)]
pub struct Binding {
    pub host_key: KeyData,
    pub session_id: Vec<u8>,
    pub forwarded: bool,
}

/// What a capability allows.
pub struct Policy {
    pub hosts: Vec<String>,
    pub allow_forwarding: bool,
    pub known: KnownHosts,
}

/// What a request showed about its destination, for the audit line.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub host: Option<String>,
    pub host_key: Option<String>,
    pub user: Option<String>,
    pub forwarded: bool,
}

/// The parts of a signed user-authentication request we judge.
#[derive(Debug, PartialEq, Eq)]
pub struct Userauth {
    pub session_id: Vec<u8>,
    pub user: String,
    pub key: KeyData,
    /// The server's host key (method `publickey-hostbound-v00@openssh.com` only).
    pub host_key: Option<KeyData>,
}

pub fn fingerprint(k: &KeyData) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

/// Parse `data` as OpenSSH's agent client sends it for a login signature: string session id,
/// byte 50, string user, string service ("ssh-connection"), string method, bool TRUE, string
/// algorithm, string public key[, string host key], and nothing after.
pub fn parse_userauth(data: &[u8]) -> Option<Userauth> {
    let mut r = data;
    let session_id = Vec::<u8>::decode(&mut r).ok()?;
    if session_id.is_empty() || u8::decode(&mut r).ok()? != USERAUTH_REQUEST {
        return None;
    }
    let user = String::decode(&mut r).ok()?;
    if String::decode(&mut r).ok()? != "ssh-connection" {
        return None;
    }
    let method = String::decode(&mut r).ok()?;
    if u8::decode(&mut r).ok()? != 1 {
        return None;
    }
    let _alg = String::decode(&mut r).ok()?;
    let blob = Vec::<u8>::decode(&mut r).ok()?;
    let key = KeyData::decode(&mut blob.as_slice()).ok()?;
    let host_key = match method.as_str() {
        "publickey" => None,
        "publickey-hostbound-v00@openssh.com" => {
            let blob = Vec::<u8>::decode(&mut r).ok()?;
            Some(KeyData::decode(&mut blob.as_slice()).ok()?)
        }
        _ => return None,
    };
    if !r.is_empty() {
        return None;
    }
    Some(Userauth {
        session_id,
        user,
        key,
        host_key,
    })
}

/// Decide one signature of `data` with `ours`, on a connection with `bindings`. `Ok` names the
/// catalog host it is for; `Err` says why not. `seen` is filled either way.
pub fn decide(
    p: &Policy,
    bindings: &[Binding],
    bind_failed: bool,
    ours: &KeyData,
    data: &[u8],
    seen: &mut Seen,
) -> Result<String, String> {
    seen.forwarded = bindings.iter().any(|b| b.forwarded);
    let Some(last) = bindings.last() else {
        return Err(if bind_failed {
            "the connection's session-bind@openssh.com failed; nothing is signed on it".into()
        } else {
            "the connection is not bound to an SSH session (no session-bind@openssh.com, which OpenSSH 8.9 and later send); a destination-constrained key signs only for a known destination".into()
        });
    };
    seen.host_key = Some(fingerprint(&last.host_key));
    if let Ok(h) = p.known.host_of(&last.host_key) {
        seen.host = Some(h.to_owned());
    }
    let Some(req) = parse_userauth(data) else {
        return Err("the data to sign is not an SSH public-key user authentication request".into());
    };
    seen.user = Some(req.user.chars().take(256).collect());
    if &req.key != ours {
        return Err("the request names another public key than the one signing".into());
    }
    if req.session_id != last.session_id {
        return Err(
            "the request's session id is not the one the connection was last bound to".into(),
        );
    }
    if let Some(hk) = &req.host_key
        && hk != &last.host_key
    {
        return Err(
            "the request's host key is not the one the connection was last bound to".into(),
        );
    }
    if last.forwarded {
        return Err(
            "a signature was asked for on a forwarding binding (only a login signs)".into(),
        );
    }
    let (hops, _) = bindings.split_at(bindings.len() - 1);
    if hops.iter().any(|b| !b.forwarded) {
        return Err("the connection was bound again after a login binding".into());
    }
    if !hops.is_empty() {
        if !p.allow_forwarding {
            return Err(format!(
                "the request came over a forwarded agent connection (ssh -A, {} hop(s)); the capability does not allow forwarding",
                hops.len()
            ));
        }
        for h in hops {
            if p.known.host_of(&h.host_key).is_err() {
                return Err(format!(
                    "the request was forwarded through host key {}, which is not a known key of {}",
                    fingerprint(&h.host_key),
                    p.hosts.join(", ")
                ));
            }
        }
    }
    match p.known.host_of(&last.host_key) {
        Ok(h) => Ok(h.to_owned()),
        Err(NotKnown::Revoked) => Err(format!(
            "the destination's host key {} is marked @revoked in ssh_known_hosts",
            fingerprint(&last.host_key)
        )),
        Err(NotKnown::Unlisted) => Err(format!(
            "the destination's host key {} is not a known key (ssh_known_hosts) of any of the capability's hosts ({})",
            fingerprint(&last.host_key),
            p.hosts.join(", ")
        )),
    }
}

/// Add a checked binding to a connection's list, by the rules above. `Err` says why not.
pub fn bind(bindings: &mut Vec<Binding>, b: Binding) -> Result<(), String> {
    if let Some(same) = bindings.iter().find(|x| x.session_id == b.session_id) {
        return if same.host_key == b.host_key && same.forwarded == b.forwarded {
            Ok(()) // the same binding again
        } else {
            Err("the session id is already bound to another host key".into())
        };
    }
    if bindings.last().is_some_and(|l| !l.forwarded) {
        return Err("the connection is already bound for a login".into());
    }
    if bindings.len() >= MAX_BINDINGS {
        return Err(format!(
            "more than {MAX_BINDINGS} bindings on one connection"
        ));
    }
    bindings.push(b);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_encoding::Encode;

    const OURS: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO+eeJY/7F4qZPnqDjnWlsiCZ/";
    const HK1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const HK2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn key(s: &str) -> KeyData {
        ssh_key::PublicKey::from_openssh(s)
            .unwrap()
            .key_data()
            .clone()
    }

    fn request(sid: &[u8], user: &str, method: &str, k: &KeyData, hk: Option<&KeyData>) -> Vec<u8> {
        let mut out = Vec::new();
        sid.to_vec().encode(&mut out).unwrap();
        USERAUTH_REQUEST.encode(&mut out).unwrap();
        user.encode(&mut out).unwrap();
        "ssh-connection".encode(&mut out).unwrap();
        method.encode(&mut out).unwrap();
        1u8.encode(&mut out).unwrap();
        k.algorithm().as_str().encode(&mut out).unwrap();
        k.encode_prefixed(&mut out).unwrap();
        if let Some(h) = hk {
            h.encode_prefixed(&mut out).unwrap();
        }
        out
    }

    fn policy(forwarding: bool) -> Policy {
        let mut known = KnownHosts::default();
        known.add_text(&format!("vps-test {HK1}\n"), &["vps-test".to_string()]);
        Policy {
            hosts: vec!["vps-test".into()],
            allow_forwarding: forwarding,
            known,
        }
    }

    fn b(hk: &str, sid: &[u8], fwd: bool) -> Binding {
        Binding {
            host_key: key(hk),
            session_id: sid.to_vec(),
            forwarded: fwd,
        }
    }

    fn judge(p: &Policy, bs: &[Binding], data: &[u8]) -> Result<String, String> {
        decide(p, bs, false, &key(OURS), data, &mut Seen::default())
    }

    #[test]
    fn a_login_to_a_known_host_is_signed() {
        let p = policy(false);
        let data = request(b"sid1", "root", "publickey", &key(OURS), None);
        assert_eq!(
            judge(&p, &[b(HK1, b"sid1", false)], &data),
            Ok("vps-test".into())
        );
        let data = request(
            b"sid1",
            "root",
            "publickey-hostbound-v00@openssh.com",
            &key(OURS),
            Some(&key(HK1)),
        );
        assert_eq!(
            judge(&p, &[b(HK1, b"sid1", false)], &data),
            Ok("vps-test".into())
        );
    }

    #[test]
    fn everything_else_is_refused() {
        let p = policy(false);
        let ok = request(b"sid1", "root", "publickey", &key(OURS), None);
        // unbound
        assert!(judge(&p, &[], &ok).unwrap_err().contains("not bound"));
        // another host
        assert!(
            judge(&p, &[b(HK2, b"sid1", false)], &ok)
                .unwrap_err()
                .contains("not a known key")
        );
        // wrong session id
        assert!(
            judge(&p, &[b(HK1, b"sid2", false)], &ok)
                .unwrap_err()
                .contains("session id")
        );
        // host-bound request naming another host key
        let hb = request(
            b"sid1",
            "root",
            "publickey-hostbound-v00@openssh.com",
            &key(OURS),
            Some(&key(HK2)),
        );
        assert!(
            judge(&p, &[b(HK1, b"sid1", false)], &hb)
                .unwrap_err()
                .contains("host key")
        );
        // another key in the request
        let other = request(b"sid1", "root", "publickey", &key(HK2), None);
        assert!(
            judge(&p, &[b(HK1, b"sid1", false)], &other)
                .unwrap_err()
                .contains("another public key")
        );
        // not a userauth request at all, truncated, trailing bytes, other method
        assert!(judge(&p, &[b(HK1, b"sid1", false)], b"hello").is_err());
        assert!(judge(&p, &[b(HK1, b"sid1", false)], &ok[..ok.len() - 1]).is_err());
        let mut long = ok.clone();
        long.push(0);
        assert!(judge(&p, &[b(HK1, b"sid1", false)], &long).is_err());
        let pw = request(b"sid1", "root", "password", &key(OURS), None);
        assert!(judge(&p, &[b(HK1, b"sid1", false)], &pw).is_err());
        // signing on a forwarding binding
        assert!(
            judge(&p, &[b(HK1, b"sid1", true)], &ok)
                .unwrap_err()
                .contains("forwarding binding")
        );
        // a bind failed, then nothing
        assert!(
            decide(&p, &[], true, &key(OURS), &ok, &mut Seen::default())
                .unwrap_err()
                .contains("failed")
        );
    }

    #[test]
    fn forwarded_requests_need_allow_forwarding_and_known_hops() {
        let ok2 = request(b"sid2", "root", "publickey", &key(OURS), None);
        let chain = [b(HK1, b"sid1", true), b(HK1, b"sid2", false)];
        let mut seen = Seen::default();
        let no = decide(&policy(false), &chain, false, &key(OURS), &ok2, &mut seen).unwrap_err();
        assert!(no.contains("does not allow forwarding"), "{no}");
        assert!(seen.forwarded);
        assert_eq!(seen.user.as_deref(), Some("root"));
        assert_eq!(judge(&policy(true), &chain, &ok2), Ok("vps-test".into()));
        // through an unknown hop
        let chain = [b(HK2, b"sid1", true), b(HK1, b"sid2", false)];
        assert!(
            judge(&policy(true), &chain, &ok2)
                .unwrap_err()
                .contains("forwarded through")
        );
    }

    #[test]
    fn binding_rules() {
        let mut bs = Vec::new();
        bind(&mut bs, b(HK1, b"s1", true)).unwrap();
        bind(&mut bs, b(HK1, b"s1", true)).unwrap(); // repeated: fine, not added
        assert_eq!(bs.len(), 1);
        assert!(bind(&mut bs, b(HK2, b"s1", true)).is_err());
        bind(&mut bs, b(HK1, b"s2", false)).unwrap();
        assert!(
            bind(&mut bs, b(HK1, b"s3", false))
                .unwrap_err()
                .contains("already bound")
        );
        let mut bs = Vec::new();
        for i in 0..MAX_BINDINGS {
            bind(&mut bs, b(HK1, format!("s{i}").as_bytes(), true)).unwrap();
        }
        assert!(bind(&mut bs, b(HK1, b"last", true)).is_err());
    }
}
