//! The proxy's errors.

use std::io;
use std::net::SocketAddr;

/// What can go wrong when configuring the proxy. Serving never fails: bad
/// requests and broken backends are answered with an HTTP status (or a
/// closed TCP connection) and counted.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The route's listen address could not be bound.
    #[error(
        "cannot listen on {listen}: {source}\n  hint: {}",
        bind_hint(source, route)
    )]
    Bind {
        route: String,
        listen: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A listener handed over by the caller could not be used.
    #[error("cannot serve route {route} on the given listener: {source}")]
    Listener {
        route: String,
        #[source]
        source: io::Error,
    },
    /// No route with this name is configured.
    #[error("no route named {0}\n  hint: configure the route before setting its backends")]
    NoSuchRoute(String),
    /// Two backends of one set share an id.
    #[error(
        "route {route}: backend id {id} appears twice in the set\n  hint: backend ids must be unique within a route"
    )]
    DuplicateBackend { route: String, id: String },
    /// The routes of one address cannot share it (overlapping hosts, two
    /// defaults, a TCP route among others).
    #[error(
        "route {route} cannot share {listen}: {message}\n  hint: give each route of one address its own `hosts`, and TCP routes an address of their own"
    )]
    Shared {
        route: String,
        listen: SocketAddr,
        message: String,
    },
    /// The proxy's worker threads could not be started.
    #[error(
        "cannot start the proxy's worker threads: {0}\n  hint: the process may be at its thread or memory limit"
    )]
    Workers(#[source] io::Error),
}

fn bind_hint(source: &io::Error, route: &str) -> String {
    match source.kind() {
        io::ErrorKind::AddrInUse => {
            format!("another process holds the port; change `listen` in [route.{route}]")
        }
        io::ErrorKind::PermissionDenied => format!(
            "ports below 1024 need CAP_NET_BIND_SERVICE; grant it or change `listen` in [route.{route}]"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("the address is not assigned to this host; change `listen` in [route.{route}]")
        }
        _ => format!("check `listen` in [route.{route}]"),
    }
}
