//! The reconciler: keeps what runs equal to the active generation.
//!
//! Woken by an instance that exits or turns unhealthy (and every
//! `drift_interval` for a drift check), it plans the active generation
//! against what runs and executes the plan: a dead instance is destroyed and
//! a fresh one created (new id, same image), never restarted in place.
//! Replacements of a service whose instances keep dying young back off
//! exponentially (first one at once, then 200 ms doubling to 30 s) and the
//! crash loop is reported as an event.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_plan::{InstanceSpec, InstanceStatus, ServiceAction};
use kiln_runtime::{Drift, Driver, InstanceState};
use kiln_spec::model::DriftPolicy;

use crate::api::DriftFinding;
use crate::engine::Engine;
use crate::instance::file_digest;
use crate::project::parse_status;

/// An instance that dies within this long of its start counts toward a
/// crash loop.
const YOUNG: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct ReconcileState {
    /// Per service: replacements in a row of instances that died young.
    failures: HashMap<String, u32>,
    /// Per service: no replacement before this instant.
    not_before: HashMap<String, Instant>,
    /// Drift already reported (instance id, what), so `report` does not
    /// repeat itself every interval.
    reported: BTreeSet<(String, String)>,
}

impl Engine {
    pub(crate) async fn reconcile_loop(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let mut next_drift = tokio::time::Instant::now() + self.opts.drift_interval;
        loop {
            let drift_due = tokio::select! {
                _ = self.wake.notified() => false,
                _ = tokio::time::sleep_until(next_drift) => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            if drift_due {
                next_drift = tokio::time::Instant::now() + self.opts.drift_interval;
            }
            let guard = self.rollout.lock().await;
            if *self.shutdown.borrow() {
                return;
            }
            if drift_due {
                self.check_drift(true).await;
            }
            let retry = self.heal().await;
            drop(guard);
            if let Some(after) = retry {
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    this.wake.notify_one();
                });
            }
        }
    }

    /// One reconciliation pass; returns when to try again if a backoff
    /// delayed some replacement.
    /// A generation still `rolling-out` (or `pending`) while the reconciler
    /// holds the rollout lock is not being rolled out: its end could not be
    /// recorded (a full disk) after it was reverted. Record it now.
    fn settle_stale_generations(&self) {
        if self
            .resume_pending
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let Ok(generations) = self.store.list_generations() else {
            return;
        };
        for g in generations {
            if matches!(
                g.status,
                Some(kiln_state::GenerationStatus::RollingOut)
                    | Some(kiln_state::GenerationStatus::Pending)
            ) {
                let why = "its rollout ended without being recorded (the state store was unwritable); it was reverted";
                if self
                    .store
                    .set_generation_status(g.number, kiln_state::GenerationStatus::Failed, why)
                    .is_ok()
                {
                    self.event(
                        "generation.failed",
                        format!("generation/{}", g.number),
                        Some(g.number),
                        format!("generation {}: {why}", g.number),
                    );
                }
            }
        }
    }

    async fn heal(self: &Arc<Self>) -> Option<Duration> {
        self.settle_stale_generations();
        let (number, generation) = match self.active() {
            Ok(Some(active)) => active,
            Ok(None) => return None,
            Err(e) => {
                self.event("reconcile.error", "daemon", None, e.to_string());
                return Some(BACKOFF_CAP);
            }
        };
        let plan = match self.plan_for(&generation) {
            Ok(plan) => plan,
            Err(e) => {
                self.event("reconcile.error", "daemon", Some(number), e.to_string());
                return Some(BACKOFF_CAP);
            }
        };
        if plan.is_empty() {
            return None;
        }
        // Backoff: is any service that needs healing still waiting?
        let now = Instant::now();
        let mut wait = None;
        {
            let state = self.reconcile.lock().expect("reconcile");
            for service in &plan.services {
                if let Some(&t) = state.not_before.get(&service.service)
                    && t > now
                {
                    wait = Some(wait.map_or(t - now, |w: Duration| w.min(t - now)));
                }
            }
        }
        if let Some(w) = wait {
            return Some(w);
        }
        for service in &plan.services {
            let why = service.reasons.join("; ");
            let kind = match service.action {
                ServiceAction::Heal { .. } => "heal.replace",
                _ => "reconcile.converge",
            };
            self.event(
                kind,
                format!("service/{}", service.service),
                Some(number),
                format!("{}: {why}", service.service),
            );
            if let ServiceAction::Heal { ids } = &service.action {
                self.note_heal(&service.service, ids);
            }
        }
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        match self.execute(number, &generation, &plan, &tx).await {
            Ok(()) => None,
            Err(why) => {
                self.event(
                    "heal.failed",
                    "daemon",
                    Some(number),
                    format!("healing failed: {why}"),
                );
                for service in &plan.services {
                    self.note_heal(&service.service, &[]);
                }
                Some(BACKOFF_FIRST)
            }
        }
    }

    /// Counts a replacement toward the service's crash-loop backoff.
    fn note_heal(&self, service: &str, ids: &[String]) {
        let young = {
            let live = self.live.lock().expect("live");
            ids.is_empty()
                || ids
                    .iter()
                    .any(|id| live.get(id).is_none_or(|l| l.started.elapsed() < YOUNG))
        };
        let mut state = self.reconcile.lock().expect("reconcile");
        let failures = state.failures.entry(service.to_owned()).or_default();
        if young {
            *failures += 1;
        } else {
            *failures = 0;
        }
        let failures = *failures;
        if failures >= 2 {
            let delay = BACKOFF_FIRST
                .saturating_mul(1 << (failures - 2).min(16))
                .min(BACKOFF_CAP);
            state
                .not_before
                .insert(service.to_owned(), Instant::now() + delay);
            drop(state);
            if failures >= 3 {
                self.event(
                    "service.crash-loop",
                    format!("service/{service}"),
                    None,
                    format!(
                        "{service} is crash-looping: {failures} replacements in a row died within {} s of starting; next replacement in {:.1} s",
                        YOUNG.as_secs(),
                        delay.as_secs_f64()
                    ),
                );
            }
        } else {
            state.not_before.remove(service);
        }
    }

    /// Compares every instance with what was declared. With `act`, drifted
    /// instances of `drift = "replace"` services are marked for replacement
    /// (the reconciler replaces them) and unknown instances are removed.
    pub async fn check_drift(self: &Arc<Self>, act: bool) -> Vec<DriftFinding> {
        let mut findings = Vec::new();
        let active = self.active_generation();
        let records = self.store.list_instances(None).unwrap_or_default();
        let listed = self.blocking(|d| d.list()).await;
        if act && let Ok(listed) = &listed {
            // Fences of instances the driver no longer has are stale.
            let mut ids: std::collections::BTreeSet<String> =
                listed.iter().map(|i| i.id.clone()).collect();
            ids.extend(self.backups.lock().expect("backups").iter().cloned());
            self.sweep_fences(&ids);
        }
        let listed = listed.unwrap_or_default();
        let backups = self.backups.lock().expect("backups").clone();
        for info in &listed {
            if records.iter().all(|r| r.id != info.id) && !backups.contains(&info.id) {
                let removed = act
                    && self
                        .destroy(&info.id, Some(Duration::from_secs(2)))
                        .await
                        .is_ok();
                let what = "runs with kiln's labels but kiln never recorded it".to_owned();
                self.event(
                    "drift.orphan",
                    format!("instance/{}", info.id),
                    None,
                    format!(
                        "{} {what}{}",
                        info.id,
                        if removed { ": removed" } else { "" }
                    ),
                );
                findings.push(DriftFinding {
                    subject: format!("orphan/{}", info.id),
                    what,
                    action: if removed { "removed" } else { "report" }.into(),
                });
            }
        }
        for rec in records {
            if !parse_status(&rec.status).is_some_and(|s| s.is_live()) {
                continue;
            }
            let Ok(spec) = serde_json::from_value::<InstanceSpec>(rec.spec.clone()) else {
                continue;
            };
            let mut found = self.instance_drift(&rec.id, &spec).await;
            if found.is_empty() {
                continue;
            }
            found.sort();
            let policy = active
                .as_ref()
                .and_then(|(_, g)| g.spec.services.get(&rec.service))
                .map_or(DriftPolicy::Replace, |s| s.drift);
            let replace = policy == DriftPolicy::Replace;
            for what in &found {
                findings.push(DriftFinding {
                    subject: format!("instance/{}", rec.id),
                    what: what.clone(),
                    action: if replace { "replace" } else { "report" }.into(),
                });
            }
            if !act {
                continue;
            }
            let summary = found.join("; ");
            if replace && let Some((_, generation)) = &active {
                // Changed content in the file store would be mounted again
                // by the replacement: put the declared bytes back first.
                for (target, digest) in &spec.files {
                    let changed = found
                        .iter()
                        .any(|w| w.starts_with(&format!("file {target} ")));
                    if changed && let Err(e) = self.materials.restore_file(generation, digest) {
                        self.event(
                            "drift.error",
                            format!("instance/{}", rec.id),
                            Some(rec.generation),
                            e,
                        );
                    }
                }
            }
            if replace {
                self.event(
                    "drift.detected",
                    format!("instance/{}", rec.id),
                    Some(rec.generation),
                    format!("{} drifted ({summary}): replacing it", rec.id),
                );
                self.set_status(&rec.id, InstanceStatus::Unhealthy);
                self.wake.notify_one();
            } else {
                let fresh: Vec<String> = {
                    let mut state = self.reconcile.lock().expect("reconcile");
                    found
                        .iter()
                        .filter(|w| state.reported.insert((rec.id.clone(), (*w).clone())))
                        .cloned()
                        .collect()
                };
                if !fresh.is_empty() {
                    self.event(
                        "drift.detected",
                        format!("instance/{}", rec.id),
                        Some(rec.generation),
                        format!(
                            "{} drifted ({}): reported only (drift = \"report\")",
                            rec.id,
                            fresh.join("; ")
                        ),
                    );
                }
            }
        }
        findings
    }

    /// What differs in one instance: the driver's own check (process, root),
    /// the mounted files' content, and the environment of its process.
    async fn instance_drift(&self, id: &str, spec: &InstanceSpec) -> Vec<String> {
        let mut found = Vec::new();
        let id_c = id.to_owned();
        let (verify, info) = self
            .blocking(move |d| (d.verify(&id_c), d.inspect(&id_c)))
            .await;
        match verify {
            Ok(drifts) => found.extend(drifts.iter().map(describe)),
            Err(e) => found.push(format!("cannot be verified: {e}")),
        }
        for (target, digest) in &spec.files {
            let path = self.materials.files_dir().join(digest.hex());
            match file_digest(&path) {
                Ok(d) if d == digest.0 => {}
                Ok(d) => found.push(format!(
                    "file {target} changed (now {d}, declared {digest})"
                )),
                Err(e) => found.push(format!("file {target} is unreadable: {e}")),
            }
        }
        if let Ok(kiln_runtime::InstanceInfo {
            state: InstanceState::Running { pid: Some(pid) },
            ..
        }) = info
            && matches!(self.driver.name(), "sandbox" | "process")
            && let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ"))
        {
            let vars: HashMap<&[u8], &[u8]> = environ
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let at = kv.iter().position(|b| *b == b'=')?;
                    Some((&kv[..at], &kv[at + 1..]))
                })
                .collect();
            // Only judge the process kiln started (the supervisor's pid
            // carries no instance env).
            if vars.get(&b"KILN_INSTANCE"[..]) == Some(&id.as_bytes()) {
                for (k, v) in &spec.env {
                    if vars.get(k.as_bytes()) != Some(&v.as_bytes()) {
                        found.push(format!("env {k} is not as declared"));
                    }
                }
            }
        }
        found
    }
}

fn describe(drift: &Drift) -> String {
    match drift {
        Drift::RootChanged { path, change } => format!("root file {path} {change}"),
        Drift::ProcessReplaced { expected, found } => {
            format!("process replaced (started {expected:?}, found {found:?})")
        }
        Drift::Missing => "missing from the runtime".into(),
        Drift::Other { what } => what.clone(),
    }
}
