//! The engine: where the spec, the planner and the state store meet.
//!
//! Today it loads a project, resolves its spec into a [`Generation`]
//! (the only I/O on the way to a plan), reads what the store knows about
//! running instances, and asks the pure planner what to do. Runtimes, the
//! image store and the proxy join here as they are built; none of those
//! crates depends on another, only this one composes them.

pub mod images;
pub mod project;
pub mod resolve;

pub use images::{ImageResolver, StoreImages};
pub use project::{EngineError, Project};
pub use resolve::{ResolveErrors, ResolveProblem, resolve};
