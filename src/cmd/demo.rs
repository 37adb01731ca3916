//! `aap demo`: the quick start, on defaults embedded in the binary. Needs no config, no network
//! and no secrets of the machine it runs on.

#![forbid(unsafe_code)]

use crate::catalog::{Capability, Catalog};
use crate::error::Result;

/// The seed catalog, compiled in from `policies/`, its single source.
pub const SEED_CATALOG: &str = include_str!("../../policies/agent-capabilities.yaml");

pub fn run() -> Result<u8> {
    println!("== 1. the seed capability catalog (embedded from policies/agent-capabilities.yaml)");
    let cat = Catalog::from_text(SEED_CATALOG, "policies/agent-capabilities.yaml")?;
    println!("$ aap catalog check policies/agent-capabilities.yaml");
    println!(
        "policies/agent-capabilities.yaml: ok, {} capabilities",
        cat.len()
    );
    println!("$ aap catalog list");
    let caps: Vec<&Capability> = cat.capabilities().iter().collect();
    super::catalog::print_list(&caps, false);
    Ok(0)
}
