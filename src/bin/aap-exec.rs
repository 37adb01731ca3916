#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    aap::exec_cli::main()
}
