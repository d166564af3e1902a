//! Planning a large world: 500 services of 20 replicas (10 000 instances),
//! every service routed and rolling, half of them with a changed identity.
//! Goal: at most 50 ms per plan.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_plan::testing::{generation, route, service, spec, steady};
use kiln_plan::{Generation, Observed, plan};
use kiln_spec::model::Strategy;

const SERVICES: usize = 500;
const REPLICAS: u32 = 20;

fn world() -> (Generation, Observed) {
    let names: Vec<String> = (0..SERVICES).map(|i| format!("svc{i:03}")).collect();
    let build = |changed: bool| {
        let services = names.iter().enumerate().map(|(i, name)| {
            let mut svc = service(name);
            svc.replicas = REPLICAS;
            svc.deploy.strategy = Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
            };
            let level = if changed && i % 2 == 0 {
                "debug"
            } else {
                "info"
            };
            svc.env.insert("RUST_LOG".to_owned(), level.to_owned());
            (name.as_str(), svc)
        });
        let routes = names.iter().enumerate().map(|(i, name)| {
            let listen = format!("127.0.0.1:{}", 10_000 + i);
            (name.as_str(), route(name, &listen))
        });
        generation(spec(services, routes))
    };
    let observed = steady(&build(false));
    (build(true), observed)
}

fn bench_plan(c: &mut Criterion) {
    let (desired, observed) = world();
    assert_eq!(observed.instances.len(), SERVICES * REPLICAS as usize);
    let planned = plan(&desired, &observed);
    assert_eq!(planned.services.len(), SERVICES / 2);
    c.bench_function("plan 500 services, 10k instances, half replaced", |b| {
        b.iter(|| plan(black_box(&desired), black_box(&observed)))
    });
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
