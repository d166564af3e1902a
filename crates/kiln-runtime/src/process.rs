//! The `process` driver: the fallback where namespaces are unavailable.
//!
//! It runs the program found *inside* the verified image root (the path is
//! resolved as if the root were `/`, symlinks included, and executed by its
//! host path) with exactly the declared env, in `<root>/<workdir>` when that
//! exists (else the root), in its own session and process group, under the
//! same supervisor as the sandbox (logs with rotation, exit status, adoption
//! after a restart: see `launch.rs`).
//!
//! **No isolation**: the program sees the host's filesystem, processes and
//! network, and no resource limit is applied. `InstanceInfo::isolation`
//! says so, for `kiln status`; the engine must also warn when it falls back
//! to this driver. Volumes and files are not mounted (there is no mount
//! namespace to mount them in): they are checked and otherwise ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::driver::Driver;
use crate::error::RuntimeError;
use crate::launch::Plan;
use crate::local::{Local, Mode, cstrings};
use crate::types::{Drift, InstanceConfig, InstanceInfo};

pub const ISOLATION: &str =
    "process: NO isolation (host filesystem, processes and network; no resource limits)";

#[derive(Debug)]
pub struct ProcessMode;

impl Mode for ProcessMode {
    fn name(&self) -> &'static str {
        "process"
    }
    fn isolation(&self) -> String {
        ISOLATION.to_string()
    }
    fn cgroups(&self) -> Option<crate::cgroup::Version> {
        None
    }
    /// The program resolved inside the image root as `start` does, with
    /// exactly the instance's env, in `<root>/<workdir>`, as its `user`.
    fn exec_command(
        &self,
        c: &InstanceConfig,
        _pid: u32,
        argv: &[String],
    ) -> Result<std::process::Command, RuntimeError> {
        use std::os::unix::process::CommandExt as _;
        let root = &c.image.rootfs;
        let workdir = c.workdir.as_deref().unwrap_or("/");
        let (_, host) = crate::root::resolve_program(&c.id, root, argv, &c.env, workdir)?;
        let cwd = crate::root::resolve_in_root(root, workdir)
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| root.clone());
        let mut cmd = std::process::Command::new(host);
        cmd.arg0(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(&c.env)
            .current_dir(cwd);
        if let Some((uid, gid)) = c.user {
            cmd.uid(uid).gid(gid);
        }
        Ok(cmd)
    }

    fn plan(&self, dir: &Path, c: &InstanceConfig) -> Result<Plan, RuntimeError> {
        let root = &c.image.rootfs;
        let workdir = c.workdir.as_deref().unwrap_or("/");
        let (_, host) = crate::root::resolve_program(&c.id, root, &c.argv, &c.env, workdir)?;
        let mounts: Vec<_> = c.files.iter().chain(&c.volumes).collect();
        crate::root::check_mounts(&c.id, &mounts)?;
        let cwd = crate::root::resolve_in_root(root, workdir)
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| root.clone());
        Ok(Plan {
            exec: cstrings(&c.id, [host.to_string_lossy().into_owned()])?.remove(0),
            argv: cstrings(&c.id, c.argv.iter().cloned())?,
            envp: cstrings(&c.id, c.env.iter().map(|(k, v)| format!("{k}={v}")))?,
            workdir: cwd,
            user: c.user,
            sandbox: None,
            cgroup_procs: vec![],
            stdout: c.log_dir.join("stdout.log"),
            stderr: c.log_dir.join("stderr.log"),
            log_max_bytes: c.log_max_bytes,
            exit_file: dir.join("exit"),
        })
    }
}

/// Runs instances as plain processes: see the module docs.
#[derive(Debug)]
pub struct Process {
    inner: Local<ProcessMode>,
}

impl Process {
    /// Keeps its per-instance state under `state_dir` (created if missing).
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Process, RuntimeError> {
        let state_dir = state_dir.into();
        std::fs::create_dir_all(&state_dir).map_err(|e| RuntimeError::Unavailable {
            driver: "process",
            why: format!("cannot create {}: {e}", state_dir.display()),
            hint: "check the state directory's permissions".into(),
        })?;
        Ok(Process {
            inner: Local {
                state_dir,
                root_cache: Default::default(),
                mode: ProcessMode,
            },
        })
    }
}

impl Driver for Process {
    fn name(&self) -> &'static str {
        "process"
    }
    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        self.inner.create(config)
    }
    crate::local::delegate_to_local!();
}
