//! The conformance suite against the built-in `sandbox` driver. Needs root
//! and cgroups: skipped loudly without them, failed when KILN_STRICT_TESTS=true.

#[macro_use]
mod conformance;

use std::path::Path;

use kiln_runtime::{Driver, RuntimeError, Sandbox};

fn make(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError> {
    Ok(Box::new(Sandbox::new(state_dir)?))
}

conformance_tests!(make, conformance::Expect::ISOLATED);
