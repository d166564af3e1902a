//! Properties of the planner, checked against the model of execution in
//! `kiln_plan::simulate`.

use std::collections::{HashMap, HashSet};

use kiln_plan::testing::{generation, route, service, spec, steady};
use kiln_plan::{
    Digest, Generation, InstanceSpec, InstanceStatus, Observed, ObservedInstance, Plan,
    ServiceAction, Step, TRAFFIC_TOTAL, plan, render_plan, simulate,
};
use kiln_spec::model::{
    ByteSize, Duration, HealthCheck, Port, Protocol, SecretSource, Service,
    Strategy as DeployStrategy, VolumeMount,
};
use proptest::prelude::*;

// ---------------------------------------------------------------- inputs

fn deploy_strategy() -> impl Strategy<Value = DeployStrategy> {
    prop_oneof![
        (0u32..3, 0u32..3)
            .prop_filter("validation rejects 0/0", |(s, u)| s + u > 0)
            .prop_map(|(max_surge, max_unavailable)| DeployStrategy::Rolling {
                max_surge,
                max_unavailable
            }),
        Just(DeployStrategy::BlueGreen),
        (
            proptest::sample::subsequence(vec![1, 10, 25, 50, 75, 99], 0..4),
            0u64..3
        )
            .prop_map(|(steps, minutes)| DeployStrategy::Canary {
                steps,
                hold: Duration::from_secs(minutes * 60),
            }),
        Just(DeployStrategy::Recreate),
    ]
}

fn status() -> impl Strategy<Value = InstanceStatus> {
    prop_oneof![
        3 => Just(InstanceStatus::Healthy),
        1 => Just(InstanceStatus::Starting),
        1 => Just(InstanceStatus::Unhealthy),
        1 => proptest::option::of(0i32..200).prop_map(|code| InstanceStatus::Exited { code }),
    ]
}

/// Which of a few images and log levels a service (or an instance) has:
/// equal variants are equal identities.
type Variant = (u8, u8);

fn variant() -> impl Strategy<Value = Variant> {
    (0u8..2, 0u8..2)
}

#[derive(Clone, Debug)]
struct InstanceCase {
    variant: Variant,
    status: InstanceStatus,
    in_rotation: bool,
}

fn instance_case() -> impl Strategy<Value = InstanceCase> {
    (variant(), status(), any::<bool>()).prop_map(|(variant, status, in_rotation)| InstanceCase {
        variant,
        status,
        in_rotation,
    })
}

#[derive(Clone, Debug)]
struct ServiceCase {
    replicas: u32,
    strategy: DeployStrategy,
    variant: Variant,
    /// 0: no route; 1: routed, route not configured yet; 2: configured;
    /// 3: configured on another address.
    route: u8,
    instances: Vec<InstanceCase>,
}

fn service_case() -> impl Strategy<Value = ServiceCase> {
    (
        0u32..8,
        deploy_strategy(),
        variant(),
        0u8..4,
        proptest::collection::vec(instance_case(), 0..8),
    )
        .prop_map(
            |(replicas, strategy, variant, route, instances)| ServiceCase {
                replicas,
                strategy,
                variant,
                route,
                instances,
            },
        )
}

#[derive(Clone, Debug)]
struct WorldCase {
    services: Vec<ServiceCase>,
    /// Services no longer declared: their instances, and whether a route
    /// still serves them (on its own address, or one a declared route takes).
    removed: Vec<(Vec<InstanceCase>, u8)>,
}

fn world_case() -> impl Strategy<Value = WorldCase> {
    (
        proptest::collection::vec(service_case(), 1..4),
        proptest::collection::vec(
            (proptest::collection::vec(instance_case(), 0..4), 0u8..3),
            0..3,
        ),
    )
        .prop_map(|(services, removed)| WorldCase { services, removed })
}

fn variant_service(variant: Variant) -> Service {
    let mut svc = service(&format!("img{}", variant.0));
    svc.env
        .insert("RUST_LOG".to_owned(), format!("level{}", variant.1));
    svc
}

/// The instance spec of `name` built from `variant`.
fn variant_spec(name: &str, variant: Variant) -> InstanceSpec {
    generation(spec([(name, variant_service(variant))], [])).instance_spec(name)
}

