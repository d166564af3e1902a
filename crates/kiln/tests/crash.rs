//! Crash and resource-exhaustion tests of the engine, through the `kiln`
//! binary: the daemon killed (SIGKILL, via `KILN_FAILPOINT`) at every
//! failpoint of a rollout and restarted, killed while idle, the state
//! directory's disk full before and during a rollout, and a rollout on the
//! Docker driver.
//!
//! After every crash the test demands convergence: exactly one
//! generation's replicas, healthy, in rotation and answering through the
//! route; no generation left `rolling-out`; and no orphan (the driver's
//! state and the host's processes hold exactly the instances `kiln status`
//! shows). Each project has a unique name, its own state directory and
//! image store, and is brought down (`kiln down`, then SIGKILL to anything
//! left) when it is dropped, even when the test fails.
//!
//! They need root (sandbox driver, tmpfs mounts) and Docker Engine: without
//! them they are skipped loudly, or fail when `KILN_STRICT_TESTS=true`.

#[path = "support/env.rs"]
mod env;
#[path = "crash/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::{DEADLINE, Proj, Spec, http_get, may_run, poll, say, show, text};

fn greetings(pairs: &[(u64, &str)]) -> BTreeMap<u64, String> {
    pairs.iter().map(|(g, s)| (*g, (*s).to_owned())).collect()
}

// ---- kill -9 at every failpoint ------------------------------------------

/// Generation 1 (two replicas) runs; generation 2 changes the config file
/// (every instance is replaced, one at a time) and the route's listen
/// address, so one rollout passes every failpoint. The daemon applying it
/// dies at `failpoint`; a new daemon must converge.
fn crash_at(failpoint: &str) -> Result<u64, String> {
    let mut p = Proj::new("crash-fp", None);
    let one = Spec::new("one");
    p.write(&one);
    let first = p.start_daemon(None);
    let out = p.apply();
    if !out.status.success() {
        return Err(format!("generation 1 failed: {}", show(&out)));
    }
    // A fresh daemon, so the failpoint's first hit is in generation 2.
    p.stop_daemon(first);
    p.write(&Spec {
        listen: "0.0.0.0:0".into(),
        ..Spec::new("two")
    });
    let doomed = p.start_daemon(Some(&format!("{failpoint}@1")));
    let applied = p.apply();
    let Some(end) = p.wait_daemon(doomed, Duration::from_secs(60)) else {
        return Err(format!(
            "failpoint {failpoint} was never reached: the daemon still runs after `kiln apply` ended ({})",
            show(&applied)
        ));
    };
    let logs = p.daemon_logs();
    if end.signal() != Some(9) || !logs.contains(&format!("failpoint {failpoint}:")) {
        return Err(format!(
            "the daemon did not die at failpoint {failpoint} ({end}):\n{logs}"
        ));
    }
    p.start_daemon(None);
    poll(Duration::from_secs(60), || {
        p.converged(&greetings(&[(1, "one"), (2, "two")]), 2)
    })
    .map_err(|e| {
        format!(
            "no convergence after a crash at {failpoint}: {e}\n{}",
            p.diagnostics()
        )
    })
}

