//! Stateful services end to end, through the `kiln` binary and the real
//! sandbox driver: a service writing an exclusive volume is replaced again
//! and again (and once killed) while a thread on the host watches every
//! process's mount namespace: the volume is never mounted in two at once;
//! the data written through it survives every replacement; the backup hook
//! stores, by digest, what the volume held between the old instance's stop
//! and the new one's start.
//!
//! Needs root (the sandbox driver) and a static busybox (`busybox-static`,
//! installed by scripts/test) for the backup's `cat`: without them the test
//! is skipped loudly, or fails when `KILN_STRICT_TESTS=true`. No timing is
//! asserted; every wait polls a condition up to a generous deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

#[path = "support/env.rs"]
mod env;
#[path = "support/mounts.rs"]
mod mounts;

use env::{hello_binary, sandbox_unavailable, say, show, text};

const DEADLINE: Duration = Duration::from_secs(90);
const BUSYBOX: &str = "/bin/busybox";
const REPLACEMENTS: usize = 10;

fn unavailable() -> Option<String> {
    sandbox_unavailable().or_else(|| {
        (!Path::new(BUSYBOX).is_file()).then(|| {
            format!("{BUSYBOX} is missing (apt-get install busybox-static): the backup needs a static `cat`")
        })
    })
}

const SPEC: &str = r#"
[project]
name = "stateful"

[image.db]
from = "scratch"
copy = [
  { src = "bin/hello", dst = "/app/hello", mode = 0o755 },
  { src = "bin/busybox", dst = "/bin/busybox", mode = 0o755 },
]
closure = true
entrypoint = ["/app/hello"]

[service.db]
image = "db"
command = ["/app/hello", "--port", "${PORT}", "--config", "/etc/hello/config.toml", "--data", "/data"]
env = { KILN_TEST_COPY = "UNIQUE" }
files = { "/etc/hello/config.toml" = "config/hello.toml" }
volumes = { "/data" = "data" }
ports = { http = {} }
health = { http = "/healthz", port = "http", interval = "1s", timeout = "500ms", healthy = 1 }
stop_grace = "5s"

[service.db.backup]
command = ["/bin/busybox", "cat", "/data/starts.log"]
timeout = "60s"

[volume.data]

[route.db]
listen = "127.0.0.1:0"
service = "db"
port = "http"
"#;

/// The project in a temporary directory; `kiln down` when dropped.
struct Project {
    dir: tempfile::TempDir,
    unique: String,
}

impl Project {
    fn new() -> Project {
        Project::with(|s| s)
    }

