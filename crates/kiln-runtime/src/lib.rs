//! Runtimes: how an instance runs from an image's read-only root.
//!
//! One [`Driver`] trait, a closed set of drivers ([`AnyDriver`]), and a fake
//! for the engine's tests. This crate knows nothing of the image store or
//! the state store: the engine hands it an already materialised root (and,
//! for Docker, a way to export the image) and records what it reports.

mod cgroup;
pub mod docker;
pub mod driver;
pub mod error;
mod exec;
pub mod fake;
pub mod host;
mod launch;
mod local;
pub mod oci;
pub mod process;
mod root;
pub mod sandbox;
pub mod types;

pub use cgroup::Version as CgroupVersion;
pub use driver::Driver;
pub use error::RuntimeError;
pub use fake::{ExecScript, Fake};
pub use host::{HostFacts, Isolation, select_local_driver, select_local_driver_with};
pub use process::Process;
pub use sandbox::{Sandbox, SandboxOptions};
pub use types::*;

/// The closed set of drivers, dispatched by `match` (youki's
/// `AnyCgroupManager`): the engine holds one of these.
#[derive(Debug)]
pub enum AnyDriver {
    Sandbox(Sandbox),
    Process(Process),
    Fake(std::sync::Arc<Fake>),
    Docker(docker::DockerDriver),
    Oci(oci::OciDriver),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDriver::Sandbox($d) => $e,
            AnyDriver::Process($d) => $e,
            AnyDriver::Fake($d) => $e,
            AnyDriver::Docker($d) => $e,
            AnyDriver::Oci($d) => $e,
        }
    };
}

impl Driver for AnyDriver {
    fn name(&self) -> &'static str {
        dispatch!(self, d => d.name())
    }
    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        dispatch!(self, d => d.create(config))
    }
    fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        dispatch!(self, d => d.start(id))
    }
    fn stop(&self, id: &str, grace: std::time::Duration) -> Result<InstanceInfo, RuntimeError> {
        dispatch!(self, d => d.stop(id, grace))
    }
    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        dispatch!(self, d => d.remove(id))
    }
    fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        dispatch!(self, d => d.inspect(id))
    }
    fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        dispatch!(self, d => d.list())
    }
    fn logs(&self, id: &str, max_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError> {
        dispatch!(self, d => d.logs(id, max_bytes))
    }
    fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError> {
        dispatch!(self, d => d.verify(id))
    }
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: std::time::Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        dispatch!(self, d => d.exec(id, argv, timeout))
    }
}
