//! Backend sets and how a request picks one of them.
//!
//! A set is immutable once built; `set_backends` builds a new one and swaps
//! it in. Round-robin is nginx's smooth weighted algorithm, computed once per
//! set into a sequence of picks, so the request path is one `fetch_add`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{Backend, LoadBalance};
use crate::http::UpBody;
use crate::raw::RawConn;
use crate::stats::{BackendCounters, Gauge};

/// Longest precomputed round-robin sequence; larger weight sums are scaled
/// down (keeping every positive weight at least 1).
const MAX_SEQUENCE: u64 = 1 << 14;
/// Connect timeout to a backend (a refused connection fails at once; this
/// bounds a black-holed one, which is then retried on another backend).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle pooled connections are dropped after this, below common backend
/// keep-alive timeouts (Node's is 5 s), so the proxy rarely sends on a
/// connection the backend is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// A connection to a backend, ready for one request.
pub(crate) type Sender = http1::SendRequest<UpBody>;
/// Idle connections and since when, most recently used last.
type IdleList = Vec<(Sender, Instant)>;
type RawIdleList = Vec<(RawConn, Instant)>;

/// The keep-alive pool to one backend address: idle HTTP/1.1 connections,
/// last in first out. Each backend has its own, so when a removed backend's
/// last request ends the pool is dropped and its idle connections close.
/// A request checks a connection out, and the response body's end puts it
/// back: no task per request, no pool key, no URI rewriting. Each worker
/// thread has its own idle list: a connection's task runs on the worker
/// that opened it, so it is only used there, without cross-thread wakeups.
#[derive(Debug)]
pub(crate) struct ClientCell {
    idle: Box<[Mutex<IdleList>]>,
    /// Connections of the fast path (`crate::raw`), per worker too.
    raw: Box<[Mutex<RawIdleList>]>,
    reaper: OnceLock<()>,
}

/// Why a connection could not be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Io(std::io::Error),
    TimedOut,
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "connect: {e}"),
            ConnectError::TimedOut => write!(f, "connect: timed out after {CONNECT_TIMEOUT:?}"),
            ConnectError::Handshake(e) => write!(f, "connect: {e}"),
        }
    }
}

impl ClientCell {
    /// A pool with one idle list per worker thread.
    pub(crate) fn new(workers: usize) -> ClientCell {
        ClientCell {
            idle: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            raw: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            reaper: OnceLock::new(),
        }
    }

    fn raw_idle(&self) -> std::sync::MutexGuard<'_, RawIdleList> {
        let slot = &self.raw[crate::workers::current() % self.raw.len()];
        slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fast-path connection (and whether it was reused): an idle one that
    /// still looks open, or a new one.
    pub(crate) async fn checkout_raw(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(RawConn, bool), ConnectError> {
        loop {
            let idle = self.raw_idle().pop();
            let Some((mut conn, since)) = idle else {
                break;
            };
            if since.elapsed() < POOL_IDLE_TIMEOUT && conn.looks_alive() {
                return Ok((conn, true));
            }
        }
        let stream = connect(addr).await?;
        self.start_reaper();
        Ok((RawConn::new(stream), false))
    }

    /// Returns a fast-path connection whose response was read to the end.
    pub(crate) fn checkin_raw(&self, conn: RawConn) {
        self.raw_idle().push((conn, Instant::now()));
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, IdleList> {
        let slot = &self.idle[crate::workers::current() % self.idle.len()];
        slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection that is still open (and whether it was reused), or
    /// a new one.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(Sender, bool), ConnectError> {
        loop {
            let idle = self.idle().pop();
            let Some((mut sender, since)) = idle else {
                break;
            };
            if since.elapsed() >= POOL_IDLE_TIMEOUT || sender.is_closed() {
                continue;
            }
            // Put back right after the response body ended: the
            // connection's task may not have asked for the next request yet.
            if sender.ready().await.is_ok() {
                return Ok((sender, true));
            }
        }
        let stream = connect(addr).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.start_reaper();
        Ok((sender, false))
    }

    /// Drops idle connections past the idle timeout, every so often, while
    /// the pool exists.
    fn start_reaper(self: &Arc<Self>) {
        self.reaper.get_or_init(|| {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(POOL_IDLE_TIMEOUT / 4);
                loop {
                    tick.tick().await;
                    let Some(cell) = weak.upgrade() else { return };
                    for slot in &cell.idle {
                        slot.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|(s, since)| {
                                since.elapsed() < POOL_IDLE_TIMEOUT && !s.is_closed()
                            });
                    }
                    for slot in &cell.raw {
                        slot.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIMEOUT);
                    }
                }
            });
        });
    }

    /// Returns a connection whose response was read to the end.
    pub(crate) fn checkin(&self, sender: Sender) {
        if !sender.is_closed() {
            self.idle().push((sender, Instant::now()));
        }
    }
}

