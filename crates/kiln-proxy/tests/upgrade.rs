//! HTTP/1.1 upgrades (WebSocket): the handshake goes through, then bytes
//! flow both ways; the tunnel counts for drain, and a drain that times out
//! closes it.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use kiln_proxy::{Backend, DrainOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GREETING: &[u8] = b"hello from the backend\n";

/// Reads until the end of an HTTP head; returns it.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .expect("head within the deadline")
            .unwrap();
        assert_eq!(n, 1, "closed before the end of the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A WebSocket-like backend: answers an upgrade request with 101, sends a
/// greeting, then echoes. Counts upgrade requests it saw.
async fn echo_upgrade_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upgrades = Arc::new(AtomicUsize::new(0));
    let seen = upgrades.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await.to_ascii_lowercase();
                assert!(head.contains("connection: upgrade"), "{head}");
                assert!(head.contains("upgrade: echo"), "{head}");
                seen.fetch_add(1, Ordering::SeqCst);
                stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await
                    .unwrap();
                stream.write_all(GREETING).await.unwrap();
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, upgrades)
}

/// Opens a tunnel through the proxy and checks the 101 and the greeting.
async fn open_tunnel(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: echo"), "{head}");
    assert!(lower.contains("x-kiln-backend: ws"), "{head}");
    let mut greeting = vec![0u8; GREETING.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut greeting))
        .await
        .expect("greeting within the deadline")
        .unwrap();
    assert_eq!(greeting, GREETING);
    stream
}

async fn echo_round(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .unwrap();
    assert_eq!(back, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgraded_connection_echoes_both_ways() {
    let (ws, upgrades) = echo_upgrade_backend().await;
    let (proxy, addr) = http_proxy(vec![Backend::new("ws", ws, 1)]).await;

    let mut tunnel = open_tunnel(addr).await;
    for i in 0..20 {
        echo_round(&mut tunnel, format!("message {i}\n").as_bytes()).await;
    }
    // Larger than a socket buffer's first read, both ways.
    echo_round(&mut tunnel, &vec![b'x'; 256 * 1024]).await;
    assert_eq!(upgrades.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.in_flight("ws"), 1);
    assert_eq!(proxy.busy(), 1);
    assert_eq!(proxy.stats("web").unwrap().status_2xx, 1);

    // Closing the client ends the tunnel and its counts.
    drop(tunnel);
    wait_until("the tunnel to end", || {
        proxy.in_flight("ws") == 0 && proxy.busy() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_waits_for_a_tunnel_that_closes() {
    let (ws, _) = echo_upgrade_backend().await;
    let (proxy, addr) = http_proxy(vec![Backend::new("ws", ws, 1)]).await;
    let mut tunnel = open_tunnel(addr).await;
    proxy.set_backends("web", vec![]).unwrap();

    let p = proxy.clone();
    let drain = tokio::spawn(async move { p.drain("ws", DEADLINE).await });
    // Still served while draining.
    echo_round(&mut tunnel, b"still here\n").await;
    assert!(!drain.is_finished());
    drop(tunnel);
    assert_eq!(drain.await.unwrap(), DrainOutcome::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_timeout_closes_the_tunnel() {
    let (ws, _) = echo_upgrade_backend().await;
    let (proxy, addr) = http_proxy(vec![Backend::new("ws", ws, 1)]).await;
    let mut tunnel = open_tunnel(addr).await;
    echo_round(&mut tunnel, b"before the drain\n").await;
    proxy.set_backends("web", vec![]).unwrap();

    let outcome = proxy
        .drain("ws", std::time::Duration::from_millis(200))
        .await;
    assert_eq!(outcome, DrainOutcome::TimedOut { remaining: 1 });
    // The proxy closed the client's side of the tunnel.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, tunnel.read_to_end(&mut rest))
        .await
        .expect("the tunnel closed within the deadline")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    wait_until("the tunnel to be forgotten", || {
        proxy.in_flight("ws") == 0 && proxy.busy() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_upgrade_is_an_ordinary_answer() {
    // A plain HTTP backend ignores the upgrade and answers 200.
    let (plain, _) = backend("plain").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("plain", plain, 1)]).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(stream);
    wait_until("the request to end", || proxy.in_flight("plain") == 0).await;
}
