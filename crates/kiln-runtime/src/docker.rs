//! The `docker` driver: instances as Docker Engine containers, through
//! `bollard` on the engine's Unix socket.
//!
//! Design:
//! - The trait is synchronous; the driver owns a current-thread tokio
//!   runtime and `block_on`s each call. The client negotiates the API
//!   version at connect time (Debian's Docker 20.10 speaks 1.41; bollard
//!   defaults to a newer one the engine refuses).
//! - Images: the engine gets the kiln image once, tagged
//!   `kiln/<manifest hex12>:<manifest hex>`; a later instance of the same
//!   digest finds the tag and loads nothing. The image comes from the
//!   `docker save` archive kiln writes (`ImageRef::docker_archive`), or,
//!   without one, is imported from the verified rootfs (`docker import`: a
//!   tar of the root, no image config, which kiln does not need since argv,
//!   env and workdir are explicit). Images are never removed here (that is
//!   image GC's business).
//! - One container per instance, named `kiln-<id>`, labelled
//!   `io.kiln.instance=<id>`, `io.kiln.owner=<owner>` (one kiln project or
//!   daemon: two projects on one engine never adopt each other's
//!   containers) and `io.kiln.image=<digest>`, plus the instance's labels.
//!   `list` filters on the owner label, so kiln adopts its own containers
//!   and never touches anyone else's.
//! - The container runs with a read-only root, tmpfs `/tmp` and `/run`,
//!   volumes and files as bind mounts, `argv` as `Cmd` with an empty
//!   `Entrypoint` override, host networking (kiln's ports are host ports),
//!   memory (swap disabled), NanoCpus and pids limits, json-file logs capped
//!   at `log_max_bytes`.
//! - `verify` reads the engine's filesystem diff of the container: any
//!   change outside the tmpfs, volume and file mounts (and the files Docker
//!   itself bind-mounts: hosts, hostname, resolv.conf) is drift.
//!
//! Limits: exit by signal is reported as Docker reports it, an exit code of
//! 128+N (`signal` is derived from it); logs come from the engine, not from
//! `log_dir`; a grace period is rounded up to whole seconds (the engine's
//! unit); the rootfs import holds the root's tar in memory.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ChangeType, ContainerCreateBody, ContainerStateStatusEnum, HostConfig, HostConfigLogConfig,
    Mount as DockerMount, MountType,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;

use crate::driver::Driver;
use crate::error::RuntimeError;
use crate::oci::preflight;
use crate::types::{Drift, ExecOutput, InstanceConfig, InstanceInfo, InstanceState};

const DRIVER: &str = "docker";
/// The label that marks a container as kiln's, valued with the instance id.
pub const LABEL_INSTANCE: &str = "io.kiln.instance";
/// Which kiln (project or daemon) owns the container.
pub const LABEL_OWNER: &str = "io.kiln.owner";
/// The image digest the container was created from.
pub const LABEL_IMAGE: &str = "io.kiln.image";
/// Paths Docker bind-mounts into every container; their diff is not drift.
const ENGINE_PATHS: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];
const TMPFS: [&str; 2] = ["/tmp", "/run"];

/// Docker Engine through its API socket.
#[derive(Debug)]
pub struct DockerDriver {
    docker: Docker,
    rt: tokio::runtime::Runtime,
    owner: String,
}

fn unavailable(why: impl ToString) -> RuntimeError {
    RuntimeError::Unavailable {
        driver: DRIVER,
        why: why.to_string(),
        hint: "start Docker Engine (`dockerd`) and check that /var/run/docker.sock (or \
               DOCKER_HOST) is reachable"
            .into(),
    }
}

