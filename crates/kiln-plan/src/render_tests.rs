//! Snapshots of rendered plans, each followed by its steps, one per line, so
//! a review sees both what people read and what the engine runs.

use std::fmt::Write as _;

use kiln_spec::model::{Duration, Service, Strategy};

use crate::observed::{InstanceStatus, Observed};
use crate::steps::{Plan, Step};
use crate::testing::{generation, route, service, spec, steady};
use crate::{Generation, plan, render_plan};

fn web(replicas: u32) -> Service {
    let mut web = service("web");
    web.replicas = replicas;
    web.env.insert("RUST_LOG".into(), "info".into());
    web.files
        .insert("/etc/web/config.toml".into(), "config/web.toml".into());
    web
}

fn worker() -> Service {
    let mut worker = service("worker");
    worker.ports.clear();
    worker.health = None;
    worker
}

fn shop(web: Service) -> Generation {
    generation(spec(
        [("web", web), ("worker", worker())],
        [("web", route("web", "127.0.0.1:8080"))],
    ))
}

fn show(plan: &Plan) -> String {
    let mut out = render_plan(plan, false);
    out.push_str("--- steps ---\n");
    for step in &plan.steps {
        let line = match step {
            Step::CreateInstance { id, .. } => format!("create {id}"),
            Step::AwaitHealthy { ids, deadline } => {
                format!("await {} (deadline {deadline})", ids.join(", "))
            }
            Step::ShiftTraffic { service, weights } => {
                let set: Vec<String> = weights.iter().map(|(id, w)| format!("{id}={w}")).collect();
                format!("traffic {service}: [{}]", set.join(", "))
            }
            Step::Hold { service, duration } => format!("hold {service} {duration}"),
            Step::Drain { ids, timeout } => format!("drain {} (timeout {timeout})", ids.join(", ")),
            Step::DestroyInstance { id } => format!("destroy {id}"),
            Step::ConfigureRoute { name, route } => {
                format!(
                    "configure route {name} {} → {}",
                    route.listen, route.service
                )
            }
            Step::RemoveRoute { name } => format!("remove route {name}"),
            Step::Backup {
                service,
                command,
                timeout,
            } => format!(
                "backup {service}: {} (timeout {timeout})",
                command.join(" ")
            ),
        };
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The world after `old` was applied, and the plan to `new`.
fn replan(old: &Generation, new: &Generation) -> Plan {
    plan(new, &steady(old))
}

#[test]
fn fresh_create() {
    let desired = shop(web(3));
    insta::assert_snapshot!(show(&plan(&desired, &Observed::default())));
}

#[test]
fn rolling_replace_names_the_fields() {
    let old = shop(web(3));
    let mut changed = web(3);
    changed.image = kiln_spec::model::ImageSource::Local("web-v2".into());
    changed.env.insert("RUST_LOG".into(), "debug".into());
    insta::assert_snapshot!(show(&replan(&old, &shop(changed))));
}

#[test]
fn scale_up() {
    insta::assert_snapshot!(show(&replan(&shop(web(3)), &shop(web(5)))));
}

#[test]
fn scale_down() {
    insta::assert_snapshot!(show(&replan(&shop(web(5)), &shop(web(2)))));
}

fn replace_with(strategy: Strategy, replicas: u32) -> Plan {
    let old = shop(web(replicas));
    let mut new = shop(web(replicas));
    let memory = kiln_spec::model::ByteSize { bytes: 256 << 20 };
    let service = new.spec.services.get_mut("web").expect("declared");
    service.resources.memory = Some(memory);
    service.deploy.strategy = strategy;
    replan(&old, &new)
}

#[test]
fn blue_green() {
    insta::assert_snapshot!(show(&replace_with(Strategy::BlueGreen, 3)));
}

#[test]
fn canary() {
    let strategy = Strategy::Canary {
        steps: vec![10, 50],
        hold: Duration::from_secs(300),
    };
    insta::assert_snapshot!(show(&replace_with(strategy, 4)));
}

#[test]
fn recreate() {
    insta::assert_snapshot!(show(&replace_with(Strategy::Recreate, 2)));
}

/// A database: one replica writing an exclusive volume, with a backup.
fn db(config: &str) -> Service {
    let mut db = service("db");
    db.ports.clear();
    db.health = None;
    db.files.insert("/etc/db.conf".into(), config.into());
    db.volumes.insert(
        "/data".into(),
        kiln_spec::model::VolumeMount {
            volume: "db-data".into(),
            read_only: false,
        },
    );
    db.deploy.strategy = Strategy::Recreate;
    db.stop_grace = Duration::from_secs(30);
    db.backup = Some(kiln_spec::model::Backup {
        command: vec![
            "tar".into(),
            "-C".into(),
            "/data".into(),
            "-cf".into(),
            "-".into(),
            ".".into(),
        ],
        timeout: Duration::from_secs(300),
    });
    db
}

#[test]
fn recreate_with_a_backup_shows_the_unavailability() {
    let old = generation(spec([("db", db("db-v1.conf"))], []));
    let new = generation(spec([("db", db("db-v2.conf"))], []));
    insta::assert_snapshot!(show(&replan(&old, &new)));
}

#[test]
fn a_backup_never_runs_on_a_first_creation_or_a_heal() {
    let desired = generation(spec([("db", db("db-v1.conf"))], []));
    let fresh = plan(&desired, &Observed::default());
    let mut observed = steady(&desired);
    observed.instances[0].status = InstanceStatus::Exited { code: Some(1) };
    let healed = plan(&desired, &observed);
    for p in [&fresh, &healed] {
        assert!(!p.steps.is_empty());
        assert!(
            p.steps.iter().all(|s| !matches!(s, Step::Backup { .. })),
            "{p:?}"
        );
        assert!(
            p.services
                .iter()
                .all(|s| s.backup.is_none() && s.unavailable.is_none())
        );
    }
}

#[test]
fn destroy_removed_service() {
    let old = generation(spec(
        [
            ("web", web(2)),
            ("worker", worker()),
            ("admin", service("admin")),
        ],
        [
            ("web", route("web", "127.0.0.1:8080")),
            ("admin", route("admin", "127.0.0.1:9090")),
        ],
    ));
    insta::assert_snapshot!(show(&replan(&old, &shop(web(2)))));
}

#[test]
fn heal_crashed_instance() {
    let desired = shop(web(3));
    let mut observed = steady(&desired);
    let crashed = observed
        .instances
        .iter_mut()
        .find(|i| i.id.ends_with("-1") && i.spec.service == "web")
        .expect("web has three replicas");
    crashed.status = InstanceStatus::Exited { code: Some(137) };
    insta::assert_snapshot!(show(&plan(&desired, &observed)));
}

#[test]
fn route_change() {
    let old = generation(spec(
        [("web", web(2)), ("worker", worker())],
        [
            ("web", route("web", "127.0.0.1:8080")),
            ("legacy", route("web", "127.0.0.1:8081")),
        ],
    ));
    let new = generation(spec(
        [("web", web(2)), ("worker", worker())],
        [
            ("web", route("web", "0.0.0.0:8080")),
            ("www", route("web", "127.0.0.1:8081")),
        ],
    ));
    insta::assert_snapshot!(show(&replan(&old, &new)));
}

#[test]
fn no_changes() {
    let desired = shop(web(3));
    let planned = plan(&desired, &steady(&desired));
    assert!(planned.is_empty());
    insta::assert_snapshot!(render_plan(&planned, false));
}

#[test]
fn colors_only_when_asked() {
    let planned = replan(&shop(web(3)), &shop(web(4)));
    assert!(!render_plan(&planned, false).contains('\x1b'));
    let colored = render_plan(&planned, true);
    assert!(colored.contains("\x1b[32m+\x1b[0m instance web-"));
}
