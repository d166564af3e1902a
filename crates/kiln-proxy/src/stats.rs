//! Counters: lock-free atomics updated on the request path, read by
//! [`crate::Proxy::stats`] and [`crate::Proxy::metrics_text`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Upper bounds (seconds) of the request duration histogram.
pub(crate) const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Response classes: 2xx (and 1xx), 3xx, 4xx, 5xx, and `conn` for TCP
/// connections, which have no status.
pub(crate) const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "conn"];
pub(crate) const CLASS_4XX: usize = 2;
pub(crate) const CLASS_5XX: usize = 3;
pub(crate) const CLASS_CONN: usize = 4;

pub(crate) fn class_of(status: u16) -> usize {
    match status {
        0..=299 => 0,
        300..=399 => 1,
        400..=499 => CLASS_4XX,
        _ => CLASS_5XX,
    }
}

/// Counters of one backend on one route.
#[derive(Debug, Default)]
pub(crate) struct BackendCounters {
    pub(crate) classes: [AtomicU64; 5],
    pub(crate) connect_errors: AtomicU64,
    pub(crate) duration: Histogram,
}

impl BackendCounters {
    pub(crate) fn record(&self, class: usize) {
        self.classes[class].fetch_add(1, Ordering::Relaxed);
    }

    fn requests(&self) -> u64 {
        self.classes.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Counters of one route; answers the proxy gives itself (no backend,
/// maintenance, overload) are in `local`.
#[derive(Debug, Default)]
pub(crate) struct RouteCounters {
    pub(crate) classes: [AtomicU64; 5],
    pub(crate) local: [AtomicU64; 5],
    pub(crate) connect_errors: AtomicU64,
    /// Open client connections (a gauge).
    pub(crate) connections: AtomicUsize,
}

impl RouteCounters {
    pub(crate) fn record(&self, class: usize) {
        self.classes[class].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_local(&self, class: usize) {
        self.record(class);
        self.local[class].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Non-cumulative counts per bucket; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Work in flight on one backend id, across routes; [`crate::Proxy::drain`]
/// waits on `zero`.
#[derive(Debug, Default)]
pub(crate) struct Gauge {
    count: AtomicUsize,
    pub(crate) zero: Notify,
    /// Notified when a drain of this backend times out: upgraded
    /// connections (tunnels) to it close.
    pub(crate) cut: Notify,
}

impl Gauge {
    pub(crate) fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Holds one unit of [`Gauge`]; dropping it wakes drainers when the count
/// reaches zero.
#[derive(Debug)]
pub(crate) struct InFlightGuard(Arc<Gauge>);

impl InFlightGuard {
    pub(crate) fn new(gauge: Arc<Gauge>) -> InFlightGuard {
        gauge.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(gauge)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// A snapshot of one route's counters, for canary analysis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// HTTP requests answered (by a backend or by the proxy itself), or TCP
    /// connections proxied.
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    /// Includes the proxy's own 502/503/504.
    pub status_5xx: u64,
    /// Failed connection attempts to backends (each retried attempt counts).
    pub connect_errors: u64,
    /// Backends of the current set, plus removed ones until a later
    /// `set_backends` finds them drained.
    pub per_backend: BTreeMap<String, BackendStats>,
}

/// One backend's counters on one route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Requests (or TCP connections) this backend answered or failed after
    /// the connection was made.
    pub requests: u64,
    /// 5xx from the backend, plus the 502/504 the proxy answered because of it.
    pub status_5xx: u64,
    pub connect_errors: u64,
}

pub(crate) fn route_stats(
    route: &RouteCounters,
    backends: &std::collections::HashMap<String, Arc<BackendCounters>>,
) -> RouteStats {
    let c = |i: usize| route.classes[i].load(Ordering::Relaxed);
    RouteStats {
        requests: (0..CLASSES.len()).map(c).sum(),
        status_2xx: c(0),
        status_3xx: c(1),
        status_4xx: c(2),
        status_5xx: c(CLASS_5XX),
        connect_errors: route.connect_errors.load(Ordering::Relaxed),
        per_backend: backends
            .iter()
            .map(|(id, b)| {
                let stats = BackendStats {
                    requests: b.requests(),
                    status_5xx: b.classes[CLASS_5XX].load(Ordering::Relaxed),
                    connect_errors: b.connect_errors.load(Ordering::Relaxed),
                };
                (id.clone(), stats)
            })
            .collect(),
    }
}

/// The Prometheus text exposition, built family by family.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    requests: String,
    duration: String,
    connect_errors: String,
    in_flight: String,
    connections: String,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    pub(crate) fn route(
        &mut self,
        name: &str,
        route: &RouteCounters,
        backends: &BTreeMap<&String, &Arc<BackendCounters>>,
    ) {
        let r = escape(name);
        for (i, class) in CLASSES.iter().enumerate() {
            let n = route.local[i].load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    self.requests,
                    "kiln_proxy_requests_total{{route=\"{r}\",backend=\"\",class=\"{class}\"}} {n}"
                );
            }
        }
        for (id, b) in backends {
            let id = escape(id);
            for (i, class) in CLASSES.iter().enumerate() {
                let n = b.classes[i].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        self.requests,
                        "kiln_proxy_requests_total{{route=\"{r}\",backend=\"{id}\",class=\"{class}\"}} {n}"
                    );
                }
            }
            let _ = writeln!(
                self.connect_errors,
                "kiln_proxy_connect_errors_total{{route=\"{r}\",backend=\"{id}\"}} {}",
                b.connect_errors.load(Ordering::Relaxed)
            );
            let h = &b.duration;
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    self.duration,
                    "kiln_proxy_request_duration_seconds_bucket{{route=\"{r}\",backend=\"{id}\",le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative += h.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                self.duration,
                "kiln_proxy_request_duration_seconds_bucket{{route=\"{r}\",backend=\"{id}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                self.duration,
                "kiln_proxy_request_duration_seconds_sum{{route=\"{r}\",backend=\"{id}\"}} {sum}"
            );
            let _ = writeln!(
                self.duration,
                "kiln_proxy_request_duration_seconds_count{{route=\"{r}\",backend=\"{id}\"}} {}",
                h.count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            self.connections,
            "kiln_proxy_connections{{route=\"{r}\"}} {}",
            route.connections.load(Ordering::Relaxed)
        );
    }

    pub(crate) fn in_flight(&mut self, backend: &str, gauge: &Gauge) {
        let _ = writeln!(
            self.in_flight,
            "kiln_proxy_in_flight{{backend=\"{}\"}} {}",
            escape(backend),
            gauge.get()
        );
    }

    pub(crate) fn finish(self) -> String {
        let mut out = String::new();
        let families = [
            (
                "kiln_proxy_requests_total",
                "counter",
                "Requests answered (TCP: connections proxied, class conn); backend is empty for the proxy's own answers.",
                self.requests,
            ),
            (
                "kiln_proxy_request_duration_seconds",
                "histogram",
                "Time from picking a backend until the response body was sent.",
                self.duration,
            ),
            (
                "kiln_proxy_connect_errors_total",
                "counter",
                "Failed connection attempts to a backend.",
                self.connect_errors,
            ),
            (
                "kiln_proxy_in_flight",
                "gauge",
                "Requests in flight plus open TCP connections per backend, across routes.",
                self.in_flight,
            ),
            (
                "kiln_proxy_connections",
                "gauge",
                "Open client connections per route.",
                self.connections,
            ),
        ];
        for (name, kind, help, body) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            out.push_str(&body);
        }
        out
    }
}
