//! `aap dev-server`.

#![forbid(unsafe_code)]

use crate::cli::DevServerArgs;
use crate::devserver::{Options, Seed, api::Faults};
use crate::error::Result;

pub fn run(a: DevServerArgs) -> Result<u8> {
    let seed = match &a.seed {
        Some(p) => Seed::load(p)?,
        None => Seed::default_seed(),
    };
    let faults = Faults {
        latency_ms: a.latency_ms,
        fail_next: a.fail_next,
        fail_status: a.fail_status.parse().ok(),
        retry_after: a.retry_after,
        rate_limit_next: a.rate_limit_next,
        rate_limit_status: a.rate_limit_status.parse().ok(),
        malformed_next: a.malformed_next,
        close_mid_body_next: a.close_mid_body_next,
        huge_body_next: a.huge_body_next,
        expire_tokens_next: a.expire_tokens_next,
    };
    crate::devserver::run(Options {
        listen: a.listen,
        seed,
        tls: a.tls,
        allow_non_loopback: a.i_know_this_is_not_infisical,
        faults,
    })
}
