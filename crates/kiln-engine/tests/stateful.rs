//! Exclusive volumes and backups on the fake driver: the fence of a volume
//! is taken before its writer is created and released only once the old
//! writer is gone; a second writer waits; the backup runs between the old
//! instance's stop and the new one's start, and its failure reverts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::api::{Reply, exit};
use kiln_engine::{Engine, EngineOptions, Generation, Project};
use kiln_runtime::fake::Script;
use kiln_runtime::{Driver, Fake, InstanceConfig};
use kiln_state::{EventFilter, GenerationStatus};

const SPEC: &str = r#"
[project]
name = "t"

[image.app]
from = "scratch"
copy = [{ src = "app", dst = "/app" }]
entrypoint = ["/app"]

[service.db]
image = "app"
env = { SETTING = "SETTING_VALUE" }
volumes = { "/data" = "data" }
deploy = { deadline = "DEADLINE" }
BACKUP

[volume.data]
"#;

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    fake: Arc<Fake>,
    engine: Arc<Engine>,
}

fn write_spec(dir: &Path, setting: &str, backup: Option<&str>, deadline: &str) {
    let backup = backup.map_or(String::new(), |b| format!("\n[service.db.backup]\n{b}\n"));
    let spec = SPEC
        .replace("SETTING_VALUE", setting)
        .replace("DEADLINE", deadline)
        .replace("BACKUP", &backup);
    std::fs::write(dir.join("kiln.toml"), spec).unwrap();
}

fn generation(dir: &Path) -> Generation {
    Project::load(dir).unwrap().generation().unwrap()
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("app"), b"#!/bin/true\n").unwrap();
    write_spec(&dir, "one", None, "5s");
    let fake = Arc::new(Fake::new());
    let engine = start(&dir, &fake).await;
    Setup {
        _dir: tmp,
        dir,
        fake,
        engine,
    }
}

async fn start(dir: &Path, fake: &Arc<Fake>) -> Arc<Engine> {
    let opts = EngineOptions {
        project_name: "t".into(),
        project_dir: dir.to_path_buf(),
        state_dir: dir.join(".kiln"),
        image_store_dir: dir.join(".kiln/images"),
        driver: kiln_spec::model::Driver::Sandbox,
        fake: Some(fake.clone()),
        drift_interval: Duration::from_secs(3600),
        takeover: false,
    };
    Engine::start(opts).await.unwrap()
}

async fn apply(s: &Setup) -> Result<u64, (i32, String)> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    match s
        .engine
        .apply(generation(&s.dir), BTreeMap::new(), None, false, &tx)
        .await
    {
        Ok(Reply::Done { generation, .. }) => Ok(generation.unwrap_or(0)),
        Ok(other) => panic!("unexpected reply {other:?}"),
        Err(r) => Err((r.code, r.message)),
    }
}

fn db_instances(s: &Setup) -> Vec<String> {
    s.engine.instances_of("db").unwrap()
}

fn holder(s: &Setup) -> Option<String> {
    s.engine
        .store()
        .lease("volume:t/data")
        .unwrap()
        .map(|h| h.owner)
}

/// Every event, in order, as `kind message`.
fn events(s: &Setup) -> Vec<String> {
    s.engine
        .store()
        .list_events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .map(|e| format!("{} {}", e.kind, e.message))
        .collect()
}

