//! The `oci` driver: one OCI runtime bundle per instance, run by `runc`
//! (or `crun`).
//!
//! Design:
//! - `create` checks the config ([`preflight`]), then writes
//!   `<state>/bundles/<id>/config.json` (built with `oci-spec`). Its root is
//!   a per-instance skeleton directory (`<bundle>/root`, read-only once
//!   mounted) holding the image's top-level symlinks, with every other
//!   top-level entry of the shared image rootfs bind-mounted read-only: the
//!   runtime may create mount points (`/proc`, `/tmp`, a volume's `/data`)
//!   in the skeleton, never in the shared root, and the image need not
//!   contain them. Then proc, a tmpfs `/dev` with the
//!   runtime's default devices, tmpfs `/tmp` and `/run`, volumes as rw binds,
//!   files as ro binds; pid, mount, ipc and uts namespaces (no network
//!   namespace: kiln's ports are host ports); no_new_privileges and the
//!   runtime spec's default capabilities (AUDIT_WRITE, KILL,
//!   NET_BIND_SERVICE); pids and cpu limits on the container's cgroup. It
//!   also records a metadata snapshot of the rootfs (mode, size, mtime,
//!   ctime, link target of every entry) for `verify`. The bundle is written
//!   under a temporary name and renamed, so a failed create leaves nothing.
//! - `start` runs `runc run` (not `create`+`start`) under a tiny detached
//!   `/bin/sh` shim: `runc run` waits for the container and exits with its
//!   status (128+N for a signal), which the shim writes to `<bundle>/exit`.
//!   With `runc create`, the container's parent would be whoever adopted the
//!   orphan, and its exit status would be lost. The shim is double-forked
//!   (kiln reaps the outer shell at once) and survives kiln's restart. The
//!   container's stdout/stderr are the instance's log files, passed to the
//!   runtime as its stdio (runc passes them through when there is no
//!   terminal) through the shim's size-rotating copier.
//! - Memory: the limit is set by kiln on a parent cgroup it owns
//!   (`kiln/<id>`), and the runtime creates the container's cgroup under it
//!   (`kiln/<id>/ctr`). The runtime removes its own cgroup when the
//!   container exits; the parent survives, so `inspect` can still tell an
//!   OOM kill: on v2 the parent's hierarchical `memory.events` `oom_kill`;
//!   on v1 the kill is counted in the victim's own (deleted) cgroup, so an
//!   exit by SIGKILL after the parent's peak usage reached its limit is
//!   reported as OOM. `remove` deletes the parent in
//!   every hierarchy.
//! - `stop`: `runc kill TERM`, wait for the exit file up to the grace
//!   period, then `runc kill KILL`.
//!
//! Limits: the log copier is a shell loop (a few MB/s, lines of text; a
//! line without a newline at exit gets one) and costs two `sh` processes
//! per instance; a mount point below a top-level directory
//! of the image (`/etc/app/config.toml`) must already exist in the image
//! (the runtime would otherwise create it in the shared rootfs, which is
//! never written): `create` refuses the config otherwise. `crun`
//! 1.8 refuses hybrid cgroup hosts (v1 + a v2 mount at
//! `/sys/fs/cgroup/unified`): for crun the shim runs it in a private mount
//! namespace with that mount removed (`unshare -m`).

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, Mount as OciMount, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder, get_default_mounts,
};
use serde::{Deserialize, Serialize};

use crate::driver::Driver;
use crate::error::RuntimeError;
use crate::types::{Drift, ExecOutput, InstanceConfig, InstanceInfo, InstanceState};

mod cgroup;
pub(crate) mod preflight;
mod snapshot;

const DRIVER: &str = "oci";
/// How long `start` and `stop` wait for the runtime to report.
const RUNTIME_DEADLINE: Duration = Duration::from_secs(60);

/// Which OCI runtime runs the bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciRuntime {
    Runc,
    Crun,
}

impl OciRuntime {
    pub fn program(self) -> &'static str {
        match self {
            OciRuntime::Runc => "runc",
            OciRuntime::Crun => "crun",
        }
    }
}

