//! The driver trait: every side effect of running instances goes through it.

use std::time::Duration;

use crate::error::RuntimeError;
use crate::types::{Drift, ExecOutput, InstanceConfig, InstanceInfo, InstanceState};

/// A way of running instances. Implementations are synchronous (the engine
/// calls them from blocking tasks) and must survive the engine's restart:
/// `list` finds every instance the driver owns, whoever created it.
pub trait Driver: Send + Sync {
    /// `sandbox`, `process`, `docker`, `oci`, `fake`.
    fn name(&self) -> &'static str;

    /// Prepares the instance (root, mounts, limits, log files) without
    /// running its process. Fails cleanly: nothing is left behind on error.
    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError>;

    /// Runs the instance's process, detached from the caller.
    fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError>;

    /// SIGTERM to the instance's processes, then SIGKILL after `grace`;
    /// returns once the process is gone.
    fn stop(&self, id: &str, grace: Duration) -> Result<InstanceInfo, RuntimeError>;

    /// Removes everything the instance used (not its volumes). Refused while
    /// it runs.
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;

    fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError>;

    /// Every instance this driver owns (for adoption after a restart).
    fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError>;

    /// The captured output so far: (stdout, stderr), most recent last, at
    /// most `max_bytes` each.
    fn logs(&self, id: &str, max_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError>;

    /// Differences between what runs and what was created.
    fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError>;

    /// Runs `argv` inside the running instance (its root, namespaces,
    /// cgroup, env and user, as the instance's own process), waits at most
    /// `timeout`, and returns its exit code and captured output (each capped
    /// at [`crate::EXEC_OUTPUT_CAP`]). Used by `exec` health checks and
    /// `kiln exec`-style diagnostics. Refused unless the instance is running
    /// ([`InstanceState::ensure_can_exec`]). On timeout the command is
    /// killed and the error ([`RuntimeError::ExecTimedOut`]) says so.
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let _ = (id, argv, timeout);
        Err(RuntimeError::Unsupported {
            driver: self.name(),
            what: "exec",
        })
    }

    /// Convenience: the current state.
    fn state(&self, id: &str) -> Result<InstanceState, RuntimeError> {
        Ok(self.inspect(id)?.state)
    }
}