fn instances(name: &str, cases: &[InstanceCase]) -> Vec<ObservedInstance> {
    cases
        .iter()
        .enumerate()
        .map(|(n, case)| {
            let spec = variant_spec(name, case.variant);
            let identity = spec.identity();
            ObservedInstance {
                id: format!("{name}-{}-{n}", identity.short(8)),
                spec,
                identity,
                status: case.status,
                in_rotation: case.in_rotation,
            }
        })
        .collect()
}

fn build(case: &WorldCase) -> (Generation, Observed) {
    let names: Vec<String> = (0..case.services.len()).map(|i| format!("s{i}")).collect();
    let mut services = Vec::new();
    let mut routes = Vec::new();
    let mut observed = Observed::default();
    for (i, (name, svc)) in names.iter().zip(&case.services).enumerate() {
        let mut declared = variant_service(svc.variant);
        declared.replicas = svc.replicas;
        declared.deploy.strategy = svc.strategy.clone();
        services.push((name.as_str(), declared));
        if svc.route > 0 {
            let listen = format!("127.0.0.1:{}", 8000 + i);
            routes.push((name.as_str(), route(name, &listen)));
            match svc.route {
                2 => {
                    observed.routes.insert(name.clone(), route(name, &listen));
                }
                3 => {
                    let moved = format!("127.0.0.2:{}", 8000 + i);
                    observed.routes.insert(name.clone(), route(name, &moved));
                }
                _ => {}
            }
        }
        observed.instances.extend(instances(name, &svc.instances));
    }
    for (j, (cases, routed)) in case.removed.iter().enumerate() {
        let name = format!("gone{j}");
        observed.instances.extend(instances(&name, cases));
        let listen = match routed {
            1 => format!("127.0.0.1:{}", 9000 + j),
            // The address of a declared route, if there is one.
            2 => "127.0.0.1:8000".to_owned(),
            _ => continue,
        };
        observed
            .routes
            .insert(format!("old-{name}"), route(&name, &listen));
    }
    (generation(spec(services, routes)), observed)
}

// ---------------------------------------------------------------- checks

/// Runs `plan` step by step on the model, checking after each step that an
/// instance is out of traffic and drained (or exited) before it is
/// destroyed, and that every traffic shift is a full share.
fn execute(desired: &Generation, observed: &Observed, plan: &Plan) -> Observed {
    let mut world = observed.clone();
    let mut drained = HashSet::new();
    for step in &plan.steps {
        let routed: HashSet<&str> = world.routes.values().map(|r| r.service.as_str()).collect();
        let serving =
            |i: &ObservedInstance| i.in_rotation && routed.contains(i.spec.service.as_str());
        match step {
            Step::Drain { ids, .. } => {
                for id in ids {
                    let instance = world
                        .instances
                        .iter()
                        .find(|i| &i.id == id)
                        .expect("drains what exists");
                    assert!(!serving(instance), "{id} drained while in rotation");
                    drained.insert(id.clone());
                }
            }
            Step::DestroyInstance { id } => {
                let instance = world
                    .instances
                    .iter()
                    .find(|i| &i.id == id)
                    .expect("destroys what exists");
                assert!(!serving(instance), "{id} destroyed while in rotation");
                assert!(
                    drained.contains(id)
                        || matches!(instance.status, InstanceStatus::Exited { .. }),
                    "{id} destroyed without a drain"
                );
            }
            Step::ShiftTraffic { weights, .. } if !weights.is_empty() => {
                let total: u32 = weights.iter().map(|(_, w)| w).sum();
                assert_eq!(total, TRAFFIC_TOTAL);
            }
            _ => {}
        }
        simulate::apply_step(desired, &mut world, step);
    }
    world
}

