//! Applying generations: record, plan, run the steps with a journal entry
//! before and after each, and on failure put back what served before.
//!
//! A failed rollout (an instance not healthy by `deploy.deadline`, one that
//! exits while awaited, a canary whose error rate rises, a step the driver
//! refuses) is reverted: traffic returns to the instances that served
//! before, the new ones are drained and destroyed, the generation is marked
//! `failed` with the reason, and the previous generation is converged
//! again. After a crash, a generation left `rolling-out` is planned again
//! against what runs and finished (the planner resumes what is half done).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_plan::{Generation, InstanceStatus, Plan, Step};
use kiln_runtime::Driver;
use kiln_state::{GenerationStatus, JournalPhase, NewGeneration, NewJournalEntry, Origin};

use crate::api::{Reply, exit};
use crate::engine::{Engine, LEASE_TTL, Progress, say, token};
use crate::failpoint;
use crate::project::{decode_generation, load_generation, parse_status};

/// Why an action ended without doing its work.
#[derive(Debug)]
pub struct Refusal {
    pub message: String,
    pub code: i32,
}

impl Refusal {
    fn new(code: i32, message: impl Into<String>) -> Refusal {
        Refusal {
            message: message.into(),
            code,
        }
    }
}

impl From<crate::EngineError> for Refusal {
    fn from(e: crate::EngineError) -> Refusal {
        Refusal::new(exit::FAILED, e.to_string())
    }
}

impl From<kiln_state::StateError> for Refusal {
    fn from(e: kiln_state::StateError) -> Refusal {
        Refusal::new(
            exit::FAILED,
            format!("the state store failed: {}", chain(&e)),
        )
    }
}

/// An error with its causes, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// Holds the rollout lock and lease for one action.
struct Held<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    engine: &'a Engine,
    token: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.renew.abort();
        let _ = self.engine.store.release_lease("rollout", &self.token);
    }
}

