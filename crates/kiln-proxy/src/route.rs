//! A route's shared state and its accept loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::balance::BackendSet;
use crate::config::{Protocol, RouteConfig};
use crate::error::ProxyError;
use crate::stats::{BackendCounters, RouteCounters};
use crate::workers::{Live, LiveGuard, Workers};

/// What every connection of a route shares; the request path only loads
/// from the `ArcSwap`s and touches atomics.
#[derive(Debug)]
pub(crate) struct RouteShared {
    pub(crate) name: String,
    pub(crate) config: ArcSwap<RouteConfig>,
    pub(crate) backends: ArcSwap<BackendSet>,
    pub(crate) counters: RouteCounters,
    /// Per-backend counters by id, replaced on `set_backends`.
    pub(crate) backend_counters: ArcSwap<HashMap<String, Arc<BackendCounters>>>,
    /// Serialises `set_backends` on this route (never taken by requests).
    pub(crate) set_lock: Mutex<()>,
}

impl RouteShared {
    pub(crate) fn new(name: &str, config: RouteConfig) -> RouteShared {
        RouteShared {
            name: name.to_owned(),
            config: ArcSwap::from_pointee(config),
            backends: ArcSwap::from_pointee(BackendSet::default()),
            counters: RouteCounters::default(),
            backend_counters: ArcSwap::from_pointee(HashMap::new()),
            set_lock: Mutex::new(()),
        }
    }
}

/// Counts one client connection of a route (and on its worker) while
/// alive; an upgraded connection (WebSocket) holds it until its tunnel
/// closes.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    pub(crate) route: Arc<RouteShared>,
    pub(crate) over_limit: bool,
    _live: LiveGuard,
}

impl ConnGuard {
    fn new(route: Arc<RouteShared>, live: &Arc<Live>) -> ConnGuard {
        let before = route.counters.connections.fetch_add(1, Ordering::AcqRel);
        let over_limit = before >= route.config.load().max_connections;
        ConnGuard {
            route,
            over_limit,
            _live: LiveGuard::new(live),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.route
            .counters
            .connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// One listening socket of a route and its accept loop.
#[derive(Debug)]
pub(crate) struct Listening {
    /// The address as configured (port 0 stays 0), to recognise an
    /// unchanged `listen`.
    pub(crate) configured: SocketAddr,
    pub(crate) local_addr: SocketAddr,
    /// A duplicate of the listening socket, for handing it to another
    /// process (a kiln upgrade) while this one stops accepting.
    pub(crate) fd: std::os::fd::OwnedFd,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Listening {
    /// Starts one accept loop per worker, each on its own duplicate of the
    /// socket (same accept queue) registered with its worker's runtime: a
    /// connection is served, start to end, by the worker that accepted it.
    pub(crate) fn start(
        route: Arc<RouteShared>,
        listener: std::net::TcpListener,
        configured: SocketAddr,
        workers: &Workers,
    ) -> Result<Listening, ProxyError> {
        let err = |source| ProxyError::Listener {
            route: route.name.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(err)?;
        let local_addr = listener.local_addr().map_err(err)?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::with_capacity(workers.workers.len());
        for worker in &workers.workers {
            let dup = listener.try_clone().map_err(err)?;
            let listener = {
                let _runtime = worker.handle.enter();
                TcpListener::from_std(dup).map_err(err)?
            };
            tasks.push(worker.handle.spawn(accept_loop(
                route.clone(),
                listener,
                stopped.clone(),
                worker.live.clone(),
            )));
        }
        Ok(Listening {
            configured,
            local_addr,
            fd: std::os::fd::OwnedFd::from(listener),
            stop,
            tasks,
        })
    }

    /// Stops accepting without waiting (open connections finish).
    pub(crate) fn halt(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops accepting and waits until the socket is closed. Open HTTP
    /// connections finish their in-flight requests and close; TCP
    /// connections run until their peers close them.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Binds with SO_REUSEADDR (a restarted proxy can rebind while old
/// connections sit in TIME_WAIT).
pub(crate) fn bind(route: &str, listen: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind {
        route: route.to_owned(),
        listen,
        source,
    };
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(listen).map_err(err)?;
    socket
        .listen(1024)
        .and_then(TcpListener::into_std)
        .map_err(err)
}

async fn accept_loop(
    route: Arc<RouteShared>,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
    live: Arc<Live>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let conn = ConnGuard::new(route.clone(), &live);
                match route.config.load().protocol {
                    Protocol::Http => {
                        tokio::spawn(crate::http::serve(stream, peer, stopped.clone(), conn));
                    }
                    Protocol::Tcp => {
                        tokio::spawn(crate::tcp::serve(route.clone(), stream, conn));
                    }
                }
            }
            Err(e) => {
                use std::io::ErrorKind::*;
                if !matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
                    // Out of file descriptors and the like: back off instead
                    // of spinning; stop still wins.
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }
}
