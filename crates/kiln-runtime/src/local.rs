//! What the `process` and `sandbox` drivers share: the per-instance state
//! directory, the lifecycle and its guards, stop/remove, logs and verify.
//!
//! `<state_dir>/<id>/state.json` holds the config and, once started,
//! `<state_dir>/<id>/started.json` the pids (with their start times, so a
//! reused pid is never mistaken for the instance) and the cgroup: a file of
//! its own, so that starting never replaces `state.json` (on ext4, renaming
//! over a file forces its data out, and with `discard` deleting it then
//! waits for the device); `<state_dir>/<id>/exit` is written by the
//! instance's supervisor when its process ends (see `launch.rs`). Any
//! process can therefore `list`/`inspect`/`stop` what another started.

use std::ffi::CString;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Cgroup};
use crate::error::RuntimeError;
use crate::launch::{self, Launched, Plan};
use crate::types::{Drift, ExecOutput, InstanceConfig, InstanceInfo, InstanceState};

/// The `Driver` methods that the sandbox and process drivers both hand to
/// their [`Local`] core unchanged (`name` and `create` differ). Expects a
/// field `inner: Local` and `Duration`, `Drift`, `InstanceInfo` and
/// `RuntimeError` in scope.
macro_rules! delegate_to_local {
    () => {
        fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
            self.inner.start(id)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<InstanceInfo, RuntimeError> {
            self.inner.stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.inner.remove(id)
        }
        fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
            self.inner.inspect(id)
        }
        fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
            self.inner.list()
        }
        fn logs(&self, id: &str, max_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError> {
            self.inner.logs(id, max_bytes)
        }
        fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError> {
            self.inner.verify(id)
        }
        fn exec(
            &self,
            id: &str,
            argv: &[String],
            timeout: Duration,
        ) -> Result<crate::types::ExecOutput, RuntimeError> {
            self.inner.exec(id, argv, timeout)
        }
    };
}
pub(crate) use delegate_to_local;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub config: InstanceConfig,
    pub started: Option<Started>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Started {
    pub pid: u32,
    pub pid_start: u64,
    pub supervisor: u32,
    pub supervisor_start: u64,
    pub cgroup: Option<Cgroup>,
}

/// How a local driver turns a record into a launch plan.
pub(crate) trait Mode: Send + Sync {
    fn name(&self) -> &'static str;
    fn isolation(&self) -> String;
    /// Checks the config (at create) and builds the plan (at start).
    fn plan(&self, dir: &Path, config: &InstanceConfig) -> Result<Plan, RuntimeError>;
    fn cgroups(&self) -> Option<cgroup::Version>;
    /// The host command that runs `argv` in the running instance whose
    /// process is `pid`, with the instance's env and user.
    fn exec_command(
        &self,
        config: &InstanceConfig,
        pid: u32,
        argv: &[String],
    ) -> Result<std::process::Command, RuntimeError>;
}

#[derive(Debug)]
pub(crate) struct Local<M> {
    pub state_dir: PathBuf,
    pub mode: M,
    /// Recent digests of image roots, by root: every instance of an image
    /// shares one read-only root, so a drift pass over many instances
    /// hashes it once, not once per instance.
    pub root_cache: RootCache,
}

/// See [`Local::root_cache`]: an entry serves each instance once (a second
/// `verify` of the same instance hashes again, so a check right after a
/// change sees it) and lives at most [`ROOT_CACHE_TTL`].
pub(crate) type RootCache = std::sync::Mutex<
    std::collections::HashMap<
        PathBuf,
        (
            std::time::Instant,
            std::sync::Arc<crate::root::Manifest>,
            std::collections::HashSet<String>,
        ),
    >,
>;

/// How long a root's digests are reused by `verify`.
const ROOT_CACHE_TTL: Duration = Duration::from_secs(5);

