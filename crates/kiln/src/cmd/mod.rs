//! One file per command.

mod build;
mod diff;
mod engine;
mod history;
mod image;
mod key;
mod lock;
mod plan;
mod transfer;
mod validate;

use clap::CommandFactory;

use crate::Outcome;
use crate::cli::{Cli, Command};
use crate::output::use_color;

pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let color = use_color(cli.color, false);
    let color_err = use_color(cli.color, true);
    match cli.command {
        Command::Validate { project, json } => validate::run(&project.path, json, color_err),
        Command::Plan {
            project,
            json,
            detailed_exitcode,
        } => plan::run(&project.path, json, detailed_exitcode, color),
        Command::Build { project, json } => build::run(&project.path, json),
        Command::Lock { project, update } => lock::run(&project.path, update),
        Command::Image(cmd) => image::run(cmd),
        Command::Key(cmd) => key::run(cmd),
        Command::History { project, json } => history::run(&project.path, json),
        Command::Diff {
            a,
            b,
            project,
            json,
        } => diff::run(&project.path, &a, &b, json, color),
        Command::Apply {
            project,
            yes,
            wait,
            message,
        } => engine::apply(&project.path, yes, wait, message, color),
        Command::Up { project } => engine::up(&project.path, color),
        Command::Daemon { project, takeover } => engine::daemon(&project.path, takeover),
        Command::Status { project, json } => engine::status(&project.path, json),
        Command::Rollback {
            generation,
            project,
            wait,
        } => engine::rollback(&project, generation, wait),
        Command::Logs {
            service,
            project,
            follow,
            tail,
        } => engine::logs(&project, &service, follow, tail),
        Command::Events {
            project,
            follow,
            json,
        } => engine::events(&project.path, follow, json),
        Command::Verify { project, json } => engine::verify(&project.path, json),
        Command::Down { project } => engine::down(&project.path),
        Command::Schema => {
            println!("{}", kiln_spec::schema::json_schema());
            Ok(Outcome::Success)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            Ok(Outcome::Success)
        }
    }
}

/// Prints an error on stderr: spec diagnostics rendered with their
/// snippets, everything else as `error: …` with its causes.
pub fn report(err: &anyhow::Error, color: bool) {
    if let Some(kiln_spec::LoadError::Invalid(diags)) = err.downcast_ref::<kiln_spec::LoadError>() {
        eprint!("{}", diags.render(color));
        return;
    }
    if let Some(kiln_engine::EngineError::Load(kiln_spec::LoadError::Invalid(diags))) =
        err.downcast_ref::<kiln_engine::EngineError>()
    {
        eprint!("{}", diags.render(color));
        return;
    }
    let (red, reset) = if color {
        ("\x1b[1;31m", "\x1b[0m")
    } else {
        ("", "")
    };
    eprintln!("{red}error{reset}: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
