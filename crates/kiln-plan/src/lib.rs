//! Generations, instance identities and the planner.
//!
//! This crate is pure: no file, network or clock access and no `async`.
//! Everything it needs arrives as plain data (a [`Generation`] built from a
//! validated spec plus the digests the engine resolved, and the [`Observed`]
//! instances), which is what makes its property tests possible.

pub mod diff;
pub mod generation;
pub mod observed;

pub use diff::{Change, diff_values};
pub use generation::{Digest, Generation, InstanceSpec, ResolveError, Resolved};
pub use observed::{InstanceStatus, Observed, ObservedInstance};
