//! A model of what executing a plan does to the observed world, for tests:
//! every step succeeds at once (creates start, awaits make healthy, shifts
//! set the backend set, destroys remove).
//!
//! Not an executor: the engine's is the real one. This exists so that
//! properties like "planning after applying is empty" can be checked
//! without one.

use std::collections::HashSet;

use crate::generation::Generation;
use crate::observed::{InstanceStatus, Observed, ObservedInstance};
use crate::steps::{Plan, Step};

/// `observed` after every step of `plan` succeeded.
pub fn apply(desired: &Generation, observed: &Observed, plan: &Plan) -> Observed {
    let mut world = observed.clone();
    for step in &plan.steps {
        apply_step(desired, &mut world, step);
    }
    world
}

/// `world` after `step` succeeded.
///
/// # Panics
/// On a step the planner must never write: creating an existing id or with
/// an identity other than the desired one, awaiting or destroying an
/// instance that does not exist, or moving traffic to an instance that is
/// not healthy.
pub fn apply_step(desired: &Generation, world: &mut Observed, step: &Step) {
    match step {
        Step::CreateInstance {
            id,
            service,
            identity,
        } => {
            assert!(
                world.instances.iter().all(|i| &i.id != id),
                "{id} created twice"
            );
            let spec = desired.instance_spec(service);
            assert_eq!(&spec.identity(), identity, "{id} has a foreign identity");
            world.instances.push(ObservedInstance {
                id: id.clone(),
                spec,
                identity: identity.clone(),
                status: InstanceStatus::Starting,
                in_rotation: false,
            });
        }
        Step::AwaitHealthy { ids, .. } => {
            for id in ids {
                let instance = find(world, id);
                assert!(instance.status.is_live(), "awaiting {id}, which is dead");
                instance.status = InstanceStatus::Healthy;
            }
        }
        Step::ShiftTraffic { service, weights } => {
            let set: HashSet<&str> = weights.iter().map(|(id, _)| id.as_str()).collect();
            for instance in &mut world.instances {
                if &instance.spec.service == service {
                    let admitted = set.contains(instance.id.as_str());
                    assert!(
                        !admitted
                            || instance.in_rotation
                            || instance.status == InstanceStatus::Healthy,
                        "traffic moved to {}, which is not healthy",
                        instance.id
                    );
                    instance.in_rotation = admitted;
                }
            }
            assert_eq!(
                set.len(),
                world
                    .instances
                    .iter()
                    .filter(|i| set.contains(i.id.as_str()))
                    .count(),
                "traffic to an instance that does not exist"
            );
        }
        Step::Hold { .. } | Step::Drain { .. } | Step::Backup { .. } => {}
        Step::DestroyInstance { id } => {
            let before = world.instances.len();
            world.instances.retain(|i| &i.id != id);
            assert_eq!(world.instances.len() + 1, before, "destroying unknown {id}");
        }
        Step::ConfigureRoute { name, route } => {
            unroute_orphans(world);
            world.routes.insert(name.clone(), route.clone());
            let pages = desired.route_pages(name);
            if pages.is_empty() {
                world.route_pages.remove(name);
            } else {
                world.route_pages.insert(name.clone(), pages);
            }
            unroute_orphans(world);
        }
        Step::RemoveRoute { name } => {
            unroute_orphans(world);
            world.routes.remove(name);
            world.route_pages.remove(name);
            unroute_orphans(world);
        }
    }
}

fn find<'w>(world: &'w mut Observed, id: &str) -> &'w mut ObservedInstance {
    world
        .instances
        .iter_mut()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("no instance {id}"))
}

/// An instance is in rotation only while a route targets its service; a
/// service that gets a route has an empty backend set until a shift.
fn unroute_orphans(world: &mut Observed) {
    let routed: HashSet<String> = world.routes.values().map(|r| r.service.clone()).collect();
    for instance in &mut world.instances {
        if !routed.contains(&instance.spec.service) {
            instance.in_rotation = false;
        }
    }
}
