//! The `sandbox` driver, the built-in default: Linux namespaces, a
//! read-only root and cgroup limits, with no external binary.
//!
//! ## What an instance gets
//! * New mount, PID, UTS and IPC namespaces (network only with
//!   [`SandboxOptions::private_network`]: ports are host ports by default).
//!   PID 1 of the namespace is kiln's own init (`kiln-init`, like Docker's
//!   `--init`; see `launch`): it forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
//!   SIGUSR1, SIGUSR2 and SIGWINCH to the program and reaps orphaned
//!   zombies. The program is PID 2, so `stop`'s SIGTERM ends even a program
//!   without a handler (reported as signal 15). The reported pid
//!   (`Running { pid }`) is the program's host pid: its env is the
//!   instance's, killing it is the instance's exit (with that signal), and
//!   `exec` enters its namespaces.
//! * A root assembled in its private mount namespace (`launch::setup_root`):
//!   a tmpfs with one read-only bind mount per top-level entry of the shared
//!   image root, fresh `/proc`, a minimal `/dev` (null, zero, full, random,
//!   urandom, tty bind-mounted; fd/stdin/stdout/stderr links; tmpfs shm),
//!   tmpfs `/tmp` and `/run`, volumes bind-mounted read-write (or read-only)
//!   and `files` read-only; then the tmpfs turns read-only and pivot_root
//!   makes it `/`. The image root is never written. No mount shows on the
//!   host, and all vanish with the instance.
//! * Hostname = instance id; env, argv, workdir and `uid:gid` from the config.
//! * `no_new_privs`; capabilities (bounding, effective, permitted; ambient and
//!   inheritable cleared) reduced to [`KEPT_CAPABILITIES`]: chown,
//!   dac_override, fowner, fsetid, kill, setgid, setuid, net_bind_service
//!   — Docker's default set minus mknod, net_raw, setpcap, setfcap,
//!   sys_chroot and audit_write.
//! * A cgroup (v1 or v2) with memory (swap included), CPU (CFS quota from
//!   millicpus) and pids limits; OOM kills are reported as `oom: true`.
//!
//! ## Limits
//! * Rootless mode: for a non-root caller, when the kernel allows
//!   unprivileged user namespaces (see [`crate::host`]), the supervisor
//!   first enters a new user namespace in which the caller's uid and gid
//!   (only those: single-id maps, `setgroups` denied) are 0:0, then
//!   everything above follows unchanged, except cgroups: they are not
//!   delegated, so an instance that declares a memory, cpu or pids limit is
//!   **refused** at create (a clear error; limits are never silently
//!   dropped), and `user` may only be 0:0. `isolation` says
//!   `sandbox (rootless): …; no cgroup limits: not delegated`. Without user
//!   namespaces [`Sandbox::new`] answers `Unavailable` and
//!   [`crate::select_local_driver`] falls back to `process` with a warning.
//! * A mount target whose parent directory is missing from the image is
//!   refused unless it is top-level or under /tmp or /run (the image root
//!   cannot be written to create it).
//! * `exec` enters the instance with `nsenter` (util-linux, on the host),
//!   after joining its cgroup: its root, namespaces, env, working directory
//!   and user, but as uid 0 with root's full capability set and without
//!   `no_new_privs` (nsenter needs them, and nothing of the host can run
//!   once it is inside the root to drop them).
//! * No seccomp filter yet, /proc is not masked (`/proc/kcore`,
//!   `/proc/sys` stay as the kernel shows them to a PID namespace).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::thread::CapabilitySet;

use crate::cgroup::{self, MIN_MEMORY};
use crate::driver::Driver;
use crate::error::RuntimeError;
use crate::launch::{Entry, MountOp, Plan, SandboxPlan};
use crate::local::{Local, Mode, cstrings, setup};
use crate::types::{Drift, InstanceConfig, InstanceInfo};

pub const KEPT_CAPABILITIES: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::NET_BIND_SERVICE);

/// The shared mount point of instance roots in the state directory (not a
/// valid instance id: ids never start with a dot).
const ROOT_MOUNT_POINT: &str = ".root";

/// Top-level names the sandbox provides itself.
const OWN: &[&str] = &["proc", "dev", "tmp", "run"];

#[derive(Debug, Clone, Copy, Default)]
pub struct SandboxOptions {
    /// A new, empty network namespace (loopback down): for instances that
    /// need no network. Off by default: ports are host ports.
    pub private_network: bool,
}

