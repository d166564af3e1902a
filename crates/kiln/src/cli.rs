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
    /// Build every [image.NAME] of the spec (reproducible, cached)
    #[command(
        after_help = "Examples:\n  kiln build\n  kiln build examples/hello --json\n  SOURCE_DATE_EPOCH=1700000000 kiln build   # the only time inside an image"
    )]
    Build {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        json: bool,
    },
    /// Pin each image's Debian packages (versions and digests) in kiln.lock
    #[command(
        after_help = "Without --update, only images missing from kiln.lock (or whose `debian` list changed) are resolved.\nThe change is printed as a diff on stdout.\n\nExamples:\n  kiln lock\n  kiln lock examples/shop --update   # refresh the package lists, move every version forward"
    )]
    Lock {
        #[command(flatten)]
        project: ProjectArg,
        /// Refresh the package lists and resolve every image again
        #[arg(long)]
        update: bool,
    },
    /// Manage the image store: list, inspect, import, export, push, pull, sign, verify, gc
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage signing keys
    #[command(subcommand)]
    Key(KeyCommand),
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
    /// Roll the spec out: show the plan, ask, replace instances health-gated
    #[command(
        after_help = "Starts a background daemon (log in .kiln/daemon.log) when none serves the project.\nA generation whose new instances are not healthy by deploy.deadline is rolled back.\n\nExamples:\n  kiln apply\n  kiln apply examples/hello -y\n\nExit status: 0 active, 1 failed (rolled back) or error, 3 another change in progress."
    )]
    Apply {
        #[command(flatten)]
        project: ProjectArg,
        /// Apply without asking
        #[arg(short = 'y', long = "yes", visible_alias = "auto-approve")]
        yes: bool,
        /// Wait for a change in progress instead of refusing
        #[arg(long)]
        wait: bool,
        /// A note recorded with the generation
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Run the engine in the foreground, apply the spec, follow events; Ctrl-C stops every instance
    #[command(after_help = "Examples:\n  kiln up\n  kiln up examples/hello")]
    Up {
        #[command(flatten)]
        project: ProjectArg,
    },
    /// Run the engine as a daemon (HTTP API on .kiln/kiln.sock); SIGTERM leaves instances running
    #[command(
        after_help = "See dist/kiln.service for a systemd unit.\n\nExamples:\n  kiln daemon\n  kiln daemon --takeover        # upgrade: the new binary takes the sockets over\n  KILN_DRIFT_INTERVAL=2 kiln daemon examples/hello"
    )]
    Daemon {
        #[command(flatten)]
        project: ProjectArg,
        /// Replace the running daemon (an upgrade): take over its listening sockets, adopt its instances; no connection is dropped
        #[arg(long)]
        takeover: bool,
    },
    /// Services, instances, health, traffic and the driver
    #[command(after_help = "Examples:\n  kiln status\n  kiln status --json")]
    Status {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        json: bool,
    },
    /// A new generation equal in content to GEN (default: the one active before), rolled out
    #[command(after_help = "Examples:\n  kiln rollback\n  kiln rollback 3")]
    Rollback {
        /// The generation to restore
        generation: Option<u64>,
        #[arg(
            short = 'C',
            long = "project",
            value_name = "PATH",
            default_value = "."
        )]
        project: PathBuf,
        /// Wait for a change in progress instead of refusing
        #[arg(long)]
        wait: bool,
    },
    /// The output of a service's instances
    #[command(after_help = "Examples:\n  kiln logs web\n  kiln logs web -f")]
    Logs {
        service: String,
        #[arg(
            short = 'C',
            long = "project",
            value_name = "PATH",
            default_value = "."
        )]
        project: PathBuf,
        /// Keep following new output (and new instances)
        #[arg(short, long)]
        follow: bool,
        /// Lines of history per instance and stream
        #[arg(long, value_name = "LINES", default_value_t = 100)]
        tail: u64,
    },
    /// Every generation, step, health change, drift, heal and rollback
    #[command(after_help = "Examples:\n  kiln events\n  kiln events -f")]
    Events {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check every instance for drift now
    #[command(after_help = "Exit status: 0 no drift, 4 drift found, 1 error.")]
    Verify {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        json: bool,
    },
    /// Stop every instance (volumes stay) and the daemon
    Down {
        #[command(flatten)]
        project: ProjectArg,
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

/// Where the image store is.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The project (a kiln.toml or its directory) whose store to use
    #[arg(
        short = 'C',
        long = "project",
        value_name = "PATH",
        default_value = ".",
        global = true
    )]
    pub project: PathBuf,
    /// The image store directory [default: $KILN_HOME/images, else .kiln/images next to kiln.toml]
    #[arg(long, env = "KILN_IMAGE_STORE", value_name = "DIR", global = true)]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// An OCI image layout directory (skopeo `oci:DIR`, umoci)
    Oci,
    /// A `docker save` tarball for `docker load`
    Docker,
}

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Allow plain HTTP to a registry that is not on this machine
    #[arg(long)]
    pub insecure: bool,
    /// Registry user name (the password is read from KILN_REGISTRY_PASSWORD)
    #[arg(long, requires = "password_env")]
    pub username: Option<String>,
    /// Environment variable holding the registry password
    #[arg(long, value_name = "VAR", default_value = "KILN_REGISTRY_PASSWORD")]
    pub password_env: String,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the images in the store
    Ls {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show an image's manifest digest, layers and config
    #[command(
        after_help = "REF is a name, a digest, or a digest prefix of at least 12 hex digits."
    )]
    Inspect {
        reference: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Print the manifest and config documents
        #[arg(long)]
        json: bool,
    },
    /// Import an OCI image layout directory or a `docker save` tarball
    #[command(
        after_help = "Examples:\n  kiln image import ./layout\n  docker save app:1 -o app.tar && kiln image import app.tar --name app"
    )]
    Import {
        path: PathBuf,
        /// Name the imported image (when the source holds one)
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Export an image as an OCI layout directory or a docker-archive tarball
    #[command(
        after_help = "Examples:\n  kiln image export web --output ./out            # OCI layout, skopeo inspect oci:out:web\n  kiln image export web --format docker --tag web:1 --output web.tar && docker load -i web.tar"
    )]
    Export {
        reference: String,
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportFormat::Oci)]
        format: ExportFormat,
        /// Name inside the export (default: the image's name, or `kiln:DIGEST12`)
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Push an image (and its signature) to an OCI registry, byte for byte
    #[command(after_help = "Example:\n  kiln image push web 127.0.0.1:5000/shop/web:1")]
    Push {
        reference: String,
        /// registry/repository[:tag]
        target: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Pull an image (and its signature, if any) from an OCI registry
    #[command(after_help = "Example:\n  kiln image pull 127.0.0.1:5000/shop/web@sha256:…")]
    Pull {
        /// registry/repository[:tag][@sha256:…]
        source: String,
        /// Local name (default: the repository's last path segment)
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove names from the store (blobs go at the next `gc`)
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete blobs that no name and no retained generation needs
    Gc {
        /// Only report what would be removed
        #[arg(long)]
        dry_run: bool,
        /// Keep unreachable blobs younger than this (an import or build may be using them)
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        grace: std::time::Duration,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Verify the whole store, or an image's signature with --key
    #[command(
        after_help = "Examples:\n  kiln image verify                         # hash every blob, check every image\n  kiln image verify web --key keys/release.pub\n\nExit status: 0 intact / signed by a trusted key, 1 otherwise."
    )]
    Verify {
        reference: Option<String>,
        /// Trusted public key(s); requires REF
        #[arg(long = "key", requires = "reference")]
        keys: Vec<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Sign an image's manifest with a minisign secret key
    #[command(
        after_help = "Example:\n  kiln key generate release && kiln image sign web --key keys/release.key"
    )]
    Sign {
        reference: String,
        #[arg(long)]
        key: PathBuf,
        /// Environment variable holding the key's password, if it has one
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print an image's SBOM (SPDX 2.3 JSON): every file and its digest
    Sbom {
        reference: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a minisign key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub
    #[command(
        after_help = "Example:\n  kiln key generate release      # keys/release.key, keys/release.pub"
    )]
    Generate {
        name: String,
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        /// Environment variable holding a password to encrypt the secret key
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    kiln_spec::units::parse_duration(text).map(|d| d.as_std())
}