#[test]
fn kill_9_at_every_failpoint_then_restart_converges_without_orphans() {
    if !may_run("kill_9_at_every_failpoint", harness::sandbox_unavailable()) {
        return;
    }
    let names = kiln_engine::failpoint::ALL;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(&str, Result<u64, String>)>> = Mutex::default();
    let started = Instant::now();
    // A few at a time: each mostly waits (for health checks and the
    // killed daemon's lease to expire).
    std::thread::scope(|s| {
        for _ in 0..5 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(name) = names.get(i) else { return };
                    let result = std::panic::catch_unwind(|| crash_at(name)).unwrap_or_else(|e| {
                        Err(e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "panicked".into()))
                    });
                    results.lock().unwrap().push((name, result));
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut failed = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(g) => say(&format!("failpoint {name}: converged on generation {g}")),
            Err(e) => failed.push(format!("=== failpoint {name}:\n{e}")),
        }
    }
    say(&format!(
        "{} failpoints in {:.1} s",
        results.len(),
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(results.len(), names.len());
    assert!(
        failed.is_empty(),
        "{} of {} failpoints failed:\n{}",
        failed.len(),
        names.len(),
        failed.join("\n")
    );
}

/// The CLI must not report success when the daemon died mid-rollout: the
/// reply stream ends without `done` or `failed`.
#[test]
fn apply_fails_when_the_daemon_dies_mid_rollout() {
    if !may_run(
        "apply_fails_when_the_daemon_dies",
        harness::sandbox_unavailable(),
    ) {
        return;
    }
    let mut p = Proj::new("crash-cli", None);
    p.write(&Spec::new("one"));
    let daemon = p.start_daemon(Some("before:await-healthy@1"));
    let out = p.apply();
    let end = p.wait_daemon(daemon, Duration::from_secs(60));
    assert_eq!(
        end.and_then(|s| s.signal()),
        Some(9),
        "the failpoint did not kill the daemon:\n{}",
        p.daemon_logs()
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "`kiln apply` exited 0 although the daemon died before the rollout ended:\n{}",
        show(&out)
    );
    assert!(
        text(&out.stderr).contains("daemon"),
        "the error should say the daemon went away:\n{}",
        show(&out)
    );
}

// ---- kill -9 while idle ---------------------------------------------------

#[test]
fn a_daemon_killed_while_idle_is_replaced_by_one_that_adopts_every_instance() {
    if !may_run("kill_9_while_idle", harness::sandbox_unavailable()) {
        return;
    }
    let mut p = Proj::new("crash-idle", None);
    p.write(&Spec::new("one"));
    let daemon = p.start_daemon(None);
    p.apply_ok();
    let all = greetings(&[(1, "one")]);
    poll(DEADLINE, || p.converged(&all, 2)).unwrap();
    let before = p.status().unwrap();
    let pids = |s: &kiln_engine::api::Status| -> BTreeMap<String, Option<u32>> {
        s.services[0]
            .instances
            .iter()
            .map(|i| (i.id.clone(), i.pid))
            .collect()
    };
    p.kill_daemon(daemon);
    // The instances keep serving without a daemon (only the proxy died).
    for i in &before.services[0].instances {
        let port = i.ports["http"];
        let body = http_get(([127, 0, 0, 1], port).into(), "/").unwrap();
        assert_eq!(body, format!("one from {}\n", i.id));
    }
    let restarted = p.start_daemon(None);
    poll(DEADLINE, || p.converged(&all, 2)).unwrap_or_else(|e| panic!("{e}\n{}", p.diagnostics()));
    let after = p.status().unwrap();
    assert_eq!(after.daemon_pid, restarted);
    assert_eq!(
        pids(&after),
        pids(&before),
        "the same instances (ids and pids) must run after the restart\n{}",
        p.diagnostics()
    );
    let events = p.kiln(&["events", p.spec_path().to_str().unwrap(), "--json"]);
    let created = text(&events.stdout)
        .lines()
        .filter(|l| l.contains("\"instance.created\""))
        .count();
    assert_eq!(
        created,
        2,
        "no instance may be created again:\n{}",
        show(&events)
    );
}

// ---- two projects on one host ---------------------------------------------

/// Two projects (two state directories) that declare the same service get
/// instances of the same identity, hence the same ids. Bringing one down
/// must not touch the other's instances.
#[test]
fn two_projects_with_the_same_service_do_not_kill_each_other() {
    if !may_run("two_projects_same_service", harness::sandbox_unavailable()) {
        return;
    }
    let same = Spec {
        unique: false,
        ..Spec::new("shared")
    };
    let mut a = Proj::new("crash-twin-a", None);
    let mut b = Proj::new("crash-twin-b", None);
    a.write(&same);
    b.write(&same);
    a.start_daemon(None);
    b.start_daemon(None);
    a.apply_ok();
    b.apply_ok();
    let shared = greetings(&[(1, "shared")]);
    poll(DEADLINE, || a.converged(&shared, 2)).unwrap();
    poll(DEADLINE, || b.converged(&shared, 2)).unwrap();
    let before = b.status().unwrap();
    let down = a.kiln(&["down", a.spec_path().to_str().unwrap()]);
    assert!(down.status.success(), "{}", show(&down));
    // B's instances still run, untouched.
    std::thread::sleep(Duration::from_secs(1));
    for i in &before.services[0].instances {
        let port = i.ports["http"];
        let answer = http_get(([127, 0, 0, 1], port).into(), "/");
        assert_eq!(
            answer,
            Ok(format!("shared from {}\n", i.id)),
            "`kiln down` of project A killed instance {} of project B (same id: the sandbox's cgroup is /sys/fs/cgroup/<ctrl>/kiln/<id>, shared across state dirs)",
            i.id
        );
    }
    let after = b.status().unwrap();
    let pids = |s: &kiln_engine::api::Status| -> Vec<(String, Option<u32>)> {
        s.services[0]
            .instances
            .iter()
            .map(|i| (i.id.clone(), i.pid))
            .collect()
    };
    assert_eq!(pids(&after), pids(&before), "{}", b.diagnostics());
}

// ---- disk full ------------------------------------------------------------

/// A 4 MiB tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Tmpfs {
        let holder = tempfile::tempdir().unwrap();
        let at = holder.path().join("state");
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "kiln-crash-test"])
            .arg(&at)
            .output()
            .expect("mount runs");
        assert!(out.status.success(), "mount tmpfs: {}", show(&out));
        Tmpfs(at, holder)
    }

    /// Fills it up; returns the filler's path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for chunk in [64 << 10, 4 << 10, 512, 1] {
            let buf = vec![0u8; chunk];
            while f.write(&buf).is_ok_and(|n| n > 0) {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg("-l").arg(&self.0).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            say(&format!(
                "crash tests: cannot unmount {}: {out:?}",
                self.0.display()
            ));
        }
    }
}

