//! Black-box tests of the `kiln` binary: exit codes, output, and the plan
//! against a real state store.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_engine::Project;
use kiln_engine::project::status_text;
use kiln_plan::{InstanceStatus, Observed, plan, simulate};
use kiln_state::{InstanceUpsert, NewGeneration, Origin, Store};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("KILN_STATE_DIR")
        .output()
        .expect("kiln runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const SPEC: &str = r#"
[project]
name = "demo"

[image.app]
copy = [{ src = "bin/app", dst = "/app/app", mode = 0o755 }]
entrypoint = ["/app/app"]

[service.web]
image = "app"
replicas = 3
command = ["/app/app", "--port", "${PORT}"]
env = { RUST_LOG = "info" }
files = { "/etc/app.toml" = "config/app.toml" }
secrets = { TOKEN = { file = ".secrets/token" } }
ports = { http = {} }
health = { http = "/healthz" }

[route.web]
listen = "127.0.0.1:18080"
service = "web"
"#;

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    fs::create_dir_all(p.join("bin")).unwrap();
    fs::create_dir_all(p.join("config")).unwrap();
    fs::create_dir_all(p.join(".secrets")).unwrap();
    fs::write(p.join("bin/app"), "#!/bin/sh\nexec sleep 1000\n").unwrap();
    fs::write(p.join("config/app.toml"), "greeting = \"hi\"\n").unwrap();
    fs::write(p.join(".secrets/token"), "very-secret-value").unwrap();
    fs::write(p.join("kiln.toml"), SPEC).unwrap();
    dir
}

/// Records the project's current spec as a new active generation and the
/// instances its plan would leave running, as the engine will do.
fn record_applied(dir: &Path) -> u64 {
    let project = Project::load(dir).unwrap();
    let generation = project.generation().unwrap();
    let store = Store::open(&project.state_dir()).unwrap();
    let observed = kiln_engine::project::observed(&store).unwrap();
    let after = simulate::apply(&generation, &observed, &plan(&generation, &observed));
    for old in store.list_instances(None).unwrap() {
        store.remove_instance(&old.id).unwrap();
    }
    let parent = store.latest_generation().unwrap().map(|g| g.number);
    let record = store
        .append_generation(NewGeneration {
            hash: generation.content_hash().0,
            parent,
            origin: Origin::Apply,
            rollback_of: None,
            message: Some("test".into()),
            body: generation.canonical_json(),
        })
        .unwrap();
    store
        .set_generation_status(
            record.number,
            kiln_state::GenerationStatus::Active,
            "applied by test",
        )
        .unwrap();
    write_instances(&store, &after, record.number);
    record.number
}

fn write_instances(store: &Store, observed: &Observed, generation: u64) {
    for i in &observed.instances {
        store
            .upsert_instance(&InstanceUpsert {
                id: i.id.clone(),
                service: i.spec.service.clone(),
                identity: i.identity.0.clone(),
                generation,
                spec: serde_json::to_value(&i.spec).unwrap(),
                status: status_text(i.status),
                in_rotation: i.in_rotation,
                data: serde_json::json!({}),
            })
            .unwrap();
    }
}

#[test]
fn validate_accepts_the_examples() {
    for example in ["examples/hello", "examples/brief/kiln.toml"] {
        let out = kiln(&repo(), &["validate", example]);
        assert!(out.status.success(), "{example}: {}", stderr(&out));
        assert!(stderr(&out).contains("is valid"));
    }
}

#[test]
fn validate_reports_every_error_with_location_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("kiln.toml"),
        "[project]\nname = \"x\"\n[service.web]\nimage = \"nope\"\nreplica = 2\n",
    )
    .unwrap();
    let out = kiln(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("kiln.toml:4:9"), "{err}");
    assert!(err.contains("kiln.toml:5:1"), "{err}");
    assert!(err.contains("hint: did you mean `replicas`?"), "{err}");
    assert!(err.contains("has 2 problems"), "{err}");
    assert!(stdout(&out).is_empty(), "errors go to stderr");
}

