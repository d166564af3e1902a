//! The engine's rollout logic on the fake driver: no root, no processes,
//! every outcome scripted. The real drivers are exercised end to end by the
//! `kiln` crate's tests (`engine.rs`, `crash.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::api::{Reply, exit};
use kiln_engine::{Engine, EngineOptions, Generation, Project};
use kiln_runtime::Fake;
use kiln_runtime::fake::Script;
use kiln_state::GenerationStatus;

const SPEC: &str = r#"
[project]
name = "t"

[image.app]
from = "scratch"
copy = [{ src = "app", dst = "/app" }]
entrypoint = ["/app"]

[service.web]
image = "app"
replicas = 2
env = { GREETING = "GREETING_VALUE" }
deploy = { strategy = "rolling", max_surge = 1, max_unavailable = 0, deadline = "5s" }

[route.web]
listen = "127.0.0.1:0"
service = "web"
port = "http"
"#;

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    fake: Arc<Fake>,
    engine: Arc<Engine>,
}

fn write_spec(dir: &Path, greeting: &str, replicas: u32) {
    let spec = SPEC
        .replace("GREETING_VALUE", greeting)
        .replace("replicas = 2", &format!("replicas = {replicas}"))
        // The route needs a port: the fake runs nothing, so give the
        // service one without a health check (running = healthy).
        .replace("[route.web]", "ports = { http = {} }\n\n[route.web]");
    std::fs::write(dir.join("kiln.toml"), spec).unwrap();
}

fn generation(dir: &Path) -> Generation {
    let project = Project::load(dir).unwrap();
    project.generation().unwrap()
}

async fn setup(replicas: u32) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("app"), b"#!/bin/true\n").unwrap();
    write_spec(&dir, "hello", replicas);
    let fake = Arc::new(Fake::new());
    let opts = EngineOptions {
        project_name: "t".into(),
        project_dir: dir.clone(),
        state_dir: dir.join(".kiln"),
        image_store_dir: dir.join(".kiln/images"),
        driver: kiln_spec::model::Driver::Sandbox,
        fake: Some(fake.clone()),
        drift_interval: Duration::from_secs(3600),
        takeover: false,
    };
    let engine = Engine::start(opts).await.unwrap();
    Setup {
        _dir: tmp,
        dir,
        fake,
        engine,
    }
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

async fn ids(s: &Setup) -> Vec<(String, String, u64)> {
    let status = s.engine.status().await.unwrap();
    status
        .services
        .iter()
        .flat_map(|svc| &svc.instances)
        .map(|i| (i.id.clone(), i.status.clone(), i.generation))
        .collect()
}

fn status_of(s: &Setup, number: u64) -> GenerationStatus {
    s.engine
        .store()
        .generation_status(number)
        .unwrap()
        .unwrap()
        .status
}

