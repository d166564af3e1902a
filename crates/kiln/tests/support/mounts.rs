//! A host-side watch on a volume directory: which mount namespaces have it
//! mounted, read from `/proc/*/ns/mnt` and `/proc/*/mountinfo`, over and
//! over from a thread, to check that an exclusive volume is never open in
//! two instances at once. Loaded with
//! `#[path = "support/mounts.rs"] mod mounts;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What one process says: its mount namespace, and whether the volume is
/// mounted in it.
fn look(pid: u32, volume: &Needle) -> Option<(String, bool)> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    let ns = ns.to_string_lossy().into_owned();
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    Some((ns, volume.found_in(&info)))
}

/// How the volume's directory shows in a mountinfo line: its root (4th
/// field) is the directory's path inside its file system, which ends with
/// `/volumes/<name>` and contains a name unique to the test.
#[derive(Clone, Debug)]
pub struct Needle {
    pub unique: String,
    pub suffix: String,
}

impl Needle {
    fn found_in(&self, mountinfo: &str) -> bool {
        mountinfo.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|root| root.contains(&self.unique) && root.ends_with(&self.suffix))
        })
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What the watch saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Sweeps over every process.
    pub sweeps: u64,
    /// Sweeps in which some namespace had the volume mounted.
    pub seen_mounted: u64,
    /// Every namespace that ever had it, with the first pid seen in it
    /// (the kernel reuses namespace numbers; pids tell instances apart).
    pub namespaces: BTreeSet<String>,
    /// Confirmed overlaps: two namespaces with the volume at one moment.
    pub overlaps: Vec<String>,
}

pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Report>,
}

impl Watch {
    pub fn start(volume: Needle) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut report = Report::default();
            while !flag.load(Ordering::Relaxed) {
                sweep(&volume, &mut report);
                std::thread::sleep(Duration::from_millis(2));
            }
            report
        });
        Watch { stop, thread }
    }

    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the watch does not panic")
    }
}

fn sweep(volume: &Needle, report: &mut Report) {
    report.sweeps += 1;
    // One process per namespace is enough; the host's is read once.
    let mut checked: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for pid in pids() {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        let ns = ns.to_string_lossy().into_owned();
        if checked.contains_key(&ns) {
            continue;
        }
        let with = match look(pid, volume) {
            Some((seen, true)) if seen == ns => Some(pid),
            _ => None,
        };
        checked.insert(ns, with);
    }
    let holders: Vec<(String, u32)> = checked
        .into_iter()
        .filter_map(|(ns, pid)| Some((ns, pid?)))
        .collect();
    if holders.is_empty() {
        return;
    }
    report.seen_mounted += 1;
    report
        .namespaces
        .extend(holders.iter().map(|(ns, pid)| format!("{ns}@{pid}")));
    if holders.len() < 2 {
        return;
    }
    // A sweep takes time: a namespace seen early may have gone before one
    // seen late appeared. Confirm A, then B, then A again: if A is there
    // before and after B was seen, both were there at that moment.
    let still = |(ns, pid): &(String, u32)| {
        look(*pid, volume).is_some_and(|(now, mounted)| &now == ns && mounted)
    };
    let (a, rest) = holders.split_first().expect("two");
    for b in rest {
        if still(a) && still(b) && still(a) {
            report.overlaps.push(format!(
                "{} (pid {}) and {} (pid {}) both have the volume mounted",
                a.0, a.1, b.0, b.1
            ));
        }
    }
}
