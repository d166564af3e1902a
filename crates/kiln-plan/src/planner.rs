//! The planner: desired generation + observed world → ordered steps.
//!
//! Order of a plan: routes whose listen address a configured route takes
//! over are removed first, then routes are configured, then the instances of
//! services no longer declared are retired (freeing their volumes and
//! ports), then each declared service converges in name order, and last the
//! remaining undeclared routes are removed (so a retired service is drained
//! behind its old listener rather than cut off).

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_spec::model::{Duration, Route, Service};

use crate::diff::{Change, diff_values};
use crate::emitter::{Emitter, IdAllocator, Timing, Traffic};
use crate::generation::{Digest, Generation, InstanceSpec};
use crate::observed::{InstanceStatus, Observed, ObservedInstance};
use crate::steps::{
    Plan, RouteAction, RoutePlan, ServiceAction, ServicePlan, Step, Unavailability,
};
use crate::strategy::{self, Replacement};

/// The drain timeout for instances of a service that is no longer declared
/// (its `deploy.drain_timeout` went with its declaration).
pub const REMOVED_SERVICE_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Plans the steps that take `observed` to `desired`.
///
/// Pure and deterministic: the same inputs give the same plan, whatever the
/// order of `observed.instances`. Observed instances are indexed by service
/// once; the cost is `O(n log n)` in their number plus the size of the steps
/// written (each traffic step lists its service's whole backend set, so a
/// rolling wave of one instance at a time is quadratic in that service's
/// replicas, by design of the step).
pub fn plan(desired: &Generation, observed: &Observed) -> Plan {
    let mut steps = Vec::new();
    let desired_pages = desired.all_route_pages();
    let routing = plan_routes(
        (&desired.spec.routes, &desired_pages),
        (&observed.routes, &observed.route_pages),
        &mut steps,
    );
    let by_service = index(&observed.instances);
    let ids = IdAllocator::new(&observed.instances);
    let mut services = Vec::new();

    for (&name, instances) in &by_service {
        if !desired.spec.services.contains_key(name) {
            let traffic = routing.traffic(name);
            services.push(plan_removed(name, instances, traffic, &mut steps, &ids));
        }
    }
    for (name, service) in &desired.spec.services {
        let instances = by_service.get(name.as_str()).map_or(&[][..], Vec::as_slice);
        let input = ServiceInput {
            name,
            service,
            spec: desired.instance_spec(name),
            instances,
            traffic: routing.traffic(name),
        };
        let planned = plan_service(input, &mut steps, &ids);
        if planned.action != ServiceAction::Unchanged {
            services.push(planned);
        }
    }
    steps.extend(routing.late_steps);
    services.sort_by(|a, b| a.service.cmp(&b.service));

    Plan {
        generation_hash: desired.content_hash(),
        routes: routing.plans,
        services,
        steps,
    }
}

/// Observed instances by service, each list sorted by id.
fn index(instances: &[ObservedInstance]) -> BTreeMap<&str, Vec<&ObservedInstance>> {
    let mut by_service: BTreeMap<&str, Vec<&ObservedInstance>> = BTreeMap::new();
    for instance in instances {
        by_service
            .entry(instance.spec.service.as_str())
            .or_default()
            .push(instance);
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }
    by_service
}

struct Routing<'a> {
    plans: Vec<RoutePlan>,
    /// How each service stands while the instance steps run.
    traffic: HashMap<&'a str, Traffic>,
    /// Route removals that wait until the instance steps are done.
    late_steps: Vec<Step>,
}

impl Routing<'_> {
    fn traffic(&self, service: &str) -> Traffic {
        self.traffic.get(service).copied().unwrap_or_default()
    }
}

/// A route set and the digests of its routes' error pages.
type RoutesAndPages<'a> = (&'a BTreeMap<String, Route>, &'a BTreeMap<String, Pages>);
type Pages = BTreeMap<u16, crate::generation::Digest>;