fn disk_unavailable() -> Option<String> {
    harness::sandbox_unavailable()
        .or_else(|| (!harness::is_root()).then(|| "not root: cannot mount a tmpfs".into()))
}

/// A project whose state directory is a 4 MiB tmpfs (the image store is
/// elsewhere). The tmpfs is declared first so it is unmounted after the
/// project is brought down.
fn on_small_disk(prefix: &str) -> (Tmpfs, Proj) {
    let tmpfs = Tmpfs::mount();
    let p = Proj::new(prefix, Some(tmpfs.0.clone()));
    (tmpfs, p)
}

#[test]
fn a_full_disk_refuses_an_apply_cleanly_and_the_state_survives() {
    if !may_run("disk_full_before_apply", disk_unavailable()) {
        return;
    }
    let (tmpfs, mut p) = on_small_disk("crash-disk");
    p.write(&Spec::new("one"));
    p.start_daemon(None);
    p.apply_ok();
    let one = greetings(&[(1, "one")]);
    poll(DEADLINE, || p.converged(&one, 2)).unwrap();

    let filler = tmpfs.fill();
    p.write(&Spec::new("two"));
    let out = p.apply();
    let err = text(&out.stderr).to_lowercase();
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        err.contains("state store") || err.contains("disk") || err.contains("space"),
        "the error should name the state store or the disk:\n{}",
        show(&out)
    );
    // Generation 1 keeps serving meanwhile.
    poll(DEADLINE, || p.converged(&one, 2)).unwrap();

    std::fs::remove_file(filler).unwrap();
    // The store opens (a fresh process reads it) and is intact.
    let history = p.history().unwrap();
    assert_eq!(
        history.first(),
        Some(&(1, "active".to_owned())),
        "{history:?}"
    );
    let check = Command::new("sqlite3")
        .arg(p.state.join("state.db"))
        .arg("PRAGMA integrity_check;")
        .output();
    if let Ok(check) = check {
        assert_eq!(text(&check.stdout).trim(), "ok", "{}", show(&check));
    }
    poll(DEADLINE, || p.converged(&one, 2)).unwrap_or_else(|e| panic!("{e}\n{}", p.diagnostics()));
    p.apply_ok();
    let last = history.last().map_or(1, |h| h.0) + 1;
    poll(DEADLINE, || p.converged(&greetings(&[(last, "two")]), 2))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.diagnostics()));
}