/// `world` runs exactly what `desired` declares: the declared replicas of
/// each service, all of its identity and healthy, in rotation where routed,
/// nothing else, and the declared routes.
fn assert_converged(desired: &Generation, world: &Observed) -> Result<(), TestCaseError> {
    prop_assert_eq!(&world.routes, &desired.spec.routes);
    let routed: HashSet<&str> = desired
        .spec
        .routes
        .values()
        .map(|r| r.service.as_str())
        .collect();
    for (name, service) in &desired.spec.services {
        let identity = desired.instance_spec(name).identity();
        let instances: Vec<&ObservedInstance> = world
            .instances
            .iter()
            .filter(|i| &i.spec.service == name)
            .collect();
        prop_assert_eq!(
            instances.len(),
            service.replicas as usize,
            "replicas of {}",
            name
        );
        for instance in instances {
            prop_assert_eq!(&instance.identity, &identity);
            prop_assert_eq!(instance.status, InstanceStatus::Healthy);
            if routed.contains(name.as_str()) {
                prop_assert!(instance.in_rotation, "{} out of rotation", instance.id);
            }
        }
    }
    for instance in &world.instances {
        prop_assert!(
            desired.spec.services.contains_key(&instance.spec.service),
            "{} of an undeclared service survived",
            instance.id
        );
    }
    Ok(())
}

fn assert_empty(desired: &Generation, world: &Observed) -> Result<(), TestCaseError> {
    let again = plan(desired, world);
    prop_assert!(
        again.is_empty(),
        "planning after apply is not empty:\n{}",
        render_plan(&again, false)
    );
    Ok(())
}

// ---------------------------------------------------------------- identity inputs

#[derive(Clone, Copy, Debug)]
enum IdentityChange {
    Image,
    Command,
    Env,
    File,
    Secret,
    Volume,
    Resources,
    Ports,
}

fn identity_change() -> impl Strategy<Value = IdentityChange> {
    use IdentityChange::*;
    proptest::sample::select(vec![
        Image, Command, Env, File, Secret, Volume, Resources, Ports,
    ])
}

/// A service that uses every identity input.
fn full_service(replicas: u32, strategy: DeployStrategy) -> Service {
    let mut svc = service("app");
    svc.replicas = replicas;
    svc.deploy.strategy = strategy;
    svc.command = Some(vec!["/app/run".to_owned()]);
    svc.env.insert("RUST_LOG".to_owned(), "info".to_owned());
    svc.files
        .insert("/etc/app.toml".to_owned(), "config/app.toml".to_owned());
    svc.secrets.insert(
        "PGPASSWORD".to_owned(),
        SecretSource::File(".secrets/db".to_owned()),
    );
    svc.volumes.insert(
        "/data".to_owned(),
        VolumeMount {
            volume: "data".to_owned(),
            read_only: false,
        },
    );
    svc
}

fn app(replicas: u32, strategy: DeployStrategy, routed: bool) -> Generation {
    let routes = routed.then(|| ("app", route("app", "127.0.0.1:8080")));
    generation(spec([("app", full_service(replicas, strategy))], routes))
}

/// Applies `change` to the service `app`; returns the path prefix the
/// replacement must name.
fn change_identity(
    generation: &mut Generation,
    change: IdentityChange,
    salt: &str,
) -> &'static str {
    let svc = generation.spec.services.get_mut("app").expect("declared");
    match change {
        IdentityChange::Image => {
            svc.image = kiln_spec::model::ImageSource::Local("app-next".to_owned());
            let digest = Digest::of(format!("next image {salt}").as_bytes());
            generation
                .resolved
                .images
                .insert("app-next".to_owned(), digest);
            "image"
        }
        IdentityChange::Command => {
            svc.command = Some(vec!["/app/run".to_owned(), format!("--{salt}")]);
            "command"
        }
        IdentityChange::Env => {
            svc.env
                .insert("RUST_LOG".to_owned(), format!("debug{salt}"));
            "env.RUST_LOG"
        }
        IdentityChange::File => {
            let digest = Digest::of(format!("edited {salt}").as_bytes());
            generation
                .resolved
                .files
                .insert("config/app.toml".to_owned(), digest);
            "files.\"/etc/app.toml\""
        }
        IdentityChange::Secret => {
            let digest = Digest::of(format!("rotated {salt}").as_bytes());
            generation
                .resolved
                .secrets
                .insert("file:.secrets/db".to_owned(), digest);
            "secrets.PGPASSWORD"
        }
        IdentityChange::Volume => {
            let mount = svc.volumes.get_mut("/data").expect("mounted");
            mount.read_only = !mount.read_only;
            "volumes.\"/data\".read_only"
        }
        IdentityChange::Resources => {
            svc.resources.memory = Some(ByteSize {
                bytes: (salt.len() as u64 + 1) << 20,
            });
            "resources.memory"
        }
        IdentityChange::Ports => {
            svc.ports.insert(
                "admin".to_owned(),
                Port {
                    protocol: Protocol::Tcp,
                    container: None,
                },
            );
            "ports.admin"
        }
    }
}