fn plan_routes<'a>(
    (desired, desired_pages): RoutesAndPages<'a>,
    (observed, observed_pages): RoutesAndPages<'a>,
    steps: &mut Vec<Step>,
) -> Routing<'a> {
    let no_pages = Pages::new();
    // Routes per service as the route steps run: a service that is left
    // without a route at any point loses its backend set.
    let mut routes: HashMap<&str, usize> = HashMap::new();
    for route in observed.values() {
        *routes.entry(route.service.as_str()).or_default() += 1;
    }
    let mut steady: HashSet<&str> = routes.keys().copied().collect();
    let mut unroute = |routes: &mut HashMap<&'a str, usize>, service: &'a str| {
        let count = routes.get_mut(service).expect("counted");
        *count -= 1;
        if *count == 0 {
            steady.remove(service);
        }
    };

    let mut plans = Vec::new();
    let mut late_steps = Vec::new();
    let claimed: HashSet<&str> = desired.values().map(|r| r.listen.as_str()).collect();
    for (name, old) in observed {
        if desired.contains_key(name) {
            continue;
        }
        plans.push(RoutePlan {
            name: name.clone(),
            action: RouteAction::Remove { old: old.clone() },
        });
        let step = Step::RemoveRoute { name: name.clone() };
        // A declared route wants this address: free it before configuring.
        if claimed.contains(old.listen.as_str()) {
            steps.push(step);
            unroute(&mut routes, &old.service);
        } else {
            late_steps.push(step);
        }
    }
    for (name, route) in desired {
        let old_pages = observed_pages.get(name).unwrap_or(&no_pages);
        let new_pages = desired_pages.get(name).unwrap_or(&no_pages);
        let action = match observed.get(name) {
            Some(old) if old == route && old_pages == new_pages => continue,
            Some(old) => {
                let mut changes = diff_values(old, route);
                // Same paths, other content: named by the pages' digests.
                if old.error_pages == route.error_pages {
                    changes.extend(diff_values(
                        &serde_json::json!({ "error_pages": old_pages }),
                        &serde_json::json!({ "error_pages": new_pages }),
                    ));
                }
                RouteAction::Change {
                    old: old.clone(),
                    new: route.clone(),
                    changes,
                }
            }
            None => RouteAction::Create {
                route: route.clone(),
            },
        };
        plans.push(RoutePlan {
            name: name.clone(),
            action,
        });
        steps.push(Step::ConfigureRoute {
            name: name.clone(),
            route: route.clone(),
        });
        *routes.entry(route.service.as_str()).or_default() += 1;
        if let Some(old) = observed.get(name) {
            unroute(&mut routes, &old.service);
        }
    }
    plans.sort_by(|a, b| a.name.cmp(&b.name));
    let traffic = routes
        .into_iter()
        .filter(|&(_, count)| count > 0)
        .map(|(service, _)| {
            let traffic = if steady.contains(service) {
                Traffic::Steady
            } else {
                Traffic::Fresh
            };
            (service, traffic)
        })
        .collect();
    Routing {
        plans,
        traffic,
        late_steps,
    }
}

fn plan_removed(
    name: &str,
    instances: &[&ObservedInstance],
    traffic: Traffic,
    steps: &mut Vec<Step>,
    ids: &IdAllocator<'_>,
) -> ServicePlan {
    let timing = Timing {
        deadline: Duration::from_millis(0),
        drain_timeout: REMOVED_SERVICE_DRAIN_TIMEOUT,
    };
    let mut em = Emitter::new(name, traffic, timing, instances, steps, ids);
    em.retire(instances);
    ServicePlan {
        service: name.to_owned(),
        action: ServiceAction::Destroy,
        strategy: None,
        reasons: vec!["no longer declared".to_owned()],
        creates: em.creates,
        destroys: em.destroys,
        unavailable: None,
        backup: None,
    }
}

struct ServiceInput<'a, 'o> {
    name: &'a str,
    service: &'a Service,
    spec: InstanceSpec,
    /// Observed instances of the service, sorted by id.
    instances: &'a [&'o ObservedInstance],
    traffic: Traffic,
}

fn plan_service(
    input: ServiceInput<'_, '_>,
    steps: &mut Vec<Step>,
    ids: &IdAllocator<'_>,
) -> ServicePlan {
    let ServiceInput {
        name,
        service,
        spec,
        instances,
        traffic,
    } = input;
    let identity = spec.identity();
    let replicas = service.replicas as usize;
    let timing = Timing {
        deadline: service.deploy.deadline,
        drain_timeout: service.deploy.drain_timeout,
    };
    let first_step = steps.len();
    let mut em = Emitter::new(name, traffic, timing, instances, steps, ids);
    let mut strategy = None;
    let mut reasons = Vec::new();
    let mut unavailable = None;
    let mut backup = None;

    let (current, stale): (Vec<&ObservedInstance>, Vec<&ObservedInstance>) =
        instances.iter().partition(|i| i.identity == identity);

    let action = if instances.is_empty() {
        if replicas == 0 {
            ServiceAction::Unchanged
        } else {
            let fresh = em.create(&identity, replicas);
            em.await_healthy(fresh.clone());
            em.admit(&fresh);
            reasons.push(format!("{replicas} declared, none running"));
            ServiceAction::Create
        }
    } else if replicas == 0 {
        em.retire(instances);
        reasons.push("replicas: 0".to_owned());
        ServiceAction::Scale {
            from: count(instances.len()),
            to: 0,
        }
    } else if !stale.is_empty() {
        let changes = identity_changes(&stale, &spec, &identity);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        reasons.push(format!("identity changed: {}", paths.join(", ")));
        let (current_live, current_dead): (Vec<_>, Vec<_>) =
            current.into_iter().partition(|i| i.status.is_live());
        let (stale_live, stale_dead): (Vec<_>, Vec<_>) =
            stale.into_iter().partition(|i| i.status.is_live());
        let mut dead = stale_dead;
        dead.extend(current_dead);
        reasons.extend(dead.iter().map(|i| status_reason(i)));
        strategy::replace(
            &mut em,
            &service.deploy.strategy,
            Replacement {
                identity: &identity,
                replicas,
                current_live,
                stale_live,
                dead,
            },
        );
        strategy = Some(service.deploy.strategy.clone());
        backup = service.backup.clone();
        if service.deploy.strategy == kiln_spec::model::Strategy::Recreate {
            unavailable = Some(Unavailability {
                stop_grace: service.stop_grace,
                backup_timeout: backup.as_ref().map(|b| b.timeout),
                deadline: service.deploy.deadline,
            });
        }
        ServiceAction::Replace { changes }
    } else {
        converge(&mut em, &identity, replicas, current, &mut reasons)
    };

    let (creates, destroys) = (em.creates, em.destroys);
    // The backup runs before the first new instance: for `recreate`, after
    // every old one is gone, so it copies data nobody writes.
    let backup = backup.and_then(|b| {
        let at = first_step
            + steps[first_step..]
                .iter()
                .position(|s| matches!(s, Step::CreateInstance { .. }))?;
        steps.insert(
            at,
            Step::Backup {
                service: name.to_owned(),
                command: b.command.clone(),
                timeout: b.timeout,
            },
        );
        Some(b.command)
    });
    let unavailable = unavailable
        .filter(|_| !creates.is_empty())
        .map(|u| Unavailability {
            backup_timeout: u.backup_timeout.filter(|_| backup.is_some()),
            ..u
        });
    ServicePlan {
        service: name.to_owned(),
        action,
        strategy,
        reasons,
        creates,
        destroys,
        unavailable,
        backup,
    }
}