/// The detached shim (`sh -c SHIM kiln-shim RUNTIME ARGS…`, started as
/// `(…&)` so kiln reaps the outer shell at once and the shim lives on
/// without kiln): runs the runtime in the foreground with its stdout and
/// stderr piped through a size-rotating copier (`rot`: shell builtins only,
/// keeps `FILE` and `FILE.1`), then records the runtime's exit status, which
/// is the container's (128+N for a signal), in `<bundle>/exit` once every
/// log line is written.
const SHIM: &str = r#"rot() {
  exec 5>>"$1"; n=0
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line" >&5
    n=$((n + ${#line} + 1))
    if [ "$n" -ge "$KILN_LOG_MAX" ]; then mv -f "$1" "$1.1"; exec 5>>"$1"; n=0; fi
  done
}
{ { "$@" </dev/null 2>&3; echo $? >"$KILN_BUNDLE/exit.tmp"; } | rot "$KILN_LOGS/stdout.log"; } 3>&1 | rot "$KILN_LOGS/stderr.log"
mv "$KILN_BUNDLE/exit.tmp" "$KILN_BUNDLE/exit"
"#;

/// crun 1.8 refuses hybrid cgroup hosts: re-run the shim in a private mount
/// namespace without the v2 mount.
const CRUN_PREFIX: &str = r#"if [ -d /sys/fs/cgroup/unified ] && [ -z "$KILN_UNSHARED" ]; then
  KILN_UNSHARED=1 exec unshare -m --propagation private /bin/sh -c "$KILN_SHIM" "$0" "$@"
fi
umount /sys/fs/cgroup/unified 2>/dev/null
"#;

/// `crun exec` on a hybrid cgroup host, as [`CRUN_PREFIX`] does for `run`.
const CRUN_EXEC: &str = r#"if [ -d /sys/fs/cgroup/unified ]; then
  exec unshare -m --propagation private /bin/sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"' sh "$@"
fi
exec "$@"
"#;

/// A fresh file name in `dir`: `<prefix>-<pid>-<n>.<ext>` (concurrent
/// execs of one instance never share it).
fn tempfile_name(dir: &Path, prefix: &str, ext: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{prefix}-{}-{n}.{ext}", std::process::id()))
}

/// The `process` of the bundle's `config.json` running `argv`, as JSON for
/// `exec --process`.
fn exec_process(bundle: &Path, argv: &[String]) -> std::io::Result<Vec<u8>> {
    let config: serde_json::Value = serde_json::from_slice(&fs::read(bundle.join("config.json"))?)?;
    let mut process = config
        .get("process")
        .cloned()
        .ok_or_else(|| std::io::Error::other("config.json has no process"))?;
    process["args"] = serde_json::json!(argv);
    process["terminal"] = serde_json::json!(false);
    Ok(serde_json::to_vec(&process)?)
}

/// What the driver keeps beside each bundle.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    image_digest: String,
    rootfs: PathBuf,
    labels: BTreeMap<String, String>,
    log_dir: PathBuf,
    log_max_bytes: u64,
}

/// An OCI runtime driven through its command line.
#[derive(Debug)]
pub struct OciDriver {
    runtime: OciRuntime,
    /// `bundles/<id>/` and the runtime's own state (`runtime/`).
    state_dir: PathBuf,
}

fn io<'a>(id: &'a str, op: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        id: id.to_string(),
        op,
        source,
    }
}

fn engine(id: &str, message: impl ToString) -> RuntimeError {
    RuntimeError::Engine {
        id: id.to_string(),
        driver: DRIVER,
        message: message.to_string(),
    }
}

/// `runc state` output, the fields kiln reads.
#[derive(Debug, Deserialize)]
struct RuntimeState {
    status: String,
    pid: Option<u32>,
}

