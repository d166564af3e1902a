//! kiln's built-in reverse proxy: the engine switches traffic between
//! instances during rollouts through it, without losing a request.
//!
//! # Shape
//!
//! A [`Proxy`] holds named routes. Each route listens on one address and is
//! either HTTP (HTTP/1.1 and h2c from clients, HTTP/1.1 with a keep-alive
//! pool to backends) or TCP (each client connection piped to one backend).
//! Several HTTP routes may share one address (one socket): each request
//! goes to the route its host names ([`RouteConfig::hosts`], the [`host`]
//! module), else 404. A socket with one route and no hosts skips the
//! lookup. A socket closes when its last route is removed; its connection
//! limit and gauge are the socket's.
//! Everything runs on tokio; nothing blocks. Requests without a body and
//! with an idempotent method (most traffic) are forwarded by the client
//! connection's task itself over the pool (the `raw` module); the others
//! go through hyper's HTTP/1.1 client.
//!
//! # Threads
//!
//! Connections are served on the proxy's own worker threads (one per core
//! by default, [`Proxy::with_workers`]), each a tokio current-thread
//! runtime with its own accept loop on every route's socket: a client
//! connection, the backend connections it uses and their pool stay on the
//! worker that accepted it, so a request never crosses threads. The caller
//! (the engine's runtime) configures routes, swaps sets and drains from
//! anywhere: that only touches `ArcSwap`s, atomics and `Notify`s.
//!
//! # Swap
//!
//! A route's backend set is an immutable [`Backend`] list behind an
//! `ArcSwap`. [`Proxy::set_backends`] builds a new set and stores it in one
//! atomic step: a request loads the set once, picks from it, and never sees
//! a half-updated set. The request path takes no lock: it loads `ArcSwap`s
//! and bumps atomics. Round-robin is nginx's smooth weighted algorithm,
//! unrolled into a sequence when the set is built, so a pick is one
//! `fetch_add`; least-requests ([`LoadBalance::LeastRequests`]) compares the
//! backends' in-flight counts relative to their weights. Weight 0 receives
//! no new requests. Changing a route's settings with the same `listen`
//! swaps its [`RouteConfig`] the same way (the socket is kept); a new
//! `listen` binds the new socket first, then retires the old one.
//!
//! # Drain
//!
//! Every backend id has one in-flight gauge shared across routes. An HTTP
//! request counts from the moment a backend is picked until its response
//! body has been sent to the client (or the client went away): the guard
//! lives inside the response body. A TCP connection counts until both
//! directions are closed, an upgraded (WebSocket) connection until its
//! tunnel closes; a drain that times out closes the backend's tunnels. Once `set_backends` has removed a backend, no new
//! request picks it, and [`Proxy::drain`] waits (on a `Notify`, not by
//! polling) until its gauge is zero. Each backend has its own connection
//! pool, dropped with the last request that uses it, so idle keep-alive
//! connections to a removed backend close and are never reused.
//!
//! # Retry
//!
//! Within the route's `request_timeout` (which bounds waiting for the
//! response head, all attempts included; bodies stream without a limit):
//!
//! - a failed connect (refused, reset or timed out before any byte of the
//!   request was written) is retried on another backend, for any method:
//!   nothing was sent;
//! - a backend that closed or reset the connection before any byte of the
//!   response (typically an idle pooled connection it just timed out) is
//!   retried on another backend for idempotent methods (GET, HEAD, OPTIONS,
//!   PUT, DELETE, TRACE) with an empty body only; when no other backend is
//!   left, the same backend is tried once more (on a fresh connection);
//! - each backend of the set is tried at most once; when all fail the
//!   client gets 502, and a timeout gives 504.
//!
//! # Limits
//!
//! - A client's request head must arrive within 10 s and fit in 64 KiB:
//!   a stalled head (slowloris) gets 408 or a closed connection, an
//!   oversized one 431, a malformed one 400; none of them affects other
//!   clients. The same 10 s closes client keep-alive connections left idle,
//!   and a new connection must send its first request within 10 s (this also
//!   bounds the HTTP/1-or-h2 detection, which has no timeout of its own).
//! - Each route serves at most `max_connections` concurrent client
//!   connections; beyond, HTTP connections get one 503 and are closed, TCP
//!   connections are closed at once.
//! - The 502/503/504 the proxy answers itself have built-in bodies, or the
//!   route's own HTML pages ([`RouteConfig::error_pages`]).
//! - Idle pooled connections to backends are dropped after 4 s, below
//!   common backend keep-alive timeouts, so the proxy rarely writes to a
//!   connection the backend is closing.
//!
//! # Counters
//!
//! [`Proxy::stats`] and [`Proxy::metrics_text`] read atomics. A route's
//! per-backend counters cover its current set plus removed backends still
//! draining; the first `set_backends` after a removed backend has drained
//! forgets them (route totals keep counting).
//!
//! # Not done here
//!
//! HTTP/2 to backends, TLS, and health checking (the engine decides the
//! set) are not the proxy's job. Upgrades (WebSocket) are proxied over
//! HTTP/1.1 only (not h2's extended CONNECT); see the `upgrade` module.

