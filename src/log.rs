//! Diagnostics on stderr, filtered by `AAP_LOG` (e.g. `AAP_LOG=debug`, `AAP_LOG=aap=trace`).
//! Nothing is installed when `AAP_LOG` is unset, so the exec path pays nothing. Secret types
//! implement neither `Debug` nor `Display` in a way that shows their value, so no level prints one.

#![forbid(unsafe_code)]

pub fn init(prog: &str) {
    let Some(filter) = std::env::var_os("AAP_LOG") else {
        return;
    };
    let filter = filter.to_string_lossy();
    match tracing_subscriber::EnvFilter::try_new(filter.as_ref()) {
        Ok(f) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(f)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(true)
                .try_init();
        }
        Err(e) => eprintln!(
            "{prog}: warning: AAP_LOG={filter:?} is not a valid filter ({e}); logging stays off\n{prog}: hint: AAP_LOG=debug"
        ),
    }
}
