//! A generation: a validated spec plus every digest it was resolved to.
//!
//! The canonical form of a generation is its compact JSON serialisation
//! (struct fields in declaration order, every map a `BTreeMap`, no floats);
//! its content hash is the SHA-256 of that form. The same `kiln.toml` and the
//! same inputs give the same hash on any machine, however the file's keys and
//! tables are ordered.
//!
//! Secrets never appear here in plaintext: a generation keeps each secret's
//! reference (`file:PATH` / `env:VAR`) and the digest of its value.

use std::collections::BTreeMap;
use std::fmt;

use kiln_spec::model::{ImageSource, Port, Resources, SecretSource, Service, Spec, VolumeMount};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A content digest, always written `sha256:<64 hex>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(pub String);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The hex part, without the algorithm.
    pub fn hex(&self) -> &str {
        self.0.strip_prefix("sha256:").unwrap_or(&self.0)
    }

    /// The first `n` hex characters, for display and instance names.
    pub fn short(&self, n: usize) -> &str {
        let hex = self.hex();
        &hex[..n.min(hex.len())]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the engine resolved the spec's references to. Built by the engine
/// (which does the I/O); consumed here as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// Image reference (as [`ImageSource`]'s `Display`) → manifest digest.
    pub images: BTreeMap<String, Digest>,
    /// Host file path (relative to the spec's directory) → content digest.
    pub files: BTreeMap<String, Digest>,
    /// Secret reference (`file:PATH` / `env:VAR`) → digest of the value.
    pub secrets: BTreeMap<String, Digest>,
}

/// A reference the generation needs but that `Resolved` lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    Image { service: String, image: String },
    File { service: String, path: String },
    Page { route: String, path: String },
    Secret { service: String, reference: String },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Image { service, image } => {
                write!(
                    f,
                    "service `{service}`: image `{image}` was not resolved to a digest"
                )
            }
            ResolveError::File { service, path } => {
                write!(
                    f,
                    "service `{service}`: file `{path}` was not resolved to a digest"
                )
            }
            ResolveError::Page { route, path } => {
                write!(
                    f,
                    "route `{route}`: error page `{path}` was not resolved to a digest"
                )
            }
            ResolveError::Secret { service, reference } => {
                write!(
                    f,
                    "service `{service}`: secret `{reference}` was not resolved to a digest"
                )
            }
        }
    }
}

impl std::error::Error for ResolveError {}

/// The canonical key of a secret reference.
pub fn secret_key(source: &SecretSource) -> String {
    match source {
        SecretSource::File(path) => format!("file:{path}"),
        SecretSource::Env(var) => format!("env:{var}"),
    }
}

/// An immutable, content-addressed desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub spec: Spec,
    pub resolved: Resolved,
}

impl Generation {
    /// The content digests of route `name`'s error pages, by status
    /// (recorded with the service files in `resolved.files`).
    pub fn route_pages(&self, name: &str) -> BTreeMap<u16, Digest> {
        self.spec
            .routes
            .get(name)
            .into_iter()
            .flat_map(|r| &r.error_pages)
            .filter_map(|(status, path)| Some((*status, self.resolved.files.get(path)?.clone())))
            .collect()
    }

    /// Every route's page digests, routes without pages left out (as
    /// [`Observed::route_pages`](crate::Observed) holds them).
    pub fn all_route_pages(&self) -> BTreeMap<String, BTreeMap<u16, Digest>> {
        self.spec
            .routes
            .keys()
            .map(|name| (name.clone(), self.route_pages(name)))
            .filter(|(_, pages)| !pages.is_empty())
            .collect()
    }

    /// Checks that every reference the spec makes was resolved, and keeps
    /// only the resolutions the spec uses (so the hash never depends on
    /// leftovers).
    pub fn new(spec: Spec, resolved: Resolved) -> Result<Generation, Vec<ResolveError>> {
        let mut used = Resolved::default();
        let mut errors = Vec::new();
        for (name, service) in &spec.services {
            let image = service.image.to_string();
            match resolved.images.get(&image) {
                Some(d) => {
                    used.images.insert(image, d.clone());
                }
                None => errors.push(ResolveError::Image {
                    service: name.clone(),
                    image,
                }),
            }
            for path in service.files.values() {
                match resolved.files.get(path) {
                    Some(d) => {
                        used.files.insert(path.clone(), d.clone());
                    }
                    None => errors.push(ResolveError::File {
                        service: name.clone(),
                        path: path.clone(),
                    }),
                }
            }
            for source in service.secrets.values() {
                let key = secret_key(source);
                match resolved.secrets.get(&key) {
                    Some(d) => {
                        used.secrets.insert(key, d.clone());
                    }
                    None => errors.push(ResolveError::Secret {
                        service: name.clone(),
                        reference: key,
                    }),
                }
            }
        }
        for (name, route) in &spec.routes {
            for path in route.error_pages.values() {
                match resolved.files.get(path) {
                    Some(d) => {
                        used.files.insert(path.clone(), d.clone());
                    }
                    None => errors.push(ResolveError::Page {
                        route: name.clone(),
                        path: path.clone(),
                    }),
                }
            }
        }
        if errors.is_empty() {
            Ok(Generation {
                spec,
                resolved: used,
            })
        } else {
            Err(errors)
        }
    }

    /// The canonical form: compact JSON of the whole generation.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a generation always serialises")
    }

    /// SHA-256 of the canonical form.
    pub fn content_hash(&self) -> Digest {
        Digest::of(self.canonical_json().as_bytes())
    }

    /// Everything that defines an instance of `service`.
    ///
    /// # Panics
    /// If `service` is not in the spec; callers iterate the spec's services.
    pub fn instance_spec(&self, service: &str) -> InstanceSpec {
        let svc = &self.spec.services[service];
        InstanceSpec::new(service, svc, &self.resolved)
    }

    /// The instance spec of every service, by name.
    pub fn instance_specs(&self) -> BTreeMap<String, InstanceSpec> {
        self.spec
            .services
            .keys()
            .map(|name| (name.clone(), self.instance_spec(name)))
            .collect()
    }
}

/// Everything that defines an instance: change any of it and the instance's
/// identity changes, and the only way to apply that is a new instance.
///
/// Deliberately absent: replica count, health policy, deploy strategy, drift
/// policy and stop grace. They govern how instances are managed, not what an
/// instance is, so changing them never replaces a running instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub service: String,
    /// Manifest digest of the image.
    pub image: Digest,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Container path → content digest of the file mounted there.
    pub files: BTreeMap<String, Digest>,
    /// Environment variable → digest of the secret value passed in it.
    pub secrets: BTreeMap<String, Digest>,
    pub volumes: BTreeMap<String, VolumeMount>,
    pub resources: Resources,
    pub ports: BTreeMap<String, Port>,
}

impl InstanceSpec {
    fn new(name: &str, svc: &Service, resolved: &Resolved) -> InstanceSpec {
        let missing = || Digest("sha256:unresolved".to_owned());
        let image = resolved
            .images
            .get(&svc.image.to_string())
            .cloned()
            .unwrap_or_else(missing);
        InstanceSpec {
            service: name.to_owned(),
            image,
            command: svc.command.clone(),
            env: svc.env.clone(),
            files: svc
                .files
                .iter()
                .map(|(dst, src)| {
                    (
                        dst.clone(),
                        resolved.files.get(src).cloned().unwrap_or_else(missing),
                    )
                })
                .collect(),
            secrets: svc
                .secrets
                .iter()
                .map(|(var, source)| {
                    let d = resolved
                        .secrets
                        .get(&secret_key(source))
                        .cloned()
                        .unwrap_or_else(missing);
                    (var.clone(), d)
                })
                .collect(),
            volumes: svc.volumes.clone(),
            resources: svc.resources.clone(),
            ports: svc.ports.clone(),
        }
    }

    /// The instance identity hash: SHA-256 of the canonical JSON.
    pub fn identity(&self) -> Digest {
        Digest::of(serde_json::to_string(self).expect("serialises").as_bytes())
    }
}

/// Whether `source` names an image of this file, for callers that resolve.
pub fn is_local(source: &ImageSource) -> bool {
    matches!(source, ImageSource::Local(_))
}
