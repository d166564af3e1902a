//! kiln's parent cgroup of an `oci` instance: `kiln/<id>` holds the memory
//! limit, the runtime's own cgroup (`kiln/<id>/ctr`) sits under it. The
//! parent outlives the container, so its OOM kill count is still readable
//! after the runtime removed its cgroup.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// A pure cgroup v2 host (not hybrid: a hybrid host's v2 mount is at
/// `/sys/fs/cgroup/unified`).
pub fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// The runtime's `cgroupsPath` for the instance.
pub fn container_path(id: &str) -> String {
    format!("/kiln/{id}/ctr")
}

fn memory_dir(id: &str) -> PathBuf {
    if unified() {
        Path::new(ROOT).join("kiln").join(id)
    } else {
        Path::new(ROOT).join("memory/kiln").join(id)
    }
}

/// Creates the parent (memory hierarchy) with the limit. Swap is limited
/// to the same amount so the limit is what OOM-kills.
pub fn create(id: &str, memory: Option<u64>) -> io::Result<()> {
    let dir = memory_dir(id);
    if unified() {
        // Let the children have the memory, pids and cpu controllers.
        let _ = fs::write(
            Path::new(ROOT).join("cgroup.subtree_control"),
            "+memory +pids +cpu",
        );
        fs::create_dir_all(&dir)?;
        let _ = fs::write(
            Path::new(ROOT).join("kiln/cgroup.subtree_control"),
            "+memory +pids +cpu",
        );
        let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
        if let Some(m) = memory {
            fs::write(dir.join("memory.max"), m.to_string())?;
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        }
        return Ok(());
    }
    fs::create_dir_all(&dir)?;
    if let Some(m) = memory {
        fs::write(dir.join("memory.limit_in_bytes"), m.to_string())?;
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            fs::write(memsw, m.to_string())?;
        }
    }
    Ok(())
}

/// Whether the kernel killed the instance for memory. v1 counts the kill
/// in the victim's cgroup (gone with the container), so there a SIGKILL
/// death after the parent's peak usage reached its limit counts.
pub fn oom_killed(id: &str, killed: bool) -> bool {
    let dir = memory_dir(id);
    let read = |file: &str| fs::read_to_string(dir.join(file)).unwrap_or_default();
    if unified() {
        let events = read("memory.events");
        let kills = events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse::<u64>().ok());
        return kills.unwrap_or(0) > 0;
    }
    let number = |file: &str| read(file).trim().parse::<u64>().ok();
    // `failcnt` stays 0 on recent kernels; the peak reaching the limit is
    // what a v1 memcg OOM leaves behind.
    let hit = matches!((number("memory.max_usage_in_bytes"), number("memory.limit_in_bytes")), (Some(peak), Some(limit)) if peak >= limit);
    killed && hit
}

/// Removes the instance's cgroups (leaf and parent) in every hierarchy.
/// Best effort: a cgroup that still has processes stays.
pub fn remove(id: &str) {
    let mut roots = vec![PathBuf::from(ROOT)];
    if !unified() {
        roots = fs::read_dir(ROOT)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
    }
    for root in roots {
        let parent = root.join("kiln").join(id);
        let _ = fs::remove_dir(parent.join("ctr"));
        let _ = fs::remove_dir(&parent);
    }
}

/// Every leftover cgroup directory of the instance (for tests: nothing may
/// stay behind after `remove`).
pub fn leftovers(id: &str) -> Vec<PathBuf> {
    let roots: Vec<PathBuf> = fs::read_dir(ROOT)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    roots
        .into_iter()
        .chain([PathBuf::from(ROOT)])
        .map(|r| r.join("kiln").join(id))
        .filter(|p| p.exists())
        .collect()
}
