//! The conformance suite against the `process` driver (no isolation: the
//! cases that need a read-only root, a PID namespace, limits or mounts —
//! volumes, read-only volumes, read-only `files` — print a note).

#[macro_use]
mod conformance;

use std::path::Path;

use kiln_runtime::{Driver, Process, RuntimeError};

fn make(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError> {
    Ok(Box::new(Process::new(state_dir)?))
}

conformance_tests!(make, conformance::Expect::NONE);
