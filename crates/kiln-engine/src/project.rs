//! A project on disk: its spec, its directory and its state store.

use std::path::{Path, PathBuf};

use kiln_plan::{Generation, InstanceSpec, InstanceStatus, Observed, ObservedInstance};
use kiln_spec::Spec;
use kiln_state::{GenerationRecord, InstanceRecord, Store};

use crate::images::{StoreImages, source_date_epoch};
use crate::resolve::{ResolveErrors, resolve};

/// Everything that can stop the engine, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] kiln_spec::LoadError),
    #[error("cannot resolve {spec}:\n{errors}")]
    Resolve {
        spec: PathBuf,
        errors: ResolveErrors,
    },
    #[error(transparent)]
    State(#[from] kiln_state::StateError),
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    #[error(
        "generation {number} in {store} is unreadable: {reason}\n  hint: the state was written by an incompatible kiln"
    )]
    CorruptGeneration {
        number: u64,
        store: PathBuf,
        reason: String,
    },
    #[error("instance {id} in {store} is unreadable: {reason}")]
    CorruptInstance {
        id: String,
        store: PathBuf,
        reason: String,
    },
    #[error(
        "generation {number} does not exist in {store}\n  hint: `kiln history` lists the generations"
    )]
    NoSuchGeneration { number: u64, store: PathBuf },
    /// Another daemon or rollout holds what this one needs.
    #[error("{0}")]
    Busy(String),
    #[error("the runtime is unavailable: {0}")]
    Runtime(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A loaded, validated project.
#[derive(Debug)]
pub struct Project {
    /// The `kiln.toml` file.
    pub spec_path: PathBuf,
    /// Its directory: every relative path of the spec is relative to it.
    pub dir: PathBuf,
    pub spec: Spec,
}

impl Project {
    /// Loads the spec at `path` (a file, or a directory holding `kiln.toml`).
    pub fn load(path: &Path) -> Result<Project, EngineError> {
        let (spec_path, spec) = kiln_spec::load(path)?;
        let dir = spec_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Ok(Project {
            spec_path,
            dir,
            spec,
        })
    }

    /// The state directory: `KILN_STATE_DIR` if set, else `.kiln/` next to
    /// the spec.
    pub fn state_dir(&self) -> PathBuf {
        state_dir_for(&self.dir)
    }

    /// The image store: `$KILN_HOME/images` if `KILN_HOME` is set (one
    /// store shared by every project of a host), else `images/` in the
    /// state directory.
    pub fn image_store_dir(&self) -> PathBuf {
        image_store_dir_for(&self.dir)
    }

    /// Opens (creating if needed) the image store.
    pub fn image_store(&self) -> Result<kiln_image::Store, EngineError> {
        Ok(kiln_image::Store::open(&self.image_store_dir())?)
    }

    /// Resolves the spec into a generation: builds the file's images
    /// (cached), reads files and secrets, checks the signature policy.
    pub fn generation(&self) -> Result<Generation, EngineError> {
        let store = self.image_store()?;
        let mut quiet = kiln_image::progress::Quiet;
        self.generation_with(&store, &mut quiet)
    }

    /// [`Project::generation`] with a given store and build progress.
    pub fn generation_with(
        &self,
        store: &kiln_image::Store,
        progress: &mut dyn kiln_image::progress::Progress,
    ) -> Result<Generation, EngineError> {
        let resolve_err = |errors| EngineError::Resolve {
            spec: self.spec_path.clone(),
            errors,
        };
        let epoch = source_date_epoch().map_err(|why| {
            resolve_err(ResolveErrors(vec![crate::resolve::ResolveProblem {
                what: "SOURCE_DATE_EPOCH".into(),
                why,
                hint: "set it to whole seconds since 1970, or unset it".into(),
            }]))
        })?;
        let mut images = StoreImages {
            store,
            source_date_epoch: epoch,
            progress,
        };
        let env = |name: &str| std::env::var(name).ok();
        resolve(self.spec.clone(), &self.dir, &env, &mut images).map_err(resolve_err)
    }
}

/// `$KILN_HOME/images`, or `images/` in the project's state directory.
pub fn image_store_dir_for(project_dir: &Path) -> PathBuf {
    match std::env::var_os("KILN_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("images"),
        _ => state_dir_for(project_dir).join("images"),
    }
}

/// `KILN_STATE_DIR`, or `.kiln/` inside `project_dir`.
pub fn state_dir_for(project_dir: &Path) -> PathBuf {
    match std::env::var_os("KILN_STATE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => project_dir.join(".kiln"),
    }
}

/// Decodes a stored generation.
pub fn decode_generation(
    store: &Store,
    record: &GenerationRecord,
) -> Result<Generation, EngineError> {
    serde_json::from_str(&record.body).map_err(|e| EngineError::CorruptGeneration {
        number: record.number,
        store: store.path().to_path_buf(),
        reason: e.to_string(),
    })
}

/// Loads generation `number`.
pub fn load_generation(store: &Store, number: u64) -> Result<Generation, EngineError> {
    let record = store
        .get_generation(number)?
        .ok_or_else(|| EngineError::NoSuchGeneration {
            number,
            store: store.path().to_path_buf(),
        })?;
    decode_generation(store, &record)
}

/// What runs, as the store last recorded it: instances, and the routes of
/// the active generation (which is what the proxy serves).
pub fn observed(store: &Store) -> Result<Observed, EngineError> {
    let mut observed = Observed::default();
    for record in store.list_instances(None)? {
        observed.instances.push(decode_instance(store, &record)?);
    }
    if let Some(active) = store.active_generation()? {
        observed.routes = decode_generation(store, &active)?.spec.routes;
    }
    Ok(observed)
}

fn decode_instance(store: &Store, r: &InstanceRecord) -> Result<ObservedInstance, EngineError> {
    let corrupt = |reason: String| EngineError::CorruptInstance {
        id: r.id.clone(),
        store: store.path().to_path_buf(),
        reason,
    };
    let spec: InstanceSpec =
        serde_json::from_value(r.spec.clone()).map_err(|e| corrupt(e.to_string()))?;
    let status =
        parse_status(&r.status).ok_or_else(|| corrupt(format!("unknown status `{}`", r.status)))?;
    Ok(ObservedInstance {
        id: r.id.clone(),
        identity: spec.identity(),
        spec,
        status,
        in_rotation: r.in_rotation,
    })
}

/// Instance statuses as the store writes them: `starting`, `healthy`,
/// `unhealthy`, `exited` or `exited:CODE`.
pub fn parse_status(text: &str) -> Option<InstanceStatus> {
    Some(match text {
        "starting" => InstanceStatus::Starting,
        "healthy" => InstanceStatus::Healthy,
        "unhealthy" => InstanceStatus::Unhealthy,
        "exited" => InstanceStatus::Exited { code: None },
        other => InstanceStatus::Exited {
            code: Some(other.strip_prefix("exited:")?.parse().ok()?),
        },
    })
}

/// The inverse of [`parse_status`].
pub fn status_text(status: InstanceStatus) -> String {
    match status {
        InstanceStatus::Starting => "starting".into(),
        InstanceStatus::Healthy => "healthy".into(),
        InstanceStatus::Unhealthy => "unhealthy".into(),
        InstanceStatus::Exited { code: None } => "exited".into(),
        InstanceStatus::Exited { code: Some(c) } => format!("exited:{c}"),
    }
}
