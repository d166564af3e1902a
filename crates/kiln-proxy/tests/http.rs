//! HTTP routes: forwarding, balancing, swapping, draining, retry, errors.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use kiln_proxy::{Backend, DrainOutcome, LoadBalance, Protocol, RouteConfig};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_and_post_with_large_bodies_on_one_keep_alive_connection() {
    let (a, seen) = backend("a").await;
    let (_proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;

    // One client connection, several requests on it.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);

    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    for round in 0..3 {
        let req = Request::get("/")
            .header("host", "app.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-kiln-backend"], "a");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "a");

        let req = Request::post("/echo")
            .header("host", "app.test")
            .body(Full::new(Bytes::from(payload.clone())))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), payload.len());
        assert!(body == payload[..], "echoed body differs");
    }

    // A large response streams through.
    let req = Request::get("/big/4194304")
        .header("host", "app.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len(),
        4 * 1024 * 1024
    );

    // Sequential requests reuse the pooled backend connections: one for
    // requests without a body (the fast path), one for those with a body.
    assert_eq!(seen.requests.load(Ordering::SeqCst), 7);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwards_host_and_x_forwarded_headers_and_drops_hop_by_hop() {
    let (a, _) = backend("a").await;
    let (_proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let client = client();
    let req = Request::get(format!("http://{addr}/headers"))
        .header("host", "shop.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.headers()["x-kiln-backend"], "a");
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        std::str::from_utf8(&text).unwrap(),
        "host=shop.example;xff=203.0.113.9, 127.0.0.1;proto=http;secret=;te="
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_clients_are_served() {
    let (a, _) = backend("a").await;
    let (_proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let client: TestClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for _ in 0..3 {
        let answer = send(
            &client,
            "POST",
            &format!("http://{addr}/echo"),
            Bytes::from_static(b"over h2"),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.backend(), "a");
        assert_eq!(answer.text(), "over h2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_split_follows_weights_and_weight_zero_gets_nothing() {
    let (a, _) = backend("a").await;
    let (b, _) = backend("b").await;
    let (c, seen_c) = backend("c").await;
    let (_proxy, addr) = http_proxy(vec![
        Backend::new("a", a, 2500),
        Backend::new("b", b, 7500),
        Backend::new("c", c, 0),
    ])
    .await;
    let client = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let answer = get(&client, &format!("http://{addr}/")).await;
        assert_eq!(answer.status, 200);
        *counts.entry(answer.backend().to_owned()).or_default() += 1;
    }
    let a = counts.get("a").copied().unwrap_or(0);
    let b = counts.get("b").copied().unwrap_or(0);
    assert!((60..=140).contains(&a), "a got {a}: {counts:?}");
    assert!((260..=340).contains(&b), "b got {b}: {counts:?}");
    assert!(!counts.contains_key("c"), "{counts:?}");
    assert_eq!(seen_c.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_requests_avoids_the_busy_backend() {
    let (a, _) = backend("a").await;
    let (b, _) = backend("b").await;
    let mut config = RouteConfig::new(localhost(), Protocol::Http);
    config.load_balance = LoadBalance::LeastRequests;
    let (proxy, addr) = proxy_with(
        config,
        vec![Backend::new("a", a, 1), Backend::new("b", b, 1)],
    )
    .await;
    let client = client();
    // Occupy one backend with a slow request.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, &format!("http://{addr}/sleep/1500")).await })
    };
    wait_until("a request is in flight", || {
        proxy.in_flight("a") + proxy.in_flight("b") == 1
    })
    .await;
    let busy = if proxy.in_flight("a") == 1 { "a" } else { "b" };
    for _ in 0..10 {
        let answer = get(&client, &format!("http://{addr}/")).await;
        assert_ne!(answer.backend(), busy);
    }
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_backends_under_load_fails_no_request() {
    let mut addrs = Vec::new();
    for id in ["a", "b", "c", "d"] {
        addrs.push((id, backend(id).await.0));
    }
    let set = |ids: &[usize]| -> Vec<Backend> {
        ids.iter()
            .map(|&i| Backend::new(addrs[i].0, addrs[i].1, 5000))
            .collect()
    };
    let (proxy, addr) = http_proxy(set(&[0, 1])).await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let client = client();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..60 {
                let (method, path, body) = if i % 3 == 0 {
                    ("POST", "/echo", Bytes::from(vec![b'p'; 10_000]))
                } else {
                    ("GET", "/", Bytes::new())
                };
                match send(&client, method, &format!("http://{addr}{path}"), body).await {
                    Ok(a) if a.status == 200 => {}
                    Ok(a) => failures.push(format!("status {} {}", a.status, a.text())),
                    Err(e) => failures.push(e),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failures
        }));
    }
    // Swap while traffic flows: each swap waits for more requests to pass.
    for (step, ids) in [&[2usize, 3][..], &[0], &[1, 3], &[2]].iter().enumerate() {
        let target = (step + 1) * 150;
        wait_until("traffic progresses", || {
            done.load(Ordering::SeqCst) >= target
        })
        .await;
        proxy.set_backends("web", set(ids)).unwrap();
    }
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(done.load(Ordering::SeqCst), 16 * 60);
    let stats = proxy.stats("web").unwrap();
    assert_eq!(stats.status_2xx, 16 * 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_waits_for_the_in_flight_request_of_a_removed_backend() {
    let (old, seen_old) = backend("old").await;
    let (new, _) = backend("new").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("old", old, 1)]).await;
    let client = client();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, &format!("http://{addr}/sleep/2000")).await })
    };
    wait_until("the slow request is in flight", || {
        proxy.in_flight("old") == 1
    })
    .await;
    proxy
        .set_backends("web", vec![Backend::new("new", new, 1)])
        .unwrap();

    // New requests go to the new set at once.
    assert_eq!(
        get(&client, &format!("http://{addr}/")).await.backend(),
        "new"
    );
    assert_eq!(
        proxy.drain("old", Duration::from_millis(50)).await,
        DrainOutcome::TimedOut { remaining: 1 }
    );
    assert_eq!(proxy.drain("old", DEADLINE).await, DrainOutcome::Drained);
    // Drained only after the backend answered the slow request.
    assert_eq!(seen_old.slow_answered.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.in_flight("old"), 0);
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.backend(), "old");
    assert_eq!(answer.text(), "old");
    // An unknown or idle backend is drained at once.
    assert_eq!(
        proxy.drain("nobody", Duration::ZERO).await,
        DrainOutcome::Drained
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_refused_backend_is_retried_on_a_healthy_one() {
    let dead = dead_addr().await;
    let (live, _) = backend("live").await;
    let (proxy, addr) = http_proxy(vec![
        Backend::new("dead", dead, 1),
        Backend::new("live", live, 1),
    ])
    .await;
    let client = client();
    for i in 0..20 {
        let answer = if i % 2 == 0 {
            get(&client, &format!("http://{addr}/")).await
        } else {
            send(
                &client,
                "POST",
                &format!("http://{addr}/echo"),
                Bytes::from(vec![b'z'; 70_000]),
            )
            .await
            .unwrap()
        };
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.backend(), "live");
    }
    let stats = proxy.stats("web").unwrap();
    assert_eq!(stats.status_2xx, 20);
    assert!(stats.connect_errors >= 1);
    assert!(stats.per_backend["dead"].connect_errors >= 1);
    assert_eq!(stats.per_backend["dead"].requests, 0);
    assert_eq!(stats.per_backend["live"].requests, 20);

    // Only dead backends: 502.
    proxy
        .set_backends("web", vec![Backend::new("dead", dead, 1)])
        .unwrap();
    let answer = get(&client, &format!("http://{addr}/")).await;
    assert_eq!(answer.status, 502);
    assert!(answer.text().contains("route web"), "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_set_gives_503_naming_the_route() {
    let (a, _) = backend("a").await;
    let (proxy, addr) = http_proxy(vec![]).await;
    let client = client();
    let answer = get(&client, &format!("http://{addr}/")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(answer.text(), "kiln: route web has no healthy instance\n");

    // Only weight-0 backends is the same as none.
    proxy
        .set_backends("web", vec![Backend::new("a", a, 0)])
        .unwrap();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 503);
    proxy
        .set_backends("web", vec![Backend::new("a", a, 1)])
        .unwrap();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maintenance_answers_503_with_retry_after_and_keeps_the_socket() {
    let (a, _) = backend("a").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let client = client();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);

    let mut config = proxy.routes()[0].1.clone();
    config.maintenance = true;
    proxy.configure_route("web", config.clone()).await.unwrap();
    assert_eq!(proxy.local_addr("web"), Some(addr));
    // The pooled keep-alive connection sees the change.
    let answer = get(&client, &format!("http://{addr}/")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["retry-after"], "30");
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(answer.text().contains("maintenance"));

    config.maintenance = false;
    proxy.configure_route("web", config).await.unwrap();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_that_never_answers_gives_504_after_the_request_timeout() {
    let silent = silent_backend().await;
    let (a, _) = backend("a").await;
    let mut config = RouteConfig::new(localhost(), Protocol::Http);
    config.request_timeout = Duration::from_millis(300);
    let (proxy, addr) = proxy_with(config, vec![Backend::new("silent", silent, 1)]).await;
    let client = client();
    let answer = get(&client, &format!("http://{addr}/")).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.backend(), "silent");
    assert!(
        answer.text().contains("did not answer"),
        "{}",
        answer.text()
    );
    assert_eq!(
        proxy.stats("web").unwrap().per_backend["silent"].status_5xx,
        1
    );
    assert_eq!(proxy.in_flight("silent"), 0);

    proxy
        .set_backends("web", vec![Backend::new("a", a, 1)])
        .unwrap();
    assert_eq!(get(&client, &format!("http://{addr}/")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_that_resets_gives_502_and_the_proxy_stays_up() {
    let reset = resetting_backend().await;
    let (a, _) = backend("a").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("reset", reset, 1)]).await;
    let client = client();
    for method in ["GET", "POST"] {
        let answer = send(
            &client,
            method,
            &format!("http://{addr}/"),
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 502, "{method}");
    }
    assert_eq!(proxy.in_flight("reset"), 0);

    // An idempotent request with an empty body is retried elsewhere.
    proxy
        .set_backends(
            "web",
            vec![Backend::new("reset", reset, 1), Backend::new("a", a, 1)],
        )
        .unwrap();
    for _ in 0..6 {
        let answer = get(&client, &format!("http://{addr}/")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.backend(), "a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_pooled_connections_to_a_removed_backend_are_closed() {
    let (a, seen_a) = backend("a").await;
    let (b, _) = backend("b").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("a", a, 1)]).await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(
            get(&client, &format!("http://{addr}/")).await.backend(),
            "a"
        );
    }
    assert_eq!(seen_a.connections.load(Ordering::SeqCst), 1);
    assert_eq!(seen_a.closed.load(Ordering::SeqCst), 0);
    // Same id and address with a new weight: the pool is kept.
    proxy
        .set_backends("web", vec![Backend::new("a", a, 7)])
        .unwrap();
    assert_eq!(
        get(&client, &format!("http://{addr}/")).await.backend(),
        "a"
    );
    assert_eq!(seen_a.connections.load(Ordering::SeqCst), 1);

    proxy
        .set_backends("web", vec![Backend::new("b", b, 1)])
        .unwrap();
    assert_eq!(proxy.drain("a", DEADLINE).await, DrainOutcome::Drained);
    wait_until("the idle connection to a is closed", || {
        seen_a.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        get(&client, &format!("http://{addr}/")).await.backend(),
        "b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_alive_connection_lost_under_a_get_is_retried_on_a_fresh_one() {
    let (b, seen) = one_shot_backend("b").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("b", b, 1)]).await;
    let client = client();
    for _ in 0..4 {
        let answer = get(&client, &format!("http://{addr}/")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.backend(), "b");
    }
    // Some requests went out on a pooled connection that the backend then
    // dropped; each was retried once on a fresh connection.
    assert!(seen.requests.load(Ordering::SeqCst) > 4);
    assert!(seen.connections.load(Ordering::SeqCst) > 1);
    assert_eq!(proxy.stats("web").unwrap().status_2xx, 4);

    // A POST with a body is not retried: the backend may have acted on it.
    let answer = send(
        &client,
        "POST",
        &format!("http://{addr}/"),
        Bytes::from_static(b"once"),
    )
    .await
    .unwrap();
    assert!(
        answer.status == 200 || answer.status == 502,
        "{}",
        answer.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_response_counts_in_flight_until_its_body_is_sent() {
    let (s, release) = streaming_backend().await;
    let (a, _) = backend("a").await;
    let (proxy, addr) = http_proxy(vec![Backend::new("s", s, 1)]).await;
    let client = client();
    let req = Request::get(format!("http://{addr}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-kiln-backend"], "s");
    // The head arrived; the body is still streaming.
    assert_eq!(proxy.in_flight("s"), 1);
    proxy
        .set_backends("web", vec![Backend::new("a", a, 1)])
        .unwrap();
    assert_eq!(
        proxy.drain("s", Duration::from_millis(50)).await,
        DrainOutcome::TimedOut { remaining: 1 }
    );
    let drain = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.drain("s", DEADLINE).await })
    };
    release.notify_one();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "firstlast");
    assert_eq!(drain.await.unwrap(), DrainOutcome::Drained);

    // A client that goes away mid-body ends the count too.
    proxy
        .set_backends("web", vec![Backend::new("s", s, 1)])
        .unwrap();
    let req = Request::get(format!("http://{addr}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(proxy.in_flight("s"), 1);
    drop(resp);
    drop(client);
    assert_eq!(proxy.drain("s", DEADLINE).await, DrainOutcome::Drained);
}
