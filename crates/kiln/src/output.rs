//! Terminal output decisions: colour (NO_COLOR, --color, is a terminal).

use std::io::IsTerminal;

use crate::cli::Color;

/// Whether to colour what goes to stdout (`stderr == false`) or stderr.
pub fn use_color(choice: Color, stderr: bool) -> bool {
    match choice {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
            let tty = if stderr {
                std::io::stderr().is_terminal()
            } else {
                std::io::stdout().is_terminal()
            };
            !no_color && !dumb && tty
        }
    }
}

/// Prints a JSON value on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialises")
    );
}