#[derive(Debug)]
pub struct SandboxMode {
    options: SandboxOptions,
    /// `None` in rootless mode (cgroups are not delegated to the user).
    cgroups: Option<cgroup::Version>,
    /// Rootless mode: the caller's host `(uid, gid)`, mapped to 0:0 in the
    /// instance's own user namespace.
    rootless: Option<(u32, u32)>,
}

impl SandboxMode {
    /// Where the init (I) mounts the instance's tmpfs root: one empty directory shared
    /// by all the driver's instances (`<state_dir>/.root`, never an instance
    /// id), since each mounts over it only in its own private mount
    /// namespace; nothing is ever mounted on it on the host.
    fn root_mount_point(&self, instance_dir: &Path) -> PathBuf {
        instance_dir
            .parent()
            .unwrap_or(instance_dir)
            .join(ROOT_MOUNT_POINT)
    }
}

impl Mode for SandboxMode {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn isolation(&self) -> String {
        let net = if self.options.private_network {
            ",net"
        } else {
            ""
        };
        let v = match self.cgroups {
            Some(cgroup::Version::V1) => "cgroup v1 (memory,cpu,pids)",
            Some(cgroup::Version::V2) => "cgroup v2 (memory,cpu,pids)",
            None => "no cgroup limits: not delegated",
        };
        match self.rootless {
            None => format!(
                "sandbox: mount,pid,uts,ipc{net} namespaces; read-only root; {v}; no_new_privs; reduced capabilities"
            ),
            Some((uid, _)) => format!(
                "sandbox (rootless): user,mount,pid,uts,ipc{net} namespaces (host uid {uid} is root inside); read-only root; {v}; no_new_privs; reduced capabilities"
            ),
        }
    }

    fn cgroups(&self) -> Option<cgroup::Version> {
        self.cgroups
    }

    /// `nsenter` into the instance process's namespaces (user in rootless
    /// mode, mount, UTS, IPC, PID, and network when private) and its root,
    /// in its working directory, as its `user`, with exactly its env. The
    /// caller joins the instance's cgroup before `nsenter` runs.
    fn exec_command(
        &self,
        c: &InstanceConfig,
        pid: u32,
        argv: &[String],
    ) -> Result<std::process::Command, RuntimeError> {
        let nsenter = crate::exec::host_program("nsenter").ok_or_else(|| {
            setup(
                &c.id,
                "exec needs `nsenter` (util-linux) on the host, and it is not on PATH",
                "install util-linux (Debian: `apt-get install util-linux`)",
            )
        })?;
        let mut cmd = std::process::Command::new(nsenter);
        cmd.arg(format!("--target={pid}"));
        if self.rootless.is_some() {
            // Keep the caller's ids, which the namespace maps to 0:0:
            // nsenter would otherwise call setgroups, denied in it.
            cmd.args(["--user", "--preserve-credentials"]);
        }
        cmd.args(["--mount", "--uts", "--ipc", "--pid"]);
        if self.options.private_network {
            cmd.arg("--net");
        }
        // nsenter opens `--wd=DIR` before it enters the root, so DIR is
        // named through the instance's root (the working directory
        // resolved in the image beforehand: no symlink in it can then lead
        // out through the host's `/`).
        let workdir = c.workdir.as_deref().unwrap_or("/");
        let inside = crate::root::resolve_in_root(&c.image.rootfs, workdir)
            .and_then(|p| p.strip_prefix(&c.image.rootfs).ok().map(Path::to_path_buf))
            .ok_or_else(|| {
                setup(
                    &c.id,
                    format!("exec: the working directory {workdir} is not in the image"),
                    "create it in the image or change `workdir`",
                )
            })?;
        let mut wd = std::ffi::OsString::from(format!("--wd=/proc/{pid}/root/"));
        wd.push(inside.as_os_str());
        cmd.arg("--root").arg(wd);
        if let Some((uid, gid)) = c.user.filter(|_| self.rootless.is_none()) {
            cmd.arg(format!("--setuid={uid}"))
                .arg(format!("--setgid={gid}"));
        }
        cmd.arg("--").args(argv).env_clear().envs(&c.env);
        Ok(cmd)
    }