impl<M> Local<M> {
    /// The instance's cgroup name: its id and a digest of this driver's
    /// state directory, so that two projects whose instances have the same
    /// id (same spec in two checkouts) never share, or kill, a cgroup.
    fn cgroup_name(&self, id: &str) -> String {
        // FNV-1a: stable, tiny, and collisions only matter between two
        // state directories of one host.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.state_dir.as_os_str().as_encoded_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{id}-{:08x}", hash as u32)
    }
}

pub(crate) fn io(id: &str, op: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let id = id.to_string();
    move |source| RuntimeError::Io { id, op, source }
}

pub(crate) fn setup(id: &str, what: impl Into<String>, hint: &str) -> RuntimeError {
    RuntimeError::Setup {
        id: id.to_string(),
        what: what.into(),
        hint: hint.to_string(),
    }
}

pub(crate) fn cstrings(
    id: &str,
    items: impl IntoIterator<Item = String>,
) -> Result<Vec<CString>, RuntimeError> {
    items
        .into_iter()
        .map(|s| {
            CString::new(s).map_err(|_| {
                setup(
                    id,
                    "an argument or variable contains a NUL byte",
                    "remove it",
                )
            })
        })
        .collect()
}

/// `(start time, alive)` of a pid from /proc; zombies count as gone.
fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(pid: u32, start: u64) -> bool {
    pid_start(pid) == Some(start)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = vec![];
    f.read_to_end(&mut out)?;
    Ok(out)
}

impl<M: Mode> Local<M> {
    fn dir(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
    }

