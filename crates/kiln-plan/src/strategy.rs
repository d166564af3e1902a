//! The deploy strategies: in which order a service's old instances are
//! replaced by new ones.
//!
//! Every strategy starts the same way: instances that exited or are
//! unhealthy (of any identity) serve nothing and are retired first, as are
//! instances of the new identity beyond `replicas` (left by an interrupted
//! rollout whose replica count was lowered since). Instances of the new
//! identity that are still alive count as already replaced.

use std::collections::{HashSet, VecDeque};

use kiln_spec::model::{Duration, Strategy};

use crate::emitter::{Emitter, ordinal};
use crate::generation::Digest;
use crate::observed::{InstanceStatus, ObservedInstance};

/// A service whose instances must be replaced; lists sorted by id.
#[derive(Debug)]
pub(crate) struct Replacement<'a, 'o> {
    pub(crate) identity: &'a Digest,
    pub(crate) replicas: usize,
    /// Starting or healthy, with the desired identity.
    pub(crate) current_live: Vec<&'o ObservedInstance>,
    /// Starting or healthy, with an older identity.
    pub(crate) stale_live: Vec<&'o ObservedInstance>,
    /// Exited or unhealthy, any identity.
    pub(crate) dead: Vec<&'o ObservedInstance>,
}

pub(crate) fn replace(em: &mut Emitter<'_, '_>, strategy: &Strategy, mut rep: Replacement<'_, '_>) {
    let observed_live = rep.current_live.len() + rep.stale_live.len();
    let excess = rep.current_live.len().saturating_sub(rep.replicas);
    let excess = pick_victims(&mut rep.current_live, excess);
    rep.dead.extend(excess);
    match strategy {
        Strategy::Rolling {
            max_surge,
            max_unavailable,
        } => rolling(
            em,
            rep,
            observed_live,
            *max_surge as usize,
            *max_unavailable as usize,
        ),
        Strategy::BlueGreen => blue_green(em, rep),
        Strategy::Canary { steps, hold } => canary(em, rep, steps, *hold),
        Strategy::Recreate => recreate(em, rep),
    }
}

/// Takes `count` instances out of `live` to destroy: still-starting ones
/// first (they serve nothing yet), then the highest ordinals.
pub(crate) fn pick_victims<'o>(
    live: &mut Vec<&'o ObservedInstance>,
    count: usize,
) -> Vec<&'o ObservedInstance> {
    if count == 0 {
        return Vec::new();
    }
    let mut ranked = live.clone();
    ranked.sort_by_key(|i| {
        let keep = i.status == InstanceStatus::Healthy;
        std::cmp::Reverse((!keep, ordinal(&i.id), i.id.clone()))
    });
    ranked.truncate(count);
    ranked.sort_by(|a, b| a.id.cmp(&b.id));
    let chosen: HashSet<&str> = ranked.iter().map(|i| i.id.as_str()).collect();
    live.retain(|i| !chosen.contains(i.id.as_str()));
    ranked
}

fn ids(instances: &[&ObservedInstance]) -> Vec<String> {
    instances.iter().map(|i| i.id.clone()).collect()
}

fn starting(instances: &[&ObservedInstance]) -> Vec<String> {
    instances
        .iter()
        .filter(|i| i.status == InstanceStatus::Starting)
        .map(|i| i.id.clone())
        .collect()
}

