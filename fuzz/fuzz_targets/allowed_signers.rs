//! `AllowedSigners::parse` (OpenSSH allowed_signers: quoted principals, options, times, keys of
//! every type ssh-key knows), then `principal_for` for each key it lists, and OpenSSH's
//! `match_list` pattern matching of principals and namespaces.
#![no_main]

use aap::grant::AllowedSigners;
use aap::grant::signers::{match_list, parse_ssh_time};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(signers) = AllowedSigners::parse(text, "allowed_signers") {
        for s in signers.signers() {
            assert!(!s.principals.is_empty());
            for now in [0, 1_790_000_000, i64::MAX, i64::MIN] {
                let _ = signers.principal_for(&s.key, now);
            }
            let _ = match_list("operator@aap", &s.principals);
            if let Some(ns) = &s.namespaces {
                let _ = match_list("aap-grant", ns);
            }
        }
    }
    // The pattern matcher on its own: first line is the subject, the rest the pattern list.
    if let Some((subject, list)) = text.split_once('\n') {
        let _ = match_list(subject, list);
    }
    let _ = parse_ssh_time(text);
});