    fn plan(&self, dir: &Path, c: &InstanceConfig) -> Result<Plan, RuntimeError> {
        let id = &c.id;
        let image = &c.image.rootfs;
        if self.rootless.is_some() {
            let r = &c.resources;
            if r.memory_bytes.is_some() || r.millicpus.is_some() || r.pids.is_some() {
                return Err(setup(
                    id,
                    "it declares resource limits (memory, cpu or pids), which the rootless sandbox cannot enforce: cgroups are not delegated to this user",
                    "run kiln as root, or remove `resources` from the service",
                ));
            }
            if c.user.is_some_and(|u| u != (0, 0)) {
                return Err(setup(
                    id,
                    "it declares a `user` other than 0:0, but the rootless sandbox maps only the caller's own uid and gid (to 0:0)",
                    "run kiln as root, or remove `user` from the service",
                ));
            }
        }
        if let Some(m) = c.resources.memory_bytes.filter(|m| *m < MIN_MEMORY) {
            return Err(setup(
                id,
                format!(
                    "the memory limit {m} bytes is below what a process needs to start ({MIN_MEMORY} bytes)"
                ),
                "raise `resources.memory`",
            ));
        }
        let workdir = c.workdir.clone().unwrap_or_else(|| "/".into());
        if !workdir.starts_with('/')
            || crate::root::resolve_in_root(image, &workdir).is_none_or(|p| !p.is_dir())
        {
            return Err(setup(
                id,
                format!("the working directory {workdir} is not a directory of the image"),
                "create it in the image or change `workdir`",
            ));
        }
        let (inside, _) = crate::root::resolve_program(id, image, &c.argv, &c.env, &workdir)?;
        let mut entries = vec![];
        for e in std::fs::read_dir(image)
            .map_err(crate::local::io(id, "read its image root"))?
            .flatten()
        {
            let name = e.file_name();
            if OWN.iter().any(|o| name == *o) {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            let kind = if ft.is_symlink() {
                Entry::Symlink(
                    std::fs::read_link(e.path())
                        .map_err(crate::local::io(id, "read its image root"))?,
                )
            } else if ft.is_dir() {
                Entry::Dir
            } else if ft.is_file() {
                Entry::File
            } else {
                continue;
            };
            entries.push((name, kind));
        }
        let mounts: Vec<_> = c
            .files
            .iter()
            .map(|m| (m, true))
            .chain(c.volumes.iter().map(|m| (m, false)))
            .collect();
        let checked =
            crate::root::check_mounts(id, &mounts.iter().map(|(m, _)| *m).collect::<Vec<_>>())?;
        let mut ops: Vec<MountOp> = vec![];
        let mut created: Vec<PathBuf> = vec![];
        for (m, parts) in checked {
            let forced_ro = mounts.iter().any(|(x, file)| *file && x.target == m.target);
            let create = mount_points(id, image, &m, &parts, &ops, &mut created)?;
            ops.push(MountOp {
                source: m.source.clone(),
                target: parts.iter().collect(),
                read_only: m.read_only || forced_ro,
                create,
            });
        }
        Ok(Plan {
            exec: cstrings(id, [inside])?.remove(0),
            argv: cstrings(id, c.argv.iter().cloned())?,
            envp: cstrings(id, c.env.iter().map(|(k, v)| format!("{k}={v}")))?,
            workdir: PathBuf::from(workdir),
            user: c.user,
            sandbox: Some(SandboxPlan {
                root: self.root_mount_point(dir),
                image: image.clone(),
                entries,
                mounts: ops,
                hostname: id.clone(),
                private_network: self.options.private_network,
                keep_caps: KEPT_CAPABILITIES,
                userns: self.rootless,
            }),
            cgroup_procs: vec![],
            stdout: c.log_dir.join("stdout.log"),
            stderr: c.log_dir.join("stderr.log"),
            log_max_bytes: c.log_max_bytes,
            exit_file: dir.join("exit"),
        })
    }
}

/// The mount points to create for `m` in the instance's tmpfs root; never
/// in the image and never in another volume.
fn mount_points(
    id: &str,
    image: &Path,
    m: &crate::types::Mount,
    parts: &[String],
    earlier: &[MountOp],
    created: &mut Vec<PathBuf>,
) -> Result<Vec<(PathBuf, bool)>, RuntimeError> {
    let is_dir = m.source.is_dir();
    let bad = || RuntimeError::BadMount {
        id: id.to_string(),
        target: m.target.clone(),
    };
    if parts[0] == "proc" || parts[0] == "dev" {
        return Err(bad());
    }
    // Inside an earlier volume: it must exist there (a volume is not written).
    let target: PathBuf = parts.iter().collect();
    if let Some(base) = earlier
        .iter()
        .filter(|o| target.starts_with(&o.target))
        .max_by_key(|o| o.target.components().count())
    {
        let rest = target.strip_prefix(&base.target).unwrap_or(&target);
        let inside = base.source.join(rest);
        return if std::fs::symlink_metadata(&inside).is_ok_and(|md| !md.file_type().is_symlink()) {
            Ok(vec![])
        } else {
            Err(setup(
                id,
                format!(
                    "mount point {} does not exist in the volume mounted at /{}",
                    m.target,
                    base.target.display()
                ),
                "create it in the volume first",
            ))
        };
    }
    let mut create = vec![];
    let tmpfs = parts[0] == "tmp" || parts[0] == "run";
    for i in 0..parts.len() {
        let rel: PathBuf = parts[..=i].iter().collect();
        let last = i + 1 == parts.len();
        if created.contains(&rel) {
            continue;
        }
        if tmpfs && i == 0 {
            continue;
        }
        let host = image.join(&rel);
        let parent_created = i > 0
            && created
                .iter()
                .any(|c| c.as_path() == rel.parent().unwrap_or(Path::new("")));
        match std::fs::symlink_metadata(&host) {
            Ok(md) if md.file_type().is_symlink() => return Err(bad()),
            Ok(md) if !tmpfs && !parent_created => {
                if !last && !md.is_dir() {
                    return Err(bad());
                }
            }
            _ if tmpfs || i == 0 || parent_created => {
                created.push(rel.clone());
                create.push((rel, !last || is_dir));
            }
            _ => {
                return Err(setup(
                    id,
                    format!(
                        "mount point {} is missing from the image, whose root is read-only",
                        m.target
                    ),
                    "add the parent directory to the image, or mount at a top-level path",
                ));
            }
        }
    }
    Ok(create)
}

/// The built-in sandbox: see the module docs.
#[derive(Debug)]
pub struct Sandbox {
    inner: Local<SandboxMode>,
}

impl Sandbox {
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Sandbox, RuntimeError> {
        Sandbox::with_options(state_dir, SandboxOptions::default())
    }

