//! Runtime errors: each names the instance and the cause.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("instance {id}: {op}: {source}")]
    Io {
        id: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("instance {id}: cannot {op} while it is {state}")]
    InvalidState {
        id: String,
        op: &'static str,
        state: String,
    },
    #[error("instance {id} does not exist (driver {driver})")]
    NotFound { id: String, driver: &'static str },
    #[error("instance {id} already exists (driver {driver})")]
    AlreadyExists { id: String, driver: &'static str },
    #[error("instance {id}: `{program}` is not in the image ({})\n  hint: check the command and the image's `copy`/`closure`", rootfs.display())]
    MissingProgram {
        id: String,
        program: String,
        rootfs: PathBuf,
    },
    #[error(
        "instance {id}: `{program}` is not executable\n  hint: give it mode 0o755 in the image's `copy`"
    )]
    NotExecutable { id: String, program: String },
    #[error(
        "instance {id}: mount target `{target}` escapes the instance root\n  hint: use an absolute path without `..`"
    )]
    BadMount { id: String, target: String },
    #[error("instance {id}: {what}\n  hint: {hint}")]
    Setup {
        id: String,
        what: String,
        hint: String,
    },
    #[error("driver {driver} is unavailable: {why}\n  hint: {hint}")]
    Unavailable {
        driver: &'static str,
        why: String,
        hint: String,
    },
    #[error("instance {id}: {driver} engine: {message}")]
    Engine {
        id: String,
        driver: &'static str,
        message: String,
    },
    #[error(
        "instance {id}: exec `{command}` did not finish within {timeout:?}: killed\n  hint: raise the timeout, or check what the command waits for"
    )]
    ExecTimedOut {
        id: String,
        command: String,
        timeout: std::time::Duration,
    },
    #[error("driver {driver} does not support {what}")]
    Unsupported {
        driver: &'static str,
        what: &'static str,
    },
}

impl RuntimeError {
    /// `op` refused because the instance is in `state` (the guards of
    /// [`crate::InstanceState`]).
    pub fn invalid_state(id: &str, op: &'static str, state: crate::InstanceState) -> RuntimeError {
        RuntimeError::InvalidState {
            id: id.to_owned(),
            op,
            state: format!("{state:?}"),
        }
    }
}
