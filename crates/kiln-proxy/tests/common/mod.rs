//! Test backends, clients and helpers: real sockets on 127.0.0.1, port 0.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_proxy::{Backend, Protocol, Proxy, RouteConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous deadline for conditions; tests never assert timings.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What a test backend saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    /// Slow requests whose response was produced.
    pub slow_answered: AtomicUsize,
    /// Connections that have been closed.
    pub closed: AtomicUsize,
}

/// An HTTP/1.1 backend (keep-alive) with a few endpoints:
/// `/` answers its id; `/echo` echoes the body; `/headers` reports what it
/// got; `/sleep/MS` answers after MS milliseconds; `/big/N` sends N bytes.
pub async fn backend(id: &str) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let id = id.to_owned();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let id = id.clone();
            let s = s.clone();
            let s2 = s.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(id.clone(), s.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                s2.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

async fn answer(
    id: String,
    seen: Arc<Seen>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let body = if path == "/echo" {
        req.into_body().collect().await.unwrap().to_bytes()
    } else if path == "/headers" {
        let h = req.headers();
        let get = |n: &str| {
            h.get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        Bytes::from(format!(
            "host={};xff={};proto={};secret={};te={}",
            get("host"),
            get("x-forwarded-for"),
            get("x-forwarded-proto"),
            get("x-secret"),
            get("transfer-encoding"),
        ))
    } else if let Some(ms) = path.strip_prefix("/sleep/") {
        // The backend's own behaviour (a slow handler), not synchronisation.
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        seen.slow_answered.fetch_add(1, Ordering::SeqCst);
        Bytes::from(id.clone())
    } else if let Some(n) = path.strip_prefix("/big/") {
        Bytes::from(vec![b'x'; n.parse().unwrap()])
    } else {
        Bytes::from(id.clone())
    };
    Ok(Response::builder()
        .header("x-answered-by", id)
        .body(Full::new(body))
        .unwrap())
}

/// An address where nothing listens (connection refused).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A backend that accepts and reads but never answers.
pub async fn silent_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            held.push(stream);
        }
    });
    addr
}

/// A backend that reads the request head, then resets the connection.
pub async fn resetting_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    addr
}

/// A TCP echo backend; counts connections.
pub async fn echo_backend() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            s.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, seen)
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A proxy with one HTTP route `web` on port 0.
pub async fn http_proxy(backends: Vec<Backend>) -> (Proxy, SocketAddr) {
    proxy_with(RouteConfig::new(localhost(), Protocol::Http), backends).await
}

pub async fn proxy_with(config: RouteConfig, backends: Vec<Backend>) -> (Proxy, SocketAddr) {
    let proxy = Proxy::new();
    proxy.configure_route("web", config).await.unwrap();
    proxy.set_backends("web", backends).unwrap();
    let addr = proxy.local_addr("web").unwrap();
    (proxy, addr)
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, fully read.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-kiln-backend")
            .map_or("", |v| v.to_str().unwrap())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
    client: &TestClient,
    method: &str,
    url: &str,
    body: Bytes,
) -> Result<Answer, String> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

pub async fn get(client: &TestClient, url: &str) -> Answer {
    send(client, "GET", url, Bytes::new()).await.unwrap()
}

/// Waits (polling, with a generous deadline) until `cond` holds.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes raw bytes and reads the answer until the server closes the
/// connection or the deadline passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw HTTP/1.1 backend that answers the first request of each connection
/// (keeping it alive), then reads the second one and closes without an
/// answer: a keep-alive connection lost under a request in flight.
pub async fn one_shot_backend(id: &'static str) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                // First request: read to the end of its head, answer.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                s.requests.fetch_add(1, Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{id}",
                    id.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // Second request: read something, then close unanswered.
                if let Ok(n) = stream.read(&mut buf).await
                    && n > 0
                {
                    s.requests.fetch_add(1, Ordering::SeqCst);
                }
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// A raw backend that sends its response head and a first chunk at once,
/// and the rest of the body only when `release` is notified.
pub async fn streaming_backend() -> (SocketAddr, Arc<tokio::sync::Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                r.notified().await;
                let _ = stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await;
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    (addr, release)
}