impl OciDriver {
    /// A driver keeping its bundles under `state_dir`. Fails when the
    /// runtime binary does not answer `--version`.
    pub fn new(runtime: OciRuntime, state_dir: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let state_dir = state_dir.into();
        let program = runtime.program();
        let unavailable = |why: String| RuntimeError::Unavailable {
            driver: DRIVER,
            why,
            hint: format!("install it (Debian: `apt-get install {program}`)"),
        };
        match Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(unavailable(format!("`{program} --version` failed: {s}"))),
            Err(e) => return Err(unavailable(format!("cannot run `{program}`: {e}"))),
        }
        for dir in ["bundles", "runtime"] {
            fs::create_dir_all(state_dir.join(dir)).map_err(|e| {
                unavailable(format!(
                    "cannot create {}: {e}",
                    state_dir.join(dir).display()
                ))
            })?;
        }
        Ok(OciDriver { runtime, state_dir })
    }

    /// What is left of an instance on the host: its bundle, its runtime
    /// state, its cgroups. Empty after `remove` or a failed `create`.
    pub fn leftovers(&self, id: &str) -> Vec<PathBuf> {
        let mut out = cgroup::leftovers(id);
        let partial = self
            .state_dir
            .join("bundles")
            .join(format!(".{id}.partial"));
        let runtime = self.state_dir.join("runtime").join(id);
        out.extend(
            [self.bundle(id), partial, runtime]
                .into_iter()
                .filter(|p| p.exists()),
        );
        out
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.state_dir.join("bundles").join(id)
    }

    fn runtime_cmd(&self) -> Command {
        let mut cmd = Command::new(self.runtime.program());
        cmd.arg("--root").arg(self.state_dir.join("runtime"));
        cmd
    }

    fn record(&self, id: &str) -> Result<Record, RuntimeError> {
        let path = self.bundle(id).join("record.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| engine(id, format!("corrupt {}: {e}", path.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(RuntimeError::NotFound {
                id: id.into(),
                driver: DRIVER,
            }),
            Err(e) => Err(io(id, "read the instance record")(e)),
        }
    }

    /// The runtime's view, or `None` when it does not know the container.
    fn runtime_state(&self, id: &str) -> Option<RuntimeState> {
        let out = self
            .runtime_cmd()
            .arg("state")
            .arg(id)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn exit_code(&self, id: &str) -> Option<i32> {
        let text = fs::read_to_string(self.bundle(id).join("exit")).ok()?;
        text.trim().parse().ok()
    }

    fn state_of(&self, id: &str) -> InstanceState {
        if let Some(code) = self.exit_code(id) {
            let signal = (129..=128 + 64).contains(&code).then(|| code - 128);
            let oom = cgroup::oom_killed(id, signal == Some(9));
            return InstanceState::Exited {
                code: Some(code),
                signal,
                oom,
            };
        }
        if self.bundle(id).join("started").exists() {
            let pid = self
                .runtime_state(id)
                .and_then(|s| s.pid)
                .filter(|p| *p > 0);
            return InstanceState::Running { pid };
        }
        InstanceState::Created
    }

    fn info(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let record = self.record(id)?;
        Ok(InstanceInfo {
            id: record.id,
            state: self.state_of(id),
            image_digest: record.image_digest,
            labels: record.labels,
            isolation: format!(
                "oci ({}): mount,pid,ipc,uts namespaces; read-only root; cgroup {}",
                self.runtime.program(),
                if cgroup::unified() { "v2" } else { "v1" }
            ),
        })
    }

    /// The image's top-level entries: (name, symlink target if a link).
    fn top_level(rootfs: &Path) -> std::io::Result<Vec<(String, Option<PathBuf>)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(rootfs)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let link = entry
                .file_type()?
                .is_symlink()
                .then(|| fs::read_link(entry.path()))
                .transpose()?;
            out.push((name, link));
        }
        out.sort();
        Ok(out)
    }

    fn spec(
        config: &InstanceConfig,
        skeleton: &Path,
        top: &[(String, Option<PathBuf>)],
    ) -> Result<Spec, String> {
        let e = |e: oci_spec::OciSpecError| e.to_string();
        let mut mounts: Vec<OciMount> = get_default_mounts()
            .into_iter()
            .filter(|m| !m.destination().starts_with("/sys"))
            .collect();
        // Entries the instance gets from elsewhere are not bound from the image.
        let replaced: Vec<&str> = ["proc", "dev", "tmp", "run", "sys"]
            .into_iter()
            .chain(
                config
                    .volumes
                    .iter()
                    .chain(&config.files)
                    .map(|m| m.target.trim_start_matches('/')),
            )
            .collect();
        for (name, link) in top {
            if link.is_some() || replaced.contains(&name.as_str()) {
                continue;
            }
            mounts.push(
                MountBuilder::default()
                    .destination(format!("/{name}"))
                    .typ("bind")
                    .source(config.image.rootfs.join(name))
                    .options(vec![
                        "rbind".into(),
                        "ro".into(),
                        "nosuid".into(),
                        "nodev".into(),
                    ])
                    .build()
                    .map_err(e)?,
            );
        }
        for dir in ["/tmp", "/run"] {
            mounts.push(
                MountBuilder::default()
                    .destination(dir)
                    .typ("tmpfs")
                    .source("tmpfs")
                    .options(vec!["nosuid".into(), "nodev".into(), "mode=1777".into()])
                    .build()
                    .map_err(e)?,
            );
        }
        for (m, ro) in config
            .volumes
            .iter()
            .map(|m| (m, m.read_only))
            .chain(config.files.iter().map(|m| (m, true)))
        {
            let mode = if ro { "ro" } else { "rw" };
            mounts.push(
                MountBuilder::default()
                    .destination(&m.target)
                    .typ("bind")
                    .source(&m.source)
                    .options(vec![
                        "rbind".into(),
                        mode.into(),
                        "nosuid".into(),
                        "nodev".into(),
                    ])
                    .build()
                    .map_err(e)?,
            );
        }
        let (uid, gid) = config.user.unwrap_or((0, 0));
        let process = ProcessBuilder::default()
            .terminal(false)
            .args(config.argv.clone())
            .env(
                config
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>(),
            )
            .cwd(config.workdir.clone().unwrap_or_else(|| "/".into()))
            .user(
                UserBuilder::default()
                    .uid(uid)
                    .gid(gid)
                    .build()
                    .map_err(e)?,
            )
            .no_new_privileges(true)
            .capabilities(oci_spec::runtime::LinuxCapabilities::default())
            .build()
            .map_err(e)?;
        let namespaces = [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
        ]
        .into_iter()
        .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
        let mut resources = LinuxResourcesBuilder::default();
        if let Some(m) = config.resources.millicpus {
            let cpu = LinuxCpuBuilder::default()
                .period(100_000u64)
                .quota(i64::from(m) * 100)
                .build();
            resources = resources.cpu(cpu.map_err(e)?);
        }
        if let Some(p) = config.resources.pids {
            resources = resources.pids(
                LinuxPidsBuilder::default()
                    .limit(i64::from(p))
                    .build()
                    .map_err(e)?,
            );
        }
        // Memory is limited on kiln's parent cgroup, not here: see the
        // module docs.
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(resources.build().map_err(e)?)
            .cgroups_path(PathBuf::from(cgroup::container_path(&config.id)))
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
            .build()
            .map_err(e)?;
        SpecBuilder::default()
            .version("1.0.2")
            .hostname(config.service.clone())
            .root(
                RootBuilder::default()
                    .path(skeleton)
                    .readonly(true)
                    .build()
                    .map_err(e)?,
            )
            .mounts(mounts)
            .process(process)
            .linux(linux)
            .build()
            .map_err(e)
    }

    fn write_bundle(&self, config: &InstanceConfig, dir: &Path) -> Result<(), RuntimeError> {
        let id = config.id.as_str();
        let skeleton = dir.join("root");
        fs::create_dir_all(&skeleton).map_err(io(id, "create the bundle directory"))?;
        let top = Self::top_level(&config.image.rootfs).map_err(io(id, "read the image root"))?;
        for (name, link) in &top {
            if let Some(target) = link {
                std::os::unix::fs::symlink(target, skeleton.join(name))
                    .map_err(io(id, "link the image root"))?;
            }
        }
        // The final path of the skeleton: the spec names it after the rename.
        let spec = Self::spec(config, &self.bundle(id).join("root"), &top).map_err(|why| {
            RuntimeError::Setup {
                id: id.into(),
                what: format!("cannot build the OCI config: {why}"),
                hint: "check the command, env and mounts".into(),
            }
        })?;
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| engine(id, e))?;
        fs::write(dir.join("config.json"), json).map_err(io(id, "write config.json"))?;
        let record = Record {
            id: id.into(),
            image_digest: config.image.digest.clone(),
            rootfs: config.image.rootfs.clone(),
            labels: config.labels.clone(),
            log_dir: config.log_dir.clone(),
            log_max_bytes: config.log_max_bytes,
        };
        let json = serde_json::to_vec(&record).map_err(|e| engine(id, e))?;
        fs::write(dir.join("record.json"), json).map_err(io(id, "write the instance record"))?;
        let snap =
            snapshot::take(&config.image.rootfs).map_err(io(id, "snapshot the image root"))?;
        fs::write(dir.join("rootfs.snapshot"), snapshot::encode(&snap))
            .map_err(io(id, "write the root snapshot"))?;
        fs::create_dir_all(&config.log_dir).map_err(io(id, "create the log directory"))?;
        cgroup::create(id, config.resources.memory_bytes)
            .map_err(io(id, "create the instance cgroup"))?;
        Ok(())
    }

    fn wait_for(&self, deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        while start.elapsed() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        done()
    }

    fn kill(&self, id: &str, signal: &str) {
        let _ = self
            .runtime_cmd()
            .args(["kill", id, signal])
            .stderr(Stdio::null())
            .status();
    }
}

