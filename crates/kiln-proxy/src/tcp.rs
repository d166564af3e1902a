//! TCP routes: each client connection is piped to one backend connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;

use crate::balance::CONNECT_TIMEOUT;
use crate::route::{ConnGuard, RouteShared};
use crate::stats::{CLASS_CONN, InFlightGuard};

/// Connects the client to a backend (trying each backend of the set at most
/// once) and copies both ways until both directions are closed. Over the
/// connection limit, in maintenance or without backends, the client
/// connection is closed.
pub(crate) async fn serve(route: Arc<RouteShared>, mut client: TcpStream, conn: ConnGuard) {
    let config = route.config.load_full();
    if conn.over_limit || config.maintenance {
        return;
    }
    let set = route.backends.load_full();
    let connect_timeout = CONNECT_TIMEOUT.min(config.request_timeout);
    let mut tried = Vec::new();
    while let Some(i) = set.pick(config.load_balance, &tried) {
        tried.push(i);
        let entry = &set.entries[i];
        let in_flight = InFlightGuard::new(entry.gauge.clone());
        let connected =
            tokio::time::timeout(connect_timeout, TcpStream::connect(entry.backend.addr)).await;
        let mut upstream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) | Err(_) => {
                entry
                    .counters
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                route
                    .counters
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        entry.counters.record(CLASS_CONN);
        route.counters.record(CLASS_CONN);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let started = std::time::Instant::now();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        entry.counters.duration.observe(started.elapsed());
        drop(in_flight);
        return;
    }
    drop(conn);
}
