#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    aap::cli::main_aap()
}
