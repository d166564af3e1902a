//! A project on disk: its spec, its directory and its state store.

use std::path::{Path, PathBuf};

use kiln_plan::{Generation, InstanceSpec, InstanceStatus, Observed, ObservedInstance};
use kiln_spec::Spec;
use kiln_state::{GenerationRecord, InstanceRecord, Store};

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

    /// Resolves the spec into a generation, reading files and secrets.
    pub fn generation(&self) -> Result<Generation, EngineError> {
        let env = |name: &str| std::env::var(name).ok();
        resolve(self.spec.clone(), &self.dir, &env).map_err(|errors| EngineError::Resolve {
            spec: self.spec_path.clone(),
            errors,
        })
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
