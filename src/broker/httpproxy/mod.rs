//! The `http-proxy` inject form (issue 13): the broker's per-exec loopback endpoint that adds
//! a `forgejo-pat` token on the wire, so the child never holds it.
//!
//! So far only its policy ([`policy`]): the per-exec prefix, which requests it routes, and
//! which of those a `read` capability passes. The listener and the forwarding are not built yet;
//! the broker refuses an exec of an `http-proxy` capability (src/broker/exec.rs).

#![forbid(unsafe_code)]

pub mod policy;
