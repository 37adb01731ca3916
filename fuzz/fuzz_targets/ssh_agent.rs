//! The broker's ssh agent decoder (`src/broker/sshagent`): `read_frame` over a stream of agent
//! frames (4-byte big-endian length, the 256 KiB cap before any body is read), `decode_request`
//! of each body (ssh-agent-lib's types; trailing bytes refused), re-encoded and decoded again
//! (must be equal), and for what decodes: `session-bind@openssh.com` bodies bound by
//! `policy::bind`, sign requests' data through `policy::parse_userauth` and `policy::decide`
//! against a fixed capability. Nothing may panic, and nothing is ever allowed for a host key
//! that the policy does not list.
#![no_main]

use aap::broker::sshagent::known_hosts::KnownHosts;
use aap::broker::sshagent::policy::{self, Binding, Policy, Seen};
use aap::broker::sshagent::{MAX_MESSAGE, decode_request, read_frame};
use libfuzzer_sys::fuzz_target;
use ssh_agent_lib::proto::Request;
use ssh_agent_lib::proto::extension::SessionBind;
use ssh_encoding::{Decode, Encode};

/// The one host key the policy knows (vps-test).
const HOST: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
/// The capability's key.
const OURS: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO+eeJY/7F4qZPnqDjnWlsiCZ/";

fuzz_target!(|data: &[u8]| {
    let mut known = KnownHosts::default();
    known.add_text(&format!("vps-test {HOST}\n"), &["vps-test".to_string()]);
    let host = ssh_key::PublicKey::from_openssh(HOST)
        .unwrap()
        .key_data()
        .clone();
    let ours = ssh_key::PublicKey::from_openssh(OURS)
        .unwrap()
        .key_data()
        .clone();
    let p = Policy {
        hosts: vec!["vps-test".into()],
        allow_forwarding: data.first().is_some_and(|b| b & 1 == 1),
        known,
    };
    let mut bindings: Vec<Binding> = Vec::new();
    let mut r = data;
    for _ in 0..64 {
        let body = match read_frame(&mut r) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => break,
        };
        assert!(!body.is_empty() && body.len() <= MAX_MESSAGE);
        let Ok(req) = decode_request(&body) else {
            continue;
        };
        let mut again = Vec::new();
        if req.encode(&mut again).is_ok() {
            let back = decode_request(&again).expect("a re-encoded request decodes");
            assert_eq!(back, req);
        }
        match req {
            Request::Extension(e) => {
                if let Ok(Some(b)) = e.parse_message::<SessionBind>() {
                    // The fuzzer cannot sign as the host key: bind without the check, to
                    // reach the decisions below.
                    let _ = policy::bind(
                        &mut bindings,
                        Binding {
                            host_key: b.host_key,
                            session_id: b.session_id,
                            forwarded: b.is_forwarding,
                        },
                    );
                    assert!(bindings.len() <= policy::MAX_BINDINGS);
                }
            }
            Request::SignRequest(s) => {
                let _ = policy::parse_userauth(&s.data);
                let mut seen = Seen::default();
                if let Ok(h) = policy::decide(&p, &bindings, false, &ours, &s.data, &mut seen) {
                    assert_eq!(h, "vps-test");
                    let last = bindings.last().expect("a decision for a bound connection");
                    assert_eq!(last.host_key, host);
                    assert!(!last.forwarded);
                    assert!(p.allow_forwarding || bindings.len() == 1);
                }
            }
            _ => {}
        }
    }
    // The userauth parser on the raw input, too.
    let _ = policy::parse_userauth(data);
    let _ = ssh_key::public::KeyData::decode(&mut &data[..]);
});