fn engine(id: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Engine {
        id: id.to_string(),
        driver: DRIVER,
        message: e.to_string(),
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The container name of an instance.
pub fn container_name(id: &str) -> String {
    format!("kiln-{id}")
}

/// The engine-side tag of a kiln image: `kiln/<hex12>:<hex>` of the
/// manifest digest.
pub fn image_tag(digest: &str) -> String {
    let hex: String = digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    format!("kiln/{}:{hex}", &hex[..hex.len().min(12)])
}

impl DockerDriver {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket)
    /// and negotiates the API version. `owner` scopes `list`: the engine
    /// passes its project's identity.
    pub fn connect(owner: &str) -> Result<Self, RuntimeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unavailable(format!("cannot start an I/O runtime: {e}")))?;
        let docker = Docker::connect_with_local_defaults().map_err(unavailable)?;
        let docker = rt.block_on(async {
            let docker = docker.negotiate_version().await?;
            docker.ping().await?;
            Ok::<_, DockerError>(docker)
        });
        Ok(DockerDriver {
            docker: docker.map_err(unavailable)?,
            rt,
            owner: owner.to_string(),
        })
    }

    /// Makes sure the engine has the image; returns the reference to run.
    fn ensure_image(&self, config: &InstanceConfig) -> Result<String, RuntimeError> {
        let id = config.id.as_str();
        let tag = image_tag(&config.image.digest);
        let present = self.rt.block_on(self.docker.inspect_image(&tag));
        match present {
            Ok(_) => return Ok(tag),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine(id, e)),
        }
        let Some(archive) = &config.image.docker_archive else {
            return self.import_rootfs(config, &tag).map(|()| tag);
        };
        let bytes = std::fs::read(archive).map_err(|source| RuntimeError::Io {
            id: id.into(),
            op: "read the image archive",
            source,
        })?;
        let loaded = self.rt.block_on(async {
            let options = ImportImageOptionsBuilder::default().quiet(true).build();
            let body = bollard::body_full(bytes.into());
            let mut stream = self.docker.import_image(options, body, None);
            let mut loaded = Vec::new();
            while let Some(info) = stream.next().await {
                let info = info?;
                let text = info.stream.unwrap_or_default();
                for line in text.lines() {
                    if let Some(r) = line
                        .strip_prefix("Loaded image ID: ")
                        .or_else(|| line.strip_prefix("Loaded image: "))
                    {
                        loaded.push(r.trim().to_string());
                    }
                }
            }
            Ok::<_, DockerError>(loaded)
        });
        let loaded = loaded.map_err(|e| engine(id, format!("load image archive: {e}")))?;
        let [source] = loaded.as_slice() else {
            return Err(engine(
                id,
                format!(
                    "the image archive must hold exactly one image, the engine loaded {loaded:?}"
                ),
            ));
        };
        let (repo, tag_name) = tag.rsplit_once(':').unwrap_or((&tag, "latest"));
        let options = TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag_name)
            .build();
        self.rt
            .block_on(self.docker.tag_image(source, Some(options)))
            .map_err(|e| engine(id, format!("tag image {source} as {tag}: {e}")))?;
        Ok(tag)
    }

    /// `docker import` of the verified root, tagged `tag`.
    fn import_rootfs(&self, config: &InstanceConfig, tag: &str) -> Result<(), RuntimeError> {
        let id = config.id.as_str();
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        builder
            .append_dir_all(".", &config.image.rootfs)
            .map_err(|source| RuntimeError::Io {
                id: id.into(),
                op: "archive the image root",
                source,
            })?;
        let bytes = builder.into_inner().map_err(|source| RuntimeError::Io {
            id: id.into(),
            op: "archive the image root",
            source,
        })?;
        let (repo, tag_name) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag_name)
            .build();
        let result = self.rt.block_on(async {
            let mut stream = self.docker.create_image(
                Some(options),
                Some(bollard::body_full(bytes.into())),
                None,
            );
            while let Some(info) = stream.next().await {
                info?;
            }
            Ok::<_, DockerError>(())
        });
        result.map_err(|e| engine(id, format!("import the image root: {e}")))
    }

    fn body(&self, config: &InstanceConfig, image: String) -> ContainerCreateBody {
        let mut labels: HashMap<String, String> = config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_INSTANCE.into(), config.id.clone());
        labels.insert(LABEL_IMAGE.into(), config.image.digest.clone());
        labels.insert(LABEL_OWNER.into(), self.owner.clone());
        let binds = config
            .volumes
            .iter()
            .chain(&config.files)
            .map(|m| DockerMount {
                target: Some(m.target.clone()),
                source: Some(m.source.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(m.read_only || config.files.contains(m)),
                ..Default::default()
            });
        let tmpfs = TMPFS
            .iter()
            .map(|p| (p.to_string(), "rw,nosuid,nodev".to_string()))
            .collect();
        let limits = &config.resources;
        let memory = limits.memory_bytes.map(|b| b.min(i64::MAX as u64) as i64);
        let host = HostConfig {
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            mounts: Some(binds.collect()),
            network_mode: Some("host".into()),
            memory,
            // Equal to `memory`: no swap, so the limit is what OOM-kills.
            memory_swap: memory,
            nano_cpus: limits.millicpus.map(|m| i64::from(m) * 1_000_000),
            pids_limit: limits.pids.map(i64::from),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    (
                        "max-size".into(),
                        config.log_max_bytes.max(4096).to_string(),
                    ),
                    ("max-file".into(), "2".into()),
                ])),
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(image),
            cmd: Some(config.argv.clone()),
            entrypoint: Some(Vec::new()),
            env: Some(config.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: config.workdir.clone(),
            user: config.user.map(|(u, g)| format!("{u}:{g}")),
            labels: Some(labels),
            host_config: Some(host),
            ..Default::default()
        }
    }

    /// Whether the engine's event log holds an `oom` event of the
    /// container (`until` = now, so the stream ends).
    fn had_oom_event(&self, container: &str) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let filters = HashMap::from([
            ("container".to_string(), vec![container.to_string()]),
            ("event".to_string(), vec!["oom".to_string()]),
        ]);
        let options = bollard::query_parameters::EventsOptions {
            since: Some("0".into()),
            until: Some((now + 1).to_string()),
            filters: Some(filters),
        };
        // The event may trail the exit by a moment: look a few times, up
        // to half a second, only for a SIGKILLed container with a limit.
        for attempt in 0..5 {
            let found = self.rt.block_on(async {
                let mut events = self.docker.events(Some(options.clone()));
                matches!(events.next().await, Some(Ok(_)))
            });
            if found {
                return true;
            }
            if attempt < 4 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        false
    }

    fn info(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let name = container_name(id);
        let inspect = self.rt.block_on(self.docker.inspect_container(&name, None));
        let inspect = match inspect {
            Ok(i) => i,
            Err(e) if is_not_found(&e) => {
                return Err(RuntimeError::NotFound {
                    id: id.into(),
                    driver: DRIVER,
                });
            }
            Err(e) => return Err(engine(id, e)),
        };
        let labels = inspect
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let st = inspect.state.unwrap_or_default();
        let state = match st.status {
            Some(ContainerStateStatusEnum::CREATED) | None => InstanceState::Created,
            Some(
                ContainerStateStatusEnum::RUNNING
                | ContainerStateStatusEnum::PAUSED
                | ContainerStateStatusEnum::RESTARTING
                | ContainerStateStatusEnum::STOPPING,
            ) => InstanceState::Running {
                pid: st.pid.and_then(|p| u32::try_from(p).ok()),
            },
            Some(_) => {
                let code = st.exit_code.and_then(|c| i32::try_from(c).ok());
                let signal = code
                    .filter(|c| (129..=128 + 64).contains(c))
                    .map(|c| c - 128);
                // The engine sets OOMKilled from an event that can arrive
                // after the exit is recorded; its event log is the
                // authority, so a SIGKILLed container is checked there.
                let limited = inspect
                    .host_config
                    .as_ref()
                    .and_then(|h| h.memory)
                    .is_some_and(|m| m > 0);
                let oom = st.oom_killed.unwrap_or(false)
                    || (signal == Some(9)
                        && limited
                        && self.had_oom_event(inspect.id.as_deref().unwrap_or(&name)));
                InstanceState::Exited { code, signal, oom }
            }
        };
        Ok(Self::info_of(id, state, labels))
    }

    fn info_of(
        id: &str,
        state: InstanceState,
        mut labels: HashMap<String, String>,
    ) -> InstanceInfo {
        let image_digest = labels.remove(LABEL_IMAGE).unwrap_or_default();
        labels.remove(LABEL_INSTANCE);
        labels.remove(LABEL_OWNER);
        InstanceInfo {
            id: id.to_string(),
            state,
            image_digest,
            labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
            isolation: "docker: container, read-only root; host network".into(),
        }
    }

    fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.rt.block_on(
            self.docker
                .remove_container(&container_name(id), Some(options)),
        ) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NotFound {
                id: id.into(),
                driver: DRIVER,
            }),
            Err(e) => Err(engine(id, e)),
        }
    }

    /// The paths whose changes are expected: tmpfs, volumes, files, and
    /// what the engine mounts itself.
    fn expected_paths(host: Option<&HostConfig>) -> Vec<String> {
        let mut out: Vec<String> = TMPFS
            .iter()
            .chain(&ENGINE_PATHS)
            .map(|s| s.to_string())
            .collect();
        if let Some(h) = host {
            out.extend(h.mounts.iter().flatten().filter_map(|m| m.target.clone()));
            out.extend(h.tmpfs.iter().flat_map(|t| t.keys().cloned()));
        }
        out
    }
}

