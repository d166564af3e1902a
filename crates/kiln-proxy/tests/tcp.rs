//! TCP routes: piping, retry on connect failure, drain, closing.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use kiln_proxy::{Backend, DrainOutcome, Protocol, RouteConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tcp_proxy(backends: Vec<Backend>) -> (kiln_proxy::Proxy, std::net::SocketAddr) {
    proxy_with(RouteConfig::new(localhost(), Protocol::Tcp), backends).await
}

async fn roundtrip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut buf = vec![0u8; message.len()];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, message);
}

async fn assert_closed(addr: std::net::SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("the proxy kept the connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_echo_through_the_proxy_and_drain() {
    let (echo, seen) = echo_backend().await;
    let (proxy, addr) = tcp_proxy(vec![Backend::new("echo", echo, 1)]).await;

    let mut conn = TcpStream::connect(addr).await.unwrap();
    roundtrip(&mut conn, b"hello").await;
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = conn.split();
    let writer = async {
        w.write_all(&big).await.unwrap();
    };
    let reader = async {
        let mut back = vec![0u8; big.len()];
        r.read_exact(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    assert_eq!(back, big);
    assert_eq!(proxy.in_flight("echo"), 1);

    // Removed from the set: new connections are closed, the open one lives.
    proxy.set_backends("web", vec![]).unwrap();
    assert_closed(addr).await;
    assert_eq!(
        proxy.drain("echo", Duration::from_millis(50)).await,
        DrainOutcome::TimedOut { remaining: 1 }
    );
    roundtrip(&mut conn, b"still here").await;

    let drain = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.drain("echo", DEADLINE).await })
    };
    drop(conn);
    assert_eq!(drain.await.unwrap(), DrainOutcome::Drained);
    assert_eq!(proxy.in_flight("echo"), 0);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let stats = proxy.stats("web").unwrap();
    assert_eq!(stats.requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_connect_failure_is_retried_on_another_backend() {
    let dead = dead_addr().await;
    let (echo, _) = echo_backend().await;
    let (proxy, addr) = tcp_proxy(vec![
        Backend::new("dead", dead, 1),
        Backend::new("echo", echo, 1),
    ])
    .await;
    for _ in 0..6 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        roundtrip(&mut conn, b"ping").await;
    }
    let stats = proxy.stats("web").unwrap();
    assert_eq!(stats.per_backend["echo"].requests, 6);
    assert!(stats.per_backend["dead"].connect_errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_maintenance_and_connection_limit_close() {
    let (echo, _) = echo_backend().await;
    let mut config = RouteConfig::new(localhost(), Protocol::Tcp);
    config.max_connections = 1;
    let (proxy, addr) = proxy_with(config.clone(), vec![Backend::new("echo", echo, 1)]).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    roundtrip(&mut first, b"one").await;
    assert_closed(addr).await;
    drop(first);
    wait_until("the first connection is released", || {
        proxy
            .metrics_text()
            .contains("kiln_proxy_connections{route=\"web\"} 0")
    })
    .await;
    // Under the limit again: proxied.
    let mut second = TcpStream::connect(addr).await.unwrap();
    roundtrip(&mut second, b"two").await;
    drop(second);

    config.maintenance = true;
    proxy.configure_route("web", config).await.unwrap();
    assert_closed(addr).await;
}
