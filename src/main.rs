//! The `thaw` binary: parses the command line and hands over to [`thaw::cli::run`].

fn main() -> anyhow::Result<()> {
    thaw::cli::run(<thaw::cli::Cli as clap::Parser>::parse())
}
