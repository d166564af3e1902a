//! What the engine configures: routes and the backends behind them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How a route's listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and h2c (prior knowledge) from clients; HTTP/1.1 to backends.
    Http,
    /// Raw TCP: each client connection is piped to one backend connection.
    Tcp,
}

/// How a route picks a backend for a new request (or TCP connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoadBalance {
    /// nginx's smooth weighted round-robin over the backends with weight > 0.
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight relative to its weight.
    LeastRequests,
}

/// Default upstream timeout of a request ([`RouteConfig::request_timeout`]).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit of concurrent client connections per route.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The settings of one route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// Where the route listens.
    pub listen: SocketAddr,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// HTTP: how long the proxy waits for a backend's response head, from
    /// the first attempt (retries and the upload of the request body
    /// included), before answering 504. The response body then streams
    /// without a limit. TCP: bounds the connect to a backend (at most 3 s).
    pub request_timeout: Duration,
    /// Concurrent client connections; beyond it, HTTP connections get 503 and
    /// TCP connections are closed.
    pub max_connections: usize,
    /// HTTP: answer 503 with `Retry-After: 30` and a small page; TCP: close.
    pub maintenance: bool,
    /// How a backend is picked.
    pub load_balance: LoadBalance,
    /// HTTP: custom pages for the answers the proxy gives itself, by status:
    /// the HTML body (sent as `text/html; charset=utf-8`, as is) replaces
    /// the built-in one for 502 (no backend could be reached), 503 (no
    /// backend, connection limit, maintenance) and 504 (a backend did not
    /// answer in time); headers such as `Retry-After` stay. Other statuses
    /// are ignored. Empty: the built-in bodies. The spec's
    /// `[route.X] error_pages = { 503 = "pages/503.html" }` fills it with the
    /// files' contents.
    pub error_pages: BTreeMap<u16, Arc<[u8]>>,
    /// HTTP: the host names this route serves (`shop.example.com`,
    /// `*.example.com`); empty: every host its address's other routes do
    /// not claim. Several HTTP routes may share one `listen` (port other
    /// than 0) when their hosts are disjoint; see the `host` module.
    pub hosts: Vec<String>,
}

impl RouteConfig {
    /// A route with the defaults: 60 s request timeout, 10 000 connections,
    /// not in maintenance, round-robin, built-in error pages.
    pub fn new(listen: SocketAddr, protocol: Protocol) -> RouteConfig {
        RouteConfig {
            listen,
            protocol,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            maintenance: false,
            load_balance: LoadBalance::RoundRobin,
            error_pages: BTreeMap::new(),
            hosts: Vec::new(),
        }
    }
}

/// One instance behind a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Stable id (the engine's instance id); in-flight counts and drain are
    /// keyed by it, across routes.
    pub id: String,
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// Relative weight (the engine sends parts per 10 000); 0 receives no new
    /// requests.
    pub weight: u32,
}

impl Backend {
    /// Shorthand for the struct literal.
    pub fn new(id: impl Into<String>, addr: SocketAddr, weight: u32) -> Backend {
        Backend {
            id: id.into(),
            addr,
            weight,
        }
    }
}
