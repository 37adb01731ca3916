//! Link flags for `aap-exec`, which starts once for every command an agent runs: its start-up
//! cost is mostly page faults. Packed relative relocations (DT_RELR: glibc 2.36, binutils 2.38)
//! shrink the relocation table the loader reads from about 270 KiB to a few KiB, and with it the
//! pages it faults in. Nothing else about the binary changes (it stays PIE, BIND_NOW, RELRO).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=aap-exec=-Wl,-z,pack-relative-relocs");
    }
}
