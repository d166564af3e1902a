//! Custom error pages: a route's pages replace the proxy's built-in bodies
//! for the 502/503/504 it answers itself, as HTML, keeping Retry-After.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_proxy::{Backend, Protocol, RouteConfig};

const PAGE_502: &str = "<h1>custom 502</h1>";
const PAGE_503: &str = "<h1>custom 503</h1>";
const PAGE_504: &str = "<h1>custom 504</h1>";

fn pages(statuses: &[(u16, &str)]) -> BTreeMap<u16, Arc<[u8]>> {
    statuses
        .iter()
        .map(|(status, page)| (*status, Arc::from(page.as_bytes())))
        .collect()
}

fn assert_page(answer: &Answer, status: u16, page: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.text(), page);
    assert_eq!(
        answer.headers["content-type"], "text/html; charset=utf-8",
        "{:?}",
        answer.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_pages_replace_the_built_in_502_503_and_504() {
    let mut config = RouteConfig::new(localhost(), Protocol::Http);
    config.request_timeout = Duration::from_millis(300);
    config.error_pages = pages(&[(502, PAGE_502), (503, PAGE_503), (504, PAGE_504)]);
    let dead = dead_addr().await;
    let (proxy, addr) = proxy_with(config.clone(), vec![Backend::new("dead", dead, 1)]).await;
    let client = client();
    let url = format!("http://{addr}/");

    // 502: no backend could be reached.
    assert_page(&get(&client, &url).await, 502, PAGE_502);

    // 504: the backend did not answer in time; it is still named.
    let silent = silent_backend().await;
    proxy
        .set_backends("web", vec![Backend::new("silent", silent, 1)])
        .unwrap();
    let answer = get(&client, &url).await;
    assert_page(&answer, 504, PAGE_504);
    assert_eq!(answer.backend(), "silent");

    // 503: no backend; Retry-After stays.
    proxy.set_backends("web", vec![]).unwrap();
    let answer = get(&client, &url).await;
    assert_page(&answer, 503, PAGE_503);
    assert_eq!(answer.headers["retry-after"], "1");

    // 503: maintenance, with its Retry-After.
    let (ok, _) = backend("ok").await;
    proxy
        .set_backends("web", vec![Backend::new("ok", ok, 1)])
        .unwrap();
    config.maintenance = true;
    proxy.configure_route("web", config.clone()).await.unwrap();
    let answer = get(&client, &url).await;
    assert_page(&answer, 503, PAGE_503);
    assert_eq!(answer.headers["retry-after"], "30");

    // Backends' own answers are never replaced.
    config.maintenance = false;
    proxy.configure_route("web", config).await.unwrap();
    let answer = get(&client, &url).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statuses_without_a_page_keep_the_built_in_body() {
    let mut config = RouteConfig::new(localhost(), Protocol::Http);
    config.error_pages = pages(&[(503, PAGE_503), (404, "<h1>not used</h1>")]);
    let dead = dead_addr().await;
    let (proxy, addr) = proxy_with(config.clone(), vec![Backend::new("dead", dead, 1)]).await;
    let client = client();
    let url = format!("http://{addr}/");

    let answer = get(&client, &url).await;
    assert_eq!(answer.status, 502);
    assert!(answer.text().contains("bad gateway"), "{}", answer.text());
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );

    config.maintenance = true;
    config.error_pages.clear();
    proxy.configure_route("web", config).await.unwrap();
    let answer = get(&client, &url).await;
    assert_eq!(answer.status, 503);
    assert!(answer.text().contains("maintenance"), "{}", answer.text());
}