#[test]
fn missing_spec_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln(dir.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read spec"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plan_of_a_fresh_project_creates_everything_and_writes_nothing() {
    let dir = project();
    let out = kiln(dir.path(), &["plan"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("# service.web will be created"), "{text}");
    assert!(
        text.contains("Plan: 3 to create, 0 to replace, 0 to destroy, 1 route to change."),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "NO_COLOR must disable colour");
    assert!(
        !dir.path().join(".kiln").join(kiln_state::DB_FILE).exists(),
        "plan must not create state"
    );

    let out = kiln(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2));

    let out = kiln(dir.path(), &["plan", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["summary"]["create"], 3);
    assert_eq!(json["project"], "demo");
    assert!(json["steps"].as_array().unwrap().len() >= 3);
}

#[test]
fn plan_after_apply_is_empty_then_names_the_field_that_forces_replacement() {
    let dir = project();
    record_applied(dir.path());
    let out = kiln(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("No changes"), "{}", stdout(&out));

    // A config file's content is part of the identity.
    fs::write(dir.path().join("config/app.toml"), "greeting = \"hello\"\n").unwrap();
    let out = kiln(dir.path(), &["plan"]);
    let text = stdout(&out);
    assert!(text.contains("-/+"), "{text}");
    assert!(text.contains("files.\"/etc/app.toml\""), "{text}");
    assert!(
        text.contains("Plan: 0 to create, 3 to replace, 0 to destroy."),
        "{text}"
    );

    // A rotated secret replaces too, and its value never shows.
    fs::write(dir.path().join(".secrets/token"), "rotated-secret").unwrap();
    let text = stdout(&kiln(dir.path(), &["plan"]));
    assert!(text.contains("secrets.TOKEN"), "{text}");
    assert!(
        !text.contains("rotated-secret") && !text.contains("very-secret-value"),
        "{text}"
    );
}

#[test]
fn scaling_only_creates() {
    let dir = project();
    record_applied(dir.path());
    let spec = fs::read_to_string(dir.path().join("kiln.toml")).unwrap();
    fs::write(
        dir.path().join("kiln.toml"),
        spec.replace("replicas = 3", "replicas = 5"),
    )
    .unwrap();
    let text = stdout(&kiln(dir.path(), &["plan"]));
    assert!(
        text.contains("Plan: 2 to create, 0 to replace, 0 to destroy."),
        "{text}"
    );
}

#[test]
fn a_crashed_instance_is_replaced_not_restarted() {
    let dir = project();
    record_applied(dir.path());
    let project = Project::load(dir.path()).unwrap();
    let store = Store::open(&project.state_dir()).unwrap();
    let mut victim = store.list_instances(Some("web")).unwrap().remove(0);
    victim.status = status_text(InstanceStatus::Exited { code: Some(137) });
    store
        .upsert_instance(&InstanceUpsert {
            id: victim.id.clone(),
            service: victim.service,
            identity: victim.identity,
            generation: victim.generation,
            spec: victim.spec,
            status: victim.status,
            in_rotation: false,
            data: victim.data,
        })
        .unwrap();
    let out = kiln(dir.path(), &["plan", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = json["steps"].as_array().unwrap();
    let destroyed = steps
        .iter()
        .any(|s| s["action"] == "destroy-instance" && s["id"] == victim.id.as_str());
    let created = steps.iter().any(|s| s["action"] == "create-instance");
    assert!(destroyed && created, "{json:#}");
}

#[test]
fn history_and_diff_read_the_store() {
    let dir = project();
    let out = kiln(dir.path(), &["history"]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("No generations yet"));

    let first = record_applied(dir.path());
    let spec = fs::read_to_string(dir.path().join("kiln.toml")).unwrap();
    fs::write(
        dir.path().join("kiln.toml"),
        spec.replace("RUST_LOG = \"info\"", "RUST_LOG = \"debug\""),
    )
    .unwrap();
    let second = record_applied(dir.path());
    assert_eq!((first, second), (1, 2));

    let out = kiln(dir.path(), &["history", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    let text = stdout(&kiln(dir.path(), &["history"]));
    assert!(
        text.lines().count() == 3 && text.starts_with("GEN"),
        "{text}"
    );

    let out = kiln(dir.path(), &["diff", "1", "2"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("~ spec.services.web.env.RUST_LOG: \"info\" → \"debug\""),
        "{text}"
    );
    assert!(text.contains("1 change."), "{text}");

    let text = stdout(&kiln(dir.path(), &["diff", "active", "spec"]));
    assert!(text.contains("No differences."), "{text}");

    let out = kiln(dir.path(), &["diff", "1", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("generation 9 does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn colour_only_when_asked_or_on_a_terminal() {
    let dir = project();
    let out = kiln(dir.path(), &["plan", "--color", "always"]);
    assert!(stdout(&out).contains("\x1b["));
    let out = kiln(dir.path(), &["plan"]);
    assert!(!stdout(&out).contains('\x1b'));
}

#[test]
fn schema_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln(dir.path(), &["schema"]);
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(schema["properties"]["service"].is_object(), "{schema:#}");
    for shell in ["bash", "zsh", "fish"] {
        let out = kiln(dir.path(), &["completions", shell]);
        assert!(
            out.status.success() && stdout(&out).contains("validate"),
            "{shell}"
        );
    }
}

#[test]
fn help_lists_only_working_commands() {
    let out = kiln(Path::new("."), &["--help"]);
    insta::assert_snapshot!(stdout(&out));
}
