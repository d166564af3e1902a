//! Health checks: what a check is ([`Probe`]), one check with a timeout
//! ([`probe_once`]), the pure state machine that turns check results into
//! an instance's health ([`HealthTracker`]), and the task that checks one
//! instance for its whole life ([`spawn_monitor`]).
//!
//! Design: the tracker has no clock and does no I/O (the time of each
//! result is passed in), so its thresholds and start period are tested as
//! plain data; the monitor is a thin loop around it that reports only
//! transitions, on a channel, to whoever records them (the engine).
//!
//! The HTTP check is a hand-written `GET` over a TCP connection (HTTP/1.1,
//! `Connection: close`), read up to the status line: it needs no client
//! pool, never follows redirects (a 3xx counts as healthy, as in Docker and
//! Kubernetes), and the whole exchange sits under one timeout.
//!
//! Limits: an `exec` check runs through the driver's `exec` on a blocking
//! thread; the driver kills the command at the timeout, and the monitor
//! gives up waiting a little after it in case the driver itself hangs (the
//! blocking thread then finishes on its own).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_runtime::{AnyDriver, Driver as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

/// What one check does, with the instance's addresses already resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` on `addr`: healthy on a 2xx or 3xx status.
    Http { addr: SocketAddr, path: String },
    /// Healthy when a TCP connection to `addr` succeeds.
    Tcp { addr: SocketAddr },
    /// `argv` run inside the instance: healthy on exit code 0.
    Exec { argv: Vec<String> },
}

/// How often to check and how many results make a verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before the instance is healthy.
    pub healthy: u32,
    /// Consecutive failures before it is unhealthy.
    pub unhealthy: u32,
    /// Failures this soon after the start do not count (until a first
    /// success: see [`HealthTracker`]).
    pub start_period: Duration,
}

impl HealthPolicy {
    pub fn from_spec(h: &kiln_spec::model::Health) -> HealthPolicy {
        HealthPolicy {
            interval: h.interval.as_std(),
            timeout: h.timeout.as_std(),
            healthy: h.healthy,
            unhealthy: h.unhealthy,
            start_period: h.start_period.as_std(),
        }
    }
}

/// An instance's health as its checks say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not yet healthy since it started.
    Starting,
    Healthy,
    Unhealthy,
}

/// A change of [`Health`], with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    /// E.g. `2 consecutive checks passed` or `3 consecutive checks failed;
    /// last: GET http://127.0.0.1:8080/health: status 500`.
    pub reason: String,
}

/// The health state machine, pure: no clock inside (`now` is passed to
/// [`HealthTracker::record`]).
///
/// * Starting → Healthy after `healthy` consecutive successes.
/// * Starting or Healthy → Unhealthy after `unhealthy` consecutive failures.
/// * Unhealthy → Healthy after `healthy` consecutive successes.
/// * While Starting and within `start_period` of `started`, failures are
///   ignored (not counted, though remembered as the last error). As in
///   Docker, the start period ends early once the instance is healthy.
///
/// Thresholds of 0 count as 1.
#[derive(Clone, Debug)]
pub struct HealthTracker {
    policy: HealthPolicy,
    started: Instant,
    health: Health,
    successes: u32,
    failures: u32,
    last_error: Option<String>,
}

impl HealthTracker {
    pub fn new(policy: HealthPolicy, started: Instant) -> Self {
        HealthTracker {
            policy,
            started,
            health: Health::Starting,
            successes: 0,
            failures: 0,
            last_error: None,
        }
    }