mod balance;
mod config;
mod error;
pub mod host;
mod http;
mod raw;
mod route;
mod stats;
mod tcp;
mod upgrade;
mod workers;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::balance::{BackendSet, ClientCell, Entry};
use crate::host::HostRouter;
use crate::route::{ListenerShared, Listening, RouteShared};
use crate::stats::{BackendCounters, Exposition, Gauge};
use crate::workers::Workers;

pub use crate::config::{
    Backend, DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, LoadBalance, Protocol, RouteConfig,
};
pub use crate::error::ProxyError;
pub use crate::http::BACKEND_HEADER;
pub use crate::stats::{BackendStats, RouteStats};

/// The outcome of [`Proxy::drain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Nothing is in flight on the backend any more.
    Drained,
    /// The timeout passed with this much still in flight.
    TimedOut { remaining: usize },
}

/// The reverse proxy. Cheap to clone; every clone drives the same routes.
/// Dropping the last clone stops every listener; its worker threads end
/// once their open connections have closed.
#[derive(Clone, Debug, Default)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Route {
    shared: Arc<RouteShared>,
    /// Its listener's key in `Inner::listeners`.
    listener: u64,
}

/// One listening socket and the routes served on it.
#[derive(Debug)]
struct Listener {
    shared: Arc<ListenerShared>,
    listening: Listening,
    /// The names of its routes (at least one).
    routes: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Worker threads to start (0: one per core).
    worker_count: usize,
    /// Started with the first route.
    workers: OnceLock<Workers>,
    /// Locked before `listeners` when both are.
    routes: Mutex<HashMap<String, Route>>,
    listeners: Mutex<HashMap<u64, Listener>>,
    next_listener: AtomicU64,
    /// In-flight gauges by backend id, across routes.
    gauges: Mutex<HashMap<String, Arc<Gauge>>>,
    /// Serialises configure/remove/shutdown (never taken by requests).
    ops: tokio::sync::Mutex<()>,
    /// Backend sets staged for routes not configured yet: installed before
    /// the route's first accept (see [`Proxy::stage_backends`]).
    staged: Mutex<HashMap<String, Vec<Backend>>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// A proxy with no routes, serving on one worker thread per core.
    pub fn new() -> Proxy {
        Proxy::default()
    }

    /// A proxy with no routes, serving on `workers` threads (at least 1).
    /// Each thread runs its own single-threaded tokio runtime and serves the
    /// connections it accepted start to end; the threads start with the
    /// first route.
    pub fn with_workers(workers: usize) -> Proxy {
        Proxy {
            inner: Arc::new(Inner {
                worker_count: workers.max(1),
                ..Inner::default()
            }),
        }
    }

    fn worker_count(&self) -> usize {
        match self.inner.worker_count {
            0 => workers::default_count(),
            n => n,
        }
    }

    fn workers(&self) -> Result<&Workers, ProxyError> {
        if let Some(w) = self.inner.workers.get() {
            return Ok(w);
        }
        // Under `ops`: only one caller gets here at a time.
        let started = Workers::start(self.worker_count()).map_err(ProxyError::Workers)?;
        Ok(self.inner.workers.get_or_init(|| started))
    }

