//! HTTP routes: a hyper server per client connection (HTTP/1.1 or h2c),
//! forwarding each request to a backend over a keep-alive pool.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::balance::{BackendSet, ClientCell, ConnectError, Sender};
use crate::config::RouteConfig;
use crate::raw::{Head, RawBody, RawConn, RawError};
use crate::route::{ConnGuard, RouteShared};
use crate::stats::{BackendCounters, CLASS_5XX, InFlightGuard, class_of};

/// Slowloris bound: a request head must arrive within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A new connection must send its first request within this time (covers
/// the HTTP/1-or-h2 detection, which has no timeout of its own).
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1 read buffer; h2 header list).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// `Retry-After` (seconds) of the maintenance page.
const MAINTENANCE_RETRY_AFTER: u32 = 30;
/// `Retry-After` (seconds) when the route has no backend or no room.
const UNAVAILABLE_RETRY_AFTER: u32 = 1;
/// Header with the id of the backend that answered.
pub const BACKEND_HEADER: &str = "x-kiln-backend";
// Parsed once, not on every insert (a `&str` name is parsed on each use).
pub(crate) const BACKEND: HeaderName = HeaderName::from_static(BACKEND_HEADER);
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// One client connection, shared by its requests (and by the tunnel of an
/// upgraded one, which keeps the connection counted until it closes).
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) guard: ConnGuard,
    pub(crate) peer: SocketAddr,
    /// X-Forwarded-For for requests that bring none: made once per connection.
    pub(crate) peer_ip: Option<HeaderValue>,
    /// Whether a request has arrived (for the first-request timeout).
    seen_request: AtomicBool,
}

