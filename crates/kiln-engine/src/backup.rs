//! The backup hook (`[service.X.backup]`): before a service's instances are
//! replaced, its command runs in a fresh instance of what ran until now
//! (that generation's image, env, files, secrets and volumes; no port, no
//! route), and its standard output is stored by digest in
//! `<state>/backups/<sha256 hex>`.
//!
//! The instance (`<service>-backup-<generation>`) is not recorded as an
//! instance of the service (the planner must never count it as a replica):
//! while it runs the engine knows it in memory, and after a crash the next
//! daemon removes it as an orphan. It takes the fences of the exclusive
//! volumes it mounts like any other instance, so in a `recreate` it runs
//! after the old instance released them and before the new one takes them.
//!
//! Its output is written by the driver to `stdout.log` in its log directory
//! with no rotation, then hashed while streaming and renamed into place, so
//! a backup of any size never sits in memory. Drivers that keep no log file
//! there (docker, the fake) hand the output over through `Driver::logs`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_plan::Generation;
use kiln_runtime::{AnyDriver, Driver, InstanceState};
use sha2::{Digest as _, Sha256};

use crate::engine::{Engine, Progress, say};

/// What a finished backup stored.
struct Stored {
    digest: String,
    size: u64,
    path: PathBuf,
}

impl Engine {
    pub(crate) fn backups_dir(&self) -> PathBuf {
        self.opts.state_dir.join("backups")
    }

