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
    quiet_broken_pipe();
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

/// `kiln status | head` closes stdout early: exit quietly like other Unix
/// tools (status 141, as if killed by SIGPIPE) instead of printing a panic.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
