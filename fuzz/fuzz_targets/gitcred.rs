//! `gitcred::answer`: the `aap-exec` git credential helper's parser of git's `key=value` request
//! on stdin. The first byte picks the action, the capability's host and the token; the rest is
//! the request. Checks that an answer is only ever the four lines for the capability's host.
#![no_main]

use aap::exec::gitcred::{answer, is_loopback, protocols, token_is_sendable};
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

const ACTIONS: [&str; 4] = ["get", "store", "erase", "get\n"];
const HOSTS: [&str; 4] = [
    "git.example.org",
    "127.0.0.1:3000",
    "localhost:8080",
    "[::1]:3000",
];
const TOKENS: [&[u8]; 4] = [b"fj_token_value", b"", b"bad\ntoken", b"nul\0token"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let action = ACTIONS[usize::from(sel & 3)];
    let host = HOSTS[usize::from((sel >> 2) & 3)];
    let token = TOKENS[usize::from((sel >> 4) & 3)];
    let mut asked = 0;
    let out = answer(action, input, host, &mut || {
        asked += 1;
        Some(Zeroizing::new(token.to_vec()))
    });
    assert!(asked <= 1, "the token was read more than once");
    if out.is_empty() {
        return;
    }
    // An answer: exactly protocol, host, username, password, each on its own line.
    assert_eq!(action, "get");
    assert!(token_is_sendable(token));
    let text = std::str::from_utf8(&out).expect("the answer is UTF-8");
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .expect("ends with a newline")
        .split('\n')
        .collect();
    assert_eq!(lines.len(), 4, "answer {text:?}");
    let proto = lines[0].strip_prefix("protocol=").expect("protocol line");
    assert!(protocols(host).contains(&proto));
    let h = lines[1].strip_prefix("host=").expect("host line");
    assert!(h.eq_ignore_ascii_case(host));
    assert!(lines[2].starts_with("username="));
    assert_eq!(
        lines[3].as_bytes(),
        [b"password=".as_slice(), token].concat()
    );
    let _ = is_loopback(h);
});
