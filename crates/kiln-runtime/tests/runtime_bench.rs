//! Start → exec latency and memory per idle instance, for every driver.
//!
//! * **start → exec**: from calling `create` + `start` until the program
//!   inside has demonstrably started: `sh -c 'echo up; exec sleep 600'`
//!   whose `up` shows in the driver's logs (polled every 0.2 ms through
//!   `Driver::logs`). Median of N runs (default 50), in two series: back to
//!   back (N instances running at the end), and each instance right after
//!   the previous one was stopped and removed. Stop and remove are outside
//!   the timing.
//! * **memory per idle instance**: `sleep 600` instances, M of each driver
//!   (default 5) running at once. For each: the instance's own processes
//!   (found by a marker in their environ) and kiln's per-instance overhead
//!   (every other process in the tree rooted at the instance's topmost
//!   ancestor below init: the sandbox/process supervisor, the oci driver's
//!   `sh` shims and `runc`/`crun`, Docker's `containerd-shim`), as VmRSS
//!   and Pss (`/proc/PID/smaps_rollup`); against a bare `busybox sleep`
//!   started by the test.
//!
//! ```text
//! cargo test --release -p kiln-runtime --test runtime_bench -- --ignored --nocapture
//! KILN_BENCH_RUNS=100 KILN_BENCH_IDLE=10 …
//! ```

#[allow(dead_code)]
mod conformance;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_runtime::docker::DockerDriver;
use kiln_runtime::oci::{OciDriver, OciRuntime};
use kiln_runtime::{Driver, ImageRef, InstanceConfig, InstanceState};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base(fixture: &conformance::Fixture, id: &str, argv: &[&str]) -> InstanceConfig {
    InstanceConfig {
        id: id.to_string(),
        service: "bench".into(),
        image: ImageRef {
            digest: format!("sha256:{:0>64}", "be9c5"),
            rootfs: fixture.rootfs.clone(),
            docker_archive: None,
        },
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: [
            ("PATH".to_string(), "/bin".to_string()),
            ("KILN_TEST_MARKER".to_string(), id.to_string()),
        ]
        .into(),
        workdir: None,
        user: None,
        files: vec![],
        volumes: vec![],
        resources: Default::default(),
        log_dir: fixture.dir.path().join("logs").join(id),
        log_max_bytes: 1 << 20,
        labels: Default::default(),
    }
}

/// create + start until `up` is in the logs.
fn start_to_exec(driver: &dyn Driver, cfg: &InstanceConfig) -> Duration {
    let t = Instant::now();
    driver.create(cfg).unwrap();
    driver.start(&cfg.id).unwrap();
    loop {
        let (out, _) = driver.logs(&cfg.id, 64).unwrap();
        if out.starts_with(b"up") {
            break;
        }
        assert!(
            t.elapsed() < conformance::DEADLINE,
            "{} never started",
            cfg.id
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    t.elapsed()
}

fn finish(driver: &dyn Driver, id: &str) {
    driver.stop(id, Duration::from_millis(100)).unwrap();
    driver.remove(id).unwrap();
}

/// Two series: instances started back to back while the previous ones
/// still run (stopped at the end), and each started right after the
/// previous one was stopped (SIGKILL after 100 ms: `sleep` as PID 1
/// ignores SIGTERM) and removed, which is what a replacement does.
fn latency(fixture: &conformance::Fixture, driver: &dyn Driver, what: &str, tag: &str) {
    let runs = env_usize("KILN_BENCH_RUNS", 50);
    let pid = std::process::id();
    let argv = ["sh", "-c", "echo up; exec sleep 600"];
    let cfg = |series: &str, i: usize| base(fixture, &format!("l{pid}-{tag}-{series}{i}"), &argv);
    // Warm-up: image load, caches.
    start_to_exec(driver, &cfg("w", 0));
    finish(driver, &cfg("w", 0).id);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let say = |series: &str, mut v: Vec<Duration>| {
        v.sort();
        conformance::say(&format!(
            "start->exec median of {runs}: {what}, {series}: {:.1} ms (p10 {:.1}, p90 {:.1})",
            ms(v[runs / 2]),
            ms(v[runs / 10]),
            ms(v[runs * 9 / 10]),
        ));
    };
    let v: Vec<Duration> = (0..runs)
        .map(|i| start_to_exec(driver, &cfg("k", i)))
        .collect();
    for i in 0..runs {
        finish(driver, &cfg("k", i).id);
    }
    say("back to back", v);
    let v: Vec<Duration> = (0..runs)
        .map(|i| {
            let d = start_to_exec(driver, &cfg("r", i));
            finish(driver, &cfg("r", i).id);
            d
        })
        .collect();
    say("each after stop+remove of the previous", v);
}

/// (ppid, comm) of a process.
fn stat(pid: u32) -> Option<(u32, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let ppid = s[close + 2..].split(' ').nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// (VmRSS, Pss) in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (field(&status, "VmRSS:"), field(&smaps, "Pss:"))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn marked(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0)
            .any(|v| v == format!("KILN_TEST_MARKER={marker}").as_bytes())
    })
}

