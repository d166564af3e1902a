//! Several HTTP routes on one listening socket, dispatched by host: exact
//! names, wildcards, the default route, 404 for the rest; each route keeps
//! its own settings and backends; the socket lives as long as one of its
//! routes does.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kiln_proxy::{Backend, Protocol, Proxy, ProxyError, RouteConfig};
use tokio::net::TcpStream;

fn route(listen: SocketAddr, hosts: &[&str]) -> RouteConfig {
    let mut config = RouteConfig::new(listen, Protocol::Http);
    config.hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
    config
}

/// One request with this `Host` header on a fresh connection: status,
/// answering backend.
async fn with_host(addr: SocketAddr, host: &str) -> (u16, String, String) {
    let answer = raw_exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let backend = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-kiln-backend: "))
        .unwrap_or("")
        .to_owned();
    (status, backend, answer)
}

/// `shop` (exact), `any` (wildcard) and `web` (default) on one socket.
async fn shared_proxy() -> (Proxy, SocketAddr) {
    let proxy = Proxy::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    for (name, hosts) in [
        ("shop", &["shop.example.com"][..]),
        ("any", &["*.example.com"][..]),
        ("web", &[][..]),
    ] {
        let (backend, _) = backend(name).await;
        proxy.stage_backends(name, vec![Backend::new(name, backend, 1)]);
        if name == "shop" {
            let listener = listener.try_clone().unwrap();
            proxy
                .configure_route_with_listener(name, route(addr, hosts), listener)
                .await
                .unwrap();
        } else {
            // Same address: joins the socket instead of binding.
            proxy
                .configure_route(name, route(addr, hosts))
                .await
                .unwrap();
        }
        assert_eq!(proxy.local_addr(name), Some(addr));
    }
    (proxy, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_go_to_the_route_their_host_names() {
    let (proxy, addr) = shared_proxy().await;
    for (host, backend) in [
        ("shop.example.com", "shop"),
        ("SHOP.Example.COM:8080", "shop"),
        ("shop.example.com.", "shop"),
        ("api.example.com", "any"),
        ("a.b.example.com:80", "any"),
        ("example.com", "web"),
        ("other.test", "web"),
        ("127.0.0.1", "web"),
    ] {
        let (status, got, answer) = with_host(addr, host).await;
        assert_eq!((status, got.as_str()), (200, backend), "{host}: {answer}");
    }

    // Without the default route, unclaimed hosts get 404.
    proxy.remove_route("web").await.unwrap();
    let (status, _, answer) = with_host(addr, "other.test").await;
    assert_eq!(status, 404, "{answer}");
    assert!(answer.contains("no route for this host"), "{answer}");
    let (status, got, _) = with_host(addr, "x.example.com").await;
    assert_eq!((status, got.as_str()), (200, "any"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_requests_are_routed_by_their_authority() {
    let (_proxy, addr) = shared_proxy().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    for (authority, backend) in [
        ("Shop.example.com", "shop"),
        ("api.example.com:443", "any"),
        ("elsewhere.test", "web"),
    ] {
        let req = http::Request::builder()
            .uri(format!("http://{authority}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200, "{authority}");
        assert_eq!(response.headers()["x-kiln-backend"], backend, "{authority}");
        let _ = response.into_body().collect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_route_of_a_socket_keeps_its_own_settings() {
    let (proxy, addr) = shared_proxy().await;
    let mut config = route(addr, &["shop.example.com"]);
    config.maintenance = true;
    proxy.configure_route("shop", config).await.unwrap();
    let (status, _, answer) = with_host(addr, "shop.example.com").await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("shop is being updated"), "{answer}");
    let (status, got, _) = with_host(addr, "api.example.com").await;
    assert_eq!((status, got.as_str()), (200, "any"));

    // Backends too.
    proxy.set_backends("any", vec![]).unwrap();
    let (status, _, answer) = with_host(addr, "api.example.com").await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.contains("route any has no healthy instance"),
        "{answer}"
    );
    let (status, got, _) = with_host(addr, "plain.test").await;
    assert_eq!((status, got.as_str()), (200, "web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_that_would_overlap_is_refused_and_changes_nothing() {
    let (proxy, addr) = shared_proxy().await;
    let (b, _) = backend("dup").await;
    proxy.stage_backends("dup", vec![Backend::new("dup", b, 1)]);
    let refused = proxy
        .configure_route("dup", route(addr, &["shop.example.com"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ProxyError::Shared { route, .. } if route == "dup"),
        "{refused}"
    );
    let refused = proxy.configure_route("dup", route(addr, &[])).await;
    assert!(refused.is_err());
    // An existing route changed into a conflict keeps its old hosts.
    let refused = proxy
        .configure_route("any", route(addr, &["shop.example.com"]))
        .await;
    assert!(refused.is_err());
    assert!(proxy.local_addr("dup").is_none());
    let (_, got, _) = with_host(addr, "shop.example.com").await;
    assert_eq!(got, "shop");
    let (_, got, _) = with_host(addr, "api.example.com").await;
    assert_eq!(got, "any");

    // A TCP route has its address to itself.
    let refused = proxy
        .configure_route("raw", RouteConfig::new(addr, Protocol::Tcp))
        .await;
    assert!(refused.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_socket_closes_with_its_last_route_only() {
    let (proxy, addr) = shared_proxy().await;
    // An open keep-alive connection sees routes come and go.
    let client = client();
    let url = format!("http://{addr}/");
    assert_eq!(get(&client, &url).await.backend(), "web");
    proxy.remove_route("shop").await.unwrap();
    proxy.remove_route("any").await.unwrap();
    assert_eq!(proxy.routes().len(), 1);
    assert_eq!(get(&client, &url).await.backend(), "web");
    assert!(proxy.dup_listener("web").is_some());
    let (status, got, _) = with_host(addr, "shop.example.com").await;
    assert_eq!((status, got.as_str()), (200, "web"));

    proxy.remove_route("web").await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
    assert_eq!(proxy.busy(), 0);
}
