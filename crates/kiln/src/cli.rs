//! The command line, as clap sees it. Only commands that work are here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Immutable infrastructure in one binary: bake images, run instances, roll out by replacement",
    long_about = None,
    after_help = "Examples:\n  kiln validate                 check ./kiln.toml and print every problem\n  kiln plan examples/hello      show what applying would do\n  kiln history --json           list generations for scripts\n  kiln diff 3 4                 what changed between generations 3 and 4\n\nExit status: 0 success, 1 failure (invalid spec, unresolvable input, state error), 2 usage error.\nSee docs/cli.md."
)]
pub struct Cli {
    /// When to colour output: auto honours NO_COLOR and whether the stream is a terminal.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    pub color: Color,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// Where the project is: a kiln.toml file, or a directory that holds one.
#[derive(Debug, Clone, Args)]
pub struct ProjectArg {
    /// The kiln.toml, or its directory [default: ./kiln.toml]
    #[arg(value_name = "PATH", default_value = ".")]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a kiln.toml and report every problem with its location
    #[command(
        after_help = "Examples:\n  kiln validate\n  kiln validate examples/hello/kiln.toml\n\nExit status: 0 valid, 1 invalid."
    )]
    Validate {
        #[command(flatten)]
        project: ProjectArg,
        /// Print the validated model as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show what applying the spec would do, like `terraform plan`
    #[command(
        after_help = "Examples:\n  kiln plan\n  kiln plan examples/hello --json\n  kiln plan --detailed-exitcode   # 0 no changes, 2 changes, 1 error"
    )]
    Plan {
        #[command(flatten)]
        project: ProjectArg,
        /// Print the plan as JSON
        #[arg(long)]
        json: bool,
        /// Exit 2 when the plan has changes, 0 when it has none
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// List the generations, oldest first
    #[command(after_help = "Examples:\n  kiln history\n  kiln history examples/hello --json")]
    History {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        json: bool,
    },
    /// Field-level differences between two generations
    #[command(
        after_help = "A and B are generation numbers, `active`, `latest`, or `spec` (the kiln.toml on disk, resolved now).\n\nExamples:\n  kiln diff 3 4\n  kiln diff active spec\n  kiln diff 1 latest --json"
    )]
    Diff {
        /// The old side
        a: String,
        /// The new side
        b: String,
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of kiln.toml (for editors)
    Schema,
    /// Print a shell completion script
    #[command(
        after_help = "Examples:\n  kiln completions bash > /etc/bash_completion.d/kiln\n  kiln completions zsh > \"${fpath[1]}/_kiln\""
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}