/// Every instance has the desired identity: heal the dead, scale to
/// `replicas`, and finish what an interrupted rollout left (instances still
/// starting or out of rotation).
fn converge(
    em: &mut Emitter<'_, '_>,
    identity: &Digest,
    replicas: usize,
    current: Vec<&ObservedInstance>,
    reasons: &mut Vec<String>,
) -> ServiceAction {
    let (mut live, dead): (Vec<_>, Vec<_>) = current.into_iter().partition(|i| i.status.is_live());
    let observed_live = live.len();
    let excess = strategy::pick_victims(&mut live, observed_live.saturating_sub(replicas));
    let mut victims = dead.clone();
    victims.extend(excess.iter().copied());
    em.retire(&victims);

    let resumed: Vec<&ObservedInstance> = live
        .iter()
        .copied()
        .filter(|i| i.status == InstanceStatus::Starting || (em.routed() && !em.in_rotation(&i.id)))
        .collect();
    let fresh = em.create(identity, replicas.saturating_sub(live.len()));
    let mut pending: Vec<String> = live
        .iter()
        .filter(|i| i.status == InstanceStatus::Starting)
        .map(|i| i.id.clone())
        .collect();
    pending.extend(fresh.iter().cloned());
    em.await_healthy(pending);
    em.admit(live.iter().map(|i| &i.id).chain(&fresh));

    if !dead.is_empty() {
        reasons.extend(dead.iter().map(|i| status_reason(i)));
        ServiceAction::Heal {
            ids: dead.iter().map(|i| i.id.clone()).collect(),
        }
    } else if observed_live != replicas {
        reasons.push(format!("replicas: {observed_live} → {replicas}"));
        ServiceAction::Scale {
            from: count(observed_live),
            to: count(replicas),
        }
    } else if em.wrote_steps() {
        reasons.extend(resumed.iter().map(|i| status_reason(i)));
        ServiceAction::Resume {
            ids: resumed.iter().map(|i| i.id.clone()).collect(),
        }
    } else {
        ServiceAction::Unchanged
    }
}

/// The fields that differ between each older identity and the desired spec,
/// without repeats, by path.
fn identity_changes(
    stale: &[&ObservedInstance],
    desired: &InstanceSpec,
    identity: &Digest,
) -> Vec<Change> {
    let mut seen = HashSet::new();
    let mut changes: Vec<Change> = Vec::new();
    for instance in stale {
        if !seen.insert(&instance.identity) {
            continue;
        }
        let mut diff = diff_values(&instance.spec, desired);
        if diff.is_empty() {
            // The recorded spec matches but the identity does not (an older
            // hashing, or a tampered record): name the identity itself.
            diff.push(Change {
                path: "identity".to_owned(),
                old: Some(instance.identity.0.clone().into()),
                new: Some(identity.0.clone().into()),
            });
        }
        for change in diff {
            if !changes.contains(&change) {
                changes.push(change);
            }
        }
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    changes
}

fn status_reason(instance: &ObservedInstance) -> String {
    let id = &instance.id;
    match instance.status {
        InstanceStatus::Exited { code: Some(code) } => format!("{id} exited with code {code}"),
        InstanceStatus::Exited { code: None } => format!("{id} exited"),
        InstanceStatus::Unhealthy => format!("{id} is unhealthy"),
        InstanceStatus::Starting => format!("{id} is still starting"),
        InstanceStatus::Healthy => format!("{id} is healthy but not in rotation"),
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
