//! The validated model of a `kiln.toml`.
//!
//! Every value here has passed validation: names are well formed, every
//! cross-reference resolves, durations and sizes are parsed, defaults are
//! filled in. Maps are `BTreeMap`s so that the serialised form is canonical
//! (key order never depends on how the user ordered the file), which is what
//! the generation's content hash is computed over.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A whole, validated `kiln.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub project: Project,
    pub images: BTreeMap<String, Image>,
    pub services: BTreeMap<String, Service>,
    pub volumes: BTreeMap<String, Volume>,
    pub routes: BTreeMap<String, Route>,
    pub runtime: Runtime,
    pub policy: Policy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
}

/// How to bake one image (`[image.NAME]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub from: ImageSource,
    pub copy: Vec<Copy>,
    pub closure: bool,
    pub debian: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub expose: Vec<u16>,
    /// Accounts written to the image's `/etc/passwd` and `/etc/group`
    /// (what a Debian package's maintainer script would have created).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Directories created in the image with an owner and a mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<ImageDir>,
}

/// One `users` entry of an image: a user and its primary group (same name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One `dirs` entry of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDir {
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Where an image (or a service's image) comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "ref")]
pub enum ImageSource {
    /// An empty base.
    Scratch,
    /// Another `[image.NAME]` of the same file.
    Local(String),
    /// An image already in kiln's store, by manifest digest (`sha256:…`).
    Digest(String),
    /// An OCI image layout directory, relative to the spec's directory.
    OciLayout(String),
    /// A registry reference pinned by digest (`registry/repo@sha256:…`).
    Registry { name: String, digest: String },
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Scratch => f.write_str("scratch"),
            ImageSource::Local(name) => f.write_str(name),
            ImageSource::Digest(d) => f.write_str(d),
            ImageSource::OciLayout(dir) => write!(f, "oci-layout:{dir}"),
            ImageSource::Registry { name, digest } => write!(f, "{name}@{digest}"),
        }
    }
}

/// One `copy` entry: a host path (relative to the spec's directory) and its
/// absolute destination inside the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    pub src: String,
    pub dst: String,
    /// File mode override (octal in the spec); `None` keeps the source's.
    pub mode: Option<u32>,
}

/// One `[service.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub image: ImageSource,
    pub replicas: u32,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Container path → host path (relative to the spec's directory).
    pub files: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, SecretSource>,
    /// Container path → mount.
    pub volumes: BTreeMap<String, VolumeMount>,
    pub ports: BTreeMap<String, Port>,
    pub health: Option<Health>,
    pub deploy: Deploy,
    pub resources: Resources,
    pub drift: DriftPolicy,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Run before the service's instances are replaced, against its volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Backup>,
}

/// `[service.NAME.backup]`: a command run in a fresh instance of the
/// service (same image, env and volumes, nothing else running on them)
/// before its instances are replaced; its standard output is stored by
/// digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub command: Vec<String>,
    /// The command is killed (and the rollout refused) after this long.
    pub timeout: Duration,
}

/// Where a secret's value is read from, at apply time. Only a digest of the
/// value is ever stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretSource {
    /// A file, relative to the spec's directory.
    File(String),
    /// An environment variable of the process that runs `kiln apply`.
    Env(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeMount {
    pub volume: String,
    pub read_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Http,
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        })
    }
}

/// A named port of a service. kiln assigns the host port of every instance
/// and passes it as `PORT_<NAME>`, and as `PORT` too when it is the
/// service's only port or is named `http`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Port {
    pub protocol: Protocol,
    /// The port the process listens on inside its own network namespace,
    /// where the driver gives it one; `None` means "the assigned one".
    pub container: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before an instance counts as healthy.
    pub healthy: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    pub unhealthy: u32,
    /// Failures during this period after start do not count.
    pub start_period: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum HealthCheck {
    Http { path: String, port: String },
    Tcp { port: String },
    Exec { command: Vec<String> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub strategy: Strategy,
    /// New instances not healthy by then roll the generation back.
    pub deadline: Duration,
    /// How long a removed instance may finish in-flight requests.
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Strategy {
    Rolling {
        max_surge: u32,
        max_unavailable: u32,
    },
    BlueGreen,
    /// Traffic weights (percent, strictly increasing, each below 100) held
    /// for `hold` each before the next; then promotion to 100%.
    Canary {
        steps: Vec<u32>,
        hold: Duration,
    },
    Recreate,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Rolling { .. } => "rolling",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary { .. } => "canary",
            Strategy::Recreate => "recreate",
        }
    }
}

