//! Writes the steps of one service while tracking what they do to it: which
//! instances are in its backend set and which ids are taken.
//!
//! Strategies are written against these few verbs (create, await, admit,
//! retire, …) so that each keeps the guarantees by construction: traffic
//! only ever moves to awaited instances, and an instance is taken out of
//! traffic and drained before it is destroyed.

use std::collections::{BTreeSet, HashSet};

use kiln_spec::model::Duration;

use crate::generation::Digest;
use crate::observed::{InstanceStatus, ObservedInstance};
use crate::steps::{Step, TRAFFIC_TOTAL};

/// Hands out new instance ids: `{service}-{identity short 8 hex}-{n}` with
/// the smallest `n` whose id no observed instance uses (destroyed ones
/// included, so an id never names two different instances within a plan).
#[derive(Debug)]
pub(crate) struct IdAllocator<'a> {
    taken: HashSet<&'a str>,
}

impl<'a> IdAllocator<'a> {
    pub(crate) fn new(instances: &'a [ObservedInstance]) -> Self {
        IdAllocator {
            taken: instances.iter().map(|i| i.id.as_str()).collect(),
        }
    }

    /// `count` fresh ids for `identity`, starting the search at `*next`
    /// (which is left past the last id handed out, so ids created earlier
    /// in the same plan are never reused).
    fn allocate(
        &self,
        service: &str,
        identity: &Digest,
        next: &mut u64,
        count: usize,
    ) -> Vec<String> {
        let prefix = format!("{service}-{}-", identity.short(8));
        let mut ids = Vec::with_capacity(count);
        while ids.len() < count {
            let id = format!("{prefix}{next}");
            *next += 1;
            if !self.taken.contains(id.as_str()) {
                ids.push(id);
            }
        }
        ids
    }
}

/// The numeric suffix of an instance id, if it has one.
pub(crate) fn ordinal(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}

/// How a service stands with the proxy while its instance steps run (after
/// the route steps that precede them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Traffic {
    /// No route targets it: no traffic step is written, `in_rotation` means
    /// nothing.
    #[default]
    Unrouted,
    /// Routed, and was throughout the route steps: its observed
    /// `in_rotation` flags still hold.
    Steady,
    /// Routed, but was without a route at some point (new, or retargeted):
    /// nothing of it is in rotation.
    Fresh,
}

/// The service's deploy timings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) deadline: Duration,
    pub(crate) drain_timeout: Duration,
}

/// The step writer for one service.
#[derive(Debug)]
pub(crate) struct Emitter<'p, 'o> {
    service: &'p str,
    routed: bool,
    deadline: Duration,
    drain_timeout: Duration,
    /// Instances of the service in its backend set, as of the last step.
    rotation: BTreeSet<String>,
    /// Whether the last traffic shift gave unequal shares (a canary split).
    skewed: bool,
    next_ordinal: u64,
    /// Length of `steps` when this service started.
    first_step: usize,
    steps: &'p mut Vec<Step>,
    ids: &'p IdAllocator<'o>,
    pub(crate) creates: Vec<String>,
    pub(crate) destroys: Vec<String>,
}

impl<'p, 'o> Emitter<'p, 'o> {
    pub(crate) fn new(
        service: &'p str,
        traffic: Traffic,
        timing: Timing,
        instances: &[&ObservedInstance],
        steps: &'p mut Vec<Step>,
        ids: &'p IdAllocator<'o>,
    ) -> Self {
        let rotation = if traffic == Traffic::Steady {
            instances
                .iter()
                .filter(|i| i.in_rotation)
                .map(|i| i.id.clone())
                .collect()
        } else {
            BTreeSet::new()
        };
        Emitter {
            service,
            routed: traffic != Traffic::Unrouted,
            deadline: timing.deadline,
            drain_timeout: timing.drain_timeout,
            rotation,
            skewed: false,
            next_ordinal: 0,
            first_step: steps.len(),
            steps,
            ids,
            creates: Vec::new(),
            destroys: Vec::new(),
        }
    }

    pub(crate) fn routed(&self) -> bool {
        self.routed
    }

    pub(crate) fn in_rotation(&self, id: &str) -> bool {
        self.rotation.contains(id)
    }

    pub(crate) fn wrote_steps(&self) -> bool {
        self.steps.len() > self.first_step
    }

    /// Whether `instance` serves: healthy and, for a routed service, in
    /// its backend set.
    pub(crate) fn is_available(&self, instance: &ObservedInstance) -> bool {
        instance.status == InstanceStatus::Healthy
            && (!self.routed || self.rotation.contains(&instance.id))
    }

    /// Creates `count` new instances of `identity`; returns their ids.
    pub(crate) fn create(&mut self, identity: &Digest, count: usize) -> Vec<String> {
        let ids = self
            .ids
            .allocate(self.service, identity, &mut self.next_ordinal, count);
        for id in &ids {
            self.steps.push(Step::CreateInstance {
                id: id.clone(),
                service: self.service.to_owned(),
                identity: identity.clone(),
            });
        }
        self.creates.extend(ids.iter().cloned());
        ids
    }

