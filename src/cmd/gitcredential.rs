//! `aap git-credential --host HOST --fd N ACTION` (hidden): the one-shot git credential helper
//! that `aap-exec` configures for `forgejo-pat` capabilities (see src/exec/gitcred.rs).
//!
//! It reads git's request on stdin and, for a `get` on the capability's host, prints the token
//! held in the inherited sealed memfd N. Everything else (store, erase, another host, junk)
//! gets no answer. It always exits 0 and prints nothing on stderr: git treats a helper's failure
//! as "no credential" anyway, and a quiet helper cannot leak anything.

#![forbid(unsafe_code)]

use crate::error::Result;
use crate::exec::gitcred::{self, MAX_INPUT};
use std::io::{Read, Write};
use zeroize::Zeroizing;

pub fn run(host: &str, fd: i32, action: &[String]) -> Result<u8> {
    let action = action.first().map(String::as_str).unwrap_or("");
    // Read the request even when we will not answer, so git never gets SIGPIPE from us.
    let mut input = Zeroizing::new(Vec::new());
    let _ = std::io::stdin()
        .lock()
        .take(MAX_INPUT as u64 + 1)
        .read_to_end(&mut input);
    let out = gitcred::answer(action, &input, host, &mut || read_token(fd));
    if !out.is_empty() {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&out);
        let _ = stdout.flush();
    }
    Ok(0)
}

/// The token from memfd `fd`, only if that descriptor really is one of ours.
fn read_token(fd: i32) -> Option<Zeroizing<Vec<u8>>> {
    if fd < 3 {
        return None;
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if !link.to_string_lossy().starts_with("/memfd:aap-git-token") {
        return None;
    }
    // A fresh open of /proc/self/fd/N starts at offset 0 and leaves the inherited one alone.
    let file = std::fs::File::open(format!("/proc/self/fd/{fd}")).ok()?;
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_INPUT));
    file.take(MAX_INPUT as u64).read_to_end(&mut buf).ok()?;
    Some(buf)
}
