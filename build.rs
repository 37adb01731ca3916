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
//! - Linked statically, C library included (`-static`), when the C compiler has every archive it
//!   needs (`libc.a` and the others of [`STATIC_LIBS`]): no dynamic loader runs at all, no
//!   `libc.so.6` is mapped and relocated, no symbol is looked up. Measured on the whole exec path
//!   through a warm broker, paired with the floor (`timeout 10 /bin/true`) in the same runs:
//!   1.29× and 1.31× against 1.42× and 1.44× dynamic; 106 minor page faults per run against
//!   138 to 143; peak RSS 2.3 MiB against 3.0 MiB. rustc names its libraries with `-l` after a
//!   `-Bdynamic` it adds itself, so `-static` alone still links `libc.so.6`: each of them is
//!   given instead as a one-line linker script in a directory of this build's (`-L`, searched
//!   before the system's), `GROUP ( /path/libX.a )`, the form Debian's own `libc.so` has; the
//!   shared `libgcc_s` becomes `libgcc.a` (the unwinder is `libgcc_eh.a`, above). aap-exec
//!   calls nothing of glibc that needs a shared module at run time (no NSS: no user, group or
//!   host lookups; no `iconv`). A static aap-exec also ignores `LD_PRELOAD` and
//!   `LD_LIBRARY_PATH` (no loader reads them); that is no defence (the agent can run its own
//!   client, or trace this one from its start), and the tests say so. Without any of the
//!   archives the binary links as before, dynamically; `tests/shipping.rs` says which it is.
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
            if let Some(dir) = static_scripts() {
                println!("cargo:rustc-link-arg-bin=aap-exec=-static");
                println!("cargo:rustc-link-arg-bin=aap-exec=-L{}", dir.display());
                println!("cargo:rustc-env=AAP_EXEC_LINK=static");
            }
        }
    }
}

/// The libraries rustc links for std on linux-gnu (`-lc` and the rest), each of which must be
/// found as an archive for a static link.
const STATIC_LIBS: [&str; 6] = ["c", "m", "rt", "pthread", "dl", "util"];

/// A directory of linker scripts `libX.so` naming the archives `libX.a` (and `libgcc_s.so`
/// naming `libgcc.a`), or `None` when one of them is missing.
fn static_scripts() -> Option<std::path::PathBuf> {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR")?).join("static-libs");
    let mut scripts = Vec::new();
    for l in STATIC_LIBS {
        scripts.push((format!("lib{l}.so"), gcc_file(&format!("lib{l}.a"))?));
    }
    scripts.push(("libgcc_s.so".into(), gcc_file("libgcc.a")?));
    std::fs::create_dir_all(&out).ok()?;
    for (name, archive) in scripts {
        let a = archive.to_str()?;
        // A path with a space or a parenthesis would need quoting in the script: none here.
        if a.contains([' ', '(', ')', '"']) {
            return None;
        }
        std::fs::write(out.join(name), format!("GROUP ( {a} )\n")).ok()?;
    }
    Some(out)
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
