//! What a driver is given and what it reports: plain data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything needed to create one instance. Built by the engine from a
/// generation's `InstanceSpec`; all paths are absolute and already exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceConfig {
    /// kiln's instance id (`web-3f2a9c1e-0`): unique, a valid file and
    /// container name.
    pub id: String,
    pub service: String,
    pub image: ImageRef,
    /// The full argv: the service's command, or the image's entrypoint+cmd.
    pub argv: Vec<String>,
    /// The complete environment (image env, service env, secrets, PORT_*,
    /// KILN_*), already merged by the engine.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the instance (default `/`).
    pub workdir: Option<String>,
    /// `uid[:gid]` to run as inside the instance (default 0:0).
    pub user: Option<(u32, u32)>,
    /// Host file → path inside, mounted read-only.
    pub files: Vec<Mount>,
    /// Host directory → path inside, read-write unless `read_only`.
    pub volumes: Vec<Mount>,
    pub resources: Limits,
    /// Directory where the driver keeps this instance's logs
    /// (`stdout.log`, `stderr.log`, rotated at `log_max_bytes`).
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    /// Labels that mark kiln's ownership (project, service, generation).
    pub labels: BTreeMap<String, String>,
}

impl InstanceConfig {
    /// A minimal config for tests of code that only passes configs around
    /// (the fake driver, the engine's health checks): nothing in it exists.
    #[doc(hidden)]
    pub fn placeholder(id: &str) -> InstanceConfig {
        InstanceConfig {
            id: id.into(),
            service: "web".into(),
            image: ImageRef {
                digest: "sha256:00".into(),
                rootfs: "/nonexistent".into(),
                docker_archive: None,
            },
            argv: vec!["/app".into()],
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            files: vec![],
            volumes: vec![],
            resources: Limits::default(),
            log_dir: "/nonexistent".into(),
            log_max_bytes: 1024,
            labels: BTreeMap::new(),
        }
    }
}

/// The image an instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Manifest digest (`sha256:…`).
    pub digest: String,
    /// The unpacked, verified, read-only root shared by every instance of
    /// the image (sandbox, process and oci drivers run from it).
    pub rootfs: PathBuf,
    /// A `docker save`-format tarball of the image, for drivers that must
    /// load it into their engine (docker). Written by the engine on demand.
    pub docker_archive: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub source: PathBuf,
    /// Absolute path inside the instance.
    pub target: String,
    pub read_only: bool,
}

/// Resource limits; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// Thousandths of a CPU.
    pub millicpus: Option<u32>,
    pub pids: Option<u32>,
}

/// The lifecycle of an instance. Operations check the guards first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum InstanceState {
    /// Created, not started.
    Created,
    Running {
        pid: Option<u32>,
    },
    /// The process ended. `oom` when the kernel killed it for memory.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        oom: bool,
    },
}

impl InstanceState {
    pub fn can_start(self) -> bool {
        matches!(self, InstanceState::Created)
    }
    pub fn can_stop(self) -> bool {
        matches!(self, InstanceState::Running { .. })
    }
    pub fn can_remove(self) -> bool {
        !matches!(self, InstanceState::Running { .. })
    }

    /// [`InstanceState::can_start`] as an error naming the instance.
    pub fn ensure_can_start(self, id: &str) -> Result<(), crate::RuntimeError> {
        self.ensure(self.can_start(), id, "start")
    }

    /// [`InstanceState::can_stop`] as an error naming the instance.
    pub fn ensure_can_stop(self, id: &str) -> Result<(), crate::RuntimeError> {
        self.ensure(self.can_stop(), id, "stop")
    }

    /// `exec` needs a running process to join.
    pub fn can_exec(self) -> bool {
        matches!(self, InstanceState::Running { .. })
    }

    /// [`InstanceState::can_exec`] as an error naming the instance.
    pub fn ensure_can_exec(self, id: &str) -> Result<(), crate::RuntimeError> {
        self.ensure(self.can_exec(), id, "exec")
    }

    /// [`InstanceState::can_remove`] as an error naming the instance.
    pub fn ensure_can_remove(self, id: &str) -> Result<(), crate::RuntimeError> {
        self.ensure(self.can_remove(), id, "remove")
    }

    fn ensure(self, allowed: bool, id: &str, op: &'static str) -> Result<(), crate::RuntimeError> {
        if allowed {
            Ok(())
        } else {
            Err(crate::RuntimeError::invalid_state(id, op, self))
        }
    }
}

/// What a driver knows about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub image_digest: String,
    pub labels: BTreeMap<String, String>,
    /// How isolated the instance is, for `kiln status` (e.g. "sandbox:
    /// mount,pid,uts,ipc namespaces; cgroup v1", or "process: NO isolation").
    pub isolation: String,
}

/// One difference between what runs and what was declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Drift {
    /// A file in the image root differs from the image (added, changed, removed).
    RootChanged {
        path: String,
        change: String,
    },
    /// The process is not the one the driver started.
    ProcessReplaced {
        expected: Option<u32>,
        found: Option<u32>,
    },
    /// The instance is gone from the runtime.
    Missing,
    Other {
        what: String,
    },
}

/// What [`crate::Driver::exec`] returns: how the command ended and what it
/// wrote, each stream capped at [`EXEC_OUTPUT_CAP`] bytes (the first bytes
/// are kept; the rest is read and dropped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The most [`ExecOutput`] keeps of each stream.
pub const EXEC_OUTPUT_CAP: usize = 64 * 1024;

/// How long `stop` waits after SIGTERM before SIGKILL.
pub type Grace = Duration;
