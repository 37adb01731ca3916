//! Percent-decoding of URL components (`%XX`, and `+` as a space in a query), for the
//! dev-server's request parser and the http-proxy's policy. One decoder, two readings of a
//! malformed escape: the dev-server keeps it as it is; the policy refuses the request.

#![forbid(unsafe_code)]

/// Decode `s`; a `%` not followed by two hex digits is kept as it is.
pub fn decode_lossy(s: &str, plus_is_space: bool) -> String {
    String::from_utf8_lossy(&decode_with(s, plus_is_space, false).unwrap_or_default()).into_owned()
}

/// Decode `s`; `None` at a `%` not followed by two hex digits, or when the bytes decoded are
/// not UTF-8.
pub fn decode_strict(s: &str, plus_is_space: bool) -> Option<String> {
    String::from_utf8(decode_with(s, plus_is_space, true)?).ok()
}

fn decode_with(s: &str, plus_is_space: bool, strict: bool) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            match b.get(i + 1..i + 3).and_then(hex_pair) {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None if strict => return None,
                None => {}
            }
        }
        out.push(if c == b'+' && plus_is_space { b' ' } else { c });
        i += 1;
    }
    Some(out)
}

/// Two hex digits as a byte (no sign: `u8::from_str_radix` would take `+1`).
fn hex_pair(h: &[u8]) -> Option<u8> {
    let d = |x: u8| char::from(x).to_digit(16);
    u8::try_from(d(h[0])? * 16 + d(h[1])?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_keeps_malformed_escapes_and_strict_refuses_them() {
        // The rest of the lossy reading: devserver::http's tests.
        assert_eq!(decode_lossy("a+b%41", true), "a bA");
        assert_eq!(decode_lossy("%+1", false), "%+1");
        assert_eq!(
            decode_strict("git%2Dreceive-pack", true).unwrap(),
            "git-receive-pack"
        );
        for bad in ["%zz", "%+1", "%4", "a%", "%ff"] {
            assert_eq!(decode_strict(bad, true), None, "{bad}");
        }
    }
}
