//! What a plan is made of: ordered [`Step`]s for the engine, and per-service
//! and per-route summaries ([`ServicePlan`], [`RoutePlan`]) for people.
//!
//! Every type here serialises (for `kiln plan --json`) and deserialises (so
//! the engine can persist an in-flight plan and resume it after a crash).

use std::fmt;

use kiln_spec::model::{Duration, Route, Strategy};
use serde::{Deserialize, Serialize};

use crate::diff::Change;
use crate::generation::Digest;

/// The sum of the weights of every non-empty [`Step::ShiftTraffic`]: weights
/// are parts per ten thousand of a service's traffic (basis points), so a
/// canary share of 1% still leaves room to spread the rest over many
/// instances.
pub const TRAFFIC_TOTAL: u32 = 10_000;

/// One action for the engine. Steps run in order; each assumes the ones
/// before it succeeded. There is deliberately no "update in place": an
/// instance is only ever created or destroyed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Step {
    /// Start a new instance of `service` from the desired instance spec,
    /// whose identity hash is `identity`.
    CreateInstance {
        id: String,
        service: String,
        identity: Digest,
    },
    /// Wait until every instance in `ids` passed its health check. Not
    /// healthy by `deadline` (the service's `deploy.deadline`, counted from
    /// this step's start) fails the rollout, which the engine rolls back.
    AwaitHealthy {
        ids: Vec<String>,
        deadline: Duration,
    },
    /// Set the complete backend set of every route of `service`: each
    /// listed instance with its weight (summing to [`TRAFFIC_TOTAL`]), and
    /// no other instance. An empty list takes the service out of traffic.
    /// Only planned for services that have at least one route.
    ShiftTraffic {
        service: String,
        weights: Vec<(String, u32)>,
    },
    /// Canary: keep the current traffic split for `duration` before the next
    /// step (the engine watches health meanwhile).
    Hold { service: String, duration: Duration },
    /// Let `ids` finish in-flight work (they already receive no new
    /// traffic) for at most `timeout`.
    Drain { ids: Vec<String>, timeout: Duration },
    /// Stop and remove an instance. Its volumes survive.
    DestroyInstance { id: String },
    /// Run the service's backup `command` in a fresh instance of what ran
    /// before (no ports, no traffic) and store its output by digest; a
    /// non-zero exit or outliving `timeout` fails the rollout. Planned only
    /// when a service's instances are replaced: after the old instances of
    /// a `recreate` stopped, before the first new instance otherwise.
    Backup {
        service: String,
        command: Vec<String>,
        timeout: Duration,
    },
    /// Create the proxy listener `name`, or replace it with this one.
    ConfigureRoute { name: String, route: Route },
    /// Stop the proxy listener `name`.
    RemoveRoute { name: String },
}

/// Why and how one service changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    pub service: String,
    pub action: ServiceAction,
    /// The deploy strategy that orders the steps of a replacement; `None`
    /// for every other action.
    pub strategy: Option<Strategy>,
    /// Human-readable causes, one per line.
    pub reasons: Vec<String>,
    /// Instances this plan creates for the service, in step order.
    pub creates: Vec<String>,
    /// Instances this plan destroys for the service, in step order.
    pub destroys: Vec<String>,
    /// A `recreate` replacement: the service serves nothing from the old
    /// instance's stop until the new one is healthy, and this bounds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<Unavailability>,
    /// The backup command that runs before the replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Vec<String>>,
}

/// How long a `recreate` leaves a service without an instance: at most
/// `stop_grace` (SIGTERM to SIGKILL of the old one), then the backup (at
/// most its timeout), then the new instance's start, which the rollout
/// gives `deadline` before it reverts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailability {
    pub stop_grace: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_timeout: Option<Duration>,
    pub deadline: Duration,
}

impl ServicePlan {
    /// How many destroyed instances pair with a created one (shown as
    /// `-/+`): the rest are plain creations or destructions.
    pub fn replaced(&self) -> usize {
        self.creates.len().min(self.destroys.len())
    }
}

