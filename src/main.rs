//! The `cachepush` command line. The engine lives in the library; this is only the edge:
//! argument parsing, user-facing output, and mapping every error to an exit status.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
