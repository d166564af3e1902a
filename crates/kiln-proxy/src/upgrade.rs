//! HTTP/1.1 upgrades (WebSocket and the like): the request goes to a
//! backend on a fresh connection (never pooled: after a 101 it is no longer
//! HTTP), the backend's answer comes back, and after a 101 both upgraded
//! connections are spliced until either side closes.
//!
//! The tunnel counts as in flight on its backend and as an open client
//! connection of its route, so [`crate::Proxy::drain`] waits for it; when
//! the drain times out, the tunnel is closed (the backend is about to be
//! stopped anyway).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::balance::{BackendSet, ConnectError};
use crate::config::RouteConfig;
use crate::http::{
    BACKEND, Conn, ProxyBody, ResponseDone, UpBody, cause, error_page, forwarded_headers,
    strip_hop_by_hop, text,
};
use crate::route::RouteShared;
use crate::stats::{CLASS_5XX, InFlightGuard, class_of};

/// An HTTP/1.1 request asking to switch protocols: `Connection: upgrade`
/// and an `Upgrade` header.
pub(crate) fn requested(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// A fresh backend connection that can be upgraded.
async fn connect(addr: std::net::SocketAddr) -> Result<http1::SendRequest<UpBody>, ConnectError> {
    let stream = crate::balance::connect(addr).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(sender)
}

/// Forwards an upgrade request. A failed connect is retried on another
/// backend (nothing was sent); once sent, the request is not retried.
pub(crate) async fn forward(
    conn: &Arc<Conn>,
    route: &RouteShared,
    config: &RouteConfig,
    set: &BackendSet,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let name = &route.name;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    let mut headers = forwarded_headers(&mut parts, conn.peer, conn.peer_ip.clone());
    // Hop-by-hop, but the point of this request: passed on.
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        headers.insert(header::UPGRADE, protocol);
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let deadline = tokio::time::Instant::now() + config.request_timeout;
    let mut body = Some(body);

    let mut tried = Vec::new();
    let mut failure = None;
    let mut timed_out = false;
    while let Some(i) = set.pick(config.load_balance, &tried) {
        tried.push(i);
        let entry = &set.entries[i];
        let in_flight = InFlightGuard::new(entry.gauge.clone());
        let started = Instant::now();
        let mut sender = match tokio::time::timeout_at(deadline, connect(entry.backend.addr)).await
        {
            Ok(Ok(sender)) => sender,
            Ok(Err(error)) => {
                entry
                    .counters
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                route
                    .counters
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                failure = Some(format!("instance {}: {error}", entry.backend.id));
                continue;
            }
            Err(_elapsed) => {
                timed_out = true;
                break;
            }
        };
        if !headers.contains_key(header::HOST)
            && let Some(v) = &entry.host_header
        {
            headers.insert(header::HOST, v.clone());
        }
        let body = match body.take() {
            Some(b) if !b.is_end_stream() => UpBody::Slot {
                hint: b.size_hint(),
                slot: Arc::new(std::sync::Mutex::new(Some(b))),
                taken: None,
            },
            _ => UpBody::Empty,
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = Uri::from(path);
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = std::mem::take(&mut headers);

        let answer = tokio::time::timeout_at(deadline, sender.send_request(upstream)).await;
        let mut response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                entry.counters.record(CLASS_5XX);
                route.counters.record(CLASS_5XX);
                let why = format!("instance {}: {}", entry.backend.id, cause(&error));
                let status = StatusCode::BAD_GATEWAY;
                return error_page(config, status, None, || {
                    text(
                        status,
                        format!("kiln: route {name}: bad gateway ({why})"),
                        None,
                    )
                });
            }
            Err(_elapsed) => {
                entry.counters.record(CLASS_5XX);
                route.counters.record(CLASS_5XX);
                let status = StatusCode::GATEWAY_TIMEOUT;
                let mut response = error_page(config, status, None, || {
                    let (id, limit) = (&entry.backend.id, config.request_timeout);
                    let message = format!(
                        "kiln: route {name}: instance {id} did not answer within {limit:?}"
                    );
                    text(status, message, None)
                });
                if let Some(v) = &entry.id_header {
                    response.headers_mut().insert(BACKEND, v.clone());
                }
                return response;
            }
        };
        let class = class_of(response.status().as_u16());
        entry.counters.record(class);
        route.counters.record(class);

        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused: an ordinary answer, on a connection not worth keeping.
            let (mut rparts, rbody) = response.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            if let Some(v) = &entry.id_header {
                rparts.headers.insert(BACKEND, v.clone());
            }
            let done = ResponseDone::new(in_flight, entry.counters.clone(), started, None);
            return Response::from_parts(rparts, ProxyBody::Upstream { inner: rbody, done });
        }

        entry.counters.duration.observe(started.elapsed());
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let (mut rparts, _) = response.into_parts();
        let protocol = rparts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut rparts.headers);
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = protocol {
            rparts.headers.insert(header::UPGRADE, protocol);
        }
        if let Some(v) = &entry.id_header {
            rparts.headers.insert(BACKEND, v.clone());
        }
        let gauge = entry.gauge.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            // Registered before anything else, so a drain timing out from
            // now on closes this tunnel.
            let cut = gauge.cut.notified();
            tokio::pin!(cut);
            cut.as_mut().enable();
            let (client, backend) = match tokio::join!(client_upgrade, backend_upgrade) {
                (Ok(client), Ok(backend)) => (client, backend),
                _ => return,
            };
            let mut client = TokioIo::new(client);
            let mut backend = TokioIo::new(backend);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => {}
                _ = cut => {}
            }
            drop(in_flight);
            drop(conn);
        });
        return Response::from_parts(rparts, ProxyBody::Full(None));
    }
    route.counters.record(CLASS_5XX);
    if timed_out {
        let status = StatusCode::GATEWAY_TIMEOUT;
        return error_page(config, status, None, || {
            let limit = config.request_timeout;
            let message = format!("kiln: route {name}: no instance answered within {limit:?}");
            text(status, message, None)
        });
    }
    let status = StatusCode::BAD_GATEWAY;
    error_page(config, status, None, || {
        let why = failure.unwrap_or_else(|| "no instance could be reached".to_owned());
        text(
            status,
            format!("kiln: route {name}: bad gateway ({why})"),
            None,
        )
    })
}
