//! The audit log reader: `LineIn::parse` of one line (strict JSON, version, ULID id, RFC 3339
//! time, prev hash) and `verify_reader` over a whole log (line splitting, length limits, the
//! hash chain).
#![no_main]

use aap::audit::{LineIn, hash_hex, verify_reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one line, and each of its lines.
    if let Ok(l) = LineIn::parse(data) {
        assert_eq!(l.prev.len(), 64);
    }
    for line in data.split(|&b| b == b'\n').take(64) {
        let _ = LineIn::parse(line);
    }
    match verify_reader(data) {
        Ok(report) => {
            // Every line ended with a newline and chained; the head is a SHA-256 in hex.
            let newlines = data.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(report.lines, newlines);
            assert_eq!(report.head.len(), 64);
            if let Some(last) = data.strip_suffix(b"\n") {
                let last = last.rsplit(|&b| b == b'\n').next().unwrap_or(last);
                assert_eq!(report.head, hash_hex(last));
            }
        }
        Err(Ok(bad)) => assert!(bad.line >= 1),
        Err(Err(e)) => panic!("reading a slice cannot fail: {e}"),
    }
});