#[derive(Clone, Debug)]
enum SettingChange {
    Health,
    Strategy(DeployStrategy),
    Deadline(u64),
    DrainTimeout(u64),
    Drift,
    StopGrace(u64),
}

fn setting_change() -> impl Strategy<Value = SettingChange> {
    prop_oneof![
        Just(SettingChange::Health),
        deploy_strategy().prop_map(SettingChange::Strategy),
        (1u64..600).prop_map(SettingChange::Deadline),
        (1u64..600).prop_map(SettingChange::DrainTimeout),
        Just(SettingChange::Drift),
        (1u64..600).prop_map(SettingChange::StopGrace),
    ]
}

fn change_setting(generation: &mut Generation, change: &SettingChange) {
    let svc = generation.spec.services.get_mut("app").expect("declared");
    match change {
        SettingChange::Health => {
            let health = svc.health.as_mut().expect("has a health check");
            health.check = HealthCheck::Tcp {
                port: "http".to_owned(),
            };
            health.healthy += 1;
        }
        SettingChange::Strategy(strategy) => svc.deploy.strategy = strategy.clone(),
        SettingChange::Deadline(s) => svc.deploy.deadline = Duration::from_secs(*s),
        SettingChange::DrainTimeout(s) => svc.deploy.drain_timeout = Duration::from_secs(*s),
        SettingChange::Drift => svc.drift = kiln_spec::model::DriftPolicy::Report,
        SettingChange::StopGrace(s) => svc.stop_grace = Duration::from_secs(*s),
    }
}

