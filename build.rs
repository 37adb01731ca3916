//! Link flags for `aap-exec`, which starts once for every command an agent runs: its start-up
//! cost is mostly page faults.
//!
//! - `-no-pie`: a position-dependent executable has no relocations of its own, so the loader
//!   writes none of its pages at start (as PIE, relocating `.data.rel.ro` and the GOT wrote and
//!   so faulted about 60 pages per run, a quarter of all its page faults). The loss is ASLR for
//!   aap-exec's own code (its libraries keep theirs). ASLR is a defence against an attacker
//!   outside the process; aap-exec is not privileged and runs as the agent, who already
//!   controls it completely (`LD_PRELOAD`, `ptrace`), so it guards nothing here. The broker
//!   (`aap`) stays PIE. (This replaces packed relative relocations, DT_RELR, which only made
//!   the table smaller: the pages they relocate were still written.)
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=aap-exec=-no-pie");
    }
}