/// Resource limits; `None` means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Resources {
    pub memory: Option<ByteSize>,
    /// Thousandths of a CPU (`cpus = 0.5` is 500): an integer, so the
    /// canonical form never holds a float.
    pub millicpus: Option<u32>,
    pub pids: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftPolicy {
    Replace,
    Report,
}

/// One `[volume.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// May be mounted by more than one service.
    pub shared: bool,
    /// At most one instance may hold it at a time (forces `recreate`).
    pub exclusive: bool,
}

/// One `[route.NAME]`: a listener of kiln's proxy in front of a service port.
///
/// The settings after `protocol` are left out of the canonical form while
/// they have their default, so adding them changed no existing hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub listen: String,
    pub service: String,
    pub port: String,
    pub protocol: Protocol,
    /// Answer every request with 503 and `Retry-After` (HTTP), or close
    /// connections (TCP), without touching the instances.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// How long the proxy waits for an instance's answer (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Concurrent client connections (default 10,000); beyond, 503/close.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How requests are spread over the instances.
    #[serde(default, skip_serializing_if = "Balance::is_default")]
    pub balance: Balance,
    /// HTTP status → host path (relative to the spec) of the HTML page the
    /// proxy answers with instead of its own (502, 503, 504).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "status_keys"
    )]
    pub error_pages: BTreeMap<u16, String>,
    /// Host names (`shop.example.com`, `*.example.com`) this route answers
    /// on its address; empty: every host the address's other routes do not
    /// claim. Routes with hosts may share an address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// A route's load balancing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Smooth weighted round-robin (honours canary weights exactly).
    #[default]
    RoundRobin,
    /// The instance with the fewest requests in flight, among those with
    /// weight > 0.
    LeastRequests,
}

impl Balance {
    pub fn is_default(&self) -> bool {
        *self == Balance::RoundRobin
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub driver: Driver,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    Sandbox,
    Docker,
    Oci,
    Process,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub require_signed: bool,
    /// Public key files, relative to the spec's directory.
    pub trusted_keys: Vec<String>,
    /// Generations kept by garbage collection; `None` keeps all.
    pub keep_generations: Option<u32>,
}

/// A non-negative duration with millisecond precision, written like
/// `"500ms"`, `"1m30s"`, `"2h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration {
    pub millis: u64,
}

impl Duration {
    pub const fn from_millis(millis: u64) -> Self {
        Duration { millis }
    }
    pub const fn from_secs(secs: u64) -> Self {
        Duration {
            millis: secs * 1000,
        }
    }
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.millis;
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)] {
            if rest >= size {
                write!(f, "{}{unit}", rest / size)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

/// A size in bytes, written like `"256MiB"`, `"1GiB"`, `"500MB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize {
    pub bytes: u64,
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.bytes >= size && self.bytes.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.bytes / size);
            }
        }
        write!(f, "{}B", self.bytes)
    }
}

/// A map keyed by HTTP status, read from JSON's string keys even where serde
/// buffers the value first (inside a tagged enum, as the daemon's API
/// requests are), which cannot turn `"503"` into a `u16` by itself.
fn status_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, String>, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<u16>()
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom(format!("`{k}` is not an HTTP status")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's API wraps specs in internally tagged enums: error pages
    /// must survive the trip there (they once came back as "HTTP 400").
    #[test]
    fn error_pages_round_trip_through_a_tagged_enum() {
        #[derive(Deserialize)]
        #[serde(tag = "kind")]
        enum Wrapped {
            Route { route: Route },
        }
        let route = serde_json::json!({
            "listen": "127.0.0.1:80", "service": "web", "port": "http",
            "protocol": "http", "error_pages": { "503": "pages/503.html" },
        });
        let wrapped = serde_json::json!({ "kind": "Route", "route": route });
        let Wrapped::Route { route } = serde_json::from_value(wrapped).unwrap();
        assert_eq!(route.error_pages[&503], "pages/503.html");
        let back = serde_json::to_value(&route).unwrap();
        assert_eq!(back["error_pages"]["503"], "pages/503.html");
    }
}
