//! Fencing of exclusive volumes: an exclusive volume is open in at most one
//! instance.
//!
//! Each exclusive volume has a fence in the state store
//! (`volume:<project>/<name>`, see `kiln_state::Store::acquire_fence`)
//! whose holder is the instance that has it mounted read-write. The fence
//! is taken *before* the instance is recorded and created, and given up only
//! after the instance's process is gone and the driver removed it
//! (`Engine::destroy`). A fence never expires and records no pid: an
//! instance outlives the daemon that started it, so neither a timeout nor
//! the death of a daemon frees its volume. Instead the holder is judged by
//! what the driver still has: a holder the driver no longer lists (removed,
//! or never created because a crash came first) is stale, and its fence is
//! released by adoption after a restart, by the reconciler's periodic pass,
//! or by the next instance that wants the volume.
//!
//! A holder that still exists makes the next taker wait, at most the
//! service's `deploy.deadline`; then the step fails naming the volume and the
//! holder. Inside one daemon every change runs under the rollout lock and
//! the planner stops an exclusive volume's writer before it starts the next
//! (`recreate`; heals destroy first), so waiting is the exception: it covers
//! a holder left behind by something the engine did not plan.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kiln_plan::Generation;
use kiln_runtime::{Driver, InstanceState, RuntimeError};

use crate::engine::Engine;

/// How often a waiting taker looks at the holder again.
const RECHECK: Duration = Duration::from_millis(100);

/// The exclusive volumes that `service` of `generation` mounts read-write,
/// by name.
pub(crate) fn exclusive_volumes(generation: &Generation, service: &str) -> Vec<String> {
    let Some(svc) = generation.spec.services.get(service) else {
        return Vec::new();
    };
    let names: BTreeSet<String> = svc
        .volumes
        .values()
        .filter(|m| !m.read_only)
        .filter(|m| {
            generation
                .spec
                .volumes
                .get(&m.volume)
                .is_some_and(|v| v.exclusive)
        })
        .map(|m| m.volume.clone())
        .collect();
    names.into_iter().collect()
}

/// What a driver says about a fence's holder.
enum Holder {
    /// The driver still has it (running, created or exited but not removed).
    Present(String),
    /// The driver does not know it: its fence is stale.
    Gone,
}

impl Engine {
    /// The fence of volume `name` in this project's state.
    pub(crate) fn fence_name(&self, volume: &str) -> String {
        format!("{}{volume}", self.fence_prefix())
    }

    fn fence_prefix(&self) -> String {
        format!("volume:{}/", self.opts.project_name)
    }

    async fn holder(&self, id: &str) -> Holder {
        let id_c = id.to_owned();
        match self.blocking(move |d| d.inspect(&id_c)).await {
            Ok(info) => Holder::Present(match info.state {
                InstanceState::Running { .. } => "running".to_owned(),
                InstanceState::Created => "created, not started".to_owned(),
                InstanceState::Exited { .. } => "exited, not yet removed".to_owned(),
            }),
            Err(RuntimeError::NotFound { .. }) => Holder::Gone,
            // Cannot tell: assume it still has the volume open.
            Err(e) => Holder::Present(format!("state unknown: {e}")),
        }
    }

    /// Takes the fences of `volumes` for instance `holder`, in name order.
    /// A fence held by an instance the driver no longer has is taken over;
    /// one held by an instance that still exists is waited for, at most
    /// `wait`. On failure the fences taken so far are given back.
    pub(crate) async fn take_fences(
        &self,
        holder: &str,
        volumes: &[String],
        wait: Duration,
        generation: Option<u64>,
    ) -> Result<(), String> {
        let until = tokio::time::Instant::now() + wait;
        let mut taken: Vec<String> = Vec::new();
        for volume in volumes {
            let name = self.fence_name(volume);
            let mut announced = false;
            loop {
                let held = match self.store.acquire_fence(&name, holder) {
                    Ok(Ok(())) => break,
                    Ok(Err(held)) => held.0,
                    Err(e) => {
                        self.give_back(&taken, holder);
                        return Err(format!("cannot take the fence of volume {volume}: {e}"));
                    }
                };
                match self.holder(&held.owner).await {
                    Holder::Gone => {
                        let _ = self.store.release_fence(&name, &held.owner);
                        self.event(
                            "volume.released",
                            format!("volume/{volume}"),
                            generation,
                            format!(
                                "volume {volume}: its holder {} is gone; fence released",
                                held.owner
                            ),
                        );
                    }
                    Holder::Present(state) => {
                        if tokio::time::Instant::now() >= until {
                            self.give_back(&taken, holder);
                            return Err(format!(
                                "exclusive volume {volume} is still held by instance {} ({state}) after waiting {} s, so {holder} was not started\n  hint: an exclusive volume is open in at most one instance; `kiln status` shows {}, and the reconciler replaces or removes it",
                                held.owner,
                                wait.as_secs(),
                                held.owner
                            ));
                        }
                        if !announced {
                            announced = true;
                            self.event(
                                "volume.waiting",
                                format!("volume/{volume}"),
                                generation,
                                format!(
                                    "{holder} waits for exclusive volume {volume}: held by {} ({state})",
                                    held.owner
                                ),
                            );
                        }
                        tokio::time::sleep(RECHECK).await;
                    }
                }
            }
            taken.push(name);
            self.event(
                "volume.acquired",
                format!("volume/{volume}"),
                generation,
                format!("{holder} holds exclusive volume {volume}"),
            );
        }
        Ok(())
    }