impl Driver for OciDriver {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        let id = config.id.as_str();
        preflight::check(config, true)?;
        let dir = self.bundle(id);
        if dir.exists() || self.runtime_state(id).is_some() {
            return Err(RuntimeError::AlreadyExists {
                id: id.into(),
                driver: DRIVER,
            });
        }
        let partial = self
            .state_dir
            .join("bundles")
            .join(format!(".{id}.partial"));
        let _ = fs::remove_dir_all(&partial);
        let written = self
            .write_bundle(config, &partial)
            .and_then(|()| fs::rename(&partial, &dir).map_err(io(id, "install the bundle")));
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&partial);
            cgroup::remove(id);
            return Err(e);
        }
        self.info(id)
    }

    fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let record = self.record(id)?;
        let state = self.state_of(id);
        state.ensure_can_start(id)?;
        let bundle = self.bundle(id);
        fs::create_dir_all(&record.log_dir).map_err(io(id, "create the log directory"))?;
        fs::write(bundle.join("started"), b"").map_err(io(id, "mark the bundle started"))?;
        let prefix = match self.runtime {
            OciRuntime::Runc => "",
            OciRuntime::Crun => CRUN_PREFIX,
        };
        let shim = format!("{prefix}{SHIM}");
        let status = Command::new("/bin/sh")
            .args([
                "-c",
                "(/bin/sh -c \"$KILN_SHIM\" kiln-shim \"$@\" &)",
                "kiln-shim",
            ])
            .arg(self.runtime.program())
            .arg("--root")
            .arg(self.state_dir.join("runtime"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(id)
            .env("KILN_BUNDLE", &bundle)
            .env("KILN_LOGS", &record.log_dir)
            .env("KILN_LOG_MAX", record.log_max_bytes.max(1024).to_string())
            .env("KILN_SHIM", &shim)
            .env("LC_ALL", "C")
            .current_dir(&bundle)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io(id, "spawn the runtime shim"))?;
        if !status.success() {
            let _ = fs::remove_file(bundle.join("started"));
            return Err(engine(id, format!("the runtime shim failed: {status}")));
        }
        let up = self.wait_for(RUNTIME_DEADLINE, || {
            self.exit_code(id).is_some()
                || self
                    .runtime_state(id)
                    .is_some_and(|s| s.status == "running" || s.status == "stopped")
        });
        if !up {
            return Err(engine(
                id,
                "the runtime did not start the container within 60s (see stderr.log)",
            ));
        }
        self.info(id)
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<InstanceInfo, RuntimeError> {
        let info = self.info(id)?;
        if !info.state.can_stop() {
            return Ok(info);
        }
        self.kill(id, "TERM");
        if !self.wait_for(grace, || self.exit_code(id).is_some()) {
            self.kill(id, "KILL");
            if !self.wait_for(RUNTIME_DEADLINE, || self.exit_code(id).is_some()) {
                return Err(engine(
                    id,
                    "the container did not exit after SIGKILL within 60s",
                ));
            }
        }
        self.info(id)
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let state = self.info(id)?.state;
        state.ensure_can_remove(id)?;
        if self.runtime_state(id).is_some() {
            let out = self
                .runtime_cmd()
                .args(["delete", "--force", id])
                .output()
                .map_err(io(id, "run delete"))?;
            if !out.status.success() && self.runtime_state(id).is_some() {
                return Err(engine(
                    id,
                    format!("delete: {}", String::from_utf8_lossy(&out.stderr).trim()),
                ));
            }
        }
        cgroup::remove(id);
        fs::remove_dir_all(self.bundle(id)).map_err(io(id, "remove the bundle"))
    }

    fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        self.info(id)
    }

    fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        let dir = self.state_dir.join("bundles");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io("*", "list bundles"))? {
            let name = entry.map_err(io("*", "list bundles"))?.file_name();
            let Some(id) = name.to_str().filter(|n| !n.starts_with('.')) else {
                continue;
            };
            match self.info(id) {
                Ok(info) => out.push(info),
                Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn logs(&self, id: &str, max_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError> {
        let record = self.record(id)?;
        let tail = |name: &str| -> Result<Vec<u8>, RuntimeError> {
            let mut bytes = Vec::new();
            for file in [format!("{name}.1"), name.to_string()] {
                match fs::read(record.log_dir.join(file)) {
                    Ok(b) => bytes.extend(b),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io(id, "read a log file")(e)),
                }
            }
            let keep = usize::try_from(max_bytes)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            Ok(bytes[bytes.len() - keep..].to_vec())
        };
        Ok((tail("stdout.log")?, tail("stderr.log")?))
    }

    /// `runc exec` / `crun exec` with the driver's state root: the runtime
    /// joins the container's namespaces, root and cgroup, with the
    /// bundle's env, cwd, user, capabilities and no_new_privileges. On
    /// timeout the exec'd process (from `--pid-file`) is killed too: it is
    /// not in the runtime's process group.
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.info(id)?.state.ensure_can_exec(id)?;
        crate::exec::ensure_command(id, argv)?;
        let bundle = self.bundle(id);
        let pid_file = tempfile_name(&bundle, "exec", "pid");
        let mut cmd = match self.runtime {
            OciRuntime::Runc => self.runtime_cmd(),
            // As for `run`: crun refuses hybrid cgroup hosts, so it runs in
            // a private mount namespace without the v2 mount.
            OciRuntime::Crun => {
                let mut c = Command::new("/bin/sh");
                c.args([
                    "-c",
                    CRUN_EXEC,
                    "kiln-exec",
                    self.runtime.program(),
                    "--root",
                ])
                .arg(self.state_dir.join("runtime"));
                c
            }
        };
        // The bundle's own process (env, cwd, user, capabilities,
        // no_new_privileges) with `argv`: crun, unlike runc, does not take
        // cwd and user from the container when given only a command.
        let process_file = pid_file.with_extension("json");
        let process = exec_process(&bundle, argv)
            .map_err(|e| engine(id, format!("exec: read the bundle's process: {e}")))?;
        fs::write(&process_file, process).map_err(io(id, "write the exec process"))?;
        cmd.arg("exec")
            .arg("--process")
            .arg(&process_file)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .env("LC_ALL", "C")
            .current_dir(&bundle);
        let result = crate::exec::run(id, cmd, argv, timeout, |_| {
            let pid = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        });
        let _ = fs::remove_file(&pid_file);
        let _ = fs::remove_file(&process_file);
        // The runtime exits 128+N for a command killed by signal N, as
        // `state_of` reads the container's own status.
        result.map(|mut out| {
            out.signal = out
                .code
                .filter(|c| (129..=128 + 64).contains(c))
                .map(|c| c - 128);
            out
        })
    }

    fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError> {
        let record = match self.record(id) {
            Ok(r) => r,
            Err(RuntimeError::NotFound { .. }) => return Ok(vec![Drift::Missing]),
            Err(e) => return Err(e),
        };
        let mut drift = Vec::new();
        if let InstanceState::Running { .. } = self.state_of(id)
            && self.runtime_state(id).is_none()
        {
            drift.push(Drift::Missing);
        }
        let rootfs = record.rootfs;
        let before = fs::read(self.bundle(id).join("rootfs.snapshot"))
            .map_err(io(id, "read the root snapshot"))?;
        let now = snapshot::take(&rootfs).map_err(io(id, "snapshot the image root"))?;
        for (path, change) in snapshot::diff(&snapshot::decode(&before), &now) {
            drift.push(Drift::RootChanged {
                path,
                change: change.into(),
            });
        }
        Ok(drift)
    }
}