/// A TCP connection to a backend, with TCP_NODELAY.
pub(crate) async fn connect(addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::TimedOut),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) backend: Backend,
    pub(crate) client: Arc<ClientCell>,
    pub(crate) counters: Arc<BackendCounters>,
    pub(crate) gauge: Arc<Gauge>,
    /// The backend's id as a header value, made once per set rather than
    /// per response (`None` if the id is not a valid header value).
    pub(crate) id_header: Option<HeaderValue>,
    /// The backend's address as a Host header, for requests without one.
    pub(crate) host_header: Option<HeaderValue>,
}

impl Entry {
    pub(crate) fn new(
        backend: Backend,
        client: Arc<ClientCell>,
        counters: Arc<BackendCounters>,
        gauge: Arc<Gauge>,
    ) -> Entry {
        Entry {
            id_header: HeaderValue::from_str(&backend.id).ok(),
            host_header: HeaderValue::from_str(&backend.addr.to_string()).ok(),
            backend,
            client,
            counters,
            gauge,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct BackendSet {
    pub(crate) entries: Vec<Entry>,
    /// Indices of entries with weight > 0.
    live: Vec<usize>,
    /// Smooth weighted round-robin order, as indices into `entries`.
    sequence: Vec<usize>,
    next: AtomicUsize,
}

impl BackendSet {
    /// `start` continues the round-robin position of the set this one
    /// replaces, so frequent swaps do not favour the head of the sequence.
    pub(crate) fn new(entries: Vec<Entry>, start: usize) -> BackendSet {
        let live: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].backend.weight > 0)
            .collect();
        let weights: Vec<u64> = live
            .iter()
            .map(|&i| u64::from(entries[i].backend.weight))
            .collect();
        let sequence = smooth_sequence(&weights)
            .into_iter()
            .map(|k| live[k])
            .collect();
        BackendSet {
            entries,
            live,
            sequence,
            next: AtomicUsize::new(start),
        }
    }

    pub(crate) fn position(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Whether every backend with weight > 0 is in `tried`.
    pub(crate) fn exhausted(&self, tried: &[usize]) -> bool {
        self.live.iter().all(|i| tried.contains(i))
    }

    /// Picks a backend with weight > 0 that is not in `tried`.
    pub(crate) fn pick(&self, lb: LoadBalance, tried: &[usize]) -> Option<usize> {
        if self.exhausted(tried) {
            return None;
        }
        match lb {
            LoadBalance::RoundRobin => {
                let n = self.sequence.len();
                for _ in 0..n {
                    let i = self.sequence[self.next.fetch_add(1, Ordering::Relaxed) % n];
                    if !tried.contains(&i) {
                        return Some(i);
                    }
                }
                self.live.iter().copied().find(|i| !tried.contains(i))
            }
            LoadBalance::LeastRequests => {
                // Rotate the starting point so ties spread.
                let n = self.live.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<(usize, u64, u64)> = None;
                for k in 0..n {
                    let i = self.live[(start + k) % n];
                    if tried.contains(&i) {
                        continue;
                    }
                    let load = self.entries[i].gauge.get() as u64;
                    let weight = u64::from(self.entries[i].backend.weight);
                    // load / weight < best_load / best_weight, without division.
                    let better = match best {
                        None => true,
                        Some((_, bl, bw)) => {
                            u128::from(load) * u128::from(bw) < u128::from(bl) * u128::from(weight)
                        }
                    };
                    if better {
                        best = Some((i, load, weight));
                    }
                }
                best.map(|(i, _, _)| i)
            }
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// nginx's smooth weighted round-robin, unrolled: positions into `weights`
/// (all > 0) in the order the algorithm picks them over one full cycle.
fn smooth_sequence(weights: &[u64]) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let mut total: u64 = w.iter().sum();
    if total > MAX_SEQUENCE {
        for x in &mut w {
            *x = (*x * MAX_SEQUENCE / total).max(1);
        }
        total = w.iter().sum();
    }
    let total_i = i64::try_from(total).unwrap_or(i64::MAX);
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += i64::try_from(w[i]).unwrap_or(i64::MAX);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total_i;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_sequence_matches_nginx() {
        // nginx's documented example: weights 5, 1, 1 → a a b a c a a.
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[1, 3]), vec![1, 0, 1, 1]);
    }

    #[test]
    fn each_backend_appears_as_often_as_its_reduced_weight() {
        for weights in [
            vec![1u64],
            vec![3, 1],
            vec![9990, 10],
            vec![3333, 3333, 3334],
            vec![7, 11, 13, 17],
            vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ] {
            let seq = smooth_sequence(&weights);
            let g = weights.iter().copied().fold(0, gcd);
            for (i, w) in weights.iter().enumerate() {
                let n = seq.iter().filter(|&&k| k == i).count() as u64;
                assert_eq!(n, w / g, "{weights:?}");
            }
            // Smooth: a backend's picks are spread, never bunched beyond
            // its share (at most ceil(w/total * window) in any window).
            let total = seq.len() as u64;
            for (i, w) in weights.iter().enumerate() {
                let w = w / g;
                let max_run = seq
                    .chunk_by(|a, b| a == b)
                    .filter(|run| run[0] == i)
                    .map(|run| run.len() as u64)
                    .max()
                    .unwrap_or(0);
                assert!(max_run <= w.div_ceil(total - w + 1), "{weights:?}: {seq:?}");
            }
        }
    }

    #[test]
    fn weights_reduce_by_gcd_and_scale() {
        assert_eq!(smooth_sequence(&[2500, 7500]).len(), 4);
        let seq = smooth_sequence(&[u64::from(u32::MAX), 1]);
        assert!(seq.len() as u64 <= MAX_SEQUENCE + 1);
        assert!(seq.contains(&1));
        assert!(smooth_sequence(&[]).is_empty());
    }

    fn set(weights: &[u32]) -> BackendSet {
        let entries = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Entry::new(
                    Backend::new(format!("b{i}"), "127.0.0.1:1".parse().unwrap(), w),
                    Arc::new(ClientCell::new(1)),
                    Arc::default(),
                    Arc::default(),
                )
            })
            .collect();
        BackendSet::new(entries, 0)
    }

    #[test]
    fn pick_skips_zero_weight_and_tried() {
        let s = set(&[0, 1, 1]);
        for _ in 0..10 {
            assert_ne!(s.pick(LoadBalance::RoundRobin, &[]), Some(0));
            assert_eq!(s.pick(LoadBalance::RoundRobin, &[1]), Some(2));
            assert_eq!(s.pick(LoadBalance::LeastRequests, &[2]), Some(1));
        }
        assert_eq!(s.pick(LoadBalance::RoundRobin, &[1, 2]), None);
        assert!(set(&[0, 0]).is_empty());
        assert_eq!(set(&[]).pick(LoadBalance::LeastRequests, &[]), None);
    }

    #[test]
    fn least_requests_prefers_idle() {
        let s = set(&[1, 1]);
        let _busy = crate::stats::InFlightGuard::new(s.entries[0].gauge.clone());
        for _ in 0..5 {
            assert_eq!(s.pick(LoadBalance::LeastRequests, &[]), Some(1));
        }
    }
}
