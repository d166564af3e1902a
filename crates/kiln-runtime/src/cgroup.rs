//! Resource limits through cgroups, v1 (per-controller hierarchies, as on
//! this project's hybrid hosts) and v2 (the unified hierarchy).
//!
//! One directory per instance and controller: `/sys/fs/cgroup/<ctrl>/kiln/<id>`
//! (v1) or `/sys/fs/cgroup/kiln/<id>` (v2). The parent `kiln` directory is
//! shared and never removed. The child joins by writing `0` to the
//! pre-opened `cgroup.procs` files before it executes the program, so every
//! process of the instance is accounted from its first instruction.
//! OOM kills are read from `memory.oom_control` (v1, `oom_kill` counter,
//! kernel ≥ 4.13) or `memory.events` (v2). Swap is limited to the same
//! amount (`memsw` / `memory.swap.max = 0`) so a limit really ends in OOM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::types::Limits;

const ROOT: &str = "/sys/fs/cgroup";

/// Below this a process cannot even start: refused at create.
pub const MIN_MEMORY: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    V1,
    V2,
}

pub fn detect() -> Option<Version> {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        Some(Version::V2)
    } else if Path::new(ROOT).join("memory").is_dir() {
        Some(Version::V1)
    } else {
        None
    }
}

/// The cgroup directories of one instance (recorded in its state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    pub version: Version,
    pub dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

impl Cgroup {
    /// Creates the directories and writes the limits; on error removes
    /// whatever it created.
    pub fn create(version: Version, id: &str, limits: &Limits) -> std::io::Result<Cgroup> {
        let dirs = match version {
            Version::V1 => ["memory", "cpu", "pids"]
                .iter()
                .map(|c| Path::new(ROOT).join(c))
                .filter(|p| p.is_dir())
                .map(|p| p.join("kiln").join(id))
                .collect(),
            Version::V2 => vec![Path::new(ROOT).join("kiln").join(id)],
        };
        let cg = Cgroup { version, dirs };
        match cg.setup(limits) {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    /// The cgroup of instance `id` if any of its directories exists (one
    /// a start created before the caller could record it).
    pub fn existing(version: Version, id: &str) -> Option<Cgroup> {
        let dirs: Vec<PathBuf> = match version {
            Version::V1 => ["memory", "cpu", "pids"]
                .iter()
                .map(|c| Path::new(ROOT).join(c).join("kiln").join(id))
                .filter(|p| p.is_dir())
                .collect(),
            Version::V2 => vec![Path::new(ROOT).join("kiln").join(id)]
                .into_iter()
                .filter(|p| p.is_dir())
                .collect(),
        };
        (!dirs.is_empty()).then_some(Cgroup { version, dirs })
    }

    /// Whether a process is in the cgroup.
    pub fn has_processes(&self) -> bool {
        !self.pids().is_empty()
    }

    fn setup(&self, limits: &Limits) -> std::io::Result<()> {
        if self.version == Version::V2 {
            // Controllers must be enabled in every ancestor's subtree_control.
            let parent = Path::new(ROOT).join("kiln");
            std::fs::create_dir_all(&parent)?;
            for dir in [Path::new(ROOT), parent.as_path()] {
                for c in ["+memory", "+cpu", "+pids"] {
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
                }
            }
        }
        for dir in &self.dirs {
            std::fs::create_dir_all(dir)?;
        }
        let file = |name: &str| self.dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
        let need = |name: &str| {
            file(name)
                .ok_or_else(|| std::io::Error::other(format!("cgroup file {name} is missing")))
        };
        let quota = limits.millicpus.map(|m| u64::from(m.max(10)) * 100);
        match self.version {
            Version::V1 => {
                if let Some(mem) = limits.memory_bytes {
                    write(&need("memory.limit_in_bytes")?, &mem.to_string())?;
                    if let Some(sw) = file("memory.memsw.limit_in_bytes") {
                        write(&sw, &mem.to_string())?;
                    }
                }
                if let Some(q) = quota {
                    write(&need("cpu.cfs_period_us")?, "100000")?;
                    write(&need("cpu.cfs_quota_us")?, &q.to_string())?;
                }
                if let Some(p) = limits.pids {
                    write(&need("pids.max")?, &p.to_string())?;
                }
            }
            Version::V2 => {
                if let Some(mem) = limits.memory_bytes {
                    write(&need("memory.max")?, &mem.to_string())?;
                    if let Some(sw) = file("memory.swap.max") {
                        write(&sw, "0")?;
                    }
                }
                if let Some(q) = quota {
                    write(&need("cpu.max")?, &format!("{q} 100000"))?;
                }
                if let Some(p) = limits.pids {
                    write(&need("pids.max")?, &p.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The file of every directory through which the (single-threaded)
    /// child joins by writing `0`, opened for it: `cgroup.procs` (v2), or
    /// `tasks` (v1). For a single-threaded process both move the same one
    /// thread, but a v1 `cgroup.procs` write takes the global threadgroup
    /// lock for writing, which can wait for an RCU grace period (whole
    /// milliseconds), while moving the writing thread itself through `tasks`
    /// skips that lock. Its children are born in the cgroup either way.
    pub fn procs_files(&self) -> std::io::Result<Vec<std::fs::File>> {
        let name = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.procs",
        };
        self.dirs
            .iter()
            .map(|d| std::fs::OpenOptions::new().write(true).open(d.join(name)))
            .collect()
    }

    /// Whether the kernel's OOM killer killed a process of the instance.
    pub fn oom_killed(&self) -> bool {
        let (name, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill"),
            Version::V2 => ("memory.events", "oom_kill"),
        };
        self.dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join(name)).ok())
            .any(|text| {
                text.lines().any(|l| {
                    let mut it = l.split_whitespace();
                    it.next() == Some(key)
                        && it.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0
                })
            })
    }

    fn pids(&self) -> Vec<i32> {
        let mut out = vec![];
        for d in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs every process left in the cgroup and removes its
    /// directories (waiting, with a deadline, for the kernel to let go).
    pub fn remove(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            for pid in &pids {
                if let Some(pid) = rustix::process::Pid::from_raw(*pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            let mut left = false;
            for d in &self.dirs {
                if d.exists() && std::fs::remove_dir(d).is_err() {
                    left = true;
                }
            }
            if !left {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