fn ids_of(observed: &Observed) -> Vec<String> {
    observed.instances.iter().map(|i| i.id.clone()).collect()
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Applying a plan reaches the declared state and planning again gives
    /// an empty plan, from any world: crashed, half-rolled-out, with
    /// undeclared services and stale routes.
    #[test]
    fn plan_after_apply_is_empty(case in world_case()) {
        let (desired, observed) = build(&case);
        let first = plan(&desired, &observed);
        let world = execute(&desired, &observed, &first);
        assert_converged(&desired, &world)?;
        assert_empty(&desired, &world)?;
    }

    /// The plan does not depend on the order instances were observed in.
    #[test]
    fn plans_are_reproducible(case in world_case()) {
        let (desired, mut observed) = build(&case);
        let first = plan(&desired, &observed);
        observed.instances.reverse();
        prop_assert_eq!(first, plan(&desired, &observed));
    }

    /// A changed identity input replaces every instance, names the field,
    /// and creates exactly the declared replicas of the new identity.
    #[test]
    fn a_changed_identity_always_replaces(
        replicas in 1u32..6,
        strategy in deploy_strategy(),
        routed in any::<bool>(),
        change in identity_change(),
        salt in "[a-z]{1,6}",
    ) {
        let old = app(replicas, strategy.clone(), routed);
        let observed = steady(&old);
        let mut desired = old.clone();
        let expected = change_identity(&mut desired, change, &salt);
        let planned = plan(&desired, &observed);

        prop_assert_eq!(planned.services.len(), 1);
        let service = &planned.services[0];
        let ServiceAction::Replace { changes } = &service.action else {
            return Err(TestCaseError::fail(format!("not a replace: {:?}", service.action)));
        };
        prop_assert!(
            changes.iter().any(|c| c.path == expected),
            "{expected} not named in {changes:?}"
        );
        let mut destroyed = service.destroys.clone();
        destroyed.sort();
        prop_assert_eq!(destroyed, ids_of(&observed));
        prop_assert_eq!(service.creates.len(), replicas as usize);
        let identity = desired.instance_spec("app").identity();
        for step in &planned.steps {
            if let Step::CreateInstance { identity: created, .. } = step {
                prop_assert_eq!(created, &identity);
            }
        }
        let world = execute(&desired, &observed, &planned);
        assert_empty(&desired, &world)?;
    }

    /// A rolling replacement, from `replicas` healthy instances in rotation,
    /// keeps at least `replicas - max_unavailable` serving and at most
    /// `replicas + max_surge` alive after every step.
    #[test]
    fn rolling_stays_within_its_bounds(
        replicas in 1u32..9,
        (max_surge, max_unavailable) in (0u32..4, 0u32..4)
            .prop_map(|(s, u)| if s + u == 0 { (0, 1) } else { (s, u) }),
        routed in any::<bool>(),
        change in identity_change(),
    ) {
        let strategy = DeployStrategy::Rolling { max_surge, max_unavailable };
        let old = app(replicas, strategy, routed);
        let observed = steady(&old);
        let mut desired = old.clone();
        change_identity(&mut desired, change, "x");
        let planned = plan(&desired, &observed);

        let (r, surge, unavailable) = (replicas as usize, max_surge as usize, max_unavailable as usize);
        let mut world = observed.clone();
        for (n, step) in planned.steps.iter().enumerate() {
            simulate::apply_step(&desired, &mut world, step);
            let alive = world.instances.iter().filter(|i| i.status.is_live()).count();
            let serving = world
                .instances
                .iter()
                .filter(|i| i.status == InstanceStatus::Healthy && (!routed || i.in_rotation))
                .count();
            prop_assert!(alive <= r + surge, "step {n}: {alive} alive > {r} + {surge}");
            prop_assert!(
                serving + unavailable >= r,
                "step {n}: {serving} serving < {r} - {unavailable}"
            );
        }
        assert_empty(&desired, &world)?;
    }

    /// Scaling only creates or only destroys, whatever else changed outside
    /// the identity.
    #[test]
    fn scaling_only_creates_or_only_destroys(
        (from, to) in (1u32..8, 0u32..7).prop_map(|(f, t)| (f, if t >= f { t + 1 } else { t })),
        strategy in deploy_strategy(),
        routed in any::<bool>(),
        setting in setting_change(),
    ) {
        let old = app(from, strategy, routed);
        let observed = steady(&old);
        let mut desired = old.clone();
        change_setting(&mut desired, &setting);
        desired.spec.services.get_mut("app").expect("declared").replicas = to;
        let planned = plan(&desired, &observed);

        prop_assert_eq!(planned.services.len(), 1);
        prop_assert_eq!(&planned.services[0].action, &ServiceAction::Scale { from, to });
        let creates = planned.steps.iter().filter(|s| matches!(s, Step::CreateInstance { .. })).count();
        let destroys = planned.steps.iter().filter(|s| matches!(s, Step::DestroyInstance { .. })).count();
        if to > from {
            prop_assert_eq!((creates, destroys), ((to - from) as usize, 0));
        } else {
            prop_assert_eq!((creates, destroys), (0, (from - to) as usize));
        }
        let world = execute(&desired, &observed, &planned);
        assert_empty(&desired, &world)?;
    }

    /// Settings outside the identity never produce instance steps.
    #[test]
    fn settings_outside_the_identity_change_nothing(
        replicas in 0u32..6,
        routed in any::<bool>(),
        setting in setting_change(),
    ) {
        let old = app(replicas, DeployStrategy::BlueGreen, routed);
        let mut desired = old.clone();
        change_setting(&mut desired, &setting);
        let planned = plan(&desired, &steady(&old));
        prop_assert!(planned.is_empty(), "{}", render_plan(&planned, false));
    }

    /// Every identity input is in the identity hash; replicas and the
    /// settings that govern instances are not.
    #[test]
    fn the_identity_hash_covers_exactly_the_identity_inputs(
        change in identity_change(),
        setting in setting_change(),
        replicas in 0u32..10,
        salt in "[a-z]{1,6}",
    ) {
        let base = app(2, DeployStrategy::Recreate, true);
        let identity = base.instance_spec("app").identity();

        let mut changed = base.clone();
        change_identity(&mut changed, change, &salt);
        prop_assert_ne!(changed.instance_spec("app").identity(), identity.clone());

        let mut managed = base.clone();
        change_setting(&mut managed, &setting);
        managed.spec.services.get_mut("app").expect("declared").replicas = replicas;
        prop_assert_eq!(managed.instance_spec("app").identity(), identity);
    }
}

