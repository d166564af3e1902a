//! From a generation's instance spec to what a driver runs: the image's
//! root, the merged environment, the argv, files, volumes and host ports.
//!
//! Files are copied once into a content-addressed directory
//! (`<state>/files/<hex>`) when a generation is applied, so an instance
//! mounts exactly the bytes its identity names even after the project's
//! file was edited, and a rollback finds the old content again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_plan::generation::secret_key;
use kiln_plan::{Digest, Generation};
use kiln_runtime::{ImageRef, InstanceConfig, Limits, Mount};
use kiln_spec::model::SecretSource;
use sha2::{Digest as _, Sha256};

/// Where the engine keeps what instances mount.
#[derive(Debug)]
pub struct Materials {
    pub state_dir: PathBuf,
    pub project_dir: PathBuf,
    pub images: kiln_image::Store,
    /// Secret values by reference (`env:VAR`, `file:PATH`), in memory only.
    secrets: Mutex<BTreeMap<String, String>>,
    ports: Mutex<BTreeSet<u16>>,
}

/// Log files of one instance rotate at this size.
pub const LOG_MAX_BYTES: u64 = 8 << 20;

impl Materials {
    pub fn new(state_dir: &Path, project_dir: &Path, images: kiln_image::Store) -> Materials {
        Materials {
            state_dir: state_dir.to_path_buf(),
            project_dir: project_dir.to_path_buf(),
            images,
            secrets: Mutex::default(),
            ports: Mutex::default(),
        }
    }

    pub fn files_dir(&self) -> PathBuf {
        self.state_dir.join("files")
    }