/// The disk fills while generation 2 rolls out (its new instance takes
/// ~3 s to become healthy). The rollout fails; once there is space again,
/// generation 1 must serve, no generation may be left `rolling-out`, and
/// a restarted daemon must not resume the failed generation.
#[test]
fn a_disk_that_fills_mid_rollout_leaves_no_generation_rolling_out() {
    if !may_run("disk_full_mid_rollout", disk_unavailable()) {
        return;
    }
    let (tmpfs, mut p) = on_small_disk("crash-disk-mid");
    p.write(&Spec::new("one"));
    let daemon = p.start_daemon(None);
    p.apply_ok();
    let one = greetings(&[(1, "one")]);
    poll(DEADLINE, || p.converged(&one, 2)).unwrap();

    p.write(&Spec {
        healthy: 15,
        deadline: "8s",
        ..Spec::new("two")
    });
    let applying = {
        std::thread::scope(|s| {
            let apply = s.spawn(|| p.apply());
            poll(DEADLINE, || {
                let h = p.history()?;
                h.iter()
                    .any(|(n, s)| *n == 2 && s == "rolling-out")
                    .then_some(())
                    .ok_or_else(|| format!("generation 2 is not rolling out: {h:?}"))
            })
            .unwrap();
            let filler = tmpfs.fill();
            let out = apply.join().unwrap();
            std::fs::remove_file(filler).unwrap();
            out
        })
    };
    assert_ne!(applying.status.code(), Some(0), "{}", show(&applying));
    poll(DEADLINE, || p.converged(&one, 2)).unwrap_or_else(|e| {
        panic!(
            "after the disk was full during a rollout: {e}\napply said: {}\n{}",
            show(&applying),
            p.diagnostics()
        )
    });
    // A restart must keep generation 1, not resume generation 2.
    p.stop_daemon(daemon);
    p.start_daemon(None);
    std::thread::sleep(Duration::from_secs(2));
    poll(DEADLINE, || p.converged(&one, 2))
        .unwrap_or_else(|e| panic!("after a restart: {e}\n{}", p.diagnostics()));
}

// ---- Docker ---------------------------------------------------------------

fn docker_unavailable() -> Option<String> {
    match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "Docker Engine does not answer (`docker info`: {})",
            text(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run docker: {e}")),
    }
}

fn containers(owner: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=io.kiln.owner={owner}"))
        .output()
        .expect("docker runs");
    assert!(out.status.success(), "{}", show(&out));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn docker_driver_rolls_out_rolls_back_and_cleans_up() {
    if !may_run("docker_driver_rollout", docker_unavailable()) {
        return;
    }
    let mut p = Proj::new("crashdock", None);
    let docker = |greeting: &str| Spec {
        driver: Some("docker"),
        ..Spec::new(greeting)
    };
    p.write(&docker("one"));
    p.start_daemon(None);
    p.apply_ok();
    poll(DEADLINE, || p.converged(&greetings(&[(1, "one")]), 2))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.diagnostics()));
    assert_eq!(containers(&p.name).len(), 2, "{:?}", containers(&p.name));

    p.write(&docker("two"));
    p.apply_ok();
    poll(DEADLINE, || p.converged(&greetings(&[(2, "two")]), 2))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.diagnostics()));
    assert_eq!(containers(&p.name).len(), 2, "{:?}", containers(&p.name));

    // New instances that never pass their health check: rolled back.
    p.write(&Spec {
        health_path: "/missing",
        deadline: "4s",
        ..docker("three")
    });
    let out = p.apply();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    poll(DEADLINE, || p.converged(&greetings(&[(2, "two")]), 2))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.diagnostics()));
    let history = p.history().unwrap();
    assert!(history.contains(&(3, "failed".to_owned())), "{history:?}");
    assert_eq!(containers(&p.name).len(), 2, "{:?}", containers(&p.name));

    let down = p.kiln(&["down", p.spec_path().to_str().unwrap()]);
    assert!(down.status.success(), "{}", show(&down));
    assert_eq!(containers(&p.name), Vec::<String>::new());
}