fn position(list: &[String], what: &str) -> usize {
    list.iter()
        .position(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no `{what}` in {list:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_is_taken_before_create_and_released_after_the_exit_only() {
    let s = setup().await;
    apply(&s).await.unwrap();
    let first = db_instances(&s);
    assert_eq!(first.len(), 1);
    assert_eq!(holder(&s).as_deref(), Some(first[0].as_str()));

    write_spec(&s.dir, "two", None, "5s");
    apply(&s).await.unwrap();
    let second = db_instances(&s);
    assert_eq!(second.len(), 1);
    assert_ne!(first, second);
    assert_eq!(holder(&s).as_deref(), Some(second[0].as_str()));

    // The driver saw the old one stopped and removed before the new one
    // was created…
    let calls = s.fake.calls();
    let at = |c: String| {
        calls
            .iter()
            .position(|x| *x == c)
            .unwrap_or_else(|| panic!("no `{c}` in {calls:?}"))
    };
    assert!(at(format!("stop {}", first[0])) < at(format!("remove {}", first[0])));
    assert!(at(format!("remove {}", first[0])) < at(format!("create {}", second[0])));
    // …and the fence went from one to the other in that order: taken for
    // the first before it existed, released after it was removed, taken
    // for the second before it was created.
    let ev = events(&s);
    assert!(
        position(&ev, &format!("volume.acquired {} holds", first[0]))
            < position(&ev, &format!("instance.created created {}", first[0]))
    );
    assert!(
        position(
            &ev,
            &format!("volume.released {} stopped and was removed", first[0])
        ) < position(&ev, &format!("volume.acquired {} holds", second[0]))
    );
    assert!(
        position(&ev, &format!("volume.acquired {} holds", second[0]))
            < position(&ev, &format!("instance.created created {}", second[0]))
    );

    // `kiln down` gives the volume back with the last instance.
    s.engine.stop(true).await;
    assert_eq!(holder(&s), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_waits_for_the_holder_then_fails_naming_it() {
    let s = setup().await;
    // Something the plan does not know holds the volume: an instance the
    // driver runs, with the fence.
    let intruder = InstanceConfig::placeholder("intruder");
    s.fake.create(&intruder).unwrap();
    s.fake.start("intruder").unwrap();
    s.engine
        .store()
        .acquire_fence("volume:t/data", "intruder")
        .unwrap()
        .unwrap();

    write_spec(&s.dir, "one", None, "1s");
    let (code, message) = apply(&s).await.unwrap_err();
    assert_eq!(code, exit::FAILED);
    assert!(
        message.contains("exclusive volume data is still held by instance intruder (running)"),
        "{message}"
    );
    assert!(db_instances(&s).is_empty(), "nothing was started");
    assert!(events(&s).iter().any(|e| e.starts_with("volume.waiting")));
    assert_eq!(holder(&s).as_deref(), Some("intruder"));
    assert!(
        s.fake.calls().iter().all(|c| !c.starts_with("create db")),
        "{:?}",
        s.fake.calls()
    );

    // The holder goes away while the next rollout waits: it proceeds.
    write_spec(&s.dir, "two", None, "30s");
    let fake = s.fake.clone();
    let remover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fake.stop("intruder", Duration::ZERO).unwrap();
        fake.remove("intruder").unwrap();
    });
    let number = apply(&s).await.unwrap();
    remover.await.unwrap();
    let now = db_instances(&s);
    assert_eq!(now.len(), 1);
    assert_eq!(holder(&s).as_deref(), Some(now[0].as_str()));
    assert_eq!(
        s.engine
            .store()
            .generation_status(number)
            .unwrap()
            .unwrap()
            .status,
        GenerationStatus::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_runs_between_the_stop_and_the_start() {
    let s = setup().await;
    let backup = r#"command = ["cat", "/data/file"]
timeout = "10s""#;
    write_spec(&s.dir, "one", Some(backup), "5s");
    apply(&s).await.unwrap();
    let first = db_instances(&s);
    // Not on the first creation.
    assert!(s.fake.calls().iter().all(|c| !c.contains("backup")));

    write_spec(&s.dir, "two", Some(backup), "5s");
    s.fake.script("db-backup-2", Script::ExitOnStart(0));
    let number = apply(&s).await.unwrap();
    assert_eq!(number, 2);
    let second = db_instances(&s);

    let calls = s.fake.calls();
    let at = |c: String| {
        calls
            .iter()
            .position(|x| *x == c)
            .unwrap_or_else(|| panic!("no `{c}` in {calls:?}"))
    };
    assert!(at(format!("remove {}", first[0])) < at("create db-backup-2".into()));
    assert!(at("remove db-backup-2".into()) < at(format!("create {}", second[0])));

    // It ran what ran before (generation 1's env), with the command as argv,
    // no port, and held the volume meanwhile.
    let ev = events(&s);
    assert!(
        position(&ev, "volume.acquired db-backup-2 holds")
            < position(&ev, "volume.released db-backup-2 stopped")
    );
    let stored = ev
        .iter()
        .find(|e| e.starts_with("service.backup "))
        .expect("a service.backup event");
    // The fake wrote nothing: the digest of no bytes.
    let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    assert!(
        stored.contains(&format!("sha256:{empty} (0 bytes")),
        "{stored}"
    );
    assert!(s.dir.join(".kiln/backups").join(empty).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_reverts_to_the_old_generation() {
    let s = setup().await;
    let backup = r#"command = ["false"]"#;
    write_spec(&s.dir, "one", Some(backup), "5s");
    apply(&s).await.unwrap();
    let first = db_instances(&s);

    write_spec(&s.dir, "two", Some(backup), "5s");
    s.fake.script("db-backup-2", Script::ExitOnStart(3));
    let (code, message) = apply(&s).await.unwrap_err();
    assert_eq!(code, exit::FAILED);
    assert!(
        message.contains("backup of db (`false`) exited with code 3"),
        "{message}"
    );
    let status = |n| {
        s.engine
            .store()
            .generation_status(n)
            .unwrap()
            .unwrap()
            .status
    };
    assert_eq!(status(2), GenerationStatus::Failed);
    assert_eq!(status(1), GenerationStatus::Active);
    // Generation 1 runs again (a fresh instance, under the same id: the
    // old one was stopped for the backup), and holds the volume.
    let now = db_instances(&s);
    assert_eq!(now, first);
    let creates = s
        .fake
        .calls()
        .iter()
        .filter(|c| **c == format!("create {}", first[0]))
        .count();
    assert_eq!(creates, 2);
    let config = s.fake.config(&now[0]).unwrap();
    assert_eq!(config.env["SETTING"], "one");
    assert_eq!(holder(&s).as_deref(), Some(now[0].as_str()));
    // No new instance of generation 2 was ever created.
    assert!(
        s.fake
            .calls()
            .iter()
            .filter(|c| c.starts_with("create db-"))
            .all(|c| {
                let id = c.trim_start_matches("create ");
                id == "db-backup-2"
                    || s.engine
                        .store()
                        .get_instance(id)
                        .ok()
                        .flatten()
                        .is_none_or(|r| r.generation == 1)
            })
    );

    // A backup that outlives its timeout fails the same way.
    write_spec(
        &s.dir,
        "three",
        Some(
            r#"command = ["sleep", "1000"]
timeout = "1s""#,
        ),
        "5s",
    );
    s.fake.script("db-backup-3", Script::Run);
    let (_, message) = apply(&s).await.unwrap_err();
    assert!(message.contains("did not finish within 1 s"), "{message}");
    assert_eq!(status(1), GenerationStatus::Active);
    assert_eq!(db_instances(&s).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_keeps_live_holders_and_releases_stale_ones() {
    let s = setup().await;
    apply(&s).await.unwrap();
    let live = db_instances(&s);
    // A stale fence: its holder is gone from the driver.
    s.engine
        .store()
        .raw_execute("INSERT INTO leases (name, owner, token, expires_ms) VALUES ('volume:t/old', 'db-gone', 'db-gone', 9223372036854775807)")
        .unwrap();
    // The daemon dies (its instances keep running) and another adopts.
    s.engine.stop(false).await;
    drop(s.engine);
    let engine = start(&s.dir, &s.fake).await;
    let held = |name: &str| engine.store().lease(name).unwrap().map(|h| h.owner);
    assert_eq!(held("volume:t/data").as_deref(), Some(live[0].as_str()));
    assert_eq!(held("volume:t/old"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_writer_is_healed_without_two_holders() {
    let s = setup().await;
    apply(&s).await.unwrap();
    let live = db_instances(&s);
    s.fake.exit(&live[0], None, Some(9), false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let calls = s.fake.calls();
        if calls.iter().filter(|c| c.starts_with("create db-")).count() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not healed: {calls:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ev = events(&s);
    // The dead one released the volume (after its removal) before its
    // replacement took it.
    let released = position(&ev, &format!("volume.released {} stopped", live[0]));
    let acquired = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| e.starts_with("volume.acquired"))
        .map(|(i, _)| i)
        .nth(1)
        .expect("taken again");
    assert!(released < acquired, "{ev:#?}");
}