    /// Binds `config.listen` (with SO_REUSEADDR) and serves route `name`.
    ///
    /// If the route exists with the same `listen`, only its settings change:
    /// the socket is kept and no connection is dropped. If another route
    /// already listens on that address (a port other than 0), the route
    /// joins its socket, dispatched by host (`RouteConfig::hosts`). With a
    /// new address, the new socket is bound first, then the route leaves
    /// the old one, which stops accepting once no route is left on it (its
    /// open connections finish).
    pub async fn configure_route(&self, name: &str, config: RouteConfig) -> Result<(), ProxyError> {
        let _ops = self.inner.ops.lock().await;
        let current = locked(&self.inner.routes)
            .get(name)
            .map(|r| (r.shared.clone(), r.listener));
        if let Some((shared, key)) = current {
            let same = locked(&self.inner.listeners)
                .get(&key)
                .is_some_and(|l| l.listening.configured == config.listen);
            if same {
                let old = shared.config.swap(Arc::new(config));
                if let Err(e) = self.rebuild(key, name) {
                    shared.config.store(old);
                    return Err(e);
                }
                return Ok(());
            }
        }
        if config.listen.port() != 0 {
            let key = locked(&self.inner.listeners)
                .iter()
                .find(|(_, l)| l.listening.configured == config.listen)
                .map(|(k, _)| *k);
            if let Some(key) = key {
                return self.join(name, config, key).await;
            }
        }
        let listener = route::bind(name, config.listen)?;
        let configured = config.listen;
        self.install(name, config, listener, configured).await
    }

    /// Like [`Proxy::configure_route`], but serves on an already-bound
    /// listener (socket handover, tests); the route's previous listener, if
    /// any, is left. If a route already serves on that same socket (one
    /// handed over for several routes of an address), the route joins it
    /// and `listener` is closed.
    pub async fn configure_route_with_listener(
        &self,
        name: &str,
        config: RouteConfig,
        listener: std::net::TcpListener,
    ) -> Result<(), ProxyError> {
        let _ops = self.inner.ops.lock().await;
        let configured = listener
            .local_addr()
            .map_err(|source| ProxyError::Listener {
                route: name.to_owned(),
                source,
            })?;
        let key = locked(&self.inner.listeners)
            .iter()
            .find(|(_, l)| l.listening.local_addr == configured)
            .map(|(k, _)| *k);
        if let Some(key) = key {
            return self.join(name, config, key).await;
        }
        self.install(name, config, listener, configured).await
    }

    /// The route's shared state with `config`: the existing one, or a new
    /// one with its staged backend set.
    fn route_shared(
        &self,
        name: &str,
        config: RouteConfig,
    ) -> Result<(Arc<RouteShared>, Option<Arc<RouteConfig>>), ProxyError> {
        let existing = locked(&self.inner.routes)
            .get(name)
            .map(|r| r.shared.clone());
        let (shared, old) = match existing {
            Some(shared) => {
                let old = shared.config.swap(Arc::new(config));
                (shared, Some(old))
            }
            None => (Arc::new(RouteShared::new(name, config)), None),
        };
        let staged = locked(&self.inner.staged).remove(name);
        if let Some(backends) = staged {
            self.apply_backends(name, &shared, backends)?;
        }
        Ok((shared, old))
    }

    /// Serves route `name` on the existing listener `key` as well.
    async fn join(&self, name: &str, config: RouteConfig, key: u64) -> Result<(), ProxyError> {
        let (shared, old_config) = self.route_shared(name, config)?;
        let previous = locked(&self.inner.routes).insert(
            name.to_owned(),
            Route {
                shared: shared.clone(),
                listener: key,
            },
        );
        let added = locked(&self.inner.listeners)
            .get_mut(&key)
            .is_some_and(|l| l.routes.insert(name.to_owned()));
        if let Err(e) = self.rebuild(key, name) {
            // Back to how it was: the route where it served, as it was.
            {
                let mut routes = locked(&self.inner.routes);
                match previous {
                    Some(p) => routes.insert(name.to_owned(), p),
                    None => routes.remove(name),
                };
            }
            if added && let Some(l) = locked(&self.inner.listeners).get_mut(&key) {
                l.routes.remove(name);
            }
            if let Some(old) = old_config {
                shared.config.store(old);
            }
            let _ = self.rebuild(key, name);
            return Err(e);
        }
        if let Some(previous) = previous
            && previous.listener != key
        {
            self.leave(previous.listener, name).await;
        }
        Ok(())
    }

