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
//! - GCC's unwinder linked in statically (`libgcc_eh.a`, whole), so the shared `libgcc_s.so.1`
//!   is no longer loaded at all: loading it costs a mapping, its relocations and its
//!   constructor `__cpu_indicator_init`, whose CPUID instructions each trap to the hypervisor
//!   on a virtual machine (about 5 µs each here). Measured on a hello-world pair: 150 to 270 µs
//!   less per process start. Used only when the C compiler has the archive
//!   (`cc -print-file-name=libgcc_eh.a`); otherwise the binary links as before.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=aap-exec=-no-pie");
        if let Some(eh) = gcc_file("libgcc_eh.a") {
            println!("cargo:rustc-link-arg-bin=aap-exec=-Wl,--whole-archive");
            println!("cargo:rustc-link-arg-bin=aap-exec={}", eh.display());
            println!("cargo:rustc-link-arg-bin=aap-exec=-Wl,--no-whole-archive");
        }
    }
}

/// The full path of one of the C compiler's own files, when it has it.
fn gcc_file(name: &str) -> Option<std::path::PathBuf> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(cc)
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let path = std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // Without the file, the compiler prints the bare name back.
    (path.is_absolute() && path.is_file()).then_some(path)
}