/// What happens to a service's instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ServiceAction {
    /// Declared, nothing runs: create every replica.
    Create,
    /// The identity changed: new instances replace every old one, ordered by
    /// the deploy strategy. `changes` names the fields that forced it.
    Replace { changes: Vec<Change> },
    /// Only the replica count differs: only creations or only destructions.
    Scale { from: u32, to: u32 },
    /// Instances of the right identity exited or are unhealthy: each is
    /// destroyed and a fresh one created (never restarted).
    Heal { ids: Vec<String> },
    /// Instances of the right identity are still starting or healthy but out
    /// of rotation (an interrupted rollout): await them and give them
    /// traffic.
    Resume { ids: Vec<String> },
    /// No longer declared: take out of traffic, drain and destroy.
    Destroy,
    /// Nothing to do (never listed in [`Plan::services`]).
    Unchanged,
}

/// How one `[route]` changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutePlan {
    pub name: String,
    pub action: RouteAction,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RouteAction {
    Create {
        route: Route,
    },
    Change {
        old: Route,
        new: Route,
        changes: Vec<Change>,
    },
    Remove {
        old: Route,
    },
}

/// Everything needed to take what runs to the desired generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Content hash of the desired generation.
    pub generation_hash: Digest,
    /// Route changes, by name.
    pub routes: Vec<RoutePlan>,
    /// Services that change, by name (unchanged ones are omitted).
    pub services: Vec<ServicePlan>,
    /// What the engine runs, in order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Whether what runs already matches the generation.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Instance counts, as on a plan's last line.
    pub fn summary(&self) -> Summary {
        let mut summary = Summary {
            routes: self.routes.len(),
            ..Summary::default()
        };
        for service in &self.services {
            let replaced = service.replaced();
            summary.replace += replaced;
            summary.create += service.creates.len() - replaced;
            summary.destroy += service.destroys.len() - replaced;
        }
        summary
    }
}

/// How many instances a plan creates, replaces (destroys one and creates
/// its successor) and destroys, and how many routes it changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub create: usize,
    pub replace: usize,
    pub destroy: usize,
    pub routes: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Plan: {} to create, {} to replace, {} to destroy",
            self.create, self.replace, self.destroy
        )?;
        match self.routes {
            0 => f.write_str("."),
            1 => f.write_str(", 1 route to change."),
            n => write!(f, ", {n} routes to change."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{generation, route, service, spec, steady};

    #[test]
    fn json_tags_steps_by_action_and_round_trips() {
        let mut web = service("web");
        web.replicas = 2;
        let old = generation(spec(
            [("web", web.clone())],
            [("web", route("web", "127.0.0.1:8080"))],
        ));
        web.env.insert("A".into(), "1".into());
        let new = generation(spec(
            [("web", web)],
            [("web", route("web", "127.0.0.1:8080"))],
        ));
        let plan = crate::plan(&new, &steady(&old));

        let json = serde_json::to_value(&plan).expect("serialises");
        let actions: Vec<&str> = json["steps"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|s| s["action"].as_str().expect("tagged"))
            .collect();
        assert_eq!(
            actions[..3],
            ["create-instance", "await-healthy", "shift-traffic"]
        );
        assert_eq!(json["services"][0]["action"]["kind"], "replace");
        assert_eq!(json["services"][0]["action"]["changes"][0]["path"], "env.A");

        let back: Plan = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, plan);
    }

    #[test]
    fn summary_pairs_destroys_with_creates() {
        let service = |creates: &[&str], destroys: &[&str]| ServicePlan {
            service: "s".into(),
            action: ServiceAction::Destroy,
            strategy: None,
            reasons: Vec::new(),
            creates: creates.iter().map(|s| s.to_string()).collect(),
            destroys: destroys.iter().map(|s| s.to_string()).collect(),
            unavailable: None,
            backup: None,
        };
        let plan = Plan {
            generation_hash: Digest::of(b""),
            routes: Vec::new(),
            services: vec![service(&["a", "b", "c"], &["x"]), service(&[], &["y", "z"])],
            steps: Vec::new(),
        };
        let summary = plan.summary();
        assert_eq!(
            (summary.create, summary.replace, summary.destroy),
            (2, 1, 2)
        );
        assert_eq!(
            summary.to_string(),
            "Plan: 2 to create, 1 to replace, 2 to destroy."
        );
    }
}