    fn with(edit: impl FnOnce(String) -> String) -> Project {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let unique = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::write(
            dir.path().join("kiln.toml"),
            edit(SPEC.replace("UNIQUE", &unique)),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::copy(hello_binary(), dir.path().join("bin/hello")).unwrap();
        std::fs::copy(BUSYBOX, dir.path().join("bin/busybox")).unwrap();
        let p = Project { dir, unique };
        p.set_greeting("v0");
        p
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn volume(&self) -> PathBuf {
        self.path().join(".kiln/volumes/data")
    }

    fn set_greeting(&self, greeting: &str) {
        std::fs::write(
            self.path().join("config/hello.toml"),
            format!("greeting = \"{greeting}\"\n"),
        )
        .unwrap();
    }

    fn kiln(&self, args: &[&str]) -> Output {
        env::kiln_command(self.path())
            .args(args)
            .output()
            .expect("kiln runs")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        text(&out.stdout)
    }

    #[track_caller]
    fn apply_ok(&self) -> String {
        let out = self.ok(&["apply", ".", "-y"]);
        assert!(out.contains("is active"), "{out}");
        out
    }

    fn status(&self) -> Value {
        let out = self.ok(&["status", ".", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"))
    }

    /// The one instance of db once it is healthy and in rotation, nothing
    /// else running, no rollout in flight.
    #[track_caller]
    fn converged(&self) -> Value {
        wait_until("db's one instance healthy and in rotation", || {
            let s = self.status();
            let db = instances(&s);
            (db.len() == 1
                && db[0]["status"] == "healthy"
                && db[0]["in_rotation"] == true
                && s["rolling_out"].is_null())
            .then(|| db[0].clone())
        })
    }

    fn get(&self, path: &str) -> Result<(u16, String), String> {
        let status = self.status();
        let addr: SocketAddr = status["routes"][0]["listen"]
            .as_str()
            .ok_or("no route")?
            .parse()
            .map_err(|e| format!("{e}"))?;
        http_get(addr, path)
    }

    /// Every event and the daemon's log, for a failure's message.
    fn diagnostics(&self) -> String {
        let events: Vec<String> = self
            .events()
            .iter()
            .map(|e| {
                format!(
                    "  {} {} {}",
                    e["kind"].as_str().unwrap_or("?"),
                    e["subject"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let log = std::fs::read_to_string(self.path().join(".kiln/daemon.log")).unwrap_or_default();
        format!("events:\n{}\ndaemon.log:\n{log}", events.join("\n"))
    }

    fn events(&self) -> Vec<Value> {
        self.ok(&["events", ".", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let out = self.kiln(&["down", "."]);
        if !out.status.success() {
            say(&format!("stateful: `kiln down` failed: {}", show(&out)));
        }
    }
}

fn instances(status: &Value) -> Vec<Value> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "db")
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[track_caller]
fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    env::wait_until(what, DEADLINE, f)
}

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    env::http(addr, "GET", path)
}

/// `sha256:<hex>` in a backup event's message.
fn digest_in(message: &str) -> String {
    let at = message
        .find("sha256:")
        .unwrap_or_else(|| panic!("no digest in {message}"));
    message[at + 7..at + 7 + 64].to_owned()
}

#[test]
fn an_exclusive_volume_is_never_open_in_two_instances() {
    if !env::may_run(
        "stateful::an_exclusive_volume_is_never_open_in_two_instances",
        unavailable(),
    ) {
        return;
    }
    let p = Project::new();
    // The plan says what a recreate costs.
    let first_plan = p.ok(&["plan", "."]);
    assert!(first_plan.contains("will be created"), "{first_plan}");
    p.apply_ok();
    let mut seen: Vec<String> = vec![p.converged()["id"].as_str().unwrap().to_owned()];

    let watch = mounts::Watch::start(mounts::Needle {
        unique: p.unique.clone(),
        suffix: "/volumes/data".to_owned(),
    });

    for n in 1..=REPLACEMENTS {
        p.set_greeting(&format!("v{n}"));
        if n == 1 {
            let plan = p.ok(&["plan", "."]);
            assert!(
                plan.contains(
                    "unavailable from stop until healthy: at most stop_grace 5s + backup (at most 1m) + start (deadline 1m)"
                ),
                "{plan}"
            );
            assert!(
                plan.contains("backup first: `/bin/busybox cat /data/starts.log`"),
                "{plan}"
            );
        }
        p.apply_ok();
        let now = p.converged()["id"].as_str().unwrap().to_owned();
        assert!(!seen.contains(&now), "replacement {n} reused {now}");
        seen.push(now);
        let (code, body) = p.get("/").unwrap();
        assert_eq!(code, 200);
        assert!(body.starts_with(&format!("v{n} from db-")), "{body}");
    }

    // kill -9 of the daemon: the instance keeps running and keeps its
    // volume's fence (in the state store, naming no process); the next
    // daemon adopts it and replaces it like any other.
    let holder = |p: &Project| {
        kiln_state::Store::open(&p.path().join(".kiln"))
            .unwrap()
            .lease("volume:stateful/data")
            .unwrap()
            .map(|h| h.owner)
    };
    let running = p.converged()["id"].as_str().unwrap().to_owned();
    assert_eq!(holder(&p).as_deref(), Some(running.as_str()));
    let daemon = p.status()["daemon_pid"].as_u64().expect("a daemon pid");
    assert!(
        Command::new("kill")
            .args(["-9", &daemon.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_until("the daemon is gone", || {
        (!Path::new(&format!("/proc/{daemon}")).exists()).then_some(())
    });
    assert_eq!(holder(&p).as_deref(), Some(running.as_str()));
    p.set_greeting("after-restart");
    p.apply_ok();
    let now = p.converged()["id"].as_str().unwrap().to_owned();
    assert_ne!(now, running);
    assert_ne!(p.status()["daemon_pid"].as_u64(), Some(daemon));
    assert_eq!(holder(&p).as_deref(), Some(now.as_str()));
    seen.push(now);

    // A crash: kill -9 of the instance's process heals without overlap.
    let victim = p.converged();
    let pid = victim["pid"].as_u64().expect("a pid");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let healed = wait_until("a new instance in place of the killed one", || {
        let s = p.status();
        let db = instances(&s);
        // A live process other than the killed one (the dead instance
        // shows no pid until it is replaced).
        let fresh = db
            .first()
            .and_then(|i| i["pid"].as_u64())
            .is_some_and(|p| p != pid);
        (db.len() == 1 && fresh && db[0]["status"] == "healthy")
            .then(|| db[0]["id"].as_str().unwrap().to_owned())
    });
    // A heal makes a new instance (it may reuse the dead one's id).
    assert_eq!(p.converged()["id"].as_str(), Some(healed.as_str()));

    let report = watch.finish();
    assert!(
        report.overlaps.is_empty(),
        "the volume was mounted in two namespaces at once:\n{}\n{}",
        report.overlaps.join("\n"),
        p.diagnostics()
    );
    // The watch really saw the volume: in one namespace per instance.
    assert!(report.seen_mounted > 0, "{report:?}");
    assert!(
        report.namespaces.len() > REPLACEMENTS,
        "the watch saw {} namespaces with the volume: {report:?}",
        report.namespaces.len()
    );

    // The data written through the volume survived every replacement:
    // each instance appended its id when it started.
    let log = std::fs::read_to_string(p.volume().join("starts.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // The first start, the replacements, one after the daemon's restart,
    // one heal.
    assert_eq!(lines.len(), REPLACEMENTS + 3, "{log}");
    for id in &seen {
        assert!(lines.contains(&id.as_str()), "{id} is not in {log}");
    }

    // Every replacement was backed up, between the stop and the start: the
    // n-th backup holds the n lines written before it, stored under the
    // digest the event names. The heal took none.
    let backups: Vec<String> = p
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "service.backup")
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(backups.len(), REPLACEMENTS + 1, "{backups:#?}");
    for (n, message) in backups.iter().enumerate() {
        let hex = digest_in(message);
        let stored = std::fs::read(p.path().join(".kiln/backups").join(&hex))
            .unwrap_or_else(|e| panic!("backup {hex}: {e}"));
        assert_eq!(kiln_plan::Digest::of(&stored).hex(), hex);
        let want: String = lines[..=n].iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(text(&stored), want, "backup {} ({message})", n + 1);
        assert!(
            message.contains(&format!("({} bytes", stored.len())),
            "{message}"
        );
    }
    // Nothing was left behind: no backup instance, and the fence with the
    // instance that runs.
    let running: Vec<String> = instances(&p.status())
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(running.len(), 1);
    assert_eq!(holder(&p).as_ref(), Some(&running[0]));
}

/// The control: with the volume declared `exclusive = false` and a rolling
/// deploy, old and new instance overlap, and the watch must say so (a
/// watch that cannot see an overlap would make the test above pass for
/// nothing).
#[test]
fn the_watch_sees_two_writers_of_a_volume_that_is_not_exclusive() {
    if !env::may_run(
        "stateful::the_watch_sees_two_writers_of_a_volume_that_is_not_exclusive",
        unavailable(),
    ) {
        return;
    }
    let p = Project::with(|s| {
        s.replace("[volume.data]", "[volume.data]\nexclusive = false")
            .replace(
                "stop_grace = \"5s\"",
                "stop_grace = \"5s\"\ndeploy = { strategy = \"rolling\", max_surge = 1, max_unavailable = 0 }",
            )
    });
    p.apply_ok();
    p.converged();
    let watch = mounts::Watch::start(mounts::Needle {
        unique: p.unique.clone(),
        suffix: "/volumes/data".to_owned(),
    });
    // The new instance runs (and is awaited healthy) next to the old one.
    p.set_greeting("v1");
    let plan = p.ok(&["plan", "."]);
    assert!(!plan.contains("unavailable from stop"), "{plan}");
    p.apply_ok();
    p.converged();
    let report = watch.finish();
    assert!(!report.overlaps.is_empty(), "no overlap seen: {report:?}");
}

/// kill -9 of the daemon while the backup runs (the old instance already
/// stopped): the next daemon removes the backup instance (an orphan), which
/// gives the volume back, and finishes the recreate; never two instances on
/// the volume.
#[test]
fn a_daemon_killed_during_a_backup_leaves_no_second_writer() {
    if !env::may_run(
        "stateful::a_daemon_killed_during_a_backup_leaves_no_second_writer",
        unavailable(),
    ) {
        return;
    }
    killed_during_backup(true);
}

/// The same, killed as soon as the backup holds the fence: at times inside
/// the driver's create or start, which then has an instance that looks
/// created but runs; removing it must end it first.
#[test]
fn a_daemon_killed_while_starting_a_backup_leaves_no_second_writer() {
    if !env::may_run(
        "stateful::a_daemon_killed_while_starting_a_backup_leaves_no_second_writer",
        unavailable(),
    ) {
        return;
    }
    killed_during_backup(false);
}

fn killed_during_backup(running: bool) {
    let p = Project::with(|s| {
        s.replace(
            r#"command = ["/bin/busybox", "cat", "/data/starts.log"]"#,
            r#"command = ["/bin/busybox", "sleep", "600"]"#,
        )
    });
    p.apply_ok();
    let old = p.converged()["id"].as_str().unwrap().to_owned();
    let daemon = p.status()["daemon_pid"].as_u64().expect("a daemon pid");
    let watch = mounts::Watch::start(mounts::Needle {
        unique: p.unique.clone(),
        suffix: "/volumes/data".to_owned(),
    });

    p.set_greeting("v1");
    let apply = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["apply", ".", "-y"])
        .current_dir(p.path())
        .env("NO_COLOR", "1")
        .env_remove("KILN_STATE_DIR")
        .env_remove("KILN_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln apply runs");
    let backup_dir = p.path().join(".kiln/runtime/db-backup-2");
    wait_until("the backup instance runs", || {
        p.events()
            .iter()
            .any(|e| {
                e["kind"] == "volume.acquired"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("db-backup-2 "))
            })
            .then_some(())
    });
    if running {
        wait_until("the driver recorded the backup instance as started", || {
            backup_dir.join("started.json").is_file().then_some(())
        });
    }
    assert!(
        Command::new("kill")
            .args(["-9", &daemon.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut apply = apply;
    let _ = apply.wait();

    // The next daemon (started by this apply, which waits for the resumed
    // rollout) adopts, removes the orphan, and finishes generation 2.
    // (The interrupted apply may have started a daemon of its own on its
    // way out: two starting at once, one gives way; so retry.)
    wait_until("an apply that answers after the restart", || {
        let out = p.kiln(&["apply", ".", "-y", "--wait"]);
        if !out.status.success() {
            say(&format!("stateful: apply after the kill: {}", show(&out)));
        }
        out.status.success().then_some(())
    });
    let now = p.converged();
    assert_ne!(now["id"].as_str(), Some(old.as_str()));
    let (code, body) = p.get("/").unwrap();
    assert_eq!(code, 200);
    assert!(body.starts_with("v1 from db-"), "{body}");
    assert!(!backup_dir.exists(), "the backup instance is left");
    let holder = kiln_state::Store::open(&p.path().join(".kiln"))
        .unwrap()
        .lease("volume:stateful/data")
        .unwrap()
        .map(|h| h.owner);
    assert_eq!(holder.as_deref(), now["id"].as_str());
    let report = watch.finish();
    assert!(
        report.overlaps.is_empty(),
        "the volume was mounted in two namespaces at once:\n{}\n{}",
        report.overlaps.join("\n"),
        p.diagnostics()
    );
    assert!(report.seen_mounted > 0, "{report:?}");
}