    /// Builds the host router of listener `key` from its routes' current
    /// settings and swaps it in; `culprit` names the route in an error.
    fn rebuild(&self, key: u64, culprit: &str) -> Result<(), ProxyError> {
        let routes = locked(&self.inner.routes);
        let listeners = locked(&self.inner.listeners);
        let Some(listener) = listeners.get(&key) else {
            return Ok(());
        };
        let members: Vec<(Arc<RouteConfig>, Arc<RouteShared>)> = listener
            .routes
            .iter()
            .filter_map(|n| routes.get(n))
            .map(|r| (r.shared.config.load_full(), r.shared.clone()))
            .collect();
        let (router, max) = router_for(&members).map_err(|message| ProxyError::Shared {
            route: culprit.to_owned(),
            listen: listener.listening.configured,
            message,
        })?;
        listener
            .shared
            .max_connections
            .store(max, Ordering::Relaxed);
        listener.shared.router.store(Arc::new(router));
        Ok(())
    }

    /// Route `name` no longer serves on listener `key`: the listener stops
    /// (socket closed when this returns) if it was its last route, else its
    /// router forgets the route.
    async fn leave(&self, key: u64, name: &str) {
        let emptied = {
            let mut listeners = locked(&self.inner.listeners);
            let empty = listeners.get_mut(&key).is_some_and(|l| {
                l.routes.remove(name);
                l.routes.is_empty()
            });
            if empty { listeners.remove(&key) } else { None }
        };
        match emptied {
            Some(listener) => listener.listening.stop().await,
            // Fewer routes cannot conflict.
            None => {
                let _ = self.rebuild(key, name);
            }
        }
    }

    async fn install(
        &self,
        name: &str,
        config: RouteConfig,
        listener: std::net::TcpListener,
        configured: SocketAddr,
    ) -> Result<(), ProxyError> {
        let workers = self.workers()?;
        let (shared, old_config) = self.route_shared(name, config)?;
        let lshared = Arc::new(ListenerShared::new(name.to_owned()));
        let routed =
            router_for(&[(shared.config.load_full(), shared.clone())]).map_err(|message| {
                ProxyError::Shared {
                    route: name.to_owned(),
                    listen: configured,
                    message,
                }
            });
        let (router, max) = match routed {
            Ok(r) => r,
            Err(e) => {
                if let Some(old) = old_config {
                    shared.config.store(old);
                }
                return Err(e);
            }
        };
        lshared.max_connections.store(max, Ordering::Relaxed);
        lshared.router.store(Arc::new(router));
        // The router is in place before the first accept.
        let listening = Listening::start(lshared.clone(), listener, configured, workers)?;
        let key = self.inner.next_listener.fetch_add(1, Ordering::Relaxed);
        let previous = {
            let mut routes = locked(&self.inner.routes);
            let previous = routes.insert(
                name.to_owned(),
                Route {
                    shared,
                    listener: key,
                },
            );
            locked(&self.inner.listeners).insert(
                key,
                Listener {
                    shared: lshared,
                    listening,
                    routes: BTreeSet::from([name.to_owned()]),
                },
            );
            previous
        };
        if let Some(previous) = previous {
            self.leave(previous.listener, name).await;
        }
        Ok(())
    }

    /// A duplicate of the route's listening socket (same socket, same
    /// accept queue), to hand to another process: connections it has not
    /// accepted yet are accepted by whoever accepts next, so none is lost.
    /// Routes sharing an address share the socket.
    pub fn dup_listener(&self, route: &str) -> Option<std::io::Result<std::net::TcpListener>> {
        let routes = locked(&self.inner.routes);
        let key = routes.get(route)?.listener;
        let listeners = locked(&self.inner.listeners);
        let listening = &listeners.get(&key)?.listening;
        Some(listening.fd.try_clone().map(std::net::TcpListener::from))
    }

