//! Taking secret strings out of JSON without leaving copies.
//!
//! serde_json unescapes strings with escapes (a multi-line key has `\n`) into a scratch buffer
//! that is freed without being wiped. So the client asks serde_json only for the *raw* string
//! literal (a slice of the zeroized body, via `RawValue`) and unescapes it here, straight into a
//! zeroizing buffer. And request bodies that carry a secret are built here, in zeroizing buffers.

#![forbid(unsafe_code)]

use crate::secret::{SecretBytes, extend_zeroizing};
use zeroize::Zeroizing;

/// Unescape a JSON string literal (with its quotes) into a secret. `None` when it is not a
/// well-formed JSON string.
pub fn unescape_secret(raw: &str) -> Option<SecretBytes> {
    let b = raw.as_bytes();
    if b.len() < 2 || b[0] != b'"' || b[b.len() - 1] != b'"' {
        return None;
    }
    let body = &b[1..b.len() - 1];
    // The result is never longer than the literal: size it once, never grow.
    let mut out = Zeroizing::new(Vec::with_capacity(body.len()));
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == b'"' || c < 0x20 {
            return None;
        }
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = *body.get(i + 1)?;
        i += 2;
        match e {
            b'"' => out.push(b'"'),
            b'\\' => out.push(b'\\'),
            b'/' => out.push(b'/'),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'u' => {
                let hi = hex4(body.get(i..i + 4)?)?;
                i += 4;
                let cp = if (0xD800..0xDC00).contains(&hi) {
                    if body.get(i) != Some(&b'\\') || body.get(i + 1) != Some(&b'u') {
                        return None;
                    }
                    let lo = hex4(body.get(i + 2..i + 6)?)?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return None;
                    }
                    i += 6;
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else if (0xDC00..0xE000).contains(&hi) {
                    return None;
                } else {
                    hi
                };
                let ch = char::from_u32(cp)?;
                let mut tmp = [0u8; 4];
                let s = ch.encode_utf8(&mut tmp);
                out.extend_from_slice(s.as_bytes());
                zeroize::Zeroize::zeroize(&mut tmp);
            }
            _ => return None,
        }
    }
    Some(SecretBytes::new(out))
}

fn hex4(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

/// Append `s` as a JSON string literal (with quotes) to a zeroizing buffer.
pub fn push_json_string(buf: &mut Zeroizing<Vec<u8>>, s: &[u8]) {
    extend_zeroizing(buf, b"\"");
    for &c in s {
        match c {
            b'"' => extend_zeroizing(buf, b"\\\""),
            b'\\' => extend_zeroizing(buf, b"\\\\"),
            b'\n' => extend_zeroizing(buf, b"\\n"),
            b'\r' => extend_zeroizing(buf, b"\\r"),
            b'\t' => extend_zeroizing(buf, b"\\t"),
            c if c < 0x20 => {
                let hex = b"0123456789abcdef";
                extend_zeroizing(
                    buf,
                    &[
                        b'\\',
                        b'u',
                        b'0',
                        b'0',
                        hex[usize::from(c >> 4)],
                        hex[usize::from(c & 15)],
                    ],
                );
            }
            c => extend_zeroizing(buf, &[c]),
        }
    }
    extend_zeroizing(buf, b"\"");
}

/// Build `{"k1":"v1","k2":"v2"}` in a zeroizing buffer.
pub fn object(fields: &[(&str, &[u8])]) -> Zeroizing<Vec<u8>> {
    let len: usize = fields.iter().map(|(k, v)| k.len() + v.len() * 2 + 8).sum();
    let mut buf = Zeroizing::new(Vec::with_capacity(len + 2));
    extend_zeroizing(&mut buf, b"{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            extend_zeroizing(&mut buf, b",");
        }
        push_json_string(&mut buf, k.as_bytes());
        extend_zeroizing(&mut buf, b":");
        push_json_string(&mut buf, v);
    }
    extend_zeroizing(&mut buf, b"}");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(s: &str) {
        let lit = serde_json::to_string(s).unwrap();
        let got = unescape_secret(&lit).unwrap();
        assert_eq!(got.expose(), s.as_bytes(), "{lit}");
        let mut buf = Zeroizing::new(Vec::new());
        push_json_string(&mut buf, s.as_bytes());
        let back: String = serde_json::from_slice(&buf).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn unescapes_like_serde_json() {
        for s in [
            "",
            "plain",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
            "quote \" backslash \\ slash / tab \t cr \r",
            "\u{1}\u{1f}",
            "é ü 日本 😀",
        ] {
            roundtrip(s);
        }
        assert_eq!(
            unescape_secret(r#""\ud83d\ude00\u00e9\/""#)
                .unwrap()
                .expose(),
            "😀é/".as_bytes()
        );
    }

    #[test]
    fn rejects_malformed_literals() {
        for bad in [
            "",
            "\"",
            "x",
            "\"abc",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"a\nb\"",
            "\"a\"b\"",
        ] {
            assert!(unescape_secret(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn object_is_valid_json() {
        let o = object(&[("clientId", b"id-1"), ("clientSecret", b"s\"e\\c")]);
        let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
        assert_eq!(v["clientId"], "id-1");
        assert_eq!(v["clientSecret"], "s\"e\\c");
    }
}
