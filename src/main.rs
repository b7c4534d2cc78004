//! The `thaw` binary: parses the command line and hands over to [`thaw::cli::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    match thaw::cli::run(<thaw::cli::Cli as clap::Parser>::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without the
            // backtrace that anyhow's Debug would add: these errors are for users.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
