//! Hostile input to every parser of this issue (grants, requests, audit lines, allowed_signers,
//! session ids, SSH signatures): many deterministic mutations of valid documents. Each parser
//! must answer Ok or Err, never panic, and never accept a document that differs from the
//! original in a way the format cannot allow.

use aap::audit::LineIn;
use aap::grant::{AllowedSigners, Grant, GrantedCap};
use aap::id::{RequestId, SessionId};
use aap::request::Request;

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\0",
    b"\xff",
    b"\xc3\x28",
    b"null",
    b"-1",
    b"1e999",
    b"\"agent\":\"x\",",
    b"\"v\":2,",
    b"\n",
    b"../",
    b"\xe2\x80\xae",
    b"99999999999999999999",
];

fn mutate(rng: &mut Rng, doc: &[u8]) -> Vec<u8> {
    let mut d = doc.to_vec();
    for _ in 0..=rng.below(3) {
        if d.is_empty() {
            d.push(b'{');
        }
        let at = rng.below(d.len());
        match rng.below(5) {
            0 => d[at] ^= 1 << rng.below(8),
            1 => {
                d.remove(at);
            }
            2 => {
                let ins = INTERESTING[rng.below(INTERESTING.len())];
                d.splice(at..at, ins.iter().copied());
            }
            3 => d.truncate(at),
            _ => {
                let len = rng.below(16).min(d.len() - at);
                let chunk = d[at..at + len].to_vec();
                d.splice(at..at, chunk);
            }
        }
    }
    d
}

fn sample_grant(id: &SessionId) -> Vec<u8> {
    Grant {
        v: 1,
        session: id.to_string(),
        agent: "codex".into(),
        operator: "op@example.org".into(),
        seq: 3,
        issued_at: "2026-11-24T02:30:00Z".into(),
        not_before: "2026-11-24T02:29:00Z".into(),
        expires_at: "2026-11-24T06:30:00Z".into(),
        capabilities: vec![GrantedCap {
            id: "forgejo-pat-read".into(),
            approved_at: "2026-11-24T02:30:00Z".into(),
            expires_at: "2026-11-24T06:30:00Z".into(),
        }],
        hosts: vec!["build1.example.org".into()],
        reason: Some("review".into()),
        break_glass: false,
    }
    .to_bytes()
}

#[test]
fn grant_decoding_never_panics_and_accepts_only_valid_grants() {
    let id = SessionId::parse("01JD0000000000000000000000").unwrap();
    let good = sample_grant(&id);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let m = mutate(&mut rng, &good);
        if let Ok(v) = Grant::decode(&m, &id) {
            accepted += 1;
            // Whatever passes is a complete, valid grant for this session id.
            assert_eq!(v.grant.session, id.to_string());
            assert!(v.not_before <= v.expires_at);
            assert!(v.caps.iter().all(|(_, e)| *e <= v.expires_at));
            assert!(aap::grant::is_kebab(&v.grant.agent));
        }
    }
    // Some mutations are harmless (whitespace, a changed reason letter); most are not.
    assert!(accepted < 20_000 / 2, "{accepted} accepted");
}

#[test]
fn request_and_audit_line_parsing_never_panic() {
    let rid = RequestId::parse("01JD0000000000000000000009").unwrap();
    let req = Request {
        v: 1,
        id: rid.to_string(),
        session: "01JD0000000000000000000001".into(),
        agent: "codex".into(),
        capability: "forgejo-pat-read".into(),
        reason: "fetch".into(),
        created_at: "2026-11-24T02:30:00Z".into(),
        expires_at: "2026-11-24T03:30:00Z".into(),
        uid: 1000,
        host: "h".into(),
    }
    .to_bytes();
    let line = format!(
        "{{\"v\":1,\"id\":\"01JD0000000000000000000000\",\"ts\":\"2026-11-24T02:30:00.000Z\",\"event\":\"exec.end\",\"session\":\"01JD0000000000000000000001\",\"agent\":\"codex\",\"uid\":1001,\"host\":\"h\",\"capability\":\"forgejo-pat-read\",\"tier\":\"low\",\"outcome\":\"ok\",\"argv\":[\"git\",\"fetch\"],\"exit_code\":0,\"prev\":\"{}\"}}",
        aap::audit::GENESIS
    );
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let m = mutate(&mut rng, &req);
        if let Ok(v) = Request::decode(&m, &rid) {
            assert_eq!(v.id, rid);
        }
        let m = mutate(&mut rng, line.as_bytes());
        if let Ok(l) = LineIn::parse(&m) {
            assert_eq!(l.v, 1);
            assert_eq!(l.prev.len(), 64);
        }
        // verify_reader over a two-line log with the mutation second.
        let mut log = line.as_bytes().to_vec();
        log.push(b'\n');
        log.extend_from_slice(&m);
        log.push(b'\n');
        let _ = aap::audit::verify_reader(&log[..]);
    }
}

#[test]
fn allowed_signers_ids_and_signatures_never_panic() {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOeSyBQb/f6VvlwzBGXkSOLwl1awV4rZirNWfALFlxU1";
    let text = format!(
        "# operators\nop@example.org namespaces=\"git,aap-grant\",valid-after=\"20200101\",valid-before=\"203001011200Z\" {key} laptop\n\"a@x,b@x\" {key}\n"
    );
    let sig = b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQAAADMAAAALc3NoLWVkMjU1MTkAAAAg55LIFBv9/pW+XDMEZeRI4vCXVr\nBXitmKs1Z8AsWXFTUAAAAJYWFwLWdyYW50AAAAAAAAAAZzaGE1MTIAAABTAAAAC3NzaC1l\nZDI1NTE5AAAAQJYOFVODq87gM7071+Nnb2pw25c7hW1tJmbKngTFZ9IQynok8sldOP9n4C\nHxk+QEm+xcjlxfDFfIlfZGg2V52Ac=\n-----END SSH SIGNATURE-----\n";
    let signers = AllowedSigners::parse(&text, "as").unwrap();
    let mut rng = Rng(7);
    for _ in 0..5_000 {
        let m = mutate(&mut rng, text.as_bytes());
        let _ = AllowedSigners::parse(&String::from_utf8_lossy(&m), "as");
        let m = mutate(&mut rng, sig);
        let _ = signers.verify(b"{\"a\":1}\n", &m, "op@example.org", 1_800_000_000);
        let m = mutate(&mut rng, b"01JD0000000000000000000000");
        let s = String::from_utf8_lossy(&m);
        if let Ok(id) = SessionId::parse(&s) {
            // Only canonical ids pass, and they are safe file names.
            assert_eq!(id.to_string(), s);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }
    // The unmutated signature is genuine (made by ssh-keygen over {"a":1}\n with the key
    // above), and verifies for the listed principal only.
    assert!(
        signers
            .verify(b"{\"a\":1}\n", sig, "op@example.org", 1_800_000_000)
            .is_ok()
    );
    assert!(
        signers
            .verify(b"{\"a\":1}\n", sig, "eve@example.org", 1_800_000_000)
            .is_err()
    );
    assert!(
        signers
            .verify(b"{\"a\":2}\n", sig, "op@example.org", 1_800_000_000)
            .is_err()
    );
    // Outside valid-before (2030-01-01 12:00 UTC) the signer is not allowed.
    assert!(
        signers
            .verify(b"{\"a\":1}\n", sig, "op@example.org", 1_900_000_000)
            .is_err()
    );
}