impl Engine {
    async fn hold(self: &Arc<Self>, what: &str, wait: bool) -> Result<Held<'_>, Refusal> {
        // A change that holds the lease is named and refused (unless
        // `wait`); the reconciler's quick passes hold only the lock, so a
        // change waits for them.
        let guard = match self.rollout.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if !wait && let Some(holder) = self.store.lease("rollout")? {
                    return Err(Refusal::new(
                        exit::BUSY,
                        format!(
                            "another change is in progress: {} since {}\n  hint: wait for it (`kiln status`), or pass --wait to queue behind it",
                            holder.owner, holder.acquired_at
                        ),
                    ));
                }
                self.rollout.lock().await
            }
        };
        let token = token();
        let owner = format!("{what} (daemon pid {})", std::process::id());
        if let Err(held) = self
            .store
            .acquire_lease("rollout", &owner, &token, LEASE_TTL)?
        {
            return Err(Refusal::new(
                exit::BUSY,
                format!(
                    "another change is in progress: {held}\n  hint: wait for it to end or expire"
                ),
            ));
        }
        let this = self.clone();
        let t = token.clone();
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_TTL / 3).await;
                let _ = this.store.renew_lease("rollout", &t, LEASE_TTL);
            }
        });
        Ok(Held {
            _guard: guard,
            engine: self,
            token,
            renew,
        })
    }

    /// Plans `generation` against what runs now.
    pub fn plan_for(&self, generation: &Generation) -> Result<Plan, crate::EngineError> {
        Ok(kiln_plan::plan(generation, &self.observed()?))
    }

    /// `kiln apply`: records the generation and rolls it out.
    pub async fn apply(
        self: &Arc<Self>,
        generation: Generation,
        secrets: BTreeMap<String, String>,
        message: Option<String>,
        wait: bool,
        progress: &Progress,
    ) -> Result<Reply, Refusal> {
        let _held = self.hold("kiln apply", wait).await?;
        self.check_runnable(&generation, &secrets).await?;
        let plan = self.plan_for(&generation)?;
        let active = self.store.active_generation()?;
        if plan.is_empty()
            && active
                .as_ref()
                .is_some_and(|a| a.hash == generation.content_hash().0)
        {
            return Ok(Reply::Done {
                message: "No changes: what runs matches the spec.".into(),
                generation: active.map(|a| a.number),
            });
        }
        let record = self.store.append_generation(NewGeneration {
            hash: generation.content_hash().0,
            parent: active.as_ref().map(|a| a.number),
            origin: Origin::Apply,
            rollback_of: None,
            message,
            body: generation.canonical_json(),
        })?;
        self.rollout_generation(record.number, &generation, progress)
            .await
    }

    /// `kiln rollback [GEN]`: a new generation equal in content to `to`
    /// (default: the generation active before the current one).
    pub async fn rollback(
        self: &Arc<Self>,
        to: Option<u64>,
        wait: bool,
        progress: &Progress,
    ) -> Result<Reply, Refusal> {
        let _held = self.hold("kiln rollback", wait).await?;
        let active = self.store.active_generation()?;
        let target = match to {
            Some(n) => n,
            None => self.previous_active(active.as_ref().map(|a| a.number))?.ok_or_else(|| {
                Refusal::new(
                    exit::USAGE,
                    "there is no earlier generation that was active\n  hint: `kiln history` lists the generations; pass one: `kiln rollback N`",
                )
            })?,
        };
        let generation = load_generation(&self.store, target)
            .map_err(|e| Refusal::new(exit::USAGE, e.to_string()))?;
        self.check_runnable(&generation, &BTreeMap::new())
            .await
            .map_err(|r| {
                Refusal::new(
                    r.code,
                    format!("cannot roll back to generation {target}: {}", r.message),
                )
            })?;
        let record = self.store.append_generation(NewGeneration {
            hash: generation.content_hash().0,
            parent: active.as_ref().map(|a| a.number),
            origin: Origin::Rollback,
            rollback_of: Some(target),
            message: Some(format!("rollback to generation {target}")),
            body: generation.canonical_json(),
        })?;
        say(
            progress,
            format!("Generation {} restores generation {target}.", record.number),
        );
        self.rollout_generation(record.number, &generation, progress)
            .await
    }

    /// The newest generation before `current` that was ever active.
    fn previous_active(&self, current: Option<u64>) -> Result<Option<u64>, Refusal> {
        let mut numbers: Vec<u64> = self
            .store
            .list_generations()?
            .into_iter()
            .map(|g| g.number)
            .filter(|n| Some(*n) != current && current.is_none_or(|c| *n < c))
            .collect();
        numbers.reverse();
        for n in numbers {
            if self
                .store
                .status_history(n)?
                .iter()
                .any(|s| s.status == GenerationStatus::Active)
            {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// Refuses, before anything stops, a generation that cannot run here:
    /// a missing image, an unreadable file or secret, another driver.
    async fn check_runnable(
        self: &Arc<Self>,
        generation: &Generation,
        secrets: &BTreeMap<String, String>,
    ) -> Result<(), Refusal> {
        let wanted = generation.spec.runtime.driver;
        let have = self.driver.name();
        let compatible = match wanted {
            kiln_spec::model::Driver::Sandbox => matches!(have, "sandbox" | "process" | "fake"),
            kiln_spec::model::Driver::Process => matches!(have, "process" | "fake"),
            kiln_spec::model::Driver::Docker => matches!(have, "docker" | "fake"),
            kiln_spec::model::Driver::Oci => matches!(have, "oci" | "fake"),
        };
        if !compatible {
            return Err(Refusal::new(
                exit::USAGE,
                format!(
                    "the spec asks for the {} driver but this daemon runs {have}\n  hint: stop the daemon (`kiln down`) and start it again to switch drivers",
                    serde_json::to_value(wanted)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            ));
        }
        let this = self.clone();
        let generation_c = generation.clone();
        let secrets = secrets.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let m = &this.materials;
            let mut missing = Vec::new();
            for (image, digest) in &generation_c.resolved.images {
                let ok = kiln_image::Digest::try_from(digest.0.clone())
                    .ok()
                    .is_some_and(|d| m.images.load_image(&d).is_ok());
                if !ok {
                    missing.push(format!(
                        "image {image} ({digest}) is not in the image store {}",
                        m.images.root().display()
                    ));
                }
            }
            if !missing.is_empty() {
                return Err(format!(
                    "{}\n  hint: `kiln build` or `kiln image pull` it; nothing was stopped",
                    missing.join("\n")
                ));
            }
            m.store_files(&generation_c)?;
            m.take_secrets(&generation_c, &secrets)
        })
        .await
        .expect("checks do not panic")
        .map_err(|e| Refusal::new(exit::USAGE, e))
    }

    /// Rolls generation `number` out; marks it active, or failed and
    /// reverted.
    pub(crate) async fn rollout_generation(
        self: &Arc<Self>,
        number: u64,
        generation: &Generation,
        progress: &Progress,
    ) -> Result<Reply, Refusal> {
        self.store.set_generation_status(
            number,
            GenerationStatus::RollingOut,
            "rollout started",
        )?;
        self.event(
            "generation.rolling-out",
            format!("generation/{number}"),
            Some(number),
            format!("rolling out generation {number}"),
        );
        failpoint::hit("recorded");
        let plan = self.plan_for(generation)?;
        let summary = plan.summary();
        say(progress, format!("Generation {number}: {summary}"));
        match self.execute(number, generation, &plan, progress).await {
            Ok(()) => {
                failpoint::hit("activated");
                let previous = self.store.active_generation()?;
                self.store.set_generation_status(
                    number,
                    GenerationStatus::Active,
                    "every step done",
                )?;
                if let Some(prev) = previous.filter(|p| p.number != number) {
                    let rollback = self
                        .store
                        .get_generation(number)?
                        .is_some_and(|g| g.origin == Origin::Rollback);
                    let (status, reason) = if rollback {
                        (
                            GenerationStatus::RolledBack,
                            format!("rolled back by generation {number}"),
                        )
                    } else {
                        (
                            GenerationStatus::Superseded,
                            format!("superseded by generation {number}"),
                        )
                    };
                    let _ = self
                        .store
                        .set_generation_status(prev.number, status, &reason);
                }
                self.event(
                    "generation.active",
                    format!("generation/{number}"),
                    Some(number),
                    format!("generation {number} is active"),
                );
                self.refresh_monitors(generation);
                if let Some(keep) = generation.spec.policy.keep_generations {
                    // Retention, the only deletion of history: by the
                    // policy the user declared, never the active one.
                    match self.store.gc_generations(keep) {
                        Ok(gone) if !gone.is_empty() => say(
                            progress,
                            format!(
                                "Retention (keep_generations = {keep}) removed {} old generation(s).",
                                gone.len()
                            ),
                        ),
                        Ok(_) => {}
                        Err(e) => self.event("gc.error", "daemon", Some(number), e.to_string()),
                    }
                }
                self.wake.notify_one();
                Ok(Reply::Done {
                    message: format!("Generation {number} is active."),
                    generation: Some(number),
                })
            }
            Err(why) => {
                // Revert even if the state store cannot record the failure
                // (a full disk): what runs must go back to what served.
                let recorded =
                    self.store
                        .set_generation_status(number, GenerationStatus::Failed, &why);
                self.event(
                    "generation.failed",
                    format!("generation/{number}"),
                    Some(number),
                    format!("generation {number} failed: {why}"),
                );
                say(progress, format!("Rollout failed: {why}"));
                say(
                    progress,
                    "Rolling back: traffic returns to the previous instances.",
                );
                self.revert(number, progress).await;
                if let Err(e) = recorded {
                    let again =
                        self.store
                            .set_generation_status(number, GenerationStatus::Failed, &why);
                    if again.is_err() {
                        // Let the reconciler record it once the store is
                        // writable again: wake it every second until then.
                        let this = self.clone();
                        tokio::spawn(async move {
                            loop {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                let settled = this
                                    .store
                                    .generation_status(number)
                                    .ok()
                                    .flatten()
                                    .is_none_or(|s| s.status != GenerationStatus::RollingOut);
                                if settled || *this.shutdown.borrow() {
                                    return;
                                }
                                this.wake.notify_one();
                            }
                        });
                    }
                    return Err(Refusal::new(
                        exit::FAILED,
                        format!(
                            "generation {number} failed ({why}) and was reverted, but the state store could not record it: {}",
                            chain(&e)
                        ),
                    ));
                }
                let active = self.store.active_generation()?.map(|a| a.number);
                let serving = active.map_or_else(
                    || "nothing was serving before".to_owned(),
                    |a| format!("generation {a} keeps serving"),
                );
                self.event(
                    "generation.rolled-back",
                    format!("generation/{number}"),
                    Some(number),
                    format!("generation {number} rolled back; {serving}"),
                );
                Err(Refusal::new(
                    exit::FAILED,
                    format!("generation {number} failed and was rolled back ({serving}): {why}"),
                ))
            }
        }
    }

    /// Runs the plan's steps in order, journaled.
    pub(crate) async fn execute(
        self: &Arc<Self>,
        number: u64,
        generation: &Generation,
        plan: &Plan,
        progress: &Progress,
    ) -> Result<(), String> {
        let started = Instant::now();
        let sources = self.backup_sources(generation, plan);
        for (index, step) in plan.steps.iter().enumerate() {
            let action = action_name(step);
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let entry = |phase, message: Option<String>| NewJournalEntry {
                generation: number,
                step_index: index,
                phase,
                step: serde_json::to_value(step).expect("steps serialise"),
                message,
            };
            self.store
                .journal_append(&entry(JournalPhase::Begin, None))
                .map_err(|e| format!("cannot journal step {index} ({action}): {e}"))?;
            failpoint::hit(&format!("before:{action}"));
            match self
                .run_step(number, generation, step, started, &sources, progress)
                .await
            {
                Ok(()) => {
                    self.store
                        .journal_append(&entry(JournalPhase::End, None))
                        .map_err(|e| format!("cannot journal step {index} ({action}): {e}"))?;
                    failpoint::hit(&format!("after:{action}"));
                }
                Err(why) => {
                    let _ = self
                        .store
                        .journal_append(&entry(JournalPhase::Failed, Some(why.clone())));
                    return Err(why);
                }
            }
        }
        Ok(())
    }

    async fn run_step(
        self: &Arc<Self>,
        number: u64,
        generation: &Generation,
        step: &Step,
        started: Instant,
        sources: &BTreeMap<String, (u64, Generation)>,
        progress: &Progress,
    ) -> Result<(), String> {
        match step {
            Step::Backup {
                service,
                command,
                timeout,
            } => match sources.get(service) {
                Some(source) => {
                    self.run_backup(
                        number,
                        generation,
                        source,
                        service,
                        command,
                        Duration::from_millis(timeout.millis),
                        progress,
                    )
                    .await?;
                }
                None => self.event(
                    "service.backup-skipped",
                    format!("service/{service}"),
                    Some(number),
                    format!(
                        "backup of {service} skipped: no earlier generation of it is known to run it in"
                    ),
                ),
            },
            Step::CreateInstance {
                id,
                service,
                identity,
            } => {
                let ports = self
                    .create(number, generation, service, id, identity)
                    .await?;
                let ports: Vec<String> = ports.iter().map(|(n, p)| format!("{n}={p}")).collect();
                say(progress, format!("  + {id} started ({})", ports.join(", ")));
            }
            Step::AwaitHealthy { ids, deadline } => {
                self.await_healthy(ids, Duration::from_millis(deadline.millis))
                    .await?;
                say(
                    progress,
                    format!(
                        "  ✓ healthy: {} ({:.1} s)",
                        ids.join(", "),
                        started.elapsed().as_secs_f64()
                    ),
                );
            }
            Step::ShiftTraffic { service, weights } => {
                self.shift(service, weights)?;
                let shown: Vec<String> = weights
                    .iter()
                    .map(|(id, w)| format!("{id} {}%", f64::from(*w) / 100.0))
                    .collect();
                say(progress, format!("  ⇄ {service}: {}", shown.join(", ")));
                self.event(
                    "traffic.shifted",
                    format!("service/{service}"),
                    Some(number),
                    format!("{service} traffic: {}", shown.join(", ")),
                );
            }
            Step::Hold { service, duration } => {
                say(
                    progress,
                    format!(
                        "  … holding {service} for {} s (canary analysis)",
                        duration.millis / 1000
                    ),
                );
                self.hold_canary(number, service, Duration::from_millis(duration.millis))
                    .await?;
            }
            Step::Drain { ids, timeout } => {
                let timeout = Duration::from_millis(timeout.millis);
                let drains = ids.iter().map(|id| {
                    let proxy = self.proxy.clone();
                    let id = id.clone();
                    async move { (id.clone(), proxy.drain(&id, timeout).await) }
                });
                for (id, outcome) in futures_join(drains).await {
                    if let kiln_proxy::DrainOutcome::TimedOut { remaining } = outcome {
                        self.event(
                            "instance.drain-timeout",
                            format!("instance/{id}"),
                            Some(number),
                            format!(
                                "{id} still had {remaining} request(s) in flight after {} ms",
                                timeout.as_millis()
                            ),
                        );
                    }
                }
                say(progress, format!("  ⌛ drained {}", ids.join(", ")));
            }
            Step::DestroyInstance { id } => {
                let grace = self.grace_of(id, generation);
                self.destroy(id, Some(grace)).await?;
                self.event(
                    "instance.destroyed",
                    format!("instance/{id}"),
                    Some(number),
                    format!("destroyed {id}"),
                );
                say(progress, format!("  - {id} destroyed"));
            }
            Step::ConfigureRoute { name, route } => {
                self.configure_route(name, route, generation).await?;
                self.event(
                    "route.configured",
                    format!("route/{name}"),
                    Some(number),
                    format!(
                        "route {name} listens on {} for {}:{}",
                        route.listen, route.service, route.port
                    ),
                );
                say(progress, format!("  ~ route {name} on {}", route.listen));
            }
            Step::RemoveRoute { name } => {
                self.proxy
                    .remove_route(name)
                    .await
                    .map_err(|e| e.to_string())?;
                self.routes.lock().expect("routes").remove(name);
                self.route_pages.lock().expect("routes").remove(name);
                self.event(
                    "route.removed",
                    format!("route/{name}"),
                    Some(number),
                    format!("route {name} removed"),
                );
                say(progress, format!("  - route {name} removed"));
            }
        }
        Ok(())
    }

    /// For each service the plan backs up: the generation its current
    /// instances run (read before the plan stops them), else the active one.
    fn backup_sources(
        &self,
        generation: &Generation,
        plan: &Plan,
    ) -> BTreeMap<String, (u64, Generation)> {
        let mut sources = BTreeMap::new();
        for step in &plan.steps {
            let Step::Backup { service, .. } = step else {
                continue;
            };
            let identity = generation.instance_spec(service).identity();
            let running = self
                .store
                .list_instances(Some(service))
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.identity != identity.0)
                .map(|r| r.generation)
                .max();
            let number = running.or_else(|| {
                self.store
                    .active_generation()
                    .ok()
                    .flatten()
                    .map(|a| a.number)
            });
            if let Some(n) = number
                && let Ok(g) = load_generation(&self.store, n)
            {
                sources.insert(service.clone(), (n, g));
            }
        }
        sources
    }

    pub(crate) fn grace_of(&self, id: &str, generation: &Generation) -> Duration {
        let service = self.record(id).map(|r| r.service);
        service
            .and_then(|s| generation.spec.services.get(&s).map(|s| s.stop_grace))
            .map_or(Duration::from_secs(10), |d| Duration::from_millis(d.millis))
    }

    /// Sets every route of `service` to exactly these backends and records
    /// which instances are in rotation.
    pub(crate) fn shift(&self, service: &str, weights: &[(String, u32)]) -> Result<(), String> {
        for (name, route) in self.routes_of(service) {
            self.set_route_backends(&name, &route, weights)?;
        }
        let rotating: BTreeSet<&str> = weights
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(id, _)| id.as_str())
            .collect();
        let records = self
            .store
            .list_instances(Some(service))
            .map_err(|e| e.to_string())?;
        for rec in records {
            self.set_rotation(&rec.id, rotating.contains(rec.id.as_str()))?;
        }
        Ok(())
    }

    /// Waits until every instance in `ids` is healthy; fails at the
    /// deadline, or at once when one exits.
    pub(crate) async fn await_healthy(
        &self,
        ids: &[String],
        deadline: Duration,
    ) -> Result<(), String> {
        let until = tokio::time::Instant::now() + deadline;
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let mut waiting = Vec::new();
            for id in ids {
                let status = self
                    .record(id)
                    .and_then(|r| parse_status(&r.status))
                    .ok_or_else(|| format!("{id} is gone"))?;
                match status {
                    InstanceStatus::Healthy => {}
                    InstanceStatus::Exited { code } => {
                        let tail = self
                            .logs(id, 2048)
                            .await
                            .map(|(_, err)| crate::engine::last_line(&err))
                            .unwrap_or_default();
                        let code = code
                            .map_or_else(|| "by a signal".to_owned(), |c| format!("with code {c}"));
                        return Err(format!(
                            "{id} exited {code} before it became healthy{}",
                            if tail.is_empty() {
                                String::new()
                            } else {
                                format!(" (last output: {tail})")
                            }
                        ));
                    }
                    InstanceStatus::Starting | InstanceStatus::Unhealthy => {
                        waiting.push(id.as_str())
                    }
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(until, changed.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "{} not healthy within the deadline of {} s",
                    waiting.join(", "),
                    deadline.as_secs_f64()
                ));
            }
        }
    }

    /// Canary hold: watches the service's new instances and the proxy's
    /// error rate for them; fails early when they sicken.
    async fn hold_canary(
        &self,
        number: u64,
        service: &str,
        duration: Duration,
    ) -> Result<(), String> {
        let routes = self.routes_of(service);
        let baseline = self.canary_counts(number, service, &routes);
        let until = tokio::time::Instant::now() + duration;
        loop {
            for rec in self
                .store
                .list_instances(Some(service))
                .map_err(|e| e.to_string())?
            {
                if rec.generation != number {
                    continue;
                }
                match parse_status(&rec.status) {
                    Some(InstanceStatus::Exited { .. }) | Some(InstanceStatus::Unhealthy) => {
                        return Err(format!(
                            "canary {} is {} during the hold",
                            rec.id, rec.status
                        ));
                    }
                    _ => {}
                }
            }
            let (requests, errors) = self.canary_counts(number, service, &routes);
            let (requests, errors) = (requests - baseline.0, errors - baseline.1);
            if requests >= CANARY_MIN_REQUESTS && errors * 100 > requests * CANARY_MAX_ERROR_PERCENT
            {
                return Err(format!(
                    "canary error rate {errors}/{requests} (over {CANARY_MAX_ERROR_PERCENT}%) from the proxy"
                ));
            }
            if tokio::time::Instant::now() >= until {
                return Ok(());
            }
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_millis(250)),
            )
            .await;
        }
    }

    /// Requests and 5xx answers (with connect errors) of this generation's
    /// instances of `service`, over its routes.
    fn canary_counts(
        &self,
        number: u64,
        service: &str,
        routes: &[(String, kiln_spec::model::Route)],
    ) -> (u64, u64) {
        let ids: BTreeSet<String> = self
            .store
            .list_instances(Some(service))
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.generation == number)
            .map(|r| r.id)
            .collect();
        let mut total = (0, 0);
        for (name, _) in routes {
            if let Some(stats) = self.proxy.stats(name) {
                for (id, b) in &stats.per_backend {
                    if ids.contains(id) {
                        total.0 += b.requests;
                        total.1 += b.status_5xx + b.connect_errors;
                    }
                }
            }
        }
        total
    }

    /// Puts back what served before generation `number`: traffic to the
    /// instances of other generations, its own instances drained and
    /// destroyed, then the active generation converged.
    pub(crate) async fn revert(self: &Arc<Self>, number: u64, progress: &Progress) {
        let records = self.store.list_instances(None).unwrap_or_default();
        let (new, old): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|r| r.generation == number);
        let services: BTreeSet<String> = new.iter().map(|r| r.service.clone()).collect();
        for service in &services {
            let serving: Vec<&kiln_state::InstanceRecord> = old
                .iter()
                .filter(|r| &r.service == service)
                .filter(|r| parse_status(&r.status).is_some_and(InstanceStatus::is_live))
                .collect();
            let preferred: Vec<&&kiln_state::InstanceRecord> =
                serving.iter().filter(|r| r.in_rotation).collect();
            let chosen: Vec<String> = if preferred.is_empty() {
                serving.iter().map(|r| r.id.clone()).collect()
            } else {
                preferred.iter().map(|r| r.id.clone()).collect()
            };
            let weight = kiln_plan::TRAFFIC_TOTAL / u32::try_from(chosen.len().max(1)).unwrap_or(1);
            let weights: Vec<(String, u32)> = chosen.into_iter().map(|id| (id, weight)).collect();
            if let Err(e) = self.shift(service, &weights) {
                self.event(
                    "rollback.error",
                    format!("service/{service}"),
                    Some(number),
                    e,
                );
            }
        }
        let drains = new.iter().map(|r| {
            let proxy = self.proxy.clone();
            let id = r.id.clone();
            async move { proxy.drain(&id, Duration::from_secs(30)).await }
        });
        futures_join(drains).await;
        // Each service's own stop_grace, as the failed generation declares it.
        let failed = load_generation(&self.store, number).ok();
        for rec in &new {
            let grace = failed
                .as_ref()
                .map_or(Duration::from_secs(10), |g| self.grace_of(&rec.id, g));
            match self.destroy(&rec.id, Some(grace)).await {
                Ok(()) => say(progress, format!("  - {} destroyed", rec.id)),
                Err(e) => self.event(
                    "rollback.error",
                    format!("instance/{}", rec.id),
                    Some(number),
                    e,
                ),
            }
        }
        // Converge on what was active before (instances that a rolling
        // update already replaced come back; routes return to its form).
        let target = match self.active() {
            Ok(Some((n, g))) => Some((n, g)),
            Ok(None) => None,
            Err(e) => {
                self.event("rollback.error", "daemon", Some(number), e.to_string());
                return;
            }
        };
        let (target_number, target) = match target {
            Some(t) => t,
            None => {
                // Nothing was active: remove what the failed generation set up.
                let failed = self
                    .store
                    .get_generation(number)
                    .ok()
                    .flatten()
                    .and_then(|r| decode_generation(&self.store, &r).ok());
                let Some(mut empty) = failed else { return };
                empty.spec.services.clear();
                empty.spec.routes.clear();
                empty.resolved = kiln_plan::Resolved::default();
                (number, empty)
            }
        };
        match self.plan_for(&target) {
            Ok(plan) if !plan.is_empty() => {
                if let Err(e) = self.execute(target_number, &target, &plan, progress).await {
                    self.event(
                        "rollback.error",
                        format!("generation/{target_number}"),
                        Some(number),
                        format!("converging back failed: {e}; the reconciler keeps trying"),
                    );
                }
            }
            Ok(_) => {}
            Err(e) => self.event("rollback.error", "daemon", Some(number), e.to_string()),
        }
    }

    /// After a restart: finishes a rollout that was in flight.
    pub(crate) async fn resume_interrupted(self: Arc<Self>) {
        self.resume().await;
        self.resume_pending
            .store(false, std::sync::atomic::Ordering::Release);
    }

    async fn resume(self: &Arc<Self>) {
        let Ok(generations) = self.store.list_generations() else {
            return;
        };
        let Some(interrupted) = generations.iter().rev().find(|g| {
            matches!(
                g.status,
                Some(GenerationStatus::RollingOut) | Some(GenerationStatus::Pending)
            )
        }) else {
            return;
        };
        let number = interrupted.number;
        let Ok(generation) = load_generation(&self.store, number) else {
            return;
        };
        // A generation older than the active one was overtaken while it
        // was interrupted: it is never rolled out over a newer one.
        if let Ok(Some(active)) = self.store.active_generation()
            && active.number > number
        {
            let why = format!(
                "interrupted, then overtaken by generation {}",
                active.number
            );
            let _ = self
                .store
                .set_generation_status(number, GenerationStatus::Failed, &why);
            self.event(
                "generation.failed",
                format!("generation/{number}"),
                Some(number),
                why,
            );
            return;
        }
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        // The dead daemon's lease is taken over at once when its pid is
        // gone; otherwise wait for it to expire.
        let mut attempts = 0;
        let _held = loop {
            match self.hold("resume after restart", true).await {
                Ok(held) => break held,
                Err(refusal) if attempts < 60 => {
                    if attempts == 0 {
                        self.event(
                            "generation.resume-waiting",
                            format!("generation/{number}"),
                            Some(number),
                            format!("waiting to resume generation {number}: {}", refusal.message),
                        );
                    }
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(refusal) => {
                    self.event(
                        "generation.resume-failed",
                        format!("generation/{number}"),
                        Some(number),
                        refusal.message,
                    );
                    return;
                }
            }
        };
        let step = self
            .store
            .journal_for(number)
            .ok()
            .and_then(|j| {
                j.last()
                    .map(|e| format!(" (last journaled: step {} {:?})", e.step_index, e.phase))
            })
            .unwrap_or_default();
        self.event(
            "generation.resumed",
            format!("generation/{number}"),
            Some(number),
            format!("resuming the rollout of generation {number} interrupted by a restart{step}"),
        );
        if let Err(e) = self.check_runnable(&generation, &BTreeMap::new()).await {
            let _ = self
                .store
                .set_generation_status(number, GenerationStatus::Failed, &e.message);
            self.event(
                "generation.failed",
                format!("generation/{number}"),
                Some(number),
                e.message,
            );
            self.revert(number, &tx).await;
            return;
        }
        let _ = self.rollout_generation(number, &generation, &tx).await;
    }
}

/// Canary analysis: at least this many requests before judging…
const CANARY_MIN_REQUESTS: u64 = 20;
/// …and fail above this share of 5xx answers and connect errors.
const CANARY_MAX_ERROR_PERCENT: u64 = 10;

pub(crate) fn action_name(step: &Step) -> &'static str {
    match step {
        Step::CreateInstance { .. } => "create-instance",
        Step::AwaitHealthy { .. } => "await-healthy",
        Step::ShiftTraffic { .. } => "shift-traffic",
        Step::Hold { .. } => "hold",
        Step::Drain { .. } => "drain",
        Step::DestroyInstance { .. } => "destroy-instance",
        Step::ConfigureRoute { .. } => "configure-route",
        Step::RemoveRoute { .. } => "remove-route",
        Step::Backup { .. } => "backup",
    }
}

/// Runs futures concurrently and collects their outputs in order.
pub(crate) async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("joined tasks do not panic"));
    }
    out
}
