//! Generations, instance identities and the planner.
//!
//! This crate is pure: no file, network or clock access and no `async`.
//! Everything it needs arrives as plain data (a [`Generation`] built from a
//! validated spec plus the digests the engine resolved, and the [`Observed`]
//! instances), which is what makes its property tests possible.
//!
//! # The planner
//! [`plan`] turns (desired generation, observed world) into a [`Plan`]: an
//! ordered list of [`Step`]s for the engine, plus a [`ServicePlan`] per
//! service that changes (why, and with which strategy) for people and
//! `--json`. [`render_plan`] prints it the way terraform does.
//!
//! Per service, in this order of precedence:
//! - nothing runs → create every replica;
//! - `replicas = 0` → retire everything;
//! - an instance has another identity → **replace** every such instance by
//!   the service's deploy strategy (rolling, blue-green, canary, recreate;
//!   see `strategy.rs`), naming the fields that forced it;
//! - otherwise converge: instances that exited or are unhealthy are destroyed
//!   and created afresh (heal, never restart), the replica count is met by
//!   only creating or only destroying (scale), and live instances still
//!   starting or out of rotation are awaited and given traffic (resume: how
//!   a rollout interrupted by a crash of kiln gets finished).
//!
//! A replacement of a service with a `backup` runs it first (a
//! [`Step::Backup`] after the old instances of a `recreate` are gone, before
//! the first new instance otherwise); never on a first creation or a heal.
//! A `recreate` says how long the service is left unavailable
//! ([`ServicePlan::unavailable`]).
//!
//! Services no longer declared are taken out of traffic, drained and
//! destroyed; `[route]`s are configured or removed to match the spec.
//!
//! # Invariants the steps keep
//! - No step modifies an instance: the only instance steps are create and
//!   destroy. Settings outside the identity (health, deploy, drift, stop
//!   grace) never cause instance steps.
//! - Traffic only moves to instances awaited healthy in an earlier step, and
//!   an instance is out of traffic and drained before it is destroyed.
//! - New ids are `{service}-{identity short 8 hex}-{n}`, `n` the smallest
//!   not used by any observed instance, so plans are reproducible.
//! - Planning what running the plan leaves gives an empty plan (checked by
//!   property tests against the model in [`simulate`]).
//!
//! # Limits
//! - Traffic weights are parts of [`TRAFFIC_TOTAL`] (10 000): a share split
//!   over more instances than that gives some a weight of 0.
//! - `in_rotation` is trusted only while a route targets the service: a
//!   service whose routes all go away (even within the plan's own route
//!   steps) starts again from an empty backend set.
//! - `in_rotation` is a flag, not a weight: a canary split interrupted by a
//!   crash of kiln is not detected as such, but its old instances still have
//!   the old identity, so the next plan replays the canary from its start.
//! - A service no longer declared has no `deploy` left; its instances drain
//!   for [`REMOVED_SERVICE_DRAIN_TIMEOUT`].
//! - Services are planned one after another; the steps of one service never
//!   depend on another's, which an executor may exploit to run them
//!   concurrently.

mod emitter;
mod planner;
mod strategy;

pub mod diff;
pub mod generation;
pub mod observed;
pub mod render;
pub mod steps;

#[doc(hidden)]
pub mod simulate;
#[doc(hidden)]
pub mod testing;

#[cfg(test)]
mod render_tests;

pub use diff::{Change, diff_values};
pub use generation::{Digest, Generation, InstanceSpec, ResolveError, Resolved};
pub use observed::{InstanceStatus, Observed, ObservedInstance};
pub use planner::{REMOVED_SERVICE_DRAIN_TIMEOUT, plan};
pub use render::render_plan;
pub use steps::{
    Plan, RouteAction, RoutePlan, ServiceAction, ServicePlan, Step, Summary, TRAFFIC_TOTAL,
    Unavailability,
};