    /// Runs the backup of `service` for the rollout of generation `number`
    /// in a fresh instance of generation `source` (what ran until now).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_backup(
        self: &Arc<Self>,
        number: u64,
        desired: &Generation,
        source: &(u64, Generation),
        service: &str,
        command: &[String],
        timeout: Duration,
        progress: &Progress,
    ) -> Result<(), String> {
        let (source_number, source_generation) = source;
        if !source_generation.spec.services.contains_key(service) {
            return Err(format!(
                "backup of {service}: generation {source_number} does not declare it"
            ));
        }
        let id = format!("{service}-backup-{number}");
        let started = Instant::now();
        // Left by a crash during the same rollout: remove it first.
        let _ = self.destroy(&id, Some(Duration::from_secs(2))).await;
        let wait = desired
            .spec
            .services
            .get(service)
            .map_or(Duration::from_secs(60), |s| {
                Duration::from_millis(s.deploy.deadline.millis)
            });
        let volumes = crate::fence::exclusive_volumes(source_generation, service);
        self.take_fences(&id, &volumes, wait, Some(number)).await?;
        self.backups.lock().expect("backups").insert(id.clone());
        let outcome = self
            .backup_in(&id, source, service, command, timeout, progress)
            .await;
        // Stopped (if it still runs) and removed; its volumes go back.
        let grace =
            Duration::from_millis(source_generation.spec.services[service].stop_grace.millis);
        let removed = self.destroy(&id, Some(grace)).await;
        self.backups.lock().expect("backups").remove(&id);
        let _ = std::fs::remove_dir_all(self.materials.log_dir(&id));
        let stored = outcome?;
        removed?;
        let message = format!(
            "backup of {service} (`{}`): {} ({} bytes, {:.1} s), stored in {}",
            command.join(" "),
            stored.digest,
            stored.size,
            started.elapsed().as_secs_f64(),
            stored.path.display()
        );
        say(progress, format!("  ⛁ {message}"));
        self.event_with(
            "service.backup",
            format!("service/{service}"),
            Some(number),
            message,
            serde_json::json!({
                "digest": stored.digest,
                "size": stored.size,
                "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "path": stored.path,
                "command": command,
                "generation": source.0,
            }),
        );
        Ok(())
    }

    async fn backup_in(
        self: &Arc<Self>,
        id: &str,
        source: &(u64, Generation),
        service: &str,
        command: &[String],
        timeout: Duration,
        progress: &Progress,
    ) -> Result<Stored, String> {
        let (source_number, source_generation) = source;
        say(
            progress,
            format!(
                "  ⛁ backup of {service}: `{}` in {id} (at most {} s)",
                command.join(" "),
                timeout.as_secs()
            ),
        );
        let log_dir = self.materials.log_dir(id);
        let _ = std::fs::remove_dir_all(&log_dir);
        let docker = matches!(*self.driver, AnyDriver::Docker(_));
        let this = self.clone();
        let (generation_c, service_c, id_c) =
            (source_generation.clone(), service.to_owned(), id.to_owned());
        let number = *source_number;
        let mut config = tokio::task::spawn_blocking(move || {
            this.materials.config(
                &generation_c,
                number,
                &service_c,
                &id_c,
                &BTreeMap::new(),
                docker,
            )
        })
        .await
        .expect("config does not panic")
        .map_err(|e| format!("backup of {service}: {e}"))?;
        config.argv = command
            .iter()
            .map(|a| crate::instance::expand(a, &config.env))
            .collect();
        // The whole output is the backup: never rotated.
        config.log_max_bytes = u64::MAX;
        config
            .labels
            .insert("kiln.role".to_owned(), "backup".to_owned());
        let id_c = id.to_owned();
        let info = self
            .blocking(move |d| {
                d.create(&config)?;
                d.start(&id_c)
            })
            .await
            .map_err(|e| format!("backup of {service}: cannot start {id}: {e}"))?;
        let pid = match info.state {
            InstanceState::Running { pid } => pid,
            _ => None,
        };
        let state = self
            .wait_for_end(id, pid, timeout)
            .await
            .map_err(|lost| match lost {
                None => format!(
                    "backup of {service} (`{}`) did not finish within {} s: stopped; nothing new was started",
                    command.join(" "),
                    timeout.as_secs()
                ),
                Some(why) => format!("backup of {service}: {id} vanished from the runtime: {why}"),
            })?;
        match state {
            InstanceState::Exited { code: Some(0), .. } => {}
            InstanceState::Exited { code, signal, .. } => {
                let tail = self
                    .logs(id, 2048)
                    .await
                    .map(|(_, err)| crate::engine::last_line(&err))
                    .unwrap_or_default();
                let how = match (code, signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (_, Some(s)) => format!("was killed by signal {s}"),
                    _ => "ended without an exit status".to_owned(),
                };
                return Err(format!(
                    "backup of {service} (`{}`) {how}{}",
                    command.join(" "),
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                ));
            }
            other => return Err(format!("backup of {service}: {id} is {other:?}")),
        }
        let this = self.clone();
        let id_c = id.to_owned();
        tokio::task::spawn_blocking(move || this.store_backup(&id_c, &log_dir))
            .await
            .expect("storing does not panic")
            .map_err(|e| format!("backup of {service}: {e}"))
    }

    /// Waits until instance `id` ended (its pidfd, else polling), at most
    /// `limit`: `Err(None)` when it still runs then, `Err(Some(why))` when
    /// the driver lost it.
    async fn wait_for_end(
        &self,
        id: &str,
        pid: Option<u32>,
        limit: Duration,
    ) -> Result<InstanceState, Option<String>> {
        let until = tokio::time::Instant::now() + limit;
        let pid = pid.filter(|_| !matches!(*self.driver, AnyDriver::Fake(_)));
        if let Some(fd) = pid.and_then(crate::engine::pidfd) {
            crate::engine::wait_exited(fd, limit)
                .await
                .map_err(|()| None)?;
        }
        // The driver records the exit (and the last output) a moment after
        // the process ends.
        let mut missing = 0;
        loop {
            let id_c = id.to_owned();
            match self.blocking(move |d| d.inspect(&id_c)).await {
                Ok(info) if matches!(info.state, InstanceState::Running { .. }) => {}
                Ok(info) => return Ok(info.state),
                // Vanished: nothing recorded how it ended.
                Err(e) if missing >= 50 => return Err(Some(e.to_string())),
                Err(_) => missing += 1,
            }
            if tokio::time::Instant::now() >= until {
                return Err(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Moves the backup's output into `<state>/backups/<hex>`, hashing it
    /// on the way.
    fn store_backup(&self, id: &str, log_dir: &Path) -> Result<Stored, String> {
        let dir = self.backups_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = log_dir.join("stdout.log");
        let source = if log.is_file() {
            log
        } else {
            // No log file of the driver's own: take the output it kept.
            let (stdout, _) = self
                .driver
                .logs(id, u64::MAX)
                .map_err(|e| format!("cannot read the output of {id}: {e}"))?;
            let tmp = dir.join(format!(".{id}.out"));
            std::fs::write(&tmp, stdout)
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            tmp
        };
        let (digest, size) = hash_file(&source)?;
        let path = dir.join(&digest);
        if path.is_file() {
            // The same content was stored before.
            let _ = std::fs::remove_file(&source);
        } else if std::fs::rename(&source, &path).is_err() {
            // Another file system: copy, then sync, then rename.
            let tmp = dir.join(format!(".{digest}.tmp"));
            std::fs::copy(&source, &tmp)
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("cannot store the backup in {}: {e}", path.display()))?;
            let _ = std::fs::remove_file(&source);
        }
        if let Ok(f) = std::fs::File::open(&path) {
            let _ = f.sync_all();
        }
        Ok(Stored {
            digest: format!("sha256:{digest}"),
            size,
            path,
        })
    }
}

/// SHA-256 (hex) and size of a file, read in chunks.
fn hash_file(path: &Path) -> Result<(String, u64), String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}