/// Waves that never exceed `max(observed live, replicas + max_surge)`
/// instances alive nor drop below `replicas - max_unavailable` available.
/// Each wave retires as many old instances as availability allows, then
/// creates as many new ones as the surge allows, awaits and admits them.
fn rolling(
    em: &mut Emitter<'_, '_>,
    rep: Replacement<'_, '_>,
    observed_live: usize,
    max_surge: usize,
    max_unavailable: usize,
) {
    // Validation rejects 0/0 (no wave could make progress); plan a surge
    // of one rather than loop if it ever gets here.
    let max_surge = if max_surge == 0 && max_unavailable == 0 {
        1
    } else {
        max_surge
    };
    let replicas = rep.replicas;
    let alive_cap = observed_live.max(replicas + max_surge);
    let min_available = replicas.saturating_sub(max_unavailable);

    em.retire(&rep.dead);
    em.await_healthy(starting(&rep.current_live));
    let current = ids(&rep.current_live);
    em.admit(&current);
    let mut new_count = current.len();

    // Old instances that serve nothing go first; they cost no availability.
    let mut old = rep.stale_live;
    old.sort_by_key(|i| em.is_available(i));
    let mut old = VecDeque::from(old);

    while !old.is_empty() || new_count < replicas {
        let mut available = new_count + old.iter().filter(|i| em.is_available(i)).count();
        let mut wave = Vec::new();
        while let Some(&next) = old.front() {
            if em.is_available(next) {
                if available <= min_available {
                    break;
                }
                available -= 1;
            }
            wave.push(next);
            old.pop_front();
        }
        em.retire(&wave);

        let alive = new_count + old.len();
        let create = (replicas - new_count).min(alive_cap.saturating_sub(alive));
        if create > 0 {
            let fresh = em.create(rep.identity, create);
            em.await_healthy(fresh.clone());
            em.admit(&fresh);
            new_count += create;
        } else if wave.is_empty() {
            // Unreachable with max_surge + max_unavailable > 0: a full wave
            // means every old instance is available, so more than
            // min_available of them are. Retire one rather than loop.
            if let Some(next) = old.pop_front() {
                em.retire(&[next]);
            }
        }
    }
}

/// Start a full new set, move all traffic at once, retire the old set.
fn blue_green(em: &mut Emitter<'_, '_>, rep: Replacement<'_, '_>) {
    em.retire(&rep.dead);
    let mut pending = starting(&rep.current_live);
    let mut green = ids(&rep.current_live);
    let fresh = em.create(rep.identity, rep.replicas - green.len());
    pending.extend(fresh.iter().cloned());
    green.extend(fresh);
    em.await_healthy(pending);
    em.set_rotation(&green);
    em.retire(&rep.stale_live);
}

/// Retire every old instance before the first new one starts (what
/// exclusive volumes need), accepting the downtime in between.
fn recreate(em: &mut Emitter<'_, '_>, rep: Replacement<'_, '_>) {
    let mut old = rep.dead;
    old.extend(rep.stale_live);
    old.sort_by(|a, b| a.id.cmp(&b.id));
    em.retire(&old);
    let mut pending = starting(&rep.current_live);
    let mut fresh = ids(&rep.current_live);
    let created = em.create(rep.identity, rep.replicas - fresh.len());
    pending.extend(created.iter().cloned());
    fresh.extend(created);
    em.await_healthy(pending);
    em.admit(&fresh);
}

/// For each weight: enough new instances for it (at least one), the split,
/// a hold; then the rest of the new set, all traffic to it, and the old
/// set retired.
fn canary(em: &mut Emitter<'_, '_>, rep: Replacement<'_, '_>, weights: &[u32], hold: Duration) {
    em.retire(&rep.dead);
    em.await_healthy(starting(&rep.current_live));
    let replicas = rep.replicas;
    let mut fresh = ids(&rep.current_live);
    for &percent in weights {
        let wanted = (replicas * percent as usize)
            .div_ceil(100)
            .clamp(1, replicas);
        if wanted > fresh.len() {
            let created = em.create(rep.identity, wanted - fresh.len());
            em.await_healthy(created.clone());
            fresh.extend(created);
        }
        em.split(&fresh, percent);
        em.hold(hold);
    }
    let created = em.create(rep.identity, replicas - fresh.len());
    em.await_healthy(created.clone());
    fresh.extend(created);
    em.set_rotation(&fresh);
    em.retire(&rep.stale_live);
}
