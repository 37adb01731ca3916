//! Secret values in memory: wiped on drop, never printed.
//!
//! `SecretBytes` holds a secret from the moment it is read (a file, a response body) until it is
//! dropped. It has no `Display`, no `Serialize`, and a `Debug` that prints only the length. The
//! few places that must read the value call [`SecretBytes::expose`].

#![forbid(unsafe_code)]

use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// Bytes that are zeroized on drop and never shown.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Take ownership of a buffer. The caller must not keep other copies.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        SecretBytes(bytes)
    }

    /// Copy from a slice into a fresh, exactly sized buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut v = Zeroizing::new(Vec::with_capacity(bytes.len()));
        v.extend_from_slice(bytes);
        SecretBytes(v)
    }

    /// The value. Keep the borrow short; copy it only into other zeroizing buffers.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as UTF-8, when it is.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.0.len())
    }
}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

/// Push `bytes` onto a zeroizing buffer without leaving an un-wiped copy behind when the buffer
/// has to grow: the old allocation is wiped before it is freed.
pub fn extend_zeroizing(buf: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
    let need = buf.len() + bytes.len();
    if need > buf.capacity() {
        let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(buf.capacity() * 2)));
        bigger.extend_from_slice(buf);
        // The old buffer is zeroized when `bigger` replaces it and it drops.
        *buf = bigger;
    }
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value() {
        let s = SecretBytes::from_slice(b"hunter2-value");
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("13 bytes"), "{d}");
        assert_eq!(s.expose(), b"hunter2-value");
        assert_eq!(s.expose_str(), Some("hunter2-value"));
    }

    #[test]
    fn extend_grows_without_losing_bytes() {
        let mut b = Zeroizing::new(Vec::with_capacity(2));
        extend_zeroizing(&mut b, b"ab");
        extend_zeroizing(&mut b, b"cdefgh");
        extend_zeroizing(&mut b, b"i");
        assert_eq!(&b[..], b"abcdefghi");
    }
}