/// Per-instance memory: (instance rss, instance pss, overhead rss,
/// overhead pss, the overhead processes' names).
fn instance_memory(id: &str) -> (u64, u64, u64, u64, Vec<String>) {
    let me = std::process::id();
    let pids = all_pids();
    let own: Vec<u32> = pids.iter().copied().filter(|p| marked(*p, id)).collect();
    assert!(!own.is_empty(), "no process of {id}");
    // The topmost ancestor below init (or below this test, or below the
    // container engine's daemons).
    let mut top = own[0];
    while let Some((ppid, _)) = stat(top) {
        let parent = stat(ppid).map(|(_, c)| c).unwrap_or_default();
        if ppid <= 1 || ppid == me || ["containerd", "dockerd"].contains(&parent.as_str()) {
            break;
        }
        top = ppid;
    }
    let parents: BTreeMap<u32, u32> = pids
        .iter()
        .filter_map(|p| Some((*p, stat(*p)?.0)))
        .collect();
    let in_tree = |mut p: u32| loop {
        if p == top {
            return true;
        }
        match parents.get(&p) {
            Some(&pp) if pp > 1 => p = pp,
            _ => return false,
        }
    };
    let (mut ir, mut ip, mut or, mut op, mut names) = (0, 0, 0, 0, vec![]);
    for p in pids.iter().copied().filter(|p| in_tree(*p)) {
        // The sandbox's init shares its supervisor's memory (CLONE_VM):
        // its VmRSS and Pss are the supervisor's, counted once.
        if stat(p).is_some_and(|(_, c)| c == "kiln-init") {
            names.push("kiln-init (the supervisor's memory)".to_string());
            continue;
        }
        let (rss, pss) = memory(p);
        if own.contains(&p) {
            ir += rss;
            ip += pss;
        } else {
            or += rss;
            op += pss;
            names.push(stat(p).map(|(_, c)| c).unwrap_or_default());
        }
    }
    (ir, ip, or, op, names)
}

fn idle_memory(fixture: &conformance::Fixture, driver: &dyn Driver, what: &str, tag: &str) {
    let n = env_usize("KILN_BENCH_IDLE", 5);
    let pid = std::process::id();
    let ids: Vec<String> = (0..n).map(|i| format!("m{pid}-{tag}-{i}")).collect();
    for id in &ids {
        let cfg = base(fixture, id, &["sleep", "600"]);
        driver.create(&cfg).unwrap();
        driver.start(id).unwrap();
    }
    // Running, and exec'd (before execve, a forked child still has the
    // test's environ, without the marker).
    for id in &ids {
        let t = Instant::now();
        loop {
            let running = matches!(driver.state(id).unwrap(), InstanceState::Running { .. });
            let exec = all_pids().into_iter().any(|p| marked(p, id));
            if running && exec {
                break;
            }
            assert!(t.elapsed() < conformance::DEADLINE, "{id} never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (mut ir, mut ip, mut or, mut op) = (0, 0, 0, 0);
    let mut names = vec![];
    for id in &ids {
        let m = instance_memory(id);
        ir += m.0;
        ip += m.1;
        or += m.2;
        op += m.3;
        names = m.4;
    }
    let k = n as u64;
    conformance::say(&format!(
        "idle memory per instance ({n} running): {what}: instance RSS {} KiB / PSS {} KiB; \
         overhead RSS {} KiB / PSS {} KiB ({} processes: {})",
        ir / k,
        ip / k,
        or / k,
        op / k,
        names.len(),
        names.join(", ")
    ));
    for id in &ids {
        driver.stop(id, Duration::from_millis(100)).unwrap();
        driver.remove(id).unwrap();
    }
}

fn bare_sleep() {
    let mut child = std::process::Command::new("/bin/busybox")
        .args(["sleep", "600"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (rss, pss) = memory(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    conformance::say(&format!(
        "idle memory: bare `busybox sleep` on the host: RSS {rss} KiB / PSS {pss} KiB"
    ));
}

fn each_driver(dir: &Path, mut f: impl FnMut(&dyn Driver, &str, &str)) {
    let sandbox = kiln_runtime::Sandbox::new(dir.join("sandbox")).unwrap();
    f(&sandbox, "sandbox driver", "sb");
    let process = kiln_runtime::Process::new(dir.join("process")).unwrap();
    f(&process, "process driver", "pr");
    let runc = OciDriver::new(OciRuntime::Runc, dir.join("runc")).unwrap();
    f(&runc, "oci driver (runc)", "runc");
    let crun = OciDriver::new(OciRuntime::Crun, dir.join("crun")).unwrap();
    f(&crun, "oci driver (crun)", "crun");
    match DockerDriver::connect(&format!("bench-{}", std::process::id())) {
        Ok(docker) => f(&docker, "docker driver", "dk"),
        Err(e) => conformance::say(&format!("docker skipped: {e}")),
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn start_to_exec_latency() {
    let fixture = conformance::Fixture::new();
    let dir = fixture.dir.path().join("state");
    each_driver(&dir, |d, what, tag| latency(&fixture, d, what, tag));
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn idle_instance_memory() {
    let fixture = conformance::Fixture::new();
    let dir = fixture.dir.path().join("state");
    bare_sleep();
    each_driver(&dir, |d, what, tag| idle_memory(&fixture, d, what, tag));
}
