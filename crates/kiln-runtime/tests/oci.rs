//! The conformance suite against the `oci` driver, with `runc` and with
//! `crun`.

#[macro_use]
mod conformance;

mod runc {
    use std::path::Path;

    use kiln_runtime::oci::{OciDriver, OciRuntime};
    use kiln_runtime::{Driver, RuntimeError};

    use super::conformance;

    fn make(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError> {
        Ok(Box::new(OciDriver::new(OciRuntime::Runc, state_dir)?))
    }

    conformance_tests!(make, conformance::Expect::ISOLATED);
}

mod crun {
    use std::path::Path;

    use kiln_runtime::oci::{OciDriver, OciRuntime};
    use kiln_runtime::{Driver, RuntimeError};

    use super::conformance;

    fn make(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError> {
        Ok(Box::new(OciDriver::new(OciRuntime::Crun, state_dir)?))
    }

    conformance_tests!(make, conformance::Expect::ISOLATED);
}