    pub(crate) fn await_healthy(&mut self, ids: Vec<String>) {
        if !ids.is_empty() {
            self.steps.push(Step::AwaitHealthy {
                ids,
                deadline: self.deadline,
            });
        }
    }

    /// Adds awaited instances to the backend set.
    pub(crate) fn admit<'i>(&mut self, ids: impl IntoIterator<Item = &'i String>) {
        if !self.routed {
            return;
        }
        let mut changed = false;
        for id in ids {
            changed |= self.rotation.insert(id.clone());
        }
        if changed || self.skewed {
            self.shift_equal();
        }
    }

    /// Makes the backend set exactly `ids`, with equal shares.
    pub(crate) fn set_rotation(&mut self, ids: &[String]) {
        if !self.routed {
            return;
        }
        let set: BTreeSet<String> = ids.iter().cloned().collect();
        if set != self.rotation || self.skewed {
            self.rotation = set;
            self.shift_equal();
        }
    }

    /// Canary split: `fresh` (added to the backend set) share `percent` of
    /// the traffic, the rest of the set shares the remainder.
    pub(crate) fn split(&mut self, fresh: &[String], percent: u32) {
        if !self.routed {
            return;
        }
        self.rotation.extend(fresh.iter().cloned());
        let fresh: BTreeSet<&String> = fresh.iter().collect();
        let (new, old): (Vec<&String>, Vec<&String>) =
            self.rotation.iter().partition(|id| fresh.contains(id));
        if new.is_empty() || old.is_empty() {
            self.shift_equal();
            return;
        }
        let new_share = TRAFFIC_TOTAL / 100 * percent.min(100);
        let mut weights = spread(&new, new_share);
        weights.extend(spread(&old, TRAFFIC_TOTAL - new_share));
        weights.sort();
        self.skewed = true;
        self.shift(weights);
    }

    pub(crate) fn hold(&mut self, duration: Duration) {
        self.steps.push(Step::Hold {
            service: self.service.to_owned(),
            duration,
        });
    }

    /// Takes `victims` out of traffic, drains those whose process still
    /// runs, and destroys them all.
    pub(crate) fn retire(&mut self, victims: &[&ObservedInstance]) {
        if victims.is_empty() {
            return;
        }
        if self.routed {
            let mut changed = false;
            for victim in victims {
                changed |= self.rotation.remove(&victim.id);
            }
            if changed {
                self.shift_equal();
            }
        }
        let draining: Vec<String> = victims
            .iter()
            .filter(|v| !matches!(v.status, InstanceStatus::Exited { .. }))
            .map(|v| v.id.clone())
            .collect();
        if !draining.is_empty() {
            self.steps.push(Step::Drain {
                ids: draining,
                timeout: self.drain_timeout,
            });
        }
        for victim in victims {
            self.steps.push(Step::DestroyInstance {
                id: victim.id.clone(),
            });
            self.destroys.push(victim.id.clone());
        }
    }

    fn shift_equal(&mut self) {
        let ids: Vec<&String> = self.rotation.iter().collect();
        let weights = spread(&ids, TRAFFIC_TOTAL);
        self.skewed = false;
        self.shift(weights);
    }

    /// Writes a traffic step; one that directly follows another of this
    /// service replaces it, since nothing could have happened in between.
    fn shift(&mut self, weights: Vec<(String, u32)>) {
        let ours = self.steps.len() > self.first_step;
        match self.steps.last_mut() {
            Some(Step::ShiftTraffic { weights: last, .. }) if ours => *last = weights,
            _ => self.steps.push(Step::ShiftTraffic {
                service: self.service.to_owned(),
                weights,
            }),
        }
    }
}

/// `share` spread over `ids` as evenly as integers allow; the first ids (in
/// the given order) get the remainder, so the result is deterministic.
fn spread(ids: &[&String], share: u32) -> Vec<(String, u32)> {
    let n = u32::try_from(ids.len()).expect("fewer than 2^32 instances");
    if n == 0 {
        return Vec::new();
    }
    let (base, extra) = (share / n, share % n);
    ids.iter()
        .zip(0..)
        .map(|(id, i)| ((*id).clone(), base + u32::from(i < extra)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_sums_to_the_share_and_favours_the_first() {
        let ids: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let refs: Vec<&String> = ids.iter().collect();
        let weights = spread(&refs, 100);
        assert_eq!(
            weights,
            [("a".into(), 34), ("b".into(), 33), ("c".into(), 33)]
        );
        assert!(spread(&[], 100).is_empty());
    }

    #[test]
    fn ordinals_are_the_numeric_suffix() {
        assert_eq!(ordinal("web-1a2b3c4d-12"), Some(12));
        assert_eq!(ordinal("legacy"), None);
    }
}