    fn give_back(&self, names: &[String], holder: &str) {
        for name in names {
            let _ = self.store.release_fence(name, holder);
        }
    }

    /// Gives up every fence `holder` holds. Only for an instance whose
    /// process is gone and that the driver removed (or never created).
    pub(crate) fn release_fences(&self, holder: &str) {
        let prefix = self.fence_prefix();
        let Ok(fences) = self.store.fences(&prefix) else {
            return;
        };
        for fence in fences.into_iter().filter(|f| f.owner == holder) {
            let volume = fence.name.strip_prefix(&prefix).unwrap_or(&fence.name);
            match self.store.release_fence(&fence.name, holder) {
                Ok(()) => self.event(
                    "volume.released",
                    format!("volume/{volume}"),
                    None,
                    format!("{holder} stopped and was removed: volume {volume} released"),
                ),
                Err(e) => self.event(
                    "volume.error",
                    format!("volume/{volume}"),
                    None,
                    format!("cannot release volume {volume} held by {holder}: {e}"),
                ),
            }
        }
    }

    /// Releases the fences whose holder is not among `listed` (the ids the
    /// driver has). Runs under the rollout lock, so no instance is being
    /// created meanwhile.
    pub(crate) fn sweep_fences(&self, listed: &BTreeSet<String>) {
        let prefix = self.fence_prefix();
        let Ok(fences) = self.store.fences(&prefix) else {
            return;
        };
        for fence in fences {
            if listed.contains(&fence.owner) {
                continue;
            }
            let volume = fence.name.strip_prefix(&prefix).unwrap_or(&fence.name);
            if self.store.release_fence(&fence.name, &fence.owner).is_ok() {
                self.event(
                    "volume.released",
                    format!("volume/{volume}"),
                    None,
                    format!(
                        "volume {volume}: its holder {} is gone; fence released",
                        fence.owner
                    ),
                );
            }
        }
    }

    /// After a restart: stale fences are released, and every instance the
    /// driver still has takes (back) the fences of the exclusive volumes it
    /// writes; a fence another live instance holds is reported, never
    /// taken.
    pub(crate) fn adopt_fences(self: &Arc<Self>, listed: &BTreeSet<String>) {
        self.sweep_fences(listed);
        let Ok(records) = self.store.list_instances(None) else {
            return;
        };
        let mut generations: BTreeMap<u64, Option<Generation>> = BTreeMap::new();
        for rec in records.iter().filter(|r| listed.contains(&r.id)) {
            let generation = generations
                .entry(rec.generation)
                .or_insert_with(|| {
                    crate::project::load_generation(&self.store, rec.generation).ok()
                })
                .as_ref();
            let Some(generation) = generation else {
                continue;
            };
            for volume in exclusive_volumes(generation, &rec.service) {
                let name = self.fence_name(&volume);
                match self.store.acquire_fence(&name, &rec.id) {
                    Ok(Ok(())) => {}
                    Ok(Err(held)) => self.event(
                        "volume.conflict",
                        format!("volume/{volume}"),
                        Some(rec.generation),
                        format!(
                            "{} writes exclusive volume {volume}, which {} holds",
                            rec.id, held.0.owner
                        ),
                    ),
                    Err(e) => self.event(
                        "volume.error",
                        format!("volume/{volume}"),
                        Some(rec.generation),
                        format!("cannot take volume {volume} back for {}: {e}", rec.id),
                    ),
                }
            }
        }
    }
}