// ---------------------------------------------------------------- examples

#[test]
fn a_crashed_rollout_is_finished_by_giving_traffic_to_healthy_new_instances() {
    let desired = app(2, DeployStrategy::BlueGreen, true);
    let mut observed = steady(&desired);
    for instance in &mut observed.instances {
        instance.in_rotation = false;
    }
    let planned = plan(&desired, &observed);
    assert!(matches!(
        planned.services[0].action,
        ServiceAction::Resume { .. }
    ));
    let shifts: Vec<&Step> = planned
        .steps
        .iter()
        .filter(|s| matches!(s, Step::ShiftTraffic { .. }))
        .collect();
    assert_eq!(shifts.len(), 1);
    assert_eq!(
        planned.steps.len(),
        1,
        "only traffic moves: {:?}",
        planned.steps
    );
    let world = simulate::apply(&desired, &observed, &planned);
    assert!(plan(&desired, &world).is_empty());
}

#[test]
fn new_ids_skip_every_observed_one() {
    let desired = app(1, DeployStrategy::BlueGreen, false);
    let mut observed = steady(&desired);
    observed.instances[0].status = InstanceStatus::Exited { code: Some(1) };
    let planned = plan(&desired, &observed);
    let short = desired.instance_spec("app").identity();
    assert_eq!(
        planned.services[0].creates,
        [format!("app-{}-1", short.short(8))]
    );
}

#[test]
fn removed_services_leave_traffic_before_they_drain() {
    let old = app(2, DeployStrategy::BlueGreen, true);
    let desired = generation(spec([], []));
    let planned = plan(&desired, &steady(&old));
    let kinds: Vec<&str> = planned
        .steps
        .iter()
        .map(|s| match s {
            Step::ShiftTraffic { weights, .. } if weights.is_empty() => "unroute",
            Step::Drain { .. } => "drain",
            Step::DestroyInstance { .. } => "destroy",
            Step::RemoveRoute { .. } => "remove-route",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["unroute", "drain", "destroy", "destroy", "remove-route"]
    );
}

#[test]
fn canary_weights_follow_the_steps() {
    let old = app(
        10,
        DeployStrategy::Canary {
            steps: vec![10, 50],
            hold: Duration::from_secs(60),
        },
        true,
    );
    let mut desired = old.clone();
    change_identity(&mut desired, IdentityChange::Env, "x");
    let planned = plan(&desired, &steady(&old));
    let fresh: HashSet<&String> = planned.services[0].creates.iter().collect();
    let shares: Vec<u32> = planned
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::ShiftTraffic { weights, .. } => Some(
                weights
                    .iter()
                    .filter(|(id, _)| fresh.contains(id))
                    .map(|(_, w)| w)
                    .sum(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(shares, [1000, 5000, TRAFFIC_TOTAL]);
    let holds = planned
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Hold { .. }))
        .count();
    assert_eq!(holds, 2);
    // ceil(10 * 10%) = 1 then ceil(10 * 50%) = 5 new instances.
    let counts: HashMap<usize, usize> = planned
        .steps
        .iter()
        .enumerate()
        .filter_map(|(n, s)| match s {
            Step::ShiftTraffic { weights, .. } => Some((
                n,
                weights.iter().filter(|(id, _)| fresh.contains(id)).count(),
            )),
            _ => None,
        })
        .collect();
    let mut counts: Vec<usize> = {
        let mut c: Vec<(usize, usize)> = counts.into_iter().collect();
        c.sort();
        c.into_iter().map(|(_, n)| n).collect()
    };
    counts.dedup();
    assert_eq!(counts, [1, 5, 10]);
}