/// Serves one accepted client connection until it closes, or until `stop`
/// asks for a graceful shutdown (in-flight requests finish first).
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    guard: ConnGuard,
) {
    let over_limit = guard.over_limit;
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(Conn {
        guard,
        peer,
        peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
        seen_request: AtomicBool::new(false),
    });
    let c = conn.clone();
    let service = service_fn(move |req| {
        let conn = c.clone();
        async move {
            conn.seen_request.store(true, Ordering::Relaxed);
            Ok::<_, Infallible>(handle(&conn, req).await)
        }
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(!over_limit);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let first_request = tokio::time::sleep(FIRST_REQUEST_TIMEOUT);
    tokio::pin!(first_request);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            _ = stop.wait_for(|stopped| *stopped), if !shutting_down => {
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            // The guard is read once when `select!` starts, while the
            // connection serves requests: check again when the timer fires.
            _ = &mut first_request, if !shutting_down && !conn.seen_request.load(Ordering::Relaxed) => {
                if !conn.seen_request.load(Ordering::Relaxed) {
                    connection.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
        }
    }
}

/// The body sent upstream. A request body is given to one attempt only; if
/// the attempt fails before the body was touched (connect errors), the body
/// is still in its slot and the next attempt takes it.
#[derive(Debug)]
pub(crate) enum UpBody {
    Empty,
    Slot {
        slot: Arc<Mutex<Option<Incoming>>>,
        taken: Option<Incoming>,
        hint: SizeHint,
    },
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Slot { slot, taken, .. } => {
                if taken.is_none() {
                    *taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                match taken {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Slot { taken, .. } => taken.as_ref().is_some_and(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Slot { hint, .. } => *hint,
        }
    }
}

/// The body sent to the client: the proxy's own small answers, or the
/// backend's body streamed through while holding the in-flight guard.
#[derive(Debug)]
pub(crate) enum ProxyBody {
    Full(Option<Bytes>),
    Upstream {
        inner: Incoming,
        done: ResponseDone,
    },
    /// Read by this body itself from a fast-path connection.
    Raw {
        body: RawBody,
        _done: ResponseDone,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream { inner, done } => {
                let frame = Pin::new(&mut *inner).poll_frame(cx);
                match &frame {
                    Poll::Ready(None) => done.reusable(),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => done.reusable(),
                    _ => {}
                }
                frame.map(|f| f.map(|r| r.map_err(BoxError::from)))
            }
            ProxyBody::Raw { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Raw { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
            ProxyBody::Raw { body, .. } => body.size_hint(),
        }
    }
}

/// Dropped when the response body is fully sent or the client went away:
/// ends the request's in-flight count and records its duration.
#[derive(Debug)]
pub(crate) struct ResponseDone {
    _in_flight: InFlightGuard,
    counters: Arc<BackendCounters>,
    started: Instant,
    /// The backend connection, back to its pool once the body has ended
    /// (otherwise it is dropped, and closes after this response).
    conn: Option<(Arc<ClientCell>, Sender)>,
}

impl ResponseDone {
    pub(crate) fn new(
        in_flight: InFlightGuard,
        counters: Arc<BackendCounters>,
        started: Instant,
        conn: Option<(Arc<ClientCell>, Sender)>,
    ) -> ResponseDone {
        ResponseDone {
            _in_flight: in_flight,
            counters,
            started,
            conn,
        }
    }

    fn reusable(&mut self) {
        if let Some((cell, sender)) = self.conn.take() {
            cell.checkin(sender);
        }
    }
}

impl Drop for ResponseDone {
    fn drop(&mut self) {
        self.counters.duration.observe(self.started.elapsed());
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names; most heads carry none, or only `Connection`.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name.as_str()) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // Names listed in `Connection` are hop-by-hop too (removed by `&str`:
    // no header name is allocated).
    let listed: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    for value in &listed {
        let Ok(value) = value.to_str() else { continue };
        for name in value.split(',') {
            let name = name.trim();
            if !name.is_empty() {
                headers.remove(name);
            }
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(*name);
        }
    }
}

fn local_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    retry_after: Option<u32>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Full(Some(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

pub(crate) fn text(
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
) -> Response<ProxyBody> {
    local_response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(format!("{message}\n")),
        retry_after,
    )
}

/// The proxy's own error answer: the route's custom page for `status` if it
/// has one, else `built_in`.
pub(crate) fn error_page(
    config: &RouteConfig,
    status: StatusCode,
    retry_after: Option<u32>,
    built_in: impl FnOnce() -> Response<ProxyBody>,
) -> Response<ProxyBody> {
    match config.error_pages.get(&status.as_u16()) {
        Some(page) => local_response(
            status,
            "text/html; charset=utf-8",
            Bytes::from_owner(page.clone()),
            retry_after,
        ),
        None => built_in(),
    }
}

fn maintenance_page(route: &str) -> Response<ProxyBody> {
    let route = route
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Down for maintenance</title></head>\n\
         <body><h1>Down for maintenance</h1><p>{route} is being updated. Please try again in a moment.</p></body></html>\n"
    );
    local_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/html; charset=utf-8",
        Bytes::from(page),
        Some(MAINTENANCE_RETRY_AFTER),
    )
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The backend closed or reset the connection (often an idle pooled one it
/// had just timed out) before any byte of the response: hyper's incomplete
/// message, a canceled request, or a reset/aborted socket. The request
/// future failing means no response head reached the proxy.
fn closed_before_response(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = e.source();
    }
    false
}

pub(crate) fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

pub(crate) fn forwarded_headers(
    parts: &mut http::request::Parts,
    peer: SocketAddr,
    peer_ip: Option<HeaderValue>,
) -> HeaderMap {
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    if !headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, v);
    }
    if !headers.contains_key(&X_FORWARDED_FOR)
        && let Some(v) = peer_ip
    {
        headers.insert(X_FORWARDED_FOR, v);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        return headers;
    }
    let previous: Vec<String> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let mut xff = previous.join(", ");
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(&peer.ip().to_string());
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    headers
}

/// Which route of the connection's listener serves a request.
enum Pick {
    /// The route the connection was accepted for, still its socket's only
    /// one: no host lookup, no reference count touched.
    Sole,
    /// The route its host names (HTTP/1.1's `Host`, h2's `:authority`, or
    /// an absolute URI's authority).
    Named(Arc<RouteShared>),
    /// No route claims the host.
    Nowhere,
}

fn route_for(conn: &Conn, req: &Request<Incoming>) -> Pick {
    let router = conn.guard.listener.router.load();
    if router.is_trivial() {
        return match (router.route(None), &conn.guard.sole) {
            (Some(route), Some(sole)) if Arc::ptr_eq(route, sole) => Pick::Sole,
            (Some(route), _) => Pick::Named(route.clone()),
            (None, _) => Pick::Nowhere,
        };
    }
    let host = match req.uri().authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => req.headers().get(header::HOST).map(HeaderValue::as_bytes),
    };
    router
        .route(host)
        .map_or(Pick::Nowhere, |r| Pick::Named(r.clone()))
}

async fn handle(conn: &Arc<Conn>, req: Request<Incoming>) -> Response<ProxyBody> {
    let named;
    let route: &RouteShared = match route_for(conn, &req) {
        Pick::Sole => conn.guard.sole.as_deref().expect("checked by route_for"),
        Pick::Named(route) => {
            named = route;
            &named
        }
        Pick::Nowhere => {
            let mut response = text(
                StatusCode::NOT_FOUND,
                "kiln: no route for this host".to_owned(),
                None,
            );
            if conn.guard.over_limit && req.version() < Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
    };
    let config = route.config.load_full();
    let name = &route.name;
    if conn.guard.over_limit {
        route.counters.record_local(CLASS_5XX);
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let retry = Some(UNAVAILABLE_RETRY_AFTER);
        let mut response = error_page(&config, status, retry, || {
            let limit = config.max_connections;
            let message = format!("kiln: route {name} is at its connection limit ({limit})");
            text(status, message, retry)
        });
        if req.version() < Version::HTTP_2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return response;
    }
    if config.maintenance {
        route.counters.record_local(CLASS_5XX);
        let status = StatusCode::SERVICE_UNAVAILABLE;
        return error_page(&config, status, Some(MAINTENANCE_RETRY_AFTER), || {
            maintenance_page(name)
        });
    }
    let set: Arc<BackendSet> = route.backends.load_full();
    if set.is_empty() {
        route.counters.record_local(CLASS_5XX);
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let retry = Some(UNAVAILABLE_RETRY_AFTER);
        return error_page(&config, status, retry, || {
            text(
                status,
                format!("kiln: route {name} has no healthy instance"),
                retry,
            )
        });
    }
    if crate::upgrade::requested(&req) {
        return crate::upgrade::forward(conn, route, &config, &set, req).await;
    }

    let (mut parts, body) = req.into_parts();
    let body_empty = body.is_end_stream();
    let hint = body.size_hint();
    let slot = (!body_empty).then(|| Arc::new(Mutex::new(Some(body))));
    let mut headers = forwarded_headers(&mut parts, conn.peer, conn.peer_ip.clone());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let retry_closed = is_idempotent(&parts.method) && body_empty;
    let deadline = tokio::time::Instant::now() + config.request_timeout;

    let mut tried: Vec<usize> = Vec::new();
    let mut retried_same = false;
    let mut failure: Option<String> = None;
    while let Some(i) = set.pick(config.load_balance, &tried) {
        tried.push(i);
        let entry = &set.entries[i];
        let in_flight = InFlightGuard::new(entry.gauge.clone());
        let started = Instant::now();
        let attempt = async {
            let addr = entry.backend.addr;
            if retry_closed {
                // Fast path: may be sent twice, so a pooled connection
                // that turns out closed is retried on a fresh one.
                let host = (!headers.contains_key(header::HOST))
                    .then_some(entry.host_header.as_ref())
                    .flatten();
                let (mut c, mut reused) = entry
                    .client
                    .checkout_raw(addr)
                    .await
                    .map_err(Failed::Connect)?;
                loop {
                    match c
                        .exchange(&parts.method, path.as_str(), &headers, host)
                        .await
                    {
                        Ok(head) => return Ok(Got::Raw(head, c)),
                        Err(e) if reused && e.closed_before_response() => {
                            (c, reused) = entry
                                .client
                                .checkout_raw(addr)
                                .await
                                .map_err(Failed::Connect)?;
                        }
                        Err(e) => return Err(Failed::Raw(e)),
                    }
                }
            }
            if !headers.contains_key(header::HOST)
                && let Some(v) = &entry.host_header
            {
                headers.insert(header::HOST, v.clone());
            }
            let up_body = match &slot {
                None => UpBody::Empty,
                Some(slot) => UpBody::Slot {
                    slot: slot.clone(),
                    taken: None,
                    hint,
                },
            };
            let mut req = Request::new(up_body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = Uri::from(path.clone());
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = headers.clone();
            let (mut sender, mut reused) =
                entry.client.checkout(addr).await.map_err(Failed::Connect)?;
            loop {
                match sender.try_send_request(req).await {
                    Ok(response) => return Ok(Got::Hyper(response, sender)),
                    Err(mut e) => match e.take_message() {
                        // Never sent: a pooled connection that just closed.
                        Some(r) if reused => {
                            req = r;
                            (sender, reused) =
                                entry.client.checkout(addr).await.map_err(Failed::Connect)?;
                        }
                        _ => return Err(Failed::Send(e.into_error())),
                    },
                }
            }
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(got)) => {
                let mut response = match got {
                    Got::Raw(head, c) => {
                        let body = RawBody::new(c, &head, entry.client.clone());
                        let done =
                            ResponseDone::new(in_flight, entry.counters.clone(), started, None);
                        let mut response = Response::new(ProxyBody::Raw { body, _done: done });
                        *response.status_mut() = head.status;
                        *response.headers_mut() = head.headers;
                        response
                    }
                    Got::Hyper(response, sender) => {
                        let (rparts, rbody) = response.into_parts();
                        let conn = Some((entry.client.clone(), sender));
                        let mut done =
                            ResponseDone::new(in_flight, entry.counters.clone(), started, conn);
                        if rbody.is_end_stream() {
                            done.reusable();
                        }
                        Response::from_parts(rparts, ProxyBody::Upstream { inner: rbody, done })
                    }
                };
                let class = class_of(response.status().as_u16());
                entry.counters.record(class);
                route.counters.record(class);
                let rheaders = response.headers_mut();
                strip_hop_by_hop(rheaders);
                if let Some(v) = &entry.id_header {
                    rheaders.insert(BACKEND, v.clone());
                }
                return response;
            }
            Ok(Err(Failed::Connect(error))) => {
                let id = &entry.backend.id;
                let body_unsent = slot
                    .as_ref()
                    .is_none_or(|s| s.lock().unwrap_or_else(|e| e.into_inner()).is_some());
                entry
                    .counters
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                route
                    .counters
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                failure = Some(format!("instance {id}: {error}"));
                if body_unsent {
                    continue;
                }
                break;
            }
            Ok(Err(failed)) => {
                let id = &entry.backend.id;
                entry.counters.record(CLASS_5XX);
                let (why, closed) = match &failed {
                    Failed::Send(e) => (cause(e), closed_before_response(e)),
                    Failed::Raw(e) => (e.to_string(), e.closed_before_response()),
                    // Handled by the arm above.
                    Failed::Connect(e) => (e.to_string(), false),
                };
                failure = Some(format!("instance {id}: {why}"));
                if retry_closed && closed {
                    // Most likely a pooled connection the backend was closing:
                    // with no other backend left, try this one once more (on
                    // a fresh connection, as the pool dropped the dead one).
                    if !retried_same && set.exhausted(&tried) {
                        retried_same = true;
                        tried.retain(|&t| t != i);
                    }
                    continue;
                }
                break;
            }
            Err(_elapsed) => {
                entry.counters.record(CLASS_5XX);
                route.counters.record(CLASS_5XX);
                let status = StatusCode::GATEWAY_TIMEOUT;
                let mut response = error_page(&config, status, None, || {
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
        }
    }
    route.counters.record(CLASS_5XX);
    let status = StatusCode::BAD_GATEWAY;
    error_page(&config, status, None, || {
        let why = failure.unwrap_or_else(|| "no instance could be reached".to_owned());
        text(
            status,
            format!("kiln: route {name}: bad gateway ({why})"),
            None,
        )
    })
}

/// How an attempt failed.
enum Failed {
    /// No connection: nothing was sent.
    Connect(ConnectError),
    /// Sending the request or reading the response head (hyper's client).
    Send(hyper::Error),
    /// The same on the fast path.
    Raw(RawError),
}

/// A response head from a backend, and the connection it came on.
enum Got {
    Hyper(Response<Incoming>, Sender),
    Raw(Head, RawConn),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_appends_peer() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "example.test")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let h = forwarded_headers(&mut parts, "192.0.2.7:5555".parse().unwrap(), None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "example.test");
    }
}