    /// Every listener stops accepting (its listening socket stays open in
    /// whoever holds a [`Proxy::dup_listener`] of it); open connections
    /// finish their in-flight requests and close. For a handover.
    pub fn stop_accepting(&self) {
        for listener in locked(&self.inner.listeners).values() {
            listener.listening.halt();
        }
    }

    /// Open client connections, over every listener.
    pub fn busy(&self) -> usize {
        locked(&self.inner.listeners)
            .values()
            .map(|l| l.shared.connections.load(Ordering::Acquire))
            .sum()
    }

    /// Stops serving the route; when it was the last route of its socket,
    /// the socket is closed when this returns. Open connections and
    /// in-flight requests finish.
    pub async fn remove_route(&self, name: &str) -> Result<(), ProxyError> {
        let _ops = self.inner.ops.lock().await;
        let route = locked(&self.inner.routes).remove(name);
        match route {
            Some(route) => {
                self.leave(route.listener, name).await;
                Ok(())
            }
            None => Err(ProxyError::NoSuchRoute(name.to_owned())),
        }
    }

    /// Atomically replaces the route's backend set. Weights are relative;
    /// weight 0 receives no new requests. With no backend of weight > 0, HTTP
    /// answers 503 and TCP connections are closed.
    pub fn set_backends(&self, route: &str, backends: Vec<Backend>) -> Result<(), ProxyError> {
        let shared = locked(&self.inner.routes)
            .get(route)
            .map(|r| r.shared.clone())
            .ok_or_else(|| ProxyError::NoSuchRoute(route.to_owned()))?;
        self.apply_backends(route, &shared, backends)
    }

    /// The backend set a route that is not configured yet starts with, so
    /// that its first accepted request already has somewhere to go (a new
    /// daemon serving a handed-over socket, a route created for running
    /// instances). Replaced by any later staging; dropped by nothing else.
    pub fn stage_backends(&self, route: &str, backends: Vec<Backend>) {
        locked(&self.inner.staged).insert(route.to_owned(), backends);
    }

    fn apply_backends(
        &self,
        route: &str,
        shared: &Arc<RouteShared>,
        backends: Vec<Backend>,
    ) -> Result<(), ProxyError> {
        let mut ids = HashSet::new();
        for b in &backends {
            if !ids.insert(b.id.as_str()) {
                return Err(ProxyError::DuplicateBackend {
                    route: route.to_owned(),
                    id: b.id.clone(),
                });
            }
        }

        let slots = self.worker_count();
        let _set = locked(&shared.set_lock);
        let old_set = shared.backends.load_full();
        let old_counters = shared.backend_counters.load_full();
        let mut counters: HashMap<String, Arc<BackendCounters>> = HashMap::new();
        let mut entries = Vec::with_capacity(backends.len());
        {
            let mut gauges = locked(&self.inner.gauges);
            for backend in backends {
                let client = old_set
                    .entries
                    .iter()
                    .find(|e| e.backend.id == backend.id && e.backend.addr == backend.addr)
                    .map_or_else(|| Arc::new(ClientCell::new(slots)), |e| e.client.clone());
                let c = old_counters.get(&backend.id).cloned().unwrap_or_default();
                counters.insert(backend.id.clone(), c.clone());
                let gauge = gauges.entry(backend.id.clone()).or_default().clone();
                entries.push(Entry::new(backend, client, c, gauge));
            }
            // Removed backends stay visible in stats while they drain.
            for (id, c) in old_counters.iter() {
                if !counters.contains_key(id) && gauges.get(id).is_some_and(|g| g.get() > 0) {
                    counters.insert(id.clone(), c.clone());
                }
            }
        }
        shared
            .backends
            .store(Arc::new(BackendSet::new(entries, old_set.position())));
        shared.backend_counters.store(Arc::new(counters));
        drop(old_set);
        // Forget gauges no set references and nothing holds.
        locked(&self.inner.gauges).retain(|_, g| Arc::strong_count(g) > 1 || g.get() > 0);
        Ok(())
    }

