//! The proxy's own threads: each runs a tokio current-thread runtime that
//! accepts on every route's listening socket and serves the connections it
//! accepted, backend connections included, start to end.
//!
//! Why not the caller's runtime: the engine runs a multi-thread runtime, on
//! which a proxied request crosses threads (the client connection's task,
//! the backend connection's task, the pool) and every wakeup may go through
//! another worker's queue; with one thread per core and everything of a
//! connection on one thread, a small request costs about 10% less CPU
//! (BENCHMARKS.md, "Proxy"). The engine keeps calling the proxy from its own
//! runtime: configuring, swapping sets and draining only touch `ArcSwap`s,
//! atomics and `Notify`s, which work across runtimes.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::{Notify, oneshot};

thread_local! {
    /// Index of the worker running on this thread (0 elsewhere).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker this code runs on (0 outside the workers), to
/// pick per-worker state such as a backend's idle connections.
pub(crate) fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Connections a worker still serves; once the proxy is dropped, the worker
/// ends when this reaches zero.
#[derive(Debug, Default)]
pub(crate) struct Live {
    count: AtomicUsize,
    zero: Notify,
}

/// Counts one connection task on its worker while alive.
#[derive(Debug)]
pub(crate) struct LiveGuard(Arc<Live>);

impl LiveGuard {
    pub(crate) fn new(live: &Arc<Live>) -> LiveGuard {
        live.count.fetch_add(1, Ordering::AcqRel);
        LiveGuard(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// One worker thread: where to spawn on it, and what it serves.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) handle: Handle,
    pub(crate) live: Arc<Live>,
}

/// The worker threads. Dropping this lets each thread end once its
/// connections have closed (listeners stop with their routes).
#[derive(Debug)]
pub(crate) struct Workers {
    pub(crate) workers: Vec<Worker>,
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` (at least 1) threads.
    pub(crate) fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let live = Arc::new(Live::default());
            let (stop, stopped) = oneshot::channel::<()>();
            let l = live.clone();
            std::thread::Builder::new()
                .name(format!("kiln-proxy-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(async move {
                        // Resolves when the sender is dropped.
                        let _ = stopped.await;
                        loop {
                            let notified = l.zero.notified();
                            tokio::pin!(notified);
                            notified.as_mut().enable();
                            if l.count.load(Ordering::Acquire) == 0 {
                                return;
                            }
                            notified.await;
                        }
                    });
                })?;
            workers.push(Worker { handle, live });
            stops.push(stop);
        }
        Ok(Workers {
            workers,
            _stop: stops,
        })
    }
}

/// Worker threads to start when the caller does not say: one per core.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
