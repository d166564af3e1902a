//! Route lifecycle, configuration errors and observability.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use kiln_proxy::{Backend, Protocol, Proxy, ProxyError, RouteConfig};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_route_stops_accepting_but_finishes_in_flight_requests() {
    let (a, _) = backend("a").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let client = client();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, &format!("http://{addr}/sleep/500")).await })
    };
    wait_until("the slow request is in flight", || {
        proxy.in_flight("a") == 1
    })
    .await;
    proxy.remove_route("web").await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    assert_eq!(slow.await.unwrap().status, 200);
    assert!(proxy.routes().is_empty());
    assert!(matches!(
        proxy.remove_route("web").await,
        Err(ProxyError::NoSuchRoute(name)) if name == "web"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configure_route_on_a_busy_port_is_a_bind_error_with_a_hint() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = holder.local_addr().unwrap();
    let proxy = Proxy::new();
    let err = proxy
        .configure_route("web", RouteConfig::new(busy, Protocol::Http))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProxyError::Bind { listen, .. } if listen == busy),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot listen on {busy}: ")),
        "{message}"
    );
    assert!(
        message
            .ends_with("\n  hint: another process holds the port; change `listen` in [route.web]"),
        "{message}"
    );
    assert!(proxy.routes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_listen_address_takes_over_and_the_old_socket_closes() {
    let (a, _) = backend("a").await;
    let (proxy, old_addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let client = client();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, &format!("http://{old_addr}/sleep/500")).await })
    };
    wait_until("the slow request is in flight", || {
        proxy.in_flight("a") == 1
    })
    .await;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let new_addr = listener.local_addr().unwrap();
    proxy
        .configure_route_with_listener("web", RouteConfig::new(new_addr, Protocol::Http), listener)
        .await
        .unwrap();
    assert_eq!(proxy.local_addr("web"), Some(new_addr));
    assert!(
        TcpStream::connect(old_addr).await.is_err(),
        "old socket still open"
    );
    // Backends and counters carry over to the new listener.
    assert_eq!(
        get(&client, &format!("http://{new_addr}/")).await.backend(),
        "a"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(proxy.stats("web").unwrap().status_2xx, 2);

    // configure_route to yet another address binds it.
    let next: SocketAddr = "127.0.0.1:0".parse().unwrap();
    proxy
        .configure_route("web", RouteConfig::new(next, Protocol::Http))
        .await
        .unwrap();
    let bound = proxy.local_addr("web").unwrap();
    assert_ne!(bound, new_addr);
    assert_eq!(get(&client, &format!("http://{bound}/")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_backends_checks_the_route_and_ids() {
    let proxy = Proxy::new();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert!(matches!(
        proxy.set_backends("nope", vec![]),
        Err(ProxyError::NoSuchRoute(_))
    ));
    proxy
        .configure_route("web", RouteConfig::new(localhost(), Protocol::Http))
        .await
        .unwrap();
    let err = proxy
        .set_backends(
            "web",
            vec![Backend::new("a", addr, 1), Backend::new("a", addr, 2)],
        )
        .unwrap_err();
    assert!(
        matches!(err, ProxyError::DuplicateBackend { .. }),
        "{err:?}"
    );
    assert_eq!(proxy.backends("web"), Some(vec![]));
    let set = vec![Backend::new("a", addr, 1), Backend::new("b", addr, 0)];
    proxy.set_backends("web", set.clone()).unwrap();
    assert_eq!(proxy.backends("web"), Some(set));
    assert_eq!(proxy.backends("nope"), None);
    let routes = proxy.routes();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].0, "web");
    assert_eq!(routes[0].1.protocol, Protocol::Http);
    assert_eq!(routes[0].1.max_connections, 10_000);
    assert_eq!(routes[0].1.request_timeout.as_secs(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_text_exposes_the_counters() {
    let (a, _) = backend("a").await;
    let dead = dead_addr().await;
    let (proxy, addr) =
        http_proxy(vec![Backend::new("a", a, 1), Backend::new("dead", dead, 1)]).await;
    let client = client();
    for _ in 0..4 {
        assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
    }
    let answer = send(&client, "GET", &format!("http://{addr}/nope"), Bytes::new())
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    // A request's duration is recorded when its body has been sent, which
    // may be a moment after the client has read it.
    wait_until("five durations are recorded", || {
        proxy
            .metrics_text()
            .contains("kiln_proxy_request_duration_seconds_count{route=\"web\",backend=\"a\"} 5")
    })
    .await;
    // Same set again: counters carry over.
    proxy
        .set_backends(
            "web",
            vec![Backend::new("a", a, 1), Backend::new("dead", dead, 1)],
        )
        .unwrap();
    let mut config = proxy.routes()[0].1.clone();
    config.maintenance = true;
    proxy.configure_route("web", config).await.unwrap();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 503);

    let text = proxy.metrics_text();
    for needle in [
        "# TYPE kiln_proxy_requests_total counter",
        "kiln_proxy_requests_total{route=\"web\",backend=\"a\",class=\"2xx\"} 5",
        "kiln_proxy_requests_total{route=\"web\",backend=\"\",class=\"5xx\"} 1",
        "# TYPE kiln_proxy_request_duration_seconds histogram",
        "kiln_proxy_request_duration_seconds_bucket{route=\"web\",backend=\"a\",le=\"+Inf\"} 5",
        "kiln_proxy_request_duration_seconds_count{route=\"web\",backend=\"a\"} 5",
        "# TYPE kiln_proxy_connect_errors_total counter",
        "kiln_proxy_connect_errors_total{route=\"web\",backend=\"a\"} 0",
        "kiln_proxy_connect_errors_total{route=\"web\",backend=\"dead\"} ",
        "kiln_proxy_in_flight{backend=\"a\"} 0",
        "# TYPE kiln_proxy_in_flight gauge",
        "# TYPE kiln_proxy_connections gauge",
        "kiln_proxy_connections{route=\"web\"}",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let stats = proxy.stats("web").unwrap();
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.status_2xx, 5);
    assert_eq!(stats.status_5xx, 1);
    assert_eq!(stats.per_backend["a"].requests, 5);
    assert!(stats.per_backend["dead"].connect_errors >= 1, "{stats:?}");
    assert_eq!(stats.per_backend["dead"].requests, 0);

    // Removed and drained backends leave the per-backend stats and metrics.
    proxy.set_backends("web", vec![]).unwrap();
    assert!(proxy.stats("web").unwrap().per_backend.is_empty());
    assert!(!proxy.metrics_text().contains("backend=\"a\",class"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_closes_every_route() {
    let (a, _) = backend("a").await;
    let proxy = Proxy::new();
    for name in ["one", "two"] {
        proxy
            .configure_route(name, RouteConfig::new(localhost(), Protocol::Http))
            .await
            .unwrap();
        proxy
            .set_backends(name, vec![Backend::new("a", a, 1)])
            .unwrap();
    }
    let addrs: Vec<SocketAddr> = ["one", "two"]
        .iter()
        .map(|n| proxy.local_addr(n).unwrap())
        .collect();
    let client = client();
    for addr in &addrs {
        assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
    }
    proxy.shutdown().await;
    for addr in &addrs {
        assert!(TcpStream::connect(addr).await.is_err());
    }
    assert!(proxy.routes().is_empty());
}

#[test]
fn proxy_is_send_sync_and_cheap_to_clone() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Proxy>();
}
