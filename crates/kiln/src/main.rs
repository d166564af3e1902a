//! The `kiln` binary: parse flags, dispatch, map errors to exit codes. The
//! work happens in the library crates.

mod cli;
mod cmd;
mod output;

use std::process::ExitCode;

use clap::Parser;

/// How a command ended, beyond plain success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// `plan --detailed-exitcode` found changes.
    Changes,
    /// A command that ends with its own exit status (docs/cli.md).
    Code(u8),
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let color_err = output::use_color(cli.color, true);
    match cmd::run(cli) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Changes) => ExitCode::from(2),
        Ok(Outcome::Code(code)) => ExitCode::from(code),
        Err(err) => {
            cmd::report(&err, color_err);
            ExitCode::FAILURE
        }
    }
}
