//! The JSON Schema of `kiln.toml` (`kiln schema`), for editors and linters.
//!
//! These types describe what users write; they are never deserialised
//! (validation walks the document itself, see [`crate::read`]). A test checks
//! that every table here has exactly the keys the validator accepts, and that
//! every example spec in the repository satisfies the schema.

use std::collections::BTreeMap;

use schemars::JsonSchema;

/// A kiln.toml file.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct KilnToml {
    pub project: Project,
    /// How to bake each immutable image, by name.
    #[serde(default)]
    pub image: BTreeMap<String, Image>,
    /// The services to run, by name.
    #[serde(default)]
    pub service: BTreeMap<String, Service>,
    /// Named volumes: the only place data lives across replacements.
    #[serde(default)]
    pub volume: BTreeMap<String, Volume>,
    /// Listeners of kiln's proxy in front of service ports.
    #[serde(default)]
    pub route: BTreeMap<String, Route>,
    pub runtime: Option<Runtime>,
    pub policy: Option<Policy>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Project {
    /// Lowercase letters, digits and `-`.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$"))]
    pub name: String,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Image {
    /// "scratch" (default), another image of this file, "sha256:…",
    /// "oci-layout:DIR" or "registry/repo@sha256:…".
    pub from: Option<String>,
    pub copy: Option<Vec<Copy>>,
    /// Add the shared-library closure of copied ELF binaries.
    pub closure: Option<bool>,
    /// Debian packages unpacked into the image.
    pub debian: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub expose: Option<Vec<u16>>,
    /// Users written to /etc/passwd and /etc/group (root is always there).
    pub users: Option<Vec<User>>,
    /// Directories created in the image with an owner and a mode.
    pub dirs: Option<Vec<ImageDir>>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct User {
    pub name: String,
    /// 1-65534.
    pub uid: u32,
    /// Default: the uid.
    pub gid: Option<u32>,
    /// Default "/nonexistent".
    pub home: Option<String>,
    /// Default "/usr/sbin/nologin".
    pub shell: Option<String>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ImageDir {
    /// Absolute path in the image.
    pub path: String,
    /// Default 0o755.
    pub mode: Option<u32>,
    /// "uid[:gid]" or a name of `users` (default "0:0").
    pub owner: Option<String>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Copy {
    /// Relative to kiln.toml.
    pub src: String,
    /// Absolute path in the image.
    pub dst: String,
    /// File mode, e.g. 0o755.
    pub mode: Option<u32>,
}

/// A duration such as "500ms", "10s", "1m30s".
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct Duration(
    #[schemars(regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$"))] pub String,
);

/// A size such as "256MiB", "1GiB", "500MB".
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct Size(
    #[schemars(regex(pattern = r"^[0-9]+(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"))] pub String,
);

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Service {
    /// An image of this file by name, or "sha256:…", "oci-layout:DIR", "REF@sha256:…".
    pub image: String,
    /// Default 1.
    pub replicas: Option<u32>,
    /// May use ${PORT}, ${PORT_<NAME>}, ${KILN_SERVICE}, ${KILN_INSTANCE}, ${KILN_GENERATION},
    /// env and secret names (docs/spec.md).
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    /// Instance path → file relative to kiln.toml (read-only, part of the identity).
    pub files: Option<BTreeMap<String, String>>,
    /// Variable → where its value is read at apply time.
    pub secrets: Option<BTreeMap<String, Secret>>,
    /// Mount point → volume name, or { volume, read_only }.
    pub volumes: Option<BTreeMap<String, Mount>>,
    pub ports: Option<BTreeMap<String, Port>>,
    pub health: Option<Health>,
    pub deploy: Option<Deploy>,
    pub resources: Option<Resources>,
    pub drift: Option<DriftPolicy>,
    pub stop_grace: Option<Duration>,
    /// Run in a fresh instance against the volumes before a replacement.
    pub backup: Option<Backup>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Backup {
    /// The program and its arguments; its standard output is the backup.
    pub command: Vec<String>,
    /// Default "10m".
    pub timeout: Option<Duration>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Secret {
    pub file: Option<String>,
    pub env: Option<String>,
}

#[derive(Debug, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Mount {
    Volume(String),
    Detailed(MountTable),
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MountTable {
    pub volume: String,
    pub read_only: Option<bool>,
}

#[derive(Debug, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Port {
    /// "http" (default) or "tcp".
    pub protocol: Option<Protocol>,
    /// Fixed port inside the instance's own network namespace.
    pub container: Option<u16>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Health {
    /// HTTP path; 2xx and 3xx are healthy.
    pub http: Option<String>,
    pub tcp: Option<bool>,
    pub exec: Option<Vec<String>>,
    pub port: Option<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub healthy: Option<u32>,
    pub unhealthy: Option<u32>,
    pub start_period: Option<Duration>,
}

#[derive(Debug, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
pub enum StrategyName {
    Rolling,
    BlueGreen,
    Canary,
    Recreate,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Deploy {
    pub strategy: Option<StrategyName>,
    pub max_surge: Option<u32>,
    pub max_unavailable: Option<u32>,
    /// Canary traffic percentages, increasing, each 1-99.
    pub steps: Option<Vec<u8>>,
    pub hold: Option<Duration>,
    pub deadline: Option<Duration>,
    pub drain_timeout: Option<Duration>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Resources {
    pub memory: Option<Size>,
    pub cpus: Option<f64>,
    pub pids: Option<u32>,
}

#[derive(Debug, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum DriftPolicy {
    Replace,
    Report,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Volume {
    pub shared: Option<bool>,
    pub exclusive: Option<bool>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Route {
    /// IP:PORT.
    pub listen: String,
    pub service: String,
    pub port: Option<String>,
    pub protocol: Option<Protocol>,
    /// Answer 503 with Retry-After (HTTP) or close connections (TCP), instances untouched.
    pub maintenance: Option<bool>,
    /// How long the proxy waits for an instance's answer (default "60s").
    pub timeout: Option<String>,
    /// Concurrent client connections, 1-1000000 (default 10000).
    pub max_connections: Option<u32>,
    /// "round-robin" (default) or "least-requests".
    pub balance: Option<String>,
    /// "502" | "503" | "504" → HTML file relative to kiln.toml.
    pub error_pages: Option<BTreeMap<String, String>>,
    /// Host names ("shop.example.com", "*.example.com") matched against the
    /// Host header; http routes on one address must name different hosts.
    pub hosts: Option<Vec<String>>,
}

#[derive(Debug, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum DriverName {
    Sandbox,
    Docker,
    Oci,
    Process,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Runtime {
    pub driver: Option<DriverName>,
}

#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Policy {
    pub require_signed: Option<bool>,
    pub trusted_keys: Option<Vec<String>>,
    pub keep_generations: Option<u32>,
}

/// The JSON Schema of kiln.toml, pretty-printed.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(KilnToml);
    serde_json::to_string_pretty(&schema).expect("a schema serialises")
}

/// The keys the validator accepts, per table, for the consistency test.
#[doc(hidden)]
pub fn validator_keys() -> Vec<(&'static str, &'static [&'static str])> {
    use crate::service as s;
    use crate::validate as v;
    vec![
        ("KilnToml", v::TOP_KEYS),
        ("Project", v::PROJECT_KEYS),
        ("Image", v::IMAGE_KEYS),
        ("Copy", v::COPY_KEYS),
        ("User", v::USER_KEYS),
        ("ImageDir", v::DIR_KEYS),
        ("Volume", v::VOLUME_KEYS),
        ("Route", v::ROUTE_KEYS),
        ("Runtime", v::RUNTIME_KEYS),
        ("Policy", v::POLICY_KEYS),
        ("Service", s::SERVICE_KEYS),
        ("Port", s::PORT_KEYS),
        ("MountTable", s::MOUNT_KEYS),
        ("Secret", s::SECRET_KEYS),
        ("Health", s::HEALTH_KEYS),
        ("Deploy", s::DEPLOY_KEYS),
        ("Resources", s::RESOURCE_KEYS),
        ("Backup", s::BACKUP_KEYS),
    ]
}