    /// Counts one check's result (at `now`); returns the transition it
    /// causes, if any.
    pub fn record(&mut self, now: Instant, result: Result<(), String>) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                let needed = self.policy.healthy.max(1);
                (self.health != Health::Healthy && self.successes >= needed).then(|| {
                    self.change(
                        Health::Healthy,
                        format!("{} consecutive checks passed", self.successes),
                    )
                })
            }
            Err(error) => {
                self.successes = 0;
                let in_start_period =
                    now.saturating_duration_since(self.started) < self.policy.start_period;
                let ignored = self.health == Health::Starting && in_start_period;
                if !ignored {
                    self.failures = self.failures.saturating_add(1);
                }
                let needed = self.policy.unhealthy.max(1);
                let reason = format!("{} consecutive checks failed; last: {error}", self.failures);
                self.last_error = Some(error);
                (!ignored && self.health != Health::Unhealthy && self.failures >= needed)
                    .then(|| self.change(Health::Unhealthy, reason))
            }
        }
    }

    fn change(&mut self, to: Health, reason: String) -> Transition {
        let from = std::mem::replace(&mut self.health, to);
        Transition { from, to, reason }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Why the last failed check failed (kept after later successes).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// The most of a response read while looking for its status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// How much longer than the check's timeout an `exec` check waits for the
/// driver, which kills the command at the timeout itself.
const EXEC_GRACE: Duration = Duration::from_secs(5);

/// One check, done within `timeout`; `Err` says why it failed. `driver`
/// and `id` are used by [`Probe::Exec`] only.
///
/// * Http: `GET path` on `addr` with HTTP/1.1 and `Connection: close`;
///   success is a status in 200..=399.
/// * Tcp: the connection succeeds.
/// * Exec: `driver.exec(id, argv, timeout)` on a blocking thread; success
///   is exit code 0, and the error names the code (or signal) and the first
///   line of stderr.
pub async fn probe_once(
    probe: &Probe,
    timeout: Duration,
    driver: &Arc<AnyDriver>,
    id: &str,
) -> Result<(), String> {
    match probe {
        Probe::Http { addr, path } => {
            let what = format!("GET http://{addr}{path}");
            match tokio::time::timeout(timeout, http_status(*addr, path)).await {
                Err(_) => Err(format!("{what}: no answer within {timeout:?}")),
                Ok(Err(e)) => Err(format!("{what}: {e}")),
                Ok(Ok(status)) if (200..=399).contains(&status) => Ok(()),
                Ok(Ok(status)) => Err(format!("{what}: status {status}")),
            }
        }
        Probe::Tcp { addr } => {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Err(_) => Err(format!("connect to {addr}: no answer within {timeout:?}")),
                Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
                Ok(Ok(_)) => Ok(()),
            }
        }
        Probe::Exec { argv } => {
            let what = format!("exec `{}`", argv.join(" "));
            let (driver, id, args) = (Arc::clone(driver), id.to_string(), argv.clone());
            let run = tokio::task::spawn_blocking(move || driver.exec(&id, &args, timeout));
            let out = match tokio::time::timeout(timeout + EXEC_GRACE, run).await {
                Err(_) => return Err(format!("{what}: no answer within {timeout:?}")),
                Ok(Err(join)) => return Err(format!("{what}: {join}")),
                Ok(Ok(Err(e))) => {
                    let e = e.to_string();
                    return Err(format!("{what}: {}", e.lines().next().unwrap_or_default()));
                }
                Ok(Ok(Ok(out))) => out,
            };
            if out.success() {
                return Ok(());
            }
            let how = match (out.code, out.signal) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "ended without a status".to_string(),
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            match stderr.lines().map(str::trim).find(|l| !l.is_empty()) {
                Some(line) => Err(format!("{what}: {how}: {line}")),
                None => Err(format!("{what}: {how}")),
            }
        }
    }
}

/// Sends a `GET` and reads the status code of the response.
async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("invalid request path {path:?}"));
    }
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kiln-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send the request: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let line_end = loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if head.len() > MAX_STATUS_LINE {
            return Err("the status line is too long".into());
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read the response: {e}"))?;
        if n == 0 {
            return Err("the connection closed before a response".into());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(status))) if v.starts_with("HTTP/1.") => Ok(status),
        _ => Err(format!("not an HTTP response: {line:?}")),
    }
}

