//! Memory stays bounded under abuse: rounds of slowloris clients, oversized
//! headers, malformed requests and requests to a backend that never
//! answers or resets; after the first round, further rounds must not make
//! the process grow (no per-connection leak). The proxy runs in this test
//! process, so its resident set is this process's.

mod common;

use std::time::Duration;

use common::*;
use kiln_proxy::{Backend, RouteConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn abuse(
    proxy: &kiln_proxy::Proxy,
    addr: std::net::SocketAddr,
    silent: std::net::SocketAddr,
    resetting: std::net::SocketAddr,
) {
    let mut held = Vec::new();
    // Slowloris: partial heads, never finished.
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
            held.push(s);
        }
    }
    // Oversized heads and garbage.
    let mut huge = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..100 {
        huge.extend_from_slice(format!("x-{i}: {}\r\n", "y".repeat(1000)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    for _ in 0..50 {
        let _ = raw_exchange(addr, &huge).await;
        let _ = raw_exchange(addr, b"\x00\x01\x02 NOT HTTP\r\n\r\n").await;
    }
    // A backend that never answers, then one that resets: every request
    // ends in 504 or 502, none is kept.
    let client = client();
    for (id, target) in [("silent", silent), ("reset", resetting)] {
        proxy
            .set_backends("web", vec![Backend::new(id, target, 1)])
            .unwrap();
        let mut asks = Vec::new();
        for _ in 0..50 {
            let c = client.clone();
            let url = format!("http://{addr}/");
            asks.push(tokio::spawn(async move { get(&c, &url).await.status }));
        }
        for a in asks {
            let status = a.await.unwrap();
            assert!(status == 504 || status == 502 || status == 200, "{status}");
        }
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_under_repeated_abuse() {
    let silent = silent_backend().await;
    let resetting = resetting_backend().await;
    let mut config = RouteConfig::new(localhost(), kiln_proxy::Protocol::Http);
    config.request_timeout = Duration::from_millis(300);
    let (proxy, addr) = proxy_with(config, vec![Backend::new("silent", silent, 1)]).await;

    abuse(&proxy, addr, silent, resetting).await;
    wait_until("abusive connections to close", || proxy.busy() == 0).await;
    let after_first = rss_kib();
    for _ in 0..3 {
        abuse(&proxy, addr, silent, resetting).await;
    }
    // Let closed connections be torn down before measuring.
    wait_until("abusive connections to close", || proxy.busy() == 0).await;
    let after_more = rss_kib();
    let growth = after_more.saturating_sub(after_first);
    eprintln!("RSS after one round of abuse {after_first} KiB, after three more {after_more} KiB");
    assert!(
        growth < 32 * 1024,
        "three more rounds of abuse grew the process by {growth} KiB (from {after_first} KiB to {after_more} KiB)"
    );

    // And it still serves.
    let (ok, _) = backend("ok").await;
    proxy
        .set_backends("web", vec![Backend::new("ok", ok, 1)])
        .unwrap();
    assert_eq!(get(&client(), &format!("http://{addr}/")).await.status, 200);
}
