//! The `riskserve` binary: everything lives in the library; see `riskserve::cli`.

fn main() -> std::process::ExitCode {
    riskserve::cli::main()
}
