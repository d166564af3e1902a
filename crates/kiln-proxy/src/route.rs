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
use crate::host::HostRouter;
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

/// What every connection accepted on one listening socket shares: the
/// routes behind it by host (one route, or several http routes with
/// `hosts`), and the socket's open connections.
#[derive(Debug)]
pub(crate) struct ListenerShared {
    /// Swapped whole when a route of the address is added, changed or
    /// removed; a request loads it once.
    pub(crate) router: ArcSwap<HostRouter<Arc<RouteShared>>>,
    /// Open client connections on this socket.
    pub(crate) connections: std::sync::atomic::AtomicUsize,
    /// The routes' `max_connections` (the spec makes the routes of one
    /// address agree; the smallest wins otherwise).
    pub(crate) max_connections: std::sync::atomic::AtomicUsize,
    /// Names this listener's errors with.
    pub(crate) label: String,
}

impl ListenerShared {
    pub(crate) fn new(label: String) -> ListenerShared {
        ListenerShared {
            router: ArcSwap::from_pointee(HostRouter::default()),
            connections: Default::default(),
            max_connections: Default::default(),
            label,
        }
    }
}

/// Counts one client connection of a listener (and on its worker) while
/// alive; an upgraded connection (WebSocket) holds it until its tunnel
/// closes. On a listener with one route, the route's connection gauge
/// counts it too; on a shared one the connection belongs to no route.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    pub(crate) listener: Arc<ListenerShared>,
    /// The only route of the listener when the connection was accepted.
    pub(crate) sole: Option<Arc<RouteShared>>,
    pub(crate) over_limit: bool,
    _live: LiveGuard,
}

impl ConnGuard {
    fn new(
        listener: Arc<ListenerShared>,
        sole: Option<Arc<RouteShared>>,
        live: &Arc<Live>,
    ) -> ConnGuard {
        let before = listener.connections.fetch_add(1, Ordering::AcqRel);
        if let Some(route) = &sole {
            route.counters.connections.fetch_add(1, Ordering::AcqRel);
        }
        let over_limit = before >= listener.max_connections.load(Ordering::Relaxed);
        ConnGuard {
            listener,
            sole,
            over_limit,
            _live: LiveGuard::new(live),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.listener.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(route) = &self.sole {
            route.counters.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One listening socket and its accept loop.
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
        shared: Arc<ListenerShared>,
        listener: std::net::TcpListener,
        configured: SocketAddr,
        workers: &Workers,
    ) -> Result<Listening, ProxyError> {
        let err = |source| ProxyError::Listener {
            route: shared.label.clone(),
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
                shared.clone(),
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
    shared: Arc<ListenerShared>,
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
                let router = shared.router.load();
                let sole = router.is_trivial().then(|| router.route(None).cloned());
                let sole = sole.flatten();
                drop(router);
                let tcp = sole
                    .as_ref()
                    .filter(|r| r.config.load().protocol == Protocol::Tcp)
                    .cloned();
                let conn = ConnGuard::new(shared.clone(), sole, &live);
                match tcp {
                    None => {
                        tokio::spawn(crate::http::serve(stream, peer, stopped.clone(), conn));
                    }
                    Some(route) => {
                        tokio::spawn(crate::tcp::serve(route, stream, conn));
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
