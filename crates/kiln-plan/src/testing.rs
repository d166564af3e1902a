//! Fixtures shared by the unit tests, the property tests and the benchmark:
//! small valid specs, generations resolved to made-up digests, and the
//! observed world of a generation that runs as declared.

use std::collections::BTreeMap;

use kiln_spec::model::{
    Deploy, DriftPolicy, Driver, Duration, Health, HealthCheck, ImageSource, Policy, Port, Project,
    Protocol, Resources, Route, Runtime, Service, Spec, Strategy,
};

use crate::generation::{Digest, Generation, Resolved, secret_key};
use crate::observed::{InstanceStatus, Observed, ObservedInstance};

/// A service of image `image` (a local image name), one replica, one
/// `http` port with a health check, rolling with a surge of one.
pub fn service(image: &str) -> Service {
    Service {
        image: ImageSource::Local(image.to_owned()),
        replicas: 1,
        command: None,
        env: BTreeMap::new(),
        files: BTreeMap::new(),
        secrets: BTreeMap::new(),
        volumes: BTreeMap::new(),
        ports: BTreeMap::from([(
            "http".to_owned(),
            Port {
                protocol: Protocol::Http,
                container: None,
            },
        )]),
        health: Some(Health {
            check: HealthCheck::Http {
                path: "/healthz".to_owned(),
                port: "http".to_owned(),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy: 2,
            unhealthy: 3,
            start_period: Duration::from_millis(0),
        }),
        deploy: Deploy {
            strategy: Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
            },
            deadline: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
        },
        resources: Resources::default(),
        drift: DriftPolicy::Replace,
        stop_grace: Duration::from_secs(10),
        backup: None,
    }
}

/// A route of `service`'s `http` port.
pub fn route(service: &str, listen: &str) -> Route {
    Route {
        listen: listen.to_owned(),
        service: service.to_owned(),
        port: "http".to_owned(),
        protocol: Protocol::Http,
        maintenance: false,
        timeout: None,
        max_connections: None,
        balance: Default::default(),
        error_pages: BTreeMap::new(),
        hosts: Vec::new(),
    }
}

pub fn spec<'a>(
    services: impl IntoIterator<Item = (&'a str, Service)>,
    routes: impl IntoIterator<Item = (&'a str, Route)>,
) -> Spec {
    Spec {
        project: Project {
            name: "shop".to_owned(),
        },
        images: BTreeMap::new(),
        services: services
            .into_iter()
            .map(|(name, s)| (name.to_owned(), s))
            .collect(),
        volumes: BTreeMap::new(),
        routes: routes
            .into_iter()
            .map(|(name, r)| (name.to_owned(), r))
            .collect(),
        runtime: Runtime {
            driver: Driver::Sandbox,
        },
        policy: Policy {
            require_signed: false,
            trusted_keys: Vec::new(),
            keep_generations: None,
        },
    }
}

/// Made-up digests for every reference of `spec`: the digest of the
/// reference itself, so different references get different digests.
pub fn resolve(spec: &Spec) -> Resolved {
    let mut resolved = Resolved::default();
    for service in spec.services.values() {
        let image = service.image.to_string();
        let digest = Digest::of(format!("image:{image}").as_bytes());
        resolved.images.insert(image, digest);
        for path in service.files.values() {
            let digest = Digest::of(format!("file:{path}").as_bytes());
            resolved.files.insert(path.clone(), digest);
        }
        for source in service.secrets.values() {
            let key = secret_key(source);
            let digest = Digest::of(format!("secret:{key}").as_bytes());
            resolved.secrets.insert(key, digest);
        }
    }
    for route in spec.routes.values() {
        for path in route.error_pages.values() {
            let digest = Digest::of(format!("file:{path}").as_bytes());
            resolved.files.insert(path.clone(), digest);
        }
    }
    resolved
}

/// `spec` resolved with [`resolve`].
pub fn generation(spec: Spec) -> Generation {
    let resolved = resolve(&spec);
    Generation::new(spec, resolved).expect("every reference is resolved")
}

/// The instances of `service` that run as `generation` declares: every
/// replica healthy, in rotation when a route targets the service.
pub fn running(generation: &Generation, service: &str) -> Vec<ObservedInstance> {
    let spec = generation.instance_spec(service);
    let identity = spec.identity();
    let routed = generation
        .spec
        .routes
        .values()
        .any(|r| r.service == service);
    (0..generation.spec.services[service].replicas)
        .map(|n| ObservedInstance {
            id: format!("{service}-{}-{n}", identity.short(8)),
            spec: spec.clone(),
            identity: identity.clone(),
            status: InstanceStatus::Healthy,
            in_rotation: routed,
        })
        .collect()
}

/// The world where `generation` runs exactly as declared.
pub fn steady(generation: &Generation) -> Observed {
    Observed {
        instances: generation
            .spec
            .services
            .keys()
            .flat_map(|name| running(generation, name))
            .collect(),
        routes: generation.spec.routes.clone(),
        route_pages: generation.all_route_pages(),
    }
}
