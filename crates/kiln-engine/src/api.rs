//! The daemon's API: one [`Request`] enum in, a stream of [`Reply`] out.
//!
//! Transport: HTTP/1.1 on a Unix socket (`<state dir>/kiln.sock`, mode
//! 0600). Every action is `POST /v1/action` with a JSON [`Request`]; the
//! answer is newline-delimited JSON, one [`Reply`] per line, ending with
//! [`Reply::Done`] or [`Reply::Failed`] (or never, for a followed stream).
//! `GET /metrics` serves the proxy's Prometheus metrics.

use std::collections::BTreeMap;

use kiln_plan::{Generation, Plan};
use serde::{Deserialize, Serialize};

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "kiln.sock";

/// Everything the CLI can ask the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Request {
    /// What applying `generation` would do now.
    Plan {
        generation: Box<Generation>,
    },
    /// Record `generation` and roll it out. `secrets` are the values of the
    /// generation's `env:` secrets (by reference, `env:VAR`), read by the
    /// CLI; they are kept in the daemon's memory only.
    Apply {
        generation: Box<Generation>,
        #[serde(default)]
        secrets: BTreeMap<String, String>,
        #[serde(default)]
        message: Option<String>,
        /// Wait for a rollout in progress instead of refusing.
        #[serde(default)]
        wait: bool,
    },
    /// A new generation equal in content to `to` (default: the generation
    /// that was active before the current one), rolled out.
    Rollback {
        to: Option<u64>,
        #[serde(default)]
        wait: bool,
    },
    Status,
    Logs {
        service: String,
        follow: bool,
        /// Lines of history per instance and stream.
        tail: u64,
    },
    Events {
        follow: bool,
        /// Only events after this sequence number.
        since: Option<u64>,
    },
    /// Check every instance for drift now.
    Verify,
    /// Stop every instance (volumes stay), then the daemon.
    Down,
    /// Hand the proxy's listening sockets to the new daemon waiting on
    /// `socket`, then stop (instances keep running): an upgrade.
    Handover {
        socket: std::path::PathBuf,
    },
}

/// One line of an answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// Something happened while the action runs (a rollout step).
    Progress {
        message: String,
    },
    Plan {
        plan: Box<Plan>,
        generation: Option<u64>,
    },
    Status {
        status: Box<Status>,
    },
    Event {
        event: EventView,
    },
    Log {
        instance: String,
        stream: String,
        text: String,
    },
    Drift {
        findings: Vec<DriftFinding>,
    },
    /// The action succeeded.
    Done {
        message: String,
        #[serde(default)]
        generation: Option<u64>,
    },
    /// The action failed; `code` is the exit code the CLI should use.
    Failed {
        message: String,
        code: i32,
    },
}

/// An event as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub at: String,
    pub kind: String,
    pub subject: String,
    pub generation: Option<u64>,
    pub message: String,
}

impl From<kiln_state::Event> for EventView {
    fn from(e: kiln_state::Event) -> EventView {
        EventView {
            seq: e.seq,
            at: e.at,
            kind: e.kind,
            subject: e.subject,
            generation: e.generation,
            message: e.message,
        }
    }
}

/// What `kiln status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub project: String,
    pub daemon_pid: u32,
    pub driver: String,
    /// Why isolation is reduced, when it is.
    pub driver_warning: Option<String>,
    pub active_generation: Option<u64>,
    /// A rollout in progress, if any.
    pub rolling_out: Option<u64>,
    pub services: Vec<ServiceStatus>,
    pub routes: Vec<RouteStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub replicas: u32,
    pub healthy: u32,
    pub instances: Vec<InstanceStatusView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceStatusView {
    pub id: String,
    pub generation: u64,
    /// `starting`, `healthy`, `unhealthy`, `exited:CODE`.
    pub status: String,
    pub in_rotation: bool,
    pub ports: BTreeMap<String, u16>,
    pub pid: Option<u32>,
    pub isolation: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouteStatus {
    pub name: String,
    pub listen: String,
    pub service: String,
    pub backends: Vec<(String, String, u32)>,
    /// The host names the route serves on its address (empty: any).
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// One difference found between what runs and what was declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftFinding {
    /// `instance/ID` or `route/NAME` or `orphan/ID`.
    pub subject: String,
    pub what: String,
    /// `replace`, `report` or `removed`.
    pub action: String,
}

/// Exit codes of engine-backed commands (see docs/cli.md).
pub mod exit {
    /// The action failed (a rollout rolled back, a step failed).
    pub const FAILED: i32 = 1;
    /// Bad input (unknown generation, secret unavailable).
    pub const USAGE: i32 = 2;
    /// Another rollout holds the lease.
    pub const BUSY: i32 = 3;
    /// `kiln verify` found drift.
    pub const DRIFT: i32 = 4;
}