/// Whether a changed `path` is explained by a mount at `expected`: the
/// mount point itself, anything under it, or a parent directory the engine
/// created or touched to hold it.
fn explained(path: &str, expected: &str) -> bool {
    let under = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|r| r.starts_with('/'));
    path == expected || under(path, expected) || under(expected, path)
}

impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        let id = config.id.as_str();
        preflight::check(config, false)?;
        match self.info(id) {
            Ok(_) => {
                return Err(RuntimeError::AlreadyExists {
                    id: id.into(),
                    driver: DRIVER,
                });
            }
            Err(RuntimeError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let image = self.ensure_image(config)?;
        let options = CreateContainerOptionsBuilder::default()
            .name(&container_name(id))
            .build();
        let body = self.body(config, image);
        let created = self
            .rt
            .block_on(self.docker.create_container(Some(options), body));
        if let Err(e) = created {
            // A failed create can still leave a container behind (e.g. a
            // name race): remove it, ignoring "not found".
            let _ = self.remove_container(id);
            return Err(engine(id, format!("create container: {e}")));
        }
        self.info(id)
    }

    fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let state = self.info(id)?.state;
        state.ensure_can_start(id)?;
        self.rt
            .block_on(self.docker.start_container(&container_name(id), None))
            .map_err(|e| engine(id, format!("start container: {e}")))?;
        self.info(id)
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<InstanceInfo, RuntimeError> {
        let info = self.info(id)?;
        if !info.state.can_stop() {
            return Ok(info);
        }
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let t = i32::try_from(secs).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(t).build();
        // The engine answers once the container is gone: give the request
        // the grace period plus room for the engine itself.
        let docker = self
            .docker
            .clone()
            .with_timeout(Duration::from_secs(secs + 120));
        match self
            .rt
            .block_on(docker.stop_container(&container_name(id), Some(options)))
        {
            Ok(()) => {}
            // 304: already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(engine(id, format!("stop container: {e}"))),
        }
        self.info(id)
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let state = self.info(id)?.state;
        state.ensure_can_remove(id)?;
        self.remove_container(id)
    }

    fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        self.info(id)
    }

    fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        let owner = format!("{LABEL_OWNER}={}", self.owner);
        let filters = HashMap::from([("label", vec![LABEL_INSTANCE.to_string(), owner])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let found = self
            .rt
            .block_on(self.docker.list_containers(Some(options)))
            .map_err(|e| engine("*", format!("list containers: {e}")))?;
        let mut out = Vec::new();
        for c in found {
            let labels = c.labels.unwrap_or_default();
            let Some(id) = labels.get(LABEL_INSTANCE).cloned() else {
                continue;
            };
            // Only containers that carry kiln's name for that id: a foreign
            // container with a copied label is not adopted.
            let named = c
                .names
                .iter()
                .flatten()
                .any(|n| n.trim_start_matches('/') == container_name(&id));
            if !named {
                continue;
            }
            match self.info(&id) {
                Ok(info) => out.push(info),
                Err(RuntimeError::NotFound { .. }) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn logs(&self, id: &str, max_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError> {
        self.info(id)?;
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .build();
        let result = self.rt.block_on(async {
            let mut stream = self.docker.logs(&container_name(id), Some(options));
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(chunk) = stream.next().await {
                match chunk? {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        out.extend_from_slice(&message)
                    }
                    LogOutput::StdErr { message } => err.extend_from_slice(&message),
                    LogOutput::StdIn { .. } => {}
                }
            }
            Ok::<_, DockerError>((out, err))
        });
        let (out, err) = result.map_err(|e| engine(id, format!("read logs: {e}")))?;
        let tail = |v: Vec<u8>| {
            let keep = usize::try_from(max_bytes)
                .unwrap_or(usize::MAX)
                .min(v.len());
            v[v.len() - keep..].to_vec()
        };
        Ok((tail(out), tail(err)))
    }

    /// An engine exec (`create_exec` + attached `start_exec`, output
    /// collected until the stream ends, the code from `inspect_exec`): the
    /// container's namespaces, root, cgroup, env, user and working
    /// directory. The API cannot kill an exec, so on timeout the driver
    /// kills its process by the host pid the engine reports (a local
    /// engine; with a remote one the command is left to finish).
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
        self.info(id)?.state.ensure_can_exec(id)?;
        crate::exec::ensure_command(id, argv)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let exec_id = self
            .rt
            .block_on(self.docker.create_exec(
                &container_name(id),
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(argv.to_vec()),
                    ..Default::default()
                },
            ))
            .map_err(|e| engine(id, format!("create exec: {e}")))?
            .id;
        let ran = self.rt.block_on(async {
            let collect = async {
                let (mut out, mut err) = (Vec::new(), Vec::new());
                let started = self
                    .docker
                    .start_exec(&exec_id, None::<StartExecOptions>)
                    .await?;
                if let StartExecResults::Attached { mut output, .. } = started {
                    while let Some(chunk) = output.next().await {
                        match chunk? {
                            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                                crate::exec::push_capped(&mut out, &message)
                            }
                            LogOutput::StdErr { message } => {
                                crate::exec::push_capped(&mut err, &message)
                            }
                            LogOutput::StdIn { .. } => {}
                        }
                    }
                }
                // The stream can end just before the engine records the code.
                loop {
                    let inspect = self.docker.inspect_exec(&exec_id).await?;
                    if inspect.running != Some(true) {
                        return Ok::<_, DockerError>((inspect.exit_code, out, err));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout_at(deadline, collect).await
        });
        match ran {
            Ok(Ok((code, stdout, stderr))) => {
                let code = code.and_then(|c| i32::try_from(c).ok());
                Ok(ExecOutput {
                    code,
                    signal: code
                        .filter(|c| (129..=128 + 64).contains(c))
                        .map(|c| c - 128),
                    stdout,
                    stderr,
                })
            }
            Ok(Err(e)) => Err(engine(id, format!("exec: {e}"))),
            Err(_elapsed) => {
                let pid = self
                    .rt
                    .block_on(self.docker.inspect_exec(&exec_id))
                    .ok()
                    .filter(|i| i.running == Some(true))
                    .and_then(|i| i.pid)
                    .and_then(|p| i32::try_from(p).ok())
                    .and_then(rustix::process::Pid::from_raw);
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                Err(crate::exec::timed_out(id, argv, timeout))
            }
        }
    }

    fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError> {
        let name = container_name(id);
        let inspect = match self.rt.block_on(self.docker.inspect_container(&name, None)) {
            Ok(i) => i,
            Err(e) if is_not_found(&e) => return Ok(vec![Drift::Missing]),
            Err(e) => return Err(engine(id, e)),
        };
        let expected = Self::expected_paths(inspect.host_config.as_ref());
        let changes = self
            .rt
            .block_on(self.docker.container_changes(&name))
            .map_err(|e| engine(id, format!("read the container's changes: {e}")))?;
        let mut drift = Vec::new();
        for c in changes.unwrap_or_default() {
            if expected.iter().any(|e| explained(&c.path, e)) {
                continue;
            }
            let change = match c.kind {
                ChangeType::_0 => "changed",
                ChangeType::_1 => "added",
                ChangeType::_2 => "removed",
            };
            drift.push(Drift::RootChanged {
                path: c.path,
                change: change.into(),
            });
        }
        Ok(drift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tags() {
        assert_eq!(container_name("web-1"), "kiln-web-1");
        assert_eq!(
            image_tag("sha256:0123456789abcdef"),
            "kiln/0123456789ab:0123456789abcdef"
        );
    }

    #[test]
    fn mount_points_and_their_parents_are_explained() {
        assert!(explained("/data", "/data"));
        assert!(explained("/data/x", "/data"));
        assert!(explained("/etc", "/etc/hosts"));
        assert!(!explained("/etc/passwd", "/etc/hosts"));
        assert!(!explained("/database", "/data"));
    }
}
