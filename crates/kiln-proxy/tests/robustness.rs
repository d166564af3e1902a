//! Bad input and hostile clients: the proxy answers or closes, and keeps
//! serving everyone else.

mod common;

use common::*;
use kiln_proxy::{Backend, Protocol, RouteConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_request_line_gets_400_and_the_next_client_is_served() {
    let (a, _) = backend("a").await;
    let (_proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let answer = raw_exchange(addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("x-kiln-backend: a"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_headers_are_refused_and_the_proxy_stays_up() {
    let (a, seen) = backend("a").await;
    let (_proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let mut request = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..80 {
        request.extend_from_slice(format!("x-filler-{i}: {}\r\n", "y".repeat(1000)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let answer = raw_exchange(addr, &request).await;
    assert!(
        answer.is_empty()
            || answer.starts_with("HTTP/1.1 431")
            || answer.starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

    let client = client();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_does_not_block_other_clients() {
    let (a, _) = backend("a").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(s);
    }
    // A silent connection (no byte at all) neither.
    stalled.push(TcpStream::connect(addr).await.unwrap());
    let client = client();
    for _ in 0..20 {
        assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
    }
    assert_eq!(proxy.stats("web").unwrap().status_2xx, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_request_heads_are_cut_off() {
    let (a, _) = backend("a").await;
    let (_proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // The proxy closes both after its 10 s header/first-request timeout
    // (408 or a plain close); the test only waits for the close.
    for stream in [&mut partial, &mut silent] {
        let mut out = Vec::new();
        let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "the proxy kept a stalled connection open");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_limit_get_503() {
    let (a, _) = backend("a").await;
    let mut config = RouteConfig::new(localhost(), Protocol::Http);
    config.max_connections = 1;
    let (proxy, addr) = proxy_with(config, vec![Backend::new("a", a, 1)]).await;

    // Hold one keep-alive connection open after a request on it.
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = held.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let answer = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("connection limit"), "{answer:?}");

    drop(held);
    wait_until("the held connection is released", || {
        proxy
            .metrics_text()
            .contains("kiln_proxy_connections{route=\"web\"} 0")
    })
    .await;
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}