/// The fastest a starting instance is checked, so that a new instance is
/// found healthy quickly whatever its interval.
const STARTING_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest pause between checks (an interval of 0 would spin).
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Checks one instance for its whole life: the first check at once, then
/// every `min(interval, 100 ms)` while Starting and every `interval` once
/// Healthy or Unhealthy. Sends every [`Transition`] on `events` as
/// `(id, transition)`. Stops when `events` is closed or the handle is
/// aborted.
pub fn spawn_monitor(
    id: String,
    probe: Probe,
    policy: HealthPolicy,
    driver: Arc<AnyDriver>,
    events: UnboundedSender<(String, Transition)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tracker = HealthTracker::new(policy.clone(), Instant::now());
        loop {
            let result = tokio::select! {
                r = probe_once(&probe, policy.timeout, &driver, &id) => r,
                () = events.closed() => return,
            };
            if let Some(t) = tracker.record(Instant::now(), result)
                && events.send((id.clone(), t)).is_err()
            {
                return;
            }
            let pause = match tracker.health() {
                Health::Starting => policy.interval.min(STARTING_INTERVAL),
                Health::Healthy | Health::Unhealthy => policy.interval,
            };
            tokio::select! {
                () = tokio::time::sleep(pause.max(MIN_INTERVAL)) => {}
                () = events.closed() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {

    use kiln_runtime::{ExecScript, Fake, InstanceConfig};
    use tokio::net::TcpListener;

    use super::*;

    /// Generous: the machine is shared; nothing asserts timing.
    const DEADLINE: Duration = Duration::from_secs(60);

    fn policy(healthy: u32, unhealthy: u32, start_period: Duration) -> HealthPolicy {
        HealthPolicy {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy,
            unhealthy,
            start_period,
        }
    }

    fn fail(why: &str) -> Result<(), String> {
        Err(why.to_string())
    }

    #[test]
    fn policy_from_spec() {
        let h = kiln_spec::model::Health {
            check: kiln_spec::model::HealthCheck::Tcp {
                port: "http".into(),
            },
            interval: kiln_spec::model::Duration::from_secs(5),
            timeout: kiln_spec::model::Duration::from_millis(2500),
            healthy: 2,
            unhealthy: 3,
            start_period: kiln_spec::model::Duration::from_secs(10),
        };
        assert_eq!(
            HealthPolicy::from_spec(&h),
            HealthPolicy {
                interval: Duration::from_secs(5),
                timeout: Duration::from_millis(2500),
                healthy: 2,
                unhealthy: 3,
                start_period: Duration::from_secs(10),
            }
        );
    }

    #[test]
    fn healthy_after_consecutive_successes() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(policy(2, 3, Duration::ZERO), t0);
        assert_eq!(t.health(), Health::Starting);
        assert_eq!(t.record(t0, Ok(())), None);
        // A failure resets the count of successes.
        assert_eq!(t.record(t0, fail("refused")), None);
        assert_eq!(t.record(t0, Ok(())), None);
        let tr = t.record(t0, Ok(())).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Starting, Health::Healthy));
        assert_eq!(tr.reason, "2 consecutive checks passed");
        assert_eq!(t.health(), Health::Healthy);
        assert_eq!(
            t.record(t0, Ok(())),
            None,
            "no transition to the same state"
        );
        assert_eq!(t.last_error(), Some("refused"));
    }

    #[test]
    fn unhealthy_after_consecutive_failures_and_recovery() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(policy(1, 3, Duration::ZERO), t0);
        assert_eq!(t.record(t0, Ok(())).unwrap().to, Health::Healthy);
        assert_eq!(t.record(t0, fail("a")), None);
        assert_eq!(t.record(t0, fail("b")), None);
        // A success resets the count of failures.
        assert_eq!(t.record(t0, Ok(())), None);
        assert_eq!(t.record(t0, fail("c")), None);
        assert_eq!(t.record(t0, fail("d")), None);
        let tr = t.record(t0, fail("status 500")).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Healthy, Health::Unhealthy));
        assert_eq!(tr.reason, "3 consecutive checks failed; last: status 500");
        assert_eq!(t.last_error(), Some("status 500"));
        assert_eq!(t.record(t0, fail("e")), None, "already unhealthy");

        let mut t = HealthTracker::new(policy(2, 1, Duration::ZERO), t0);
        let tr = t.record(t0, fail("refused")).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Starting, Health::Unhealthy));
        assert_eq!(t.record(t0, Ok(())), None);
        let tr = t.record(t0, Ok(())).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Unhealthy, Health::Healthy));
        assert_eq!(t.last_error(), Some("refused"));
    }

    #[test]
    fn failures_in_the_start_period_are_ignored() {
        let t0 = Instant::now();
        let period = Duration::from_secs(30);
        let mut t = HealthTracker::new(policy(1, 2, period), t0);
        for s in 0..10 {
            let now = t0 + Duration::from_secs(s);
            assert_eq!(t.record(now, fail("refused")), None);
        }
        assert_eq!(t.health(), Health::Starting);
        assert_eq!(t.last_error(), Some("refused"));
        // After the period they count.
        let after = t0 + period;
        assert_eq!(t.record(after, fail("x")), None);
        let tr = t.record(after, fail("y")).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Starting, Health::Unhealthy));
        assert_eq!(tr.reason, "2 consecutive checks failed; last: y");

        // Once healthy, the start period no longer shields failures.
        let mut t = HealthTracker::new(policy(1, 2, period), t0);
        assert_eq!(t.record(t0, Ok(())).unwrap().to, Health::Healthy);
        assert_eq!(t.record(t0, fail("a")), None);
        assert_eq!(t.record(t0, fail("b")).unwrap().to, Health::Unhealthy);
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(policy(0, 0, Duration::ZERO), t0);
        assert_eq!(t.record(t0, Ok(())).unwrap().to, Health::Healthy);
        assert_eq!(t.record(t0, fail("x")).unwrap().to, Health::Unhealthy);
    }

    /// A listener answering every request with `status`; its address.
    async fn http_server(status: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&req);
                    assert!(head.starts_with("GET /health HTTP/1.1\r\n"), "{head}");
                    assert!(head.contains("Connection: close\r\n"), "{head}");
                    let body = "ok";
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nLocation: /elsewhere\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn fake_driver() -> (Arc<Fake>, Arc<AnyDriver>) {
        let fake = Arc::new(Fake::new());
        (Arc::clone(&fake), Arc::new(AnyDriver::Fake(fake)))
    }

    fn http(addr: SocketAddr) -> Probe {
        Probe::Http {
            addr,
            path: "/health".into(),
        }
    }

    #[tokio::test]
    async fn http_probe_statuses() {
        let (_, driver) = fake_driver();
        let t = Duration::from_secs(30);
        let ok = http_server("200 OK").await;
        assert_eq!(probe_once(&http(ok), t, &driver, "i").await, Ok(()));
        let redirect = http_server("302 Found").await;
        assert_eq!(probe_once(&http(redirect), t, &driver, "i").await, Ok(()));
        let broken = http_server("500 Internal Server Error").await;
        let err = probe_once(&http(broken), t, &driver, "i")
            .await
            .unwrap_err();
        assert!(err.contains("status 500"), "{err}");
        assert!(err.contains(&format!("http://{broken}/health")), "{err}");
        let bad_path = Probe::Http {
            addr: ok,
            path: "/x\r\nEvil: 1".into(),
        };
        let err = probe_once(&bad_path, t, &driver, "i").await.unwrap_err();
        assert!(err.contains("invalid request path"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let (_, driver) = fake_driver();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and reads, never answers.
        tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let timeout = Duration::from_millis(300);
        let check = http(addr);
        let probe = probe_once(&check, timeout, &driver, "i");
        let err = tokio::time::timeout(DEADLINE, probe)
            .await
            .expect("the probe must give up at its timeout")
            .unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
    }

    /// An address nothing listens on (bound, then closed).
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn closed_port_fails_naming_the_address() {
        let (_, driver) = fake_driver();
        let t = Duration::from_secs(30);
        let addr = closed_port().await;
        let err = probe_once(&http(addr), t, &driver, "i").await.unwrap_err();
        assert!(err.contains(&addr.to_string()), "{err}");
        let err = probe_once(&Probe::Tcp { addr }, t, &driver, "i")
            .await
            .unwrap_err();
        assert!(err.contains(&format!("connect to {addr}")), "{err}");
    }

    #[tokio::test]
    async fn tcp_probe_connects() {
        let (_, driver) = fake_driver();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probe = Probe::Tcp { addr };
        assert_eq!(
            probe_once(&probe, Duration::from_secs(30), &driver, "i").await,
            Ok(())
        );
    }

    fn config(id: &str) -> InstanceConfig {
        InstanceConfig::placeholder(id)
    }

    #[tokio::test]
    async fn exec_probe_through_the_driver() {
        let (fake, driver) = fake_driver();
        let t = Duration::from_secs(30);
        let probe = Probe::Exec {
            argv: vec!["check".into(), "--ready".into()],
        };
        fake.create(&config("web-0")).unwrap();
        // Not running: the driver refuses, and the error says so.
        let err = probe_once(&probe, t, &driver, "web-0").await.unwrap_err();
        assert!(
            err.contains("exec `check --ready`") && err.contains("web-0"),
            "{err}"
        );
        fake.start("web-0").unwrap();
        assert_eq!(probe_once(&probe, t, &driver, "web-0").await, Ok(()));
        fake.script_exec(
            "web-0",
            ExecScript::exit(3, "", "\nnot ready: db down\nmore\n"),
        );
        let err = probe_once(&probe, t, &driver, "web-0").await.unwrap_err();
        assert_eq!(err, "exec `check --ready`: exit code 3: not ready: db down");
        fake.script_exec("web-0", ExecScript::TimedOut);
        let err = probe_once(&probe, t, &driver, "web-0").await.unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
        assert!(fake.calls().iter().any(|c| c == "exec web-0"));
    }

    #[tokio::test]
    async fn monitor_reports_starting_to_healthy() {
        let (_, driver) = fake_driver();
        let addr = http_server("200 OK").await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let policy = HealthPolicy {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(30),
            healthy: 2,
            unhealthy: 3,
            start_period: Duration::ZERO,
        };
        let handle = spawn_monitor("web-0".into(), http(addr), policy, driver, tx);
        let (id, t) = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a transition")
            .expect("the monitor runs");
        assert_eq!(id, "web-0");
        assert_eq!((t.from, t.to), (Health::Starting, Health::Healthy));
        assert_eq!(t.reason, "2 consecutive checks passed");
        // Stops when the receiver goes away.
        drop(rx);
        tokio::time::timeout(DEADLINE, handle)
            .await
            .expect("the monitor stops once events is closed")
            .unwrap();
    }

    #[tokio::test]
    async fn monitor_reports_unhealthy_with_the_reason() {
        let (_, driver) = fake_driver();
        let addr = closed_port().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let policy = HealthPolicy {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(30),
            healthy: 1,
            unhealthy: 2,
            start_period: Duration::ZERO,
        };
        let handle = spawn_monitor("web-1".into(), Probe::Tcp { addr }, policy, driver, tx);
        let (_, t) = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a transition")
            .expect("the monitor runs");
        assert_eq!((t.from, t.to), (Health::Starting, Health::Unhealthy));
        assert!(
            t.reason.contains(&format!("connect to {addr}")),
            "{}",
            t.reason
        );
        handle.abort();
    }
}