    /// Refuses (`Unavailable`, saying why and what to do) when the host
    /// cannot isolate: root without cgroups, or a non-root user without
    /// user namespaces. Probes the host (see [`crate::host::HostFacts`]).
    pub fn with_options(
        state_dir: impl Into<PathBuf>,
        options: SandboxOptions,
    ) -> Result<Sandbox, RuntimeError> {
        Sandbox::with_facts(state_dir, options, &crate::host::HostFacts::probe())
    }

    /// As [`Sandbox::with_options`], with the host facts given.
    pub fn with_facts(
        state_dir: impl Into<PathBuf>,
        options: SandboxOptions,
        facts: &crate::host::HostFacts,
    ) -> Result<Sandbox, RuntimeError> {
        let unavailable = |why: String, hint: &str| RuntimeError::Unavailable {
            driver: "sandbox",
            why,
            hint: hint.into(),
        };
        let (cgroups, rootless) = match facts.decide() {
            crate::host::Isolation::Root(v) => (Some(v), None),
            crate::host::Isolation::Rootless => (None, Some((facts.uid, facts.gid))),
            crate::host::Isolation::Unavailable { why, hint } => {
                return Err(unavailable(why, &hint));
            }
        };
        let state_dir = state_dir.into();
        std::fs::create_dir_all(&state_dir).map_err(|e| {
            unavailable(
                format!("cannot create {}: {e}", state_dir.display()),
                "check the state directory's permissions",
            )
        })?;
        Ok(Sandbox {
            inner: Local {
                state_dir,
                root_cache: Default::default(),
                mode: SandboxMode {
                    options,
                    cgroups,
                    rootless,
                },
            },
        })
    }
}

impl Driver for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }
    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        let info = self.inner.create(config)?;
        let root = self.inner.state_dir.join(ROOT_MOUNT_POINT);
        if let Err(e) = std::fs::create_dir_all(root) {
            let _ = self.inner.remove(&config.id);
            return Err(crate::local::io(&config.id, "create its root mount point")(
                e,
            ));
        }
        Ok(info)
    }
    crate::local::delegate_to_local!();
}