    fn load(&self, id: &str) -> Result<Record, RuntimeError> {
        let path = self.dir(id).join("state.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) if valid_id(id) => b,
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(id, "read its state file")(e));
            }
            _ => {
                return Err(RuntimeError::NotFound {
                    id: id.to_string(),
                    driver: self.mode.name(),
                });
            }
        };
        let mut rec: Record = serde_json::from_slice(&bytes)
            .map_err(|e| io(id, "parse its state file")(std::io::Error::other(e)))?;
        // Written at start (a `started` inside state.json is an older layout).
        match std::fs::read(self.dir(id).join("started.json")) {
            Ok(b) => {
                rec.started = Some(
                    serde_json::from_slice(&b)
                        .map_err(|e| io(id, "parse its state file")(std::io::Error::other(e)))?,
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(id, "read its state file")(e)),
        }
        Ok(rec)
    }

    /// Writes `value` to `<dir>/<name>` atomically (a temporary file
    /// renamed into place).
    fn write_json(&self, id: &str, name: &str, value: &impl Serialize) -> Result<(), RuntimeError> {
        let dir = self.dir(id);
        let tmp = dir.join(format!("{name}.tmp"));
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| io(id, "encode its state")(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(io(id, "write its state file"))?;
        std::fs::rename(&tmp, dir.join(name)).map_err(io(id, "write its state file"))
    }

    fn state_of(&self, rec: &Record) -> InstanceState {
        let Some(s) = &rec.started else {
            return InstanceState::Created;
        };
        let oom = || s.cgroup.as_ref().is_some_and(Cgroup::oom_killed);
        if let Ok(text) = std::fs::read_to_string(self.dir(&rec.config.id).join("exit")) {
            let mut it = text.split_whitespace();
            let (kind, n) = (it.next(), it.next().and_then(|n| n.parse().ok()));
            let (code, signal) = match kind {
                Some("code") => (n, None),
                Some("signal") => (None, n),
                _ => (None, None),
            };
            return InstanceState::Exited {
                code,
                signal,
                oom: oom(),
            };
        }
        if alive(s.pid, s.pid_start) || alive(s.supervisor, s.supervisor_start) {
            return InstanceState::Running { pid: Some(s.pid) };
        }
        InstanceState::Exited {
            code: None,
            signal: None,
            oom: oom(),
        }
    }

    fn info(&self, rec: &Record) -> InstanceInfo {
        InstanceInfo {
            id: rec.config.id.clone(),
            state: self.state_of(rec),
            image_digest: rec.config.image.digest.clone(),
            labels: rec.config.labels.clone(),
            isolation: self.mode.isolation(),
        }
    }

    pub fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        let id = &config.id;
        if !valid_id(id) {
            return Err(setup(
                id,
                "the id is not a valid file name",
                "use letters, digits, '-', '_' and '.'",
            ));
        }
        let dir = self.dir(id);
        if dir.join("state.json").exists() {
            return Err(RuntimeError::AlreadyExists {
                id: id.clone(),
                driver: self.mode.name(),
            });
        }
        self.mode.plan(&dir, config)?;
        // Recorded once per image, before anything can run from it.
        crate::root::recorded_manifest(&self.state_dir, &config.image.digest, &config.image.rootfs)
            .map_err(io(id, "record the digests of its root"))?;
        std::fs::create_dir_all(&dir).map_err(io(id, "create its state directory"))?;
        let rec = Record {
            config: config.clone(),
            started: None,
        };
        if let Err(e) = std::fs::create_dir_all(&config.log_dir)
            .map_err(io(id, "create its log directory"))
            .and_then(|()| self.write_json(id, "state.json", &rec))
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(self.info(&rec))
    }

    pub fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let mut rec = self.load(id)?;
        let state = self.state_of(&rec);
        state.ensure_can_start(id)?;
        let dir = self.dir(id);
        let _ = std::fs::remove_file(dir.join("exit"));
        let mut plan = self.mode.plan(&dir, &rec.config)?;
        let cgroup = match self.mode.cgroups() {
            Some(v) => Some(
                Cgroup::create(v, &self.cgroup_name(id), &rec.config.resources).map_err(|e| {
                    setup(
                        id,
                        format!("cannot set up its cgroup: {e}"),
                        "check that cgroups are mounted and writable",
                    )
                })?,
            ),
            None => None,
        };
        let result = cgroup
            .as_ref()
            .map(Cgroup::procs_files)
            .transpose()
            .map_err(io(id, "open its cgroup"))
            .and_then(|files| {
                plan.cgroup_procs = files.unwrap_or_default();
                launch::launch(&plan).map_err(|e| self.launch_error(&rec.config, e))
            });
        let launched: Launched = match result {
            Ok(l) => l,
            Err(e) => {
                // The supervisor records the failed child's exit; wait for it
                // to be gone so that nothing is left, then forget it.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !dir.join("exit").exists()
                    && Instant::now() < deadline
                    && matches!(
                        e,
                        RuntimeError::MissingProgram { .. }
                            | RuntimeError::NotExecutable { .. }
                            | RuntimeError::Setup { .. }
                    )
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                let _ = std::fs::remove_file(dir.join("exit"));
                return Err(e);
            }
        };
        let started = Started {
            pid: launched.pid,
            pid_start: pid_start(launched.pid).unwrap_or(0),
            supervisor: launched.supervisor,
            supervisor_start: pid_start(launched.supervisor).unwrap_or(0),
            cgroup,
        };
        self.write_json(id, "started.json", &started)?;
        rec.started = Some(started);
        Ok(self.info(&rec))
    }

    fn launch_error(&self, config: &InstanceConfig, e: launch::LaunchError) -> RuntimeError {
        let id = config.id.clone();
        match (e.step, e.error.raw_os_error()) {
            ("execve", Some(libc::ENOENT)) => RuntimeError::MissingProgram {
                id,
                program: config.argv.first().cloned().unwrap_or_default(),
                rootfs: config.image.rootfs.clone(),
            },
            ("execve", Some(libc::EACCES)) => RuntimeError::NotExecutable {
                id,
                program: config.argv.first().cloned().unwrap_or_default(),
            },
            (step, _) => setup(
                &id,
                format!("cannot {step}: {}", e.error),
                "see the driver's documentation for what it needs",
            ),
        }
    }

    pub fn stop(&self, id: &str, grace: Duration) -> Result<InstanceInfo, RuntimeError> {
        let rec = self.load(id)?;
        let state = self.state_of(&rec);
        match (state, &rec.started) {
            (InstanceState::Exited { .. }, _) => Ok(self.info(&rec)),
            (InstanceState::Running { .. }, Some(s)) => {
                let group = Pid::from_raw(s.pid as i32)
                    .ok_or_else(|| setup(id, "invalid pid", "remove it"))?;
                let _ = rustix::process::kill_process_group(group, Signal::TERM);
                let deadline = Instant::now() + grace;
                while self.state_of(&rec).can_stop() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                // Also ends stragglers the leader left in its group.
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
                let deadline = Instant::now() + Duration::from_secs(30);
                while self.state_of(&rec).can_stop() {
                    if Instant::now() > deadline {
                        return Err(setup(
                            id,
                            "its process did not end after SIGKILL",
                            "check for a process stuck in the kernel (state D)",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(self.info(&rec))
            }
            _ => Err(RuntimeError::invalid_state(id, "stop", state)),
        }
    }

    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let rec = self.load(id)?;
        let state = self.state_of(&rec);
        state.ensure_can_remove(id)?;
        if rec.started.is_none() {
            self.end_unrecorded_start(id)?;
        }
        if let Some(cg) = rec.started.as_ref().and_then(|s| s.cgroup.as_ref())
            && !cg.remove()
        {
            return Err(setup(
                id,
                "its cgroup still has processes",
                "retry; check for processes in state D",
            ));
        }
        std::fs::remove_dir_all(self.dir(id)).map_err(io(id, "remove its state directory"))
    }

    /// A caller killed inside `start` (after the launch, before the pids
    /// were written down) leaves an instance that looks created but runs.
    /// Its program is in the instance's cgroup: kill it, and wait for the
    /// supervisor's exit record, written once the init (and with it the
    /// instance's mounts) is gone, so nothing of it outlives `remove`.
    fn end_unrecorded_start(&self, id: &str) -> Result<(), RuntimeError> {
        let Some(cg) = self
            .mode
            .cgroups()
            .and_then(|v| Cgroup::existing(v, &self.cgroup_name(id)))
        else {
            return Ok(());
        };
        let ran = cg.has_processes();
        if !cg.remove() {
            return Err(setup(
                id,
                "its cgroup still has processes",
                "retry; check for processes in state D",
            ));
        }
        let exit = self.dir(id).join("exit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ran && !exit.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        Ok(self.info(&self.load(id)?))
    }

    pub fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io("*", "list the state directory")(e)),
        };
        let mut out = vec![];
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().join("state.json").exists() {
                match self.load(&name) {
                    Ok(rec) => out.push(self.info(&rec)),
                    Err(RuntimeError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub fn logs(&self, id: &str, max: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError> {
        let rec = self.load(id)?;
        let read = |name: &str| -> Result<Vec<u8>, RuntimeError> {
            let path = rec.config.log_dir.join(name);
            let mut cur = tail(&path, max).map_err(io(id, "read its logs"))?;
            if (cur.len() as u64) < max {
                let mut prev = tail(
                    &rec.config.log_dir.join(format!("{name}.1")),
                    max - cur.len() as u64,
                )
                .map_err(io(id, "read its logs"))?;
                prev.append(&mut cur);
                cur = prev;
            }
            Ok(cur)
        };
        Ok((read("stdout.log")?, read("stderr.log")?))
    }

    /// `Driver::exec`: the mode's command, in the instance's cgroup (when it
    /// has one), run to completion or killed at `timeout`.
    pub fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let rec = self.load(id)?;
        self.state_of(&rec).ensure_can_exec(id)?;
        crate::exec::ensure_command(id, argv)?;
        let Some(s) = rec.started.as_ref().filter(|s| alive(s.pid, s.pid_start)) else {
            return Err(setup(
                id,
                "exec: its process has ended",
                "inspect the instance: it is exiting",
            ));
        };
        let mut cmd = self.mode.exec_command(&rec.config, s.pid, argv)?;
        if let Some(cg) = &s.cgroup {
            let files = cg.procs_files().map_err(io(id, "open its cgroup"))?;
            launch::join_cgroup_before_exec(&mut cmd, files);
        }
        crate::exec::run(id, cmd, argv, timeout, |_| {})
    }

    fn root_manifest(
        &self,
        id: &str,
        root: &Path,
    ) -> std::io::Result<std::sync::Arc<crate::root::Manifest>> {
        let now = std::time::Instant::now();
        {
            let mut cache = self.root_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, m, served)) = cache.get_mut(root)
                && now.duration_since(*at) < ROOT_CACHE_TTL
                && served.insert(id.to_owned())
            {
                return Ok(m.clone());
            }
        }
        let manifest = std::sync::Arc::new(crate::root::manifest(root)?);
        let mut cache = self.root_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (at, _, _)| now.duration_since(*at) < ROOT_CACHE_TTL);
        let served = std::collections::HashSet::from([id.to_owned()]);
        cache.insert(root.to_path_buf(), (now, manifest.clone(), served));
        Ok(manifest)
    }

    pub fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError> {
        let rec = self.load(id)?;
        let root = &rec.config.image.rootfs;
        let recorded =
            crate::root::recorded_manifest(&self.state_dir, &rec.config.image.digest, root)
                .map_err(io(id, "read the digests of its root"))?;
        let now = self
            .root_manifest(id, root)
            .map_err(io(id, "hash its root"))?;
        let mut drift = crate::root::diff(&recorded, &now);
        if let (Some(s), InstanceState::Running { .. }) = (&rec.started, self.state_of(&rec))
            && !alive(s.pid, s.pid_start)
        {
            drift.push(Drift::ProcessReplaced {
                expected: Some(s.pid),
                found: None,
            });
        }
        Ok(drift)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Driver, InstanceConfig, InstanceState, Sandbox};

    /// A caller killed inside `start` (launched, pids not yet written):
    /// the instance looks created, yet runs; `remove` must end it before it
    /// forgets it (the engine releases an exclusive volume's fence then).
    #[test]
    fn removing_an_instance_whose_start_was_not_recorded_ends_it() {
        let busybox = std::path::Path::new("/bin/busybox");
        let root = rustix::process::getuid().is_root();
        if !root || crate::cgroup::detect().is_none() || !busybox.is_file() {
            // The sandbox with cgroups (root) and a static busybox
            // (scripts/test installs both) are what this needs.
            assert!(
                std::env::var("KILN_STRICT_TESTS").map_or(true, |v| v != "true"),
                "KILN_STRICT_TESTS=true and this test needs root, cgroups and /bin/busybox"
            );
            eprintln!("SKIPPED: needs root, cgroups and /bin/busybox");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::copy(busybox, rootfs.join("sleep")).unwrap();
        let driver = Sandbox::new(tmp.path().join("state")).unwrap();
        let id = format!("unrecorded-{}", std::process::id());
        let mut config = InstanceConfig::placeholder(&id);
        config.image.rootfs = rootfs;
        config.argv = vec!["/sleep".into(), "600".into()];
        config.log_dir = tmp.path().join("logs");
        driver.create(&config).unwrap();
        let pid = match driver.start(&id).unwrap().state {
            InstanceState::Running { pid: Some(pid) } => pid,
            other => panic!("not running: {other:?}"),
        };
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        // As if the caller died before writing the pids down.
        std::fs::remove_file(tmp.path().join("state").join(&id).join("started.json")).unwrap();
        assert_eq!(driver.inspect(&id).unwrap().state, InstanceState::Created);
        driver.remove(&id).unwrap();
        // The program is gone (its pidfd is readable at once)…
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(rustix::event::poll(&mut fds, Some(&zero)).unwrap(), 1);
        // …and so is the instance.
        assert!(driver.inspect(&id).is_err());
    }
}