    pub fn log_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("logs").join(id)
    }

    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.state_dir.join("volumes").join(volume)
    }

    /// Copies every file of `generation` into the content store, checking
    /// each against the digest the generation recorded.
    pub fn store_files(&self, generation: &Generation) -> Result<(), String> {
        let dir = self.files_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for (source, digest) in &generation.resolved.files {
            let dest = dir.join(digest.hex());
            if dest.is_file() {
                continue;
            }
            let path = self.project_dir.join(source);
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let found = Digest::of(&bytes);
            if &found != digest {
                return Err(format!(
                    "{} changed since the plan was made (now {found}, planned {digest})\n  hint: run the command again",
                    path.display()
                ));
            }
            let tmp = dir.join(format!(".{}.tmp", digest.hex()));
            std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &dest))
                .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        }
        Ok(())
    }

    /// Rewrites the stored content of `digest` (found changed by a drift
    /// check) from a project file that still has it; a replacement would
    /// otherwise mount the same changed bytes again.
    pub fn restore_file(&self, generation: &Generation, digest: &Digest) -> Result<(), String> {
        let dest = self.files_dir().join(digest.hex());
        for (source, d) in &generation.resolved.files {
            if d != digest {
                continue;
            }
            let path = self.project_dir.join(source);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if &Digest::of(&bytes) != digest {
                continue;
            }
            let tmp = self.files_dir().join(format!(".{}.tmp", digest.hex()));
            return std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &dest))
                .map_err(|e| format!("cannot restore {}: {e}", dest.display()));
        }
        Err(format!(
            "no project file has the content {digest} any more, so {} cannot be restored\n  hint: apply a new generation",
            dest.display()
        ))
    }

    /// Takes the secret values the CLI read (`env:` ones) and reads the
    /// `file:` ones, checking every value against its recorded digest.
    pub fn take_secrets(
        &self,
        generation: &Generation,
        given: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut found = BTreeMap::new();
        for service in generation.spec.services.values() {
            for source in service.secrets.values() {
                let key = secret_key(source);
                let Some(want) = generation.resolved.secrets.get(&key) else {
                    continue;
                };
                match self.secret_value(source, given) {
                    Ok(value) if &Digest::of(value.as_bytes()) == want => {
                        found.insert(key, value);
                    }
                    Ok(_) => problems.push(format!(
                        "secret {key} has another value than the generation recorded ({want})\n  hint: restore the value, or apply a new generation with the new one"
                    )),
                    Err(why) => problems.push(why),
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        self.secrets.lock().expect("secrets lock").extend(found);
        Ok(())
    }

    fn secret_value(
        &self,
        source: &SecretSource,
        given: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        let key = secret_key(source);
        if let Some(v) = given.get(&key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.secrets.lock().expect("secrets lock").get(&key) {
            return Ok(v.clone());
        }
        match source {
            SecretSource::File(path) => {
                let path = self.project_dir.join(path);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("secret {key}: cannot read {}: {e}", path.display()))?;
                String::from_utf8(bytes).map_err(|_| format!("secret {key} is not UTF-8"))
            }
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                format!(
                    "secret {key} is not available to the daemon\n  hint: run `kiln apply` from a shell where {var} is set (the value is kept in the daemon's memory only)"
                )
            }),
        }
    }

    /// A free host port, never handed out twice by this process.
    pub fn allocate_port(&self) -> Result<u16, String> {
        let mut taken = self.ports.lock().expect("ports lock");
        for _ in 0..64 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("cannot find a free port: {e}"))?
                .port();
            if taken.insert(port) {
                return Ok(port);
            }
        }
        Err("cannot find a free port that is not already assigned".into())
    }

    /// Marks ports as in use (adopted instances) or free again.
    pub fn claim_ports(&self, ports: impl IntoIterator<Item = u16>) {
        self.ports.lock().expect("ports lock").extend(ports);
    }

    pub fn release_ports(&self, ports: impl IntoIterator<Item = u16>) {
        let mut taken = self.ports.lock().expect("ports lock");
        for p in ports {
            taken.remove(&p);
        }
    }

    /// Everything the driver needs to create instance `id` of `service`.
    pub fn config(
        &self,
        generation: &Generation,
        number: u64,
        service: &str,
        id: &str,
        ports: &BTreeMap<String, u16>,
        docker: bool,
    ) -> Result<InstanceConfig, String> {
        let spec = generation.instance_spec(service);
        let svc = &generation.spec.services[service];
        let digest = kiln_image::Digest::try_from(spec.image.0.clone())
            .map_err(|e| format!("image digest {}: {e}", spec.image))?;
        let image = self.images.load_image(&digest).map_err(|e| {
            format!("image {digest} of service {service}: {e}\n  hint: `kiln build` it again, or `kiln image pull` it")
        })?;
        let rootfs = self
            .images
            .rootfs(&image)
            .map_err(|e| format!("cannot unpack image {digest}: {e}"))?;
        let docker_archive = if docker {
            Some(self.docker_archive(&image)?)
        } else {
            None
        };
        let cfg = image.config.config().clone().unwrap_or_default();

        let mut env = BTreeMap::new();
        for kv in cfg.env().iter().flatten() {
            if let Some((k, v)) = kv.split_once('=') {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        env.extend(spec.env.clone());
        for (var, source) in &svc.secrets {
            let value = self.secret_value(source, &BTreeMap::new())?;
            env.insert(var.clone(), value);
        }
        env.extend(port_env(ports));
        env.insert("KILN_SERVICE".into(), service.to_owned());
        env.insert("KILN_INSTANCE".into(), id.to_owned());
        env.insert("KILN_GENERATION".into(), number.to_string());
        env.insert("KILN_PROJECT".into(), generation.spec.project.name.clone());

        let argv: Vec<String> = match &spec.command {
            Some(command) => command.clone(),
            None => cfg
                .entrypoint()
                .iter()
                .flatten()
                .chain(cfg.cmd().iter().flatten())
                .cloned()
                .collect(),
        };
        if argv.is_empty() {
            return Err(format!(
                "service {service} has no command and its image no entrypoint or cmd\n  hint: set `command` in [service.{service}]"
            ));
        }
        let argv = argv.iter().map(|a| expand(a, &env)).collect();

        let files = spec
            .files
            .iter()
            .map(|(target, digest)| Mount {
                source: self.files_dir().join(digest.hex()),
                target: target.clone(),
                read_only: true,
            })
            .collect();
        let user = match cfg.user().as_deref() {
            None | Some("") => None,
            Some(u) => Some(parse_user(u).ok_or_else(|| {
                format!("image user `{u}` is not numeric (uid[:gid])\n  hint: set `user = \"1000:1000\"` in the [image] block")
            })?),
        };
        let mut volumes = Vec::new();
        for (target, mount) in &spec.volumes {
            let dir = self.volume_dir(&mount.volume);
            create_volume(&dir, user)?;
            volumes.push(Mount {
                source: dir,
                target: target.clone(),
                read_only: mount.read_only,
            });
        }
        let log_dir = self.log_dir(id);
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
        let labels = BTreeMap::from([
            (
                "kiln.project".to_owned(),
                generation.spec.project.name.clone(),
            ),
            ("kiln.service".to_owned(), service.to_owned()),
            ("kiln.generation".to_owned(), number.to_string()),
            ("kiln.identity".to_owned(), spec.identity().0),
        ]);
        Ok(InstanceConfig {
            id: id.to_owned(),
            service: service.to_owned(),
            image: ImageRef {
                digest: digest.to_string(),
                rootfs,
                docker_archive,
            },
            argv,
            env,
            workdir: cfg.working_dir().clone().filter(|w| !w.is_empty()),
            user,
            files,
            volumes,
            resources: Limits {
                memory_bytes: spec.resources.memory.map(|m| m.bytes),
                millicpus: spec.resources.millicpus,
                pids: spec.resources.pids,
            },
            log_dir,
            log_max_bytes: LOG_MAX_BYTES,
            labels,
        })
    }

    fn docker_archive(&self, image: &kiln_image::Image) -> Result<PathBuf, String> {
        let dir = self.state_dir.join("archives");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!("{}.tar", image.digest.hex()));
        if path.is_file() {
            return Ok(path);
        }
        let tmp = dir.join(format!(".{}.tmp", image.digest.hex()));
        let file = std::fs::File::create(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let tag = kiln_runtime::docker::image_tag(&image.digest.to_string());
        self.images
            .export_docker_archive(image, &tag, std::io::BufWriter::new(file))
            .map_err(|e| format!("cannot export image {} for docker: {e}", image.digest))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// `PORT_<NAME>` for every port and `PORT` for the main one.
pub fn port_env(ports: &BTreeMap<String, u16>) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = ports
        .iter()
        .map(|(name, port)| (format!("PORT_{}", env_name(name)), port.to_string()))
        .collect();
    if let Some(port) = main_port(ports) {
        env.insert("PORT".into(), port.to_string());
    }
    env
}

/// The port passed as `PORT`: the only one, or the one named `http`.
pub fn main_port(ports: &BTreeMap<String, u16>) -> Option<u16> {
    if ports.len() == 1 {
        return ports.values().next().copied();
    }
    ports.get("http").copied()
}

/// `http-alt` → `HTTP_ALT`.
pub fn env_name(port: &str) -> String {
    port.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Replaces `${NAME}` with the variable's value (empty when unset); `$$`
/// is a literal `$`.
pub fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{')
            && let Some(end) = inner.find('}')
        {
            out.push_str(env.get(&inner[..end]).map_or("", String::as_str));
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Creates a volume's directory the first time, owned by the instance's
/// user (`uid:gid` of the image), so a program that does not run as root
/// (PostgreSQL as 999) can write it. An existing directory is left as it is:
/// its owner may have been chosen on purpose.
fn create_volume(dir: &Path, user: Option<(u32, u32)>) -> Result<(), String> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(format!("cannot create volume {}: {e}", dir.display())),
    }
    match user {
        Some((uid, gid)) if (uid, gid) != (0, 0) => {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
                // Not left half made: the next attempt creates and chowns again.
                let _ = std::fs::remove_dir(dir);
                format!(
                    "cannot give volume {} to the image's user {uid}:{gid}: {e}\n  hint: kiln must run as root to run an image with a non-root user",
                    dir.display()
                )
            })
        }
        _ => Ok(()),
    }
}

fn parse_user(user: &str) -> Option<(u32, u32)> {
    match user.split_once(':') {
        Some((u, g)) => Some((u.parse().ok()?, g.parse().ok()?)),
        None => {
            let uid = user.parse().ok()?;
            Some((uid, uid))
        }
    }
}

/// SHA-256 of a file's content, for drift checks of mounted files.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_braced_variables_only() {
        let env = BTreeMap::from([("PORT".to_owned(), "8080".to_owned())]);
        assert_eq!(expand("--port=${PORT}", &env), "--port=8080");
        assert_eq!(expand("${MISSING}x", &env), "x");
        assert_eq!(expand("$$PORT $PORT ${", &env), "$PORT $PORT ${");
    }

    #[test]
    fn a_new_volume_belongs_to_the_image_user_and_an_old_one_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("volumes/data");
        let me = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        create_volume(&dir, Some(me)).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!((meta.uid(), meta.gid()), me);
        if me.0 == 0 {
            // As root: PostgreSQL's uid gets a new volume...
            let other = tmp.path().join("volumes/pg");
            create_volume(&other, Some((999, 999))).unwrap();
            let meta = std::fs::metadata(&other).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (999, 999));
            // ...and an existing one is not taken from whoever owns it.
            create_volume(&dir, Some((999, 999))).unwrap();
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!((meta.uid(), meta.gid()), me);
        }
    }

    #[test]
    fn main_port_is_the_only_or_http() {
        let one = BTreeMap::from([("web".to_owned(), 1)]);
        assert_eq!(main_port(&one), Some(1));
        let two = BTreeMap::from([("http".to_owned(), 2), ("admin".to_owned(), 3)]);
        assert_eq!(main_port(&two), Some(2));
        let none = BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 3)]);
        assert_eq!(main_port(&none), None);
        assert_eq!(env_name("http-alt"), "HTTP_ALT");
    }
}
