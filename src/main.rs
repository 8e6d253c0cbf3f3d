//! The `ehc-agent` binary: parse the command line, set up logging, run the
//! command, turn its result into an exit status (0 ok, 1 runtime failure,
//! 2 bad usage or invalid configuration).

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = ehc_agent::cli::Cli::parse();
    ehc_agent::commands::init_tracing(cli.verbose, &cli.command);
    match ehc_agent::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ehc-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}
