//! Response framing on the fast path (bodiless idempotent requests, read
//! by the proxy itself): chunked bodies with extensions and trailers,
//! HTTP/1.0 close-delimited bodies, HEAD, 204/304, interim 1xx answers,
//! and malformed heads — against a raw backend that writes exact bytes.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use kiln_proxy::{Backend, Protocol, Proxy, RouteConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request head; `None` when the connection closed.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8(head).unwrap())
}

/// A backend answering each request by its path, with canned bytes, written
/// in small pieces to exercise partial reads. Counts connections.
async fn raw_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while let Some(head) = read_request(&mut stream).await {
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let head_request = head.starts_with("HEAD ");
                    let answer: &[u8] = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\nB\r\nfrom chunks\r\n0\r\nX-Trailer: t\r\n\r\n",
                        "/interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim",
                        "/nocontent" => b"HTTP/1.1 204 No Content\r\n\r\n",
                        "/notmodified" => b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
                        "/head" if head_request => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                        "/garbage" => b"NOT HTTP AT ALL\r\n\r\n",
                        "/http10" => b"HTTP/1.0 200 OK\r\n\r\nuntil the backend closes",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    };
                    for piece in answer.chunks(7) {
                        if stream.write_all(piece).await.is_err() {
                            return;
                        }
                        stream.flush().await.unwrap();
                    }
                    if path == "/http10" || path == "/garbage" {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_are_framed_and_connections_reused() {
    let (raw, connections) = raw_backend().await;
    // One worker thread: backend pools are per worker, and a client
    // connection the proxy closed may come back on another worker, whose
    // pool would open a second backend connection.
    let proxy = Proxy::with_workers(1);
    proxy
        .configure_route("web", RouteConfig::new(localhost(), Protocol::Http))
        .await
        .unwrap();
    proxy
        .set_backends("web", vec![Backend::new("raw", raw, 1)])
        .unwrap();
    let addr = proxy.local_addr("web").unwrap();
    let client = client();
    let url = |path: &str| format!("http://{addr}{path}");

    let a = get(&client, &url("/chunked")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.text(), "hello from chunks");
    assert_eq!(a.headers["x-kind"], "chunked");
    assert_eq!(a.backend(), "raw");

    let a = get(&client, &url("/interim")).await;
    assert_eq!((a.status, a.text().as_str()), (200, "interim"));
    let a = get(&client, &url("/nocontent")).await;
    assert_eq!((a.status, a.text().as_str()), (204, ""));
    let a = get(&client, &url("/notmodified")).await;
    assert_eq!((a.status, a.text().as_str()), (304, ""));
    let a = send(&client, "HEAD", &url("/head"), Default::default())
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-length"], "1000");
    assert!(a.body.is_empty());
    for _ in 0..5 {
        let a = get(&client, &url("/")).await;
        assert_eq!((a.status, a.text().as_str()), (200, "ok"));
    }
    // All of the above, one after the other, on one backend connection.
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // Close-delimited: the body ends when the backend closes; the next
    // request needs a new connection.
    let a = get(&client, &url("/http10")).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (200, "until the backend closes")
    );
    let a = get(&client, &url("/")).await;
    assert_eq!(a.status, 200);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(proxy.in_flight("raw"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_response_head_is_a_502() {
    let (raw, _) = raw_backend().await;
    let (proxy, addr) = http_proxy(vec![Backend::new("raw", raw, 1)]).await;
    let client = client();
    let a = get(&client, &format!("http://{addr}/garbage")).await;
    assert_eq!(a.status, 502);
    assert!(a.text().contains("invalid response head"), "{}", a.text());
    assert_eq!(proxy.stats("web").unwrap().per_backend["raw"].status_5xx, 1);
    // The backend still serves.
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
}
