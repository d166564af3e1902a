//! The engine: where the spec, the planner, the state store, the images,
//! the runtimes and the proxy meet.
//!
//! - [`project`]: load a project and resolve its spec into a [`Generation`]
//!   (the only I/O on the way to a plan).
//! - [`engine`]: the daemon's engine: instances with their exit watchers
//!   and health monitors, routes, adoption after a restart.
//! - `rollout.rs`: applying and rolling back generations, step by step,
//!   journaled, reverted on failure; `reconcile.rs`: healing and drift.
//! - `fence.rs`: an exclusive volume is open in at most one instance (a
//!   fence per volume in the state store); `backup.rs`: the backup hook run
//!   before a service's instances are replaced.
//! - [`server`] and [`client`]: the HTTP API on a Unix socket ([`api`]).
//!
//! None of the crates it composes depends on another; only this one does.

pub mod api;
mod backup;
pub mod client;
pub mod engine;
pub mod failpoint;
mod fence;
pub mod handover;
pub mod health;
pub mod images;
pub mod instance;
pub mod project;
mod reconcile;
pub mod resolve;
pub mod rollout;
pub mod server;

pub use engine::{Engine, EngineOptions};
pub use images::{ImageResolver, StoreImages};
pub use project::{EngineError, Project};
pub use resolve::{ResolveErrors, ResolveProblem, resolve};

#[doc(no_inline)]
pub use kiln_plan::Generation;
