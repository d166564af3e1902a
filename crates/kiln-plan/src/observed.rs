//! What runs, as the engine observed it: plain data for the planner.

use std::collections::BTreeMap;

use kiln_spec::model::Route;
use serde::{Deserialize, Serialize};

use crate::generation::{Digest, InstanceSpec};

/// The lifecycle of an instance as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum InstanceStatus {
    /// Created; health not yet established.
    Starting,
    /// Passed its health check (or has none and is running).
    Healthy,
    /// Failed its health check past the threshold.
    Unhealthy,
    /// The process is gone.
    Exited { code: Option<i32> },
}

impl InstanceStatus {
    /// Whether the instance can still become or stay useful.
    pub fn is_live(self) -> bool {
        matches!(self, InstanceStatus::Starting | InstanceStatus::Healthy)
    }
}

/// One instance that exists (in any state) on the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedInstance {
    pub id: String,
    /// What the instance was created from; its identity is `spec.identity()`.
    pub spec: InstanceSpec,
    pub identity: Digest,
    pub status: InstanceStatus,
    /// Whether a route currently sends it traffic.
    pub in_rotation: bool,
}

/// Everything the planner needs to know about the world.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub instances: Vec<ObservedInstance>,
    /// Routes the proxy currently serves, by name.
    pub routes: BTreeMap<String, Route>,
    /// The content digests of the error pages each route serves, by route
    /// and status (routes without pages are absent): a page whose content
    /// changed under the same path reconfigures its route.
    #[serde(default)]
    pub route_pages: BTreeMap<String, BTreeMap<u16, crate::generation::Digest>>,
}