/// Polls `cond` until it holds, up to a generous deadline.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_every_replica_and_activates() {
    let s = setup(2).await;
    let number = apply(&s).await.unwrap();
    assert_eq!(number, 1);
    assert_eq!(status_of(&s, 1), GenerationStatus::Active);
    let running = ids(&s).await;
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(running.iter().all(|(_, st, g)| st == "healthy" && *g == 1));
    let status = s.engine.status().await.unwrap();
    assert_eq!(status.routes[0].backends.len(), 2);
    let config = s.fake.config(&running[0].0).expect("created by the driver");
    assert_eq!(config.env["GREETING"], "hello");
    assert_eq!(config.env["KILN_INSTANCE"], running[0].0);
    assert!(config.env.contains_key("PORT"));

    // The same spec again changes nothing and records nothing.
    let again = apply(&s).await.unwrap();
    assert_eq!(again, 1);
    assert_eq!(s.engine.store().list_generations().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_whose_instances_die_is_rolled_back() {
    let s = setup(2).await;
    apply(&s).await.unwrap();
    let before = ids(&s).await;

    s.fake.script_all(Script::ExitOnStart(3));
    write_spec(&s.dir, "broken", 2);
    let (code, message) = apply(&s).await.unwrap_err();
    assert_eq!(code, exit::FAILED, "{message}");
    assert!(message.contains("rolled back"), "{message}");
    assert!(message.contains("exited with code 3"), "{message}");

    assert_eq!(status_of(&s, 2), GenerationStatus::Failed);
    assert_eq!(status_of(&s, 1), GenerationStatus::Active);
    assert_eq!(ids(&s).await, before, "the old instances keep serving");
    let status = s.engine.status().await.unwrap();
    let backends: Vec<&String> = status.routes[0].backends.iter().map(|b| &b.0).collect();
    let old: Vec<&String> = before.iter().map(|b| &b.0).collect();
    assert_eq!(backends, old);
    // Nothing of generation 2 is left on the runtime.
    assert!(
        s.fake
            .calls()
            .iter()
            .filter(|c| c.starts_with("create "))
            .count()
            >= 3
    );
    let kinds: Vec<String> = s
        .engine
        .store()
        .list_events(&Default::default())
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"generation.failed".to_owned()));
    assert!(kinds.contains(&"generation.rolled-back".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_the_previous_content() {
    let s = setup(1).await;
    apply(&s).await.unwrap();
    write_spec(&s.dir, "bonjour", 1);
    apply(&s).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let reply = s.engine.rollback(None, false, &tx).await.unwrap();
    let Reply::Done { generation, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(generation, Some(3));
    let store = s.engine.store();
    let g1 = store.get_generation(1).unwrap().unwrap();
    let g3 = store.get_generation(3).unwrap().unwrap();
    assert_eq!(g1.hash, g3.hash, "equal in content");
    assert_eq!(g3.rollback_of, Some(1));
    let running = ids(&s).await;
    let config = s.fake.config(&running[0].0).unwrap();
    assert_eq!(config.env["GREETING"], "hello");

    let err = s.engine.rollback(Some(99), false, &tx).await.unwrap_err();
    assert_eq!(err.code, exit::USAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exited_instance_is_replaced_by_a_new_one() {
    let s = setup(2).await;
    apply(&s).await.unwrap();
    let before = ids(&s).await;
    let victim = before[0].0.clone();
    s.fake.exit(&victim, Some(1), None, false);
    eventually(
        "the exit is seen and a fresh instance replaces it",
        async || {
            let now = ids(&s).await;
            now.len() == 2
                && now
                    .iter()
                    .all(|(id, st, _)| id != &victim && st == "healthy")
        },
    )
    .await;
    let now = ids(&s).await;
    assert!(
        now.iter().any(|(id, ..)| id == &before[1].0),
        "the other one stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off_and_is_reported() {
    let s = setup(1).await;
    apply(&s).await.unwrap();
    s.fake.script_all(Script::ExitOnStart(1));
    let first = ids(&s).await[0].0.clone();
    s.fake.exit(&first, Some(1), None, false);
    eventually("a crash-loop event", async || {
        s.engine
            .store()
            .list_events(&Default::default())
            .unwrap()
            .iter()
            .any(|e| e.kind == "service.crash-loop")
    })
    .await;
    // Recovers once instances stay up again.
    s.fake.script_all(Script::Run);
    eventually("a healthy replacement after the backoff", async || {
        ids(&s).await.iter().any(|(_, st, _)| st == "healthy")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_refused_before_anything_stops() {
    let s = setup(1).await;
    apply(&s).await.unwrap();
    let before = ids(&s).await;
    let mut generation = generation(&s.dir);
    for digest in generation.resolved.images.values_mut() {
        digest.0 = format!("sha256:{}", "0".repeat(64));
    }
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = s
        .engine
        .apply(generation, BTreeMap::new(), None, false, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code, exit::USAGE);
    assert!(
        err.message.contains("not in the image store"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("nothing was stopped"),
        "{}",
        err.message
    );
    assert_eq!(ids(&s).await, before);
    assert_eq!(s.engine.store().list_generations().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_change_is_refused_while_one_runs_and_names_it() {
    let s = setup(1).await;
    apply(&s).await.unwrap();
    // A rollout that waits for its deadline: the new instance never exits
    // and never gets healthy (a failing exec health check).
    let spec = std::fs::read_to_string(s.dir.join("kiln.toml"))
        .unwrap()
        .replace(
            "env = { GREETING = \"hello\" }",
            "env = { GREETING = \"slow\" }\nhealth = { exec = [\"/check\"], interval = \"100ms\" }",
        );
    std::fs::write(s.dir.join("kiln.toml"), spec).unwrap();
    s.fake
        .script_exec_all(kiln_runtime::fake::ExecScript::exit(1, "", "not ready"));
    let engine = s.engine.clone();
    let slow_generation = generation(&s.dir);
    let slow = tokio::spawn(async move {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .apply(slow_generation, BTreeMap::new(), None, false, &tx)
            .await
    });
    eventually("the slow rollout holds the lease", async || {
        s.engine.store().lease("rollout").unwrap().is_some()
    })
    .await;
    let (code, message) = apply(&s).await.unwrap_err();
    assert_eq!(code, exit::BUSY);
    assert!(message.contains("kiln apply"), "{message}");
    let slow = slow.await.unwrap().unwrap_err();
    assert_eq!(slow.code, exit::FAILED);
    assert!(
        slow.message.contains("not healthy within"),
        "{}",
        slow.message
    );
    assert_eq!(s.engine.store().lease("rollout").unwrap(), None, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_declared_number_of_generations() {
    let s = setup(1).await;
    for greeting in ["a", "b", "c", "d"] {
        write_spec(&s.dir, greeting, 1);
        let spec = std::fs::read_to_string(s.dir.join("kiln.toml")).unwrap();
        std::fs::write(
            s.dir.join("kiln.toml"),
            format!("{spec}\n[policy]\nkeep_generations = 2\n"),
        )
        .unwrap();
        apply(&s).await.unwrap();
    }
    let numbers: Vec<u64> = s
        .engine
        .store()
        .list_generations()
        .unwrap()
        .iter()
        .map(|g| g.number)
        .collect();
    assert_eq!(numbers, [3, 4], "the newest two stay");
    assert_eq!(status_of(&s, 4), GenerationStatus::Active);
}
