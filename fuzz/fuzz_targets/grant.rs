//! The grant path of `aap-exec`/`aap session`: `Grant::decode` and `validate` of the grant
//! bytes, then the SSHSIG signature over them (`parse_sig`, `verify_crypto`) and whether its
//! key may sign (`AllowedSigners::allowed`, `verify`, `principal_for`).
//!
//! Input layout: `[grant_len: u16 LE][sig_len: u16 LE][grant][sig][allowed_signers text]`;
//! lengths are clamped to what is there, so every input is usable.
#![no_main]

use aap::grant::signers::{parse_sig, verify_crypto};
use aap::grant::{AllowedSigners, Grant};
use aap::id::SessionId;
use libfuzzer_sys::fuzz_target;

/// A fixed "now" inside the seed grants' validity, and the session id files are named by when
/// the grant's own id does not parse.
const NOW: i64 = 1_790_000_000;
const FILE_ID: &str = "01KAAAAAAAAAAAAAAAAAAAAAAA";

fn split(data: &[u8]) -> (&[u8], &[u8], &[u8]) {
    if data.len() < 4 {
        return (data, &[], &[]);
    }
    let glen = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let slen = usize::from(u16::from_le_bytes([data[2], data[3]]));
    let rest = &data[4..];
    let (grant, rest) = rest.split_at(glen.min(rest.len()));
    let (sig, signers) = rest.split_at(slen.min(rest.len()));
    (grant, sig, signers)
}

fuzz_target!(|data: &[u8]| {
    let (grant, sig_text, signers_bytes) = split(data);

    // The grant: decoded against a fixed file id, and against its own id when it has one
    // (so the field checks after the id comparison run too).
    let fixed = SessionId::parse(FILE_ID).expect("a valid ULID");
    let _ = Grant::decode(grant, &fixed);
    let mut principal = String::from("operator@aap");
    let mut now = NOW;
    if let Ok(g) = serde_json::from_slice::<Grant>(grant) {
        principal = g.operator.clone();
        if let Ok(id) = SessionId::parse(&g.session)
            && let Ok(v) = Grant::decode(grant, &id)
        {
            assert_eq!(v.id, id);
            for (cap, _) in &v.caps {
                assert!(v.cap_expiry(cap).is_some());
            }
            now = v.issued_at;
        }
    }

    // The signature on its own.
    let sig = match parse_sig(sig_text) {
        Ok(sig) => sig,
        Err(_) => return,
    };
    let crypto_ok = verify_crypto(grant, &sig).is_ok();

    // And against an allowed_signers file.
    let Ok(text) = std::str::from_utf8(signers_bytes) else {
        return;
    };
    let Ok(signers) = AllowedSigners::parse(text, "allowed_signers") else {
        return;
    };
    let _ = signers.allowed(&sig, &principal, now);
    let _ = signers.principal_for(sig.public_key(), now);
    let verified = signers.verify(grant, sig_text, &principal, now);
    if verified.is_ok() {
        // verify = parse_sig + verify_crypto + allowed: it cannot accept what verify_crypto
        // refused.
        assert!(
            crypto_ok,
            "verify accepted a signature verify_crypto refused"
        );
    }
});