    /// The route's current backend set.
    pub fn backends(&self, route: &str) -> Option<Vec<Backend>> {
        let routes = locked(&self.inner.routes);
        let set = routes.get(route)?.shared.backends.load();
        Some(set.entries.iter().map(|e| e.backend.clone()).collect())
    }

    /// Every route and its settings, by name.
    pub fn routes(&self) -> Vec<(String, RouteConfig)> {
        let routes = locked(&self.inner.routes);
        let mut out: Vec<_> = routes
            .iter()
            .map(|(name, r)| (name.clone(), RouteConfig::clone(&r.shared.config.load())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The address the route's socket is bound to (resolves port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        let key = locked(&self.inner.routes).get(route)?.listener;
        locked(&self.inner.listeners)
            .get(&key)
            .map(|l| l.listening.local_addr)
    }

    /// HTTP requests in flight plus open TCP connections to this backend id,
    /// across all routes.
    pub fn in_flight(&self, backend_id: &str) -> usize {
        locked(&self.inner.gauges)
            .get(backend_id)
            .map_or(0, |g| g.get())
    }

    /// Waits until nothing is in flight on `backend_id` or `timeout` passes.
    /// Remove the backend from every route's set first, or new requests keep
    /// arriving. On timeout, upgraded connections (WebSocket) to the backend
    /// are closed; requests and TCP connections still in flight are left
    /// to the caller (stopping the backend ends them).
    pub async fn drain(&self, backend_id: &str, timeout: Duration) -> DrainOutcome {
        let Some(gauge) = locked(&self.inner.gauges).get(backend_id).cloned() else {
            return DrainOutcome::Drained;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = gauge.zero.notified();
            tokio::pin!(notified);
            // Register before checking, so a decrement in between is not missed.
            notified.as_mut().enable();
            if gauge.get() == 0 {
                return DrainOutcome::Drained;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return match gauge.get() {
                        0 => DrainOutcome::Drained,
                        remaining => {
                            gauge.cut.notify_waiters();
                            DrainOutcome::TimedOut { remaining }
                        }
                    };
                }
            }
        }
    }

    /// The route's counters, for canary analysis.
    pub fn stats(&self, route: &str) -> Option<RouteStats> {
        let shared = locked(&self.inner.routes).get(route)?.shared.clone();
        Some(stats::route_stats(
            &shared.counters,
            &shared.backend_counters.load(),
        ))
    }

    /// Every counter in the Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        let mut routes: Vec<Arc<RouteShared>> = locked(&self.inner.routes)
            .values()
            .map(|r| r.shared.clone())
            .collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Exposition::default();
        for route in &routes {
            let counters = route.backend_counters.load();
            let sorted: BTreeMap<_, _> = counters.iter().collect();
            out.route(&route.name, &route.counters, &sorted);
        }
        let gauges: BTreeMap<String, Arc<Gauge>> = locked(&self.inner.gauges)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, gauge) in &gauges {
            out.in_flight(id, gauge);
        }
        out.finish()
    }

    /// Stops every route: listeners close; open connections finish.
    pub async fn shutdown(&self) {
        let _ops = self.inner.ops.lock().await;
        locked(&self.inner.routes).clear();
        let listeners: Vec<Listener> = locked(&self.inner.listeners)
            .drain()
            .map(|(_, l)| l)
            .collect();
        for listener in listeners {
            listener.listening.stop().await;
        }
    }
}

/// The host router over one listener's routes, and its connection limit.
fn router_for(
    members: &[(Arc<RouteConfig>, Arc<RouteShared>)],
) -> Result<(HostRouter<Arc<RouteShared>>, usize), String> {
    if members
        .iter()
        .any(|(c, _)| c.protocol == Protocol::Tcp && (members.len() > 1 || !c.hosts.is_empty()))
    {
        return Err("a TCP route has its address to itself and no `hosts`".into());
    }
    let router = HostRouter::new(members.iter().map(|(c, s)| (c.hosts.as_slice(), s.clone())))?;
    let max = members
        .iter()
        .map(|(c, _)| c.max_connections)
        .min()
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    Ok((router, max))
}
