//! The engine: one per state directory, inside the daemon.
//!
//! It owns the state store, the driver, the proxy and a task per instance
//! (an exit watcher on a pidfd, a health monitor). Changes to what runs go
//! through one async lock ([`Engine::rollout`]): an apply, a rollback or a
//! heal of the reconciler runs at a time, and a `rollout` lease in the store
//! names who holds it. See `rollout.rs` for applying generations and
//! `reconcile.rs` for healing and drift.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_plan::{Generation, InstanceSpec, InstanceStatus, Observed, ObservedInstance};
use kiln_proxy::Proxy;
use kiln_runtime::{AnyDriver, Driver, Fake, InstanceState};
use kiln_spec::model::{self, Route};
use kiln_state::{InstanceRecord, InstanceUpsert, NewEvent, Store};
use serde_json::json;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{EventView, InstanceStatusView, Reply, RouteStatus, ServiceStatus, Status};
use crate::health::{self, Health, HealthPolicy, Probe, Transition};
use crate::instance::Materials;
use crate::project::{EngineError, decode_generation, parse_status, status_text};

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub project_name: String,
    /// Where relative paths of the spec (files, file secrets) are found.
    pub project_dir: PathBuf,
    pub state_dir: PathBuf,
    pub image_store_dir: PathBuf,
    pub driver: model::Driver,
    /// Tests: run instances on this fake driver instead.
    pub fake: Option<Arc<Fake>>,
    /// How often every instance is checked for drift.
    pub drift_interval: Duration,
    /// Wait (up to 30 s) for the daemon lease instead of refusing: a new
    /// daemon taking over from one that is handing over.
    pub takeover: bool,
}

/// Where a reply of a running action goes (dropped replies are fine: the
/// client may have gone away; events keep the record).
pub type Progress = mpsc::UnboundedSender<Reply>;

pub(crate) fn say(progress: &Progress, message: impl Into<String>) {
    let _ = progress.send(Reply::Progress {
        message: message.into(),
    });
}

/// What the engine keeps in memory about one instance it runs.
#[derive(Debug)]
pub(crate) struct Live {
    pub ports: BTreeMap<String, u16>,
    /// The health check its monitor runs.
    pub health: Option<model::Health>,
    pub started: Instant,
    pub tasks: Vec<JoinHandle<()>>,
    /// Set before kiln stops it, so its exit is not a crash.
    pub stopping: bool,
}

#[derive(Debug)]
pub struct Engine {
    pub(crate) opts: EngineOptions,
    pub(crate) store: Store,
    pub(crate) driver: Arc<AnyDriver>,
    pub(crate) driver_warning: Option<String>,
    pub(crate) materials: Materials,
    pub(crate) proxy: Proxy,
    /// The routes the proxy serves, as declared.
    pub(crate) routes: Mutex<BTreeMap<String, Route>>,
    /// The content digests of the error pages each route serves (routes
    /// without pages absent), for the planner.
    pub(crate) route_pages: Mutex<BTreeMap<String, BTreeMap<u16, kiln_plan::Digest>>>,
    pub(crate) live: Mutex<HashMap<String, Live>>,
    /// Bumped whenever an instance's status changes.
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) events: broadcast::Sender<EventView>,
    /// Wakes the reconciler.
    pub(crate) wake: Notify,
    /// Held by whatever changes what runs.
    pub(crate) rollout: tokio::sync::Mutex<()>,
    pub(crate) health_tx: mpsc::UnboundedSender<(String, Transition)>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// This daemon's lease token.
    pub(crate) token: String,
    pub(crate) reconcile: Mutex<crate::reconcile::ReconcileState>,
    /// Listening sockets handed over by the previous daemon, by route.
    inherited: Mutex<BTreeMap<String, std::net::TcpListener>>,
    /// Until the interrupted rollout (if any) was picked up after a
    /// restart: the reconciler leaves `rolling-out` generations alone.
    pub(crate) resume_pending: std::sync::atomic::AtomicBool,
    /// Backup instances running now (never recorded: not orphans while
    /// they run, removed as orphans after a crash).
    pub(crate) backups: Mutex<std::collections::BTreeSet<String>>,
}

/// How long leases last without renewal.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(15);

impl Engine {
    /// Opens the state, picks the driver, adopts what runs and starts the
    /// background tasks. Must run inside a multi-threaded tokio runtime.
    pub async fn start(opts: EngineOptions) -> Result<Arc<Engine>, EngineError> {
        Engine::start_with(opts, BTreeMap::new()).await
    }

    /// [`Engine::start`] serving routes on sockets handed over by the
    /// previous daemon (see `handover.rs`).
    pub async fn start_with(
        opts: EngineOptions,
        inherited: BTreeMap<String, std::net::TcpListener>,
    ) -> Result<Arc<Engine>, EngineError> {
        let store = Store::open(&opts.state_dir)?;
        let pid = std::process::id();
        let token = format!("{pid}-{}", nanos());
        let owner = format!("kiln daemon (pid {pid} on {})", kiln_state::host_name());
        let patience = tokio::time::Instant::now()
            + if opts.takeover {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            };
        while let Err(held) = store.acquire_lease("daemon", &owner, &token, LEASE_TTL)? {
            if tokio::time::Instant::now() >= patience {
                return Err(EngineError::Busy(format!(
                    "another kiln daemon serves {}: {held}\n  hint: use that daemon (`kiln status`), stop it first, or upgrade it with `kiln daemon --takeover`",
                    opts.state_dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (driver, driver_warning) = tokio::task::block_in_place(|| make_driver(&opts))?;
        let images = kiln_image::Store::open(&opts.image_store_dir)?;
        let materials = Materials::new(&opts.state_dir, &opts.project_dir, images);
        let (health_tx, health_rx) = mpsc::unbounded_channel();
        let engine = Arc::new(Engine {
            store,
            driver: Arc::new(driver),
            driver_warning,
            materials,
            proxy: Proxy::new(),
            routes: Mutex::default(),
            route_pages: Mutex::default(),
            live: Mutex::default(),
            changed: watch::channel(0).0,
            events: broadcast::channel(1024).0,
            wake: Notify::new(),
            rollout: tokio::sync::Mutex::new(()),
            health_tx,
            shutdown: watch::channel(false).0,
            token,
            reconcile: Mutex::default(),
            inherited: Mutex::new(inherited),
            resume_pending: std::sync::atomic::AtomicBool::new(true),
            backups: Mutex::default(),
            opts,
        });
        if let Some(w) = &engine.driver_warning {
            engine.event("daemon.warning", "daemon", None, w.clone());
        }
        engine.event(
            "daemon.started",
            "daemon",
            None,
            format!(
                "kiln daemon started (pid {pid}, driver {})",
                engine.driver.name()
            ),
        );
        tokio::spawn(engine.clone().renew_daemon_lease());
        tokio::spawn(engine.clone().handle_health(health_rx));
        engine.adopt().await?;
        tokio::spawn(engine.clone().reconcile_loop());
        tokio::spawn(engine.clone().resume_interrupted());
        Ok(engine)
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolves when [`Engine::stop`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops background work; with `instances`, also stops and removes
    /// every instance (volumes stay) and the proxy's listeners.
    pub async fn stop(self: &Arc<Self>, instances: bool) {
        if instances {
            let _guard = self.rollout.lock().await;
            self.proxy.shutdown().await;
            let ids: Vec<String> = self
                .store
                .list_instances(None)
                .map(|r| r.into_iter().map(|r| r.id).collect())
                .unwrap_or_default();
            let active = self.active_generation();
            let stops = ids.into_iter().map(|id| {
                let this = self.clone();
                // Each service's own stop_grace.
                let grace = active.as_ref().map(|(_, g)| this.grace_of(&id, g));
                async move {
                    if let Err(e) = this.destroy(&id, grace).await {
                        this.event("instance.error", format!("instance/{id}"), None, e);
                    }
                }
            });
            crate::rollout::futures_join(stops).await;
            self.routes.lock().expect("routes").clear();
            self.event(
                "daemon.down",
                "daemon",
                None,
                "every instance stopped".to_owned(),
            );
        }
        let _ = self.store.release_lease("daemon", &self.token);
        self.shutdown.send_replace(true);
    }

    async fn renew_daemon_lease(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(LEASE_TTL / 3) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.store.renew_lease("daemon", &self.token, LEASE_TTL) {
                Ok(true) => {}
                Ok(false) => {
                    // Another daemon took over after our lease expired
                    // (this process was stopped too long): two writers
                    // must never run, so this one leaves.
                    eprintln!("kiln: the daemon lease was taken over; exiting");
                    std::process::exit(1);
                }
                Err(e) => eprintln!("kiln: cannot renew the daemon lease: {e}"),
            }
        }
    }

    // ---- events -------------------------------------------------------

    /// Records an event (and shows it to followers). A failure to record is
    /// reported on stderr and otherwise ignored: an event is never a reason
    /// to stop healing.
    pub(crate) fn event(
        &self,
        kind: &str,
        subject: impl Into<String>,
        generation: Option<u64>,
        message: String,
    ) {
        self.event_with(kind, subject, generation, message, serde_json::Value::Null);
    }

    /// [`Engine::event`] with structured data (`kiln events --json`).
    pub(crate) fn event_with(
        &self,
        kind: &str,
        subject: impl Into<String>,
        generation: Option<u64>,
        message: String,
        data: serde_json::Value,
    ) {
        let mut new = NewEvent::new(kind, subject, message).with_data(data);
        new.generation = generation;
        match self.store.append_event(&new) {
            Ok(seq) => {
                let _ = self.events.send(EventView {
                    seq,
                    at: String::new(),
                    kind: new.kind,
                    subject: new.subject,
                    generation,
                    message: new.message,
                });
            }
            Err(e) => eprintln!("kiln: cannot record event {kind}: {e}"),
        }
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<EventView> {
        self.events.subscribe()
    }

    // ---- instance records ---------------------------------------------

    pub(crate) fn record(&self, id: &str) -> Option<InstanceRecord> {
        self.store.get_instance(id).ok().flatten()
    }

    pub(crate) fn set_status(&self, id: &str, status: InstanceStatus) -> bool {
        let Some(rec) = self.record(id) else {
            return false;
        };
        let text = status_text(status);
        if rec.status == text {
            return false;
        }
        let upsert = InstanceUpsert {
            status: text,
            ..upsert_of(&rec)
        };
        if let Err(e) = self.store.upsert_instance(&upsert) {
            eprintln!("kiln: cannot record the status of {id}: {e}");
            return false;
        }
        self.changed.send_modify(|n| *n += 1);
        true
    }

    pub(crate) fn set_rotation(&self, id: &str, in_rotation: bool) -> Result<(), String> {
        let Some(rec) = self.record(id) else {
            return Ok(());
        };
        if rec.in_rotation == in_rotation {
            return Ok(());
        }
        self.store
            .upsert_instance(&InstanceUpsert {
                in_rotation,
                ..upsert_of(&rec)
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// What runs, as the planner sees it.
    pub(crate) fn observed(&self) -> Result<Observed, EngineError> {
        let mut observed = Observed {
            routes: self.routes.lock().expect("routes").clone(),
            route_pages: self.route_pages.lock().expect("routes").clone(),
            ..Observed::default()
        };
        for rec in self.store.list_instances(None)? {
            let spec: InstanceSpec = serde_json::from_value(rec.spec.clone()).map_err(|e| {
                EngineError::CorruptInstance {
                    id: rec.id.clone(),
                    store: self.store.path().to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
            let status = parse_status(&rec.status).unwrap_or(InstanceStatus::Exited { code: None });
            observed.instances.push(ObservedInstance {
                id: rec.id.clone(),
                identity: spec.identity(),
                spec,
                status,
                in_rotation: rec.in_rotation,
            });
        }
        Ok(observed)
    }

    /// The active generation, if one is and it can be read.
    pub fn active_generation(&self) -> Option<(u64, Generation)> {
        self.active().ok().flatten()
    }

    pub(crate) fn active(&self) -> Result<Option<(u64, Generation)>, EngineError> {
        match self.store.active_generation()? {
            Some(rec) => Ok(Some((rec.number, decode_generation(&self.store, &rec)?))),
            None => Ok(None),
        }
    }

    // ---- running instances --------------------------------------------

    /// Runs a blocking driver call off the async threads.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AnyDriver) -> T + Send + 'static,
    ) -> T {
        let driver = self.driver.clone();
        match tokio::task::spawn_blocking(move || f(&driver)).await {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down; nobody awaits this.
            Err(_) => std::future::pending().await,
        }
    }

    /// Creates and starts instance `id` of `service` from `generation`.
    /// The record is written first, so a crash at any point leaves the
    /// instance known (and adopted or removed after a restart).
    pub(crate) async fn create(
        self: &Arc<Self>,
        number: u64,
        generation: &Generation,
        service: &str,
        id: &str,
        identity: &kiln_plan::Digest,
    ) -> Result<BTreeMap<String, u16>, String> {
        let spec = generation.instance_spec(service);
        if &spec.identity() != identity {
            return Err(format!(
                "instance {id}: the plan's identity {identity} is not the generation's {}",
                spec.identity()
            ));
        }
        // An exclusive volume is open in at most one instance: its fence is
        // taken before the instance exists (see `fence.rs`).
        let volumes = crate::fence::exclusive_volumes(generation, service);
        if !volumes.is_empty() {
            let wait =
                Duration::from_millis(generation.spec.services[service].deploy.deadline.millis);
            self.take_fences(id, &volumes, wait, Some(number)).await?;
        }
        let mut ports = BTreeMap::new();
        for name in spec.ports.keys() {
            match self.materials.allocate_port() {
                Ok(port) => ports.insert(name.clone(), port),
                Err(e) => {
                    self.materials.release_ports(ports.values().copied());
                    self.release_fences(id);
                    return Err(e);
                }
            };
        }
        let upsert = InstanceUpsert {
            id: id.to_owned(),
            service: service.to_owned(),
            identity: identity.0.clone(),
            generation: number,
            spec: serde_json::to_value(&spec).expect("serialises"),
            status: status_text(InstanceStatus::Starting),
            in_rotation: false,
            data: json!({ "ports": ports, "driver": self.driver.name() }),
        };
        if let Err(e) = self.store.upsert_instance(&upsert) {
            self.materials.release_ports(ports.values().copied());
            self.release_fences(id);
            return Err(e.to_string());
        }
        let docker = matches!(*self.driver, AnyDriver::Docker(_));
        let this = self.clone();
        let (generation_c, service_c, id_c, ports_c) = (
            generation.clone(),
            service.to_owned(),
            id.to_owned(),
            ports.clone(),
        );
        let config = tokio::task::spawn_blocking(move || {
            this.materials
                .config(&generation_c, number, &service_c, &id_c, &ports_c, docker)
        })
        .await
        .expect("config does not panic");
        let started = match config {
            Ok(config) => {
                let id_c = id.to_owned();
                self.blocking(move |d| {
                    d.create(&config)?;
                    match d.start(&id_c) {
                        Ok(info) => Ok(info),
                        Err(e) => {
                            let _ = d.remove(&id_c);
                            Err(e)
                        }
                    }
                })
                .await
                .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        let info = match started {
            Ok(info) => info,
            Err(e) => {
                let _ = self.store.remove_instance(id);
                self.materials.release_ports(ports.values().copied());
                // The volume goes back only if the driver has nothing left.
                let id_c = id.to_owned();
                let gone = matches!(
                    self.blocking(move |d| d.inspect(&id_c)).await,
                    Err(kiln_runtime::RuntimeError::NotFound { .. })
                );
                if gone {
                    self.release_fences(id);
                }
                return Err(format!("cannot start {id}: {e}"));
            }
        };
        let pid = match info.state {
            InstanceState::Running { pid } => pid,
            InstanceState::Exited { code, signal, .. } => {
                // Dead on arrival: recorded as exited (the plan's next
                // await fails with the reason; a heal replaces it).
                self.set_status(id, InstanceStatus::Exited { code });
                let how = signal.map_or_else(
                    || format!("exited with code {}", code.unwrap_or(-1)),
                    |s| format!("was killed by signal {s}"),
                );
                self.event(
                    "instance.exited",
                    format!("instance/{id}"),
                    Some(number),
                    format!("{id} {how} as soon as it started"),
                );
                None
            }
            InstanceState::Created => None,
        };
        self.live.lock().expect("live").insert(
            id.to_owned(),
            Live {
                ports: ports.clone(),
                health: None,
                started: Instant::now(),
                tasks: Vec::new(),
                stopping: false,
            },
        );
        if matches!(info.state, InstanceState::Running { .. }) {
            self.watch(id, pid, generation.spec.services[service].health.as_ref());
        }
        self.event(
            "instance.created",
            format!("instance/{id}"),
            Some(number),
            format!("created {id} of service {service}{}", ports_text(&ports)),
        );
        Ok(ports)
    }

    /// Starts the exit watcher and, if the service declares one, the health
    /// monitor of a running instance; without a health check a running
    /// instance counts as healthy.
    pub(crate) fn watch(
        self: &Arc<Self>,
        id: &str,
        pid: Option<u32>,
        check: Option<&model::Health>,
    ) {
        let mut tasks = vec![tokio::spawn(self.clone().watch_exit(id.to_owned(), pid))];
        let ports = self
            .live
            .lock()
            .expect("live")
            .get(id)
            .map(|l| l.ports.clone())
            .unwrap_or_default();
        match check {
            Some(check) => match probe_for(check, &ports) {
                Ok(probe) => tasks.push(health::spawn_monitor(
                    id.to_owned(),
                    probe,
                    HealthPolicy::from_spec(check),
                    self.driver.clone(),
                    self.health_tx.clone(),
                )),
                Err(why) => {
                    self.event("instance.unhealthy", format!("instance/{id}"), None, why);
                    self.set_status(id, InstanceStatus::Unhealthy);
                }
            },
            None => {
                if self.set_status(id, InstanceStatus::Healthy) {
                    self.event(
                        "instance.healthy",
                        format!("instance/{id}"),
                        None,
                        format!("{id} is running (no health check declared)"),
                    );
                }
            }
        }
        if let Some(live) = self.live.lock().expect("live").get_mut(id) {
            live.tasks.extend(tasks);
            live.health = check.cloned();
        }
    }

    /// After a generation becomes active: instances whose service's health
    /// check changed (not part of the identity, so no replacement) get a
    /// monitor running the new one.
    pub(crate) fn refresh_monitors(self: &Arc<Self>, generation: &Generation) {
        let records = self.store.list_instances(None).unwrap_or_default();
        for rec in records {
            let wanted = generation
                .spec
                .services
                .get(&rec.service)
                .and_then(|s| s.health.clone());
            let stale = {
                let mut live = self.live.lock().expect("live");
                match live.get_mut(&rec.id) {
                    Some(l) if l.health != wanted && !l.stopping && !l.tasks.is_empty() => {
                        for task in l.tasks.drain(..) {
                            task.abort();
                        }
                        true
                    }
                    _ => false,
                }
            };
            if stale
                && parse_status(&rec.status)
                    .is_some_and(|s| s.is_live() || s == InstanceStatus::Unhealthy)
            {
                let id = rec.id.clone();
                let this = self.clone();
                let pid = self.pid_of(&id);
                tokio::spawn(async move {
                    let pid = pid.await;
                    this.watch(&id, pid, wanted.as_ref());
                });
            }
        }
    }

    fn pid_of(
        self: &Arc<Self>,
        id: &str,
    ) -> impl std::future::Future<Output = Option<u32>> + Send + 'static {
        let this = self.clone();
        let id = id.to_owned();
        async move {
            match this.blocking(move |d| d.inspect(&id)).await {
                Ok(kiln_runtime::InstanceInfo {
                    state: InstanceState::Running { pid },
                    ..
                }) => pid,
                _ => None,
            }
        }
    }

    /// Waits for the instance's process to end (a pidfd when the driver
    /// reports a pid, else polling), then records the exit.
    async fn watch_exit(self: Arc<Self>, id: String, pid: Option<u32>) {
        // The fake driver's pids are made up: never watch a host process.
        let pid = pid.filter(|_| !matches!(*self.driver, AnyDriver::Fake(_)));
        let waited = match pid.and_then(pidfd) {
            // `new` is deprecated for fds the caller might close behind
            // tokio's back; this OwnedFd is moved in and owned by it.
            #[allow(deprecated)]
            Some(fd) => match tokio::io::unix::AsyncFd::new(fd) {
                Ok(fd) => fd.readable().await.map(|_| ()).is_ok(),
                Err(_) => false,
            },
            None => false,
        };
        if !waited {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let id_c = id.clone();
                match self.blocking(move |d| d.inspect(&id_c)).await {
                    Ok(info) if matches!(info.state, InstanceState::Running { .. }) => continue,
                    _ => break,
                }
            }
        }
        self.on_exit(&id).await;
    }

    async fn on_exit(self: &Arc<Self>, id: &str) {
        if self
            .live
            .lock()
            .expect("live")
            .get(id)
            .is_none_or(|l| l.stopping)
        {
            return;
        }
        // The pidfd fires when the process ends; the driver's supervisor
        // records the exit a moment later. Wait for that record (briefly).
        let mut tries = 0;
        let (state, logs) = loop {
            let id_c = id.to_owned();
            let (state, logs) = self
                .blocking(move |d| (d.inspect(&id_c).map(|i| i.state), d.logs(&id_c, 2048)))
                .await;
            match state {
                Ok(InstanceState::Running { .. }) if tries < 400 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Still "running" after 2 s although its process ended: the
                // supervisor died with it; count it as exited.
                Ok(InstanceState::Running { .. }) => {
                    break (
                        Ok(InstanceState::Exited {
                            code: None,
                            signal: None,
                            oom: false,
                        }),
                        logs,
                    );
                }
                other => break (other, logs),
            }
        };
        let (code, how) = match state {
            Ok(InstanceState::Exited { code, signal, oom }) => (
                code,
                match (code, signal, oom) {
                    (_, _, true) => "was killed for lack of memory (OOM)".to_owned(),
                    (_, Some(s), _) => format!("was killed by signal {s}"),
                    (Some(c), _, _) => format!("exited with code {c}"),
                    _ => "exited".to_owned(),
                },
            ),
            Ok(_) => return,
            Err(e) => (None, format!("vanished from the runtime ({e})")),
        };
        if self.set_status(id, InstanceStatus::Exited { code }) {
            let tail = logs.map(|(_, err)| last_line(&err)).unwrap_or_default();
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            };
            self.event(
                "instance.exited",
                format!("instance/{id}"),
                None,
                format!("{id} {how}{tail}"),
            );
            self.wake.notify_one();
        }
    }

    async fn handle_health(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(String, Transition)>) {
        while let Some((id, t)) = rx.recv().await {
            let Some(rec) = self.record(&id) else {
                continue;
            };
            let live = parse_status(&rec.status)
                .is_some_and(|s| s.is_live() || s == InstanceStatus::Unhealthy);
            if !live {
                continue;
            }
            let status = match t.to {
                Health::Starting => continue,
                Health::Healthy => InstanceStatus::Healthy,
                Health::Unhealthy => InstanceStatus::Unhealthy,
            };
            if self.set_status(&id, status) {
                let kind = if status == InstanceStatus::Healthy {
                    "instance.healthy"
                } else {
                    "instance.unhealthy"
                };
                self.event(
                    kind,
                    format!("instance/{id}"),
                    None,
                    format!("{id}: {}", t.reason),
                );
                if status == InstanceStatus::Unhealthy {
                    self.wake.notify_one();
                }
            }
        }
    }

    /// Stops (grace, then kill) and removes an instance, taking it out of
    /// the records. Its volumes stay.
    pub(crate) async fn destroy(&self, id: &str, grace: Option<Duration>) -> Result<(), String> {
        let (ports, tasks) = {
            let mut live = self.live.lock().expect("live");
            match live.get_mut(id) {
                Some(l) => {
                    l.stopping = true;
                    (
                        l.ports.values().copied().collect::<Vec<_>>(),
                        std::mem::take(&mut l.tasks),
                    )
                }
                None => (Vec::new(), Vec::new()),
            }
        };
        for task in tasks {
            task.abort();
        }
        let grace = grace.unwrap_or(Duration::from_secs(10));
        // A pidfd of its process, taken before the stop: the volume is
        // released once that process is gone, not merely asked to go.
        let id_c = id.to_owned();
        let pid = match self.blocking(move |d| d.inspect(&id_c)).await {
            Ok(kiln_runtime::InstanceInfo {
                state: InstanceState::Running { pid },
                ..
            }) => pid.filter(|_| !matches!(*self.driver, AnyDriver::Fake(_))),
            _ => None,
        };
        let exit = pid.and_then(pidfd);
        let id_c = id.to_owned();
        let result = self
            .blocking(move |d| {
                match d.inspect(&id_c) {
                    Ok(info) if info.state.can_stop() => {
                        d.stop(&id_c, grace)?;
                    }
                    Ok(_) => {}
                    Err(kiln_runtime::RuntimeError::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                }
                d.remove(&id_c)
            })
            .await;
        let result = match (result, exit) {
            (Ok(()), Some(fd)) => wait_exited(fd, EXIT_WAIT).await.map_err(|()| {
                format!(
                    "its process {} is still running after the stop",
                    pid.unwrap_or(0)
                )
            }),
            (Ok(()), None) => Ok(()),
            (Err(e), _) => Err(e.to_string()),
        };
        if let Err(e) = result {
            if let Some(l) = self.live.lock().expect("live").get_mut(id) {
                l.stopping = false;
            }
            return Err(format!("cannot destroy {id}: {e}"));
        }
        self.release_fences(id);
        self.live.lock().expect("live").remove(id);
        self.materials.release_ports(ports);
        self.store
            .remove_instance(id)
            .map_err(|e| format!("cannot forget {id}: {e}"))?;
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// After a restart: takes back every instance the driver runs for us,
    /// removes what nobody recorded, records what vanished, and serves the
    /// active generation's routes again.
    async fn adopt(self: &Arc<Self>) -> Result<(), EngineError> {
        let records = self.store.list_instances(None)?;
        let listed = self.blocking(|d| d.list()).await;
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                self.event(
                    "daemon.warning",
                    "daemon",
                    None,
                    format!("cannot list instances: {e}"),
                );
                Vec::new()
            }
        };
        let mut running: HashMap<String, kiln_runtime::InstanceInfo> =
            listed.into_iter().map(|i| (i.id.clone(), i)).collect();
        let active = self.active()?;
        let orphans: Vec<String> = running
            .keys()
            .filter(|id| records.iter().all(|r| &r.id != *id))
            .cloned()
            .collect();
        for id in orphans {
            let removed = self
                .destroy(&id, Some(Duration::from_secs(2)))
                .await
                .is_ok();
            if removed {
                running.remove(&id);
            }
            self.event(
                "drift.orphan",
                format!("instance/{id}"),
                None,
                format!(
                    "{id} runs with kiln's labels but is in no record (left by a crash): removed"
                ),
            );
        }
        for rec in &records {
            let ports: BTreeMap<String, u16> =
                serde_json::from_value(rec.data["ports"].clone()).unwrap_or_default();
            self.materials.claim_ports(ports.values().copied());
            self.live.lock().expect("live").insert(
                rec.id.clone(),
                Live {
                    ports,
                    health: None,
                    started: Instant::now(),
                    tasks: Vec::new(),
                    stopping: false,
                },
            );
            match running.get(&rec.id).map(|i| i.state) {
                Some(InstanceState::Running { pid }) => {
                    let check = active
                        .as_ref()
                        .and_then(|(_, g)| g.spec.services.get(&rec.service))
                        .and_then(|s| s.health.as_ref());
                    self.watch(&rec.id, pid, check);
                }
                Some(InstanceState::Exited { code, .. }) => {
                    self.set_status(&rec.id, InstanceStatus::Exited { code });
                }
                Some(InstanceState::Created) | None => {
                    self.set_status(&rec.id, InstanceStatus::Exited { code: None });
                    self.event(
                        "instance.exited",
                        format!("instance/{}", rec.id),
                        None,
                        format!("{} is not running after the daemon restarted", rec.id),
                    );
                }
            }
        }
        // Volumes: what the driver still has keeps (or takes back) its
        // fences; the fences of instances that are gone are released.
        self.adopt_fences(&running.keys().cloned().collect());
        if let Some((_, generation)) = &active {
            for (name, route) in &generation.spec.routes {
                if let Err(e) = self.configure_route(name, route, generation).await {
                    self.event("route.error", format!("route/{name}"), None, e);
                }
            }
        }
        self.event(
            "daemon.adopted",
            "daemon",
            None,
            format!("adopted {} instance(s)", records.len()),
        );
        Ok(())
    }

    // ---- routes ---------------------------------------------------------

    /// Serves route `name` and gives it the service's in-rotation instances.
    /// Its error pages are read from the content store, where applying
    /// `generation` put them (a rollback serves the old pages again).
    pub(crate) async fn configure_route(
        &self,
        name: &str,
        route: &Route,
        generation: &kiln_plan::Generation,
    ) -> Result<(), String> {
        let listen = parse_listen(&route.listen)?;
        let protocol = match route.protocol {
            model::Protocol::Http => kiln_proxy::Protocol::Http,
            model::Protocol::Tcp => kiln_proxy::Protocol::Tcp,
        };
        let mut config = kiln_proxy::RouteConfig::new(listen, protocol);
        config.maintenance = route.maintenance;
        if let Some(t) = route.timeout {
            config.request_timeout = Duration::from_millis(t.millis);
        }
        if let Some(n) = route.max_connections {
            config.max_connections = n as usize;
        }
        config.load_balance = match route.balance {
            model::Balance::RoundRobin => kiln_proxy::LoadBalance::RoundRobin,
            model::Balance::LeastRequests => kiln_proxy::LoadBalance::LeastRequests,
        };
        config.hosts = route.hosts.clone();
        let pages = generation.route_pages(name);
        for (status, digest) in &pages {
            let stored = self.materials.files_dir().join(digest.hex());
            let source = route.error_pages.get(status).map_or("?", String::as_str);
            let read = |stored: &std::path::Path| {
                std::fs::read(stored)
                    .ok()
                    .filter(|bytes| &kiln_plan::Digest::of(bytes) == digest)
            };
            // A stored page that went missing or changed is written again
            // from the project file if that still has the content.
            let bytes = match read(&stored) {
                Some(bytes) => bytes,
                None => self
                    .materials
                    .restore_file(generation, digest)
                    .ok()
                    .and_then(|()| read(&stored))
                    .ok_or_else(|| {
                        format!(
                            "route {name}: error page {status} ({source}, {digest}) is missing or changed in {}\n  hint: apply the project again",
                            stored.display()
                        )
                    })?,
            };
            config.error_pages.insert(*status, bytes.into());
        }
        let inherited = {
            let mut inherited = self.inherited.lock().expect("inherited");
            let own = inherited.remove(name).filter(|l| {
                l.local_addr().is_ok_and(|a| {
                    a.ip() == listen.ip() && (listen.port() == 0 || a.port() == listen.port())
                })
            });
            // Routes sharing an address were handed one socket, under one
            // of their names: the others serve on a duplicate of it.
            own.or_else(|| {
                (listen.port() != 0)
                    .then(|| {
                        inherited
                            .values()
                            .find(|l| l.local_addr().is_ok_and(|a| a == listen))
                            .and_then(|l| l.try_clone().ok())
                    })
                    .flatten()
            })
        };
        // The backends are known before the socket accepts: staged for a
        // new route, so no request meets an empty set.
        let weights = self.rotation_weights(&route.service)?;
        let backends = self.backends_for(name, route, &weights)?;
        if self.proxy.backends(name).is_none() {
            self.proxy.stage_backends(name, backends.clone());
        }
        match inherited {
            Some(listener) => self
                .proxy
                .configure_route_with_listener(name, config, listener)
                .await
                .map_err(|e| e.to_string())?,
            None => self
                .proxy
                .configure_route(name, config)
                .await
                .map_err(|e| e.to_string())?,
        }
        self.routes
            .lock()
            .expect("routes")
            .insert(name.to_owned(), route.clone());
        {
            let mut served = self.route_pages.lock().expect("routes");
            if pages.is_empty() {
                served.remove(name);
            } else {
                served.insert(name.to_owned(), pages);
            }
        }
        self.proxy
            .set_backends(name, backends)
            .map_err(|e| e.to_string())
    }

    /// Equal weights over the service's live instances that are recorded in
    /// rotation.
    fn rotation_weights(&self, service: &str) -> Result<Vec<(String, u32)>, String> {
        let records = self
            .store
            .list_instances(Some(service))
            .map_err(|e| e.to_string())?;
        let ids: Vec<&InstanceRecord> = records
            .iter()
            .filter(|r| {
                r.in_rotation && parse_status(&r.status).is_some_and(InstanceStatus::is_live)
            })
            .collect();
        let weight = kiln_plan::TRAFFIC_TOTAL / u32::try_from(ids.len().max(1)).unwrap_or(1);
        Ok(ids.iter().map(|r| (r.id.clone(), weight)).collect())
    }

    pub(crate) fn set_route_backends(
        &self,
        name: &str,
        route: &Route,
        weights: &[(String, u32)],
    ) -> Result<(), String> {
        let backends = self.backends_for(name, route, weights)?;
        self.proxy
            .set_backends(name, backends)
            .map_err(|e| e.to_string())
    }

    fn backends_for(
        &self,
        name: &str,
        route: &Route,
        weights: &[(String, u32)],
    ) -> Result<Vec<kiln_proxy::Backend>, String> {
        let live = self.live.lock().expect("live");
        let mut backends = Vec::new();
        for (id, weight) in weights {
            let port = live
                .get(id)
                .and_then(|l| l.ports.get(&route.port))
                .ok_or_else(|| format!("{id} has no port `{}` for route {name}", route.port))?;
            backends.push(kiln_proxy::Backend {
                id: id.clone(),
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
                weight: *weight,
            });
        }
        Ok(backends)
    }

    /// Routes currently served for `service`.
    pub(crate) fn routes_of(&self, service: &str) -> Vec<(String, Route)> {
        self.routes
            .lock()
            .expect("routes")
            .iter()
            .filter(|(_, r)| r.service == service)
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    // ---- status and logs ---------------------------------------------

    pub async fn status(&self) -> Result<Status, EngineError> {
        let active = self.active()?;
        let rolling_out = self
            .store
            .list_generations()?
            .into_iter()
            .rev()
            .find(|g| g.status == Some(kiln_state::GenerationStatus::RollingOut))
            .map(|g| g.number);
        let records = self.store.list_instances(None)?;
        let infos: HashMap<String, kiln_runtime::InstanceInfo> = self
            .blocking(|d| d.list())
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i.id.clone(), i))
            .collect();
        let mut services: BTreeMap<String, ServiceStatus> = BTreeMap::new();
        if let Some((_, g)) = &active {
            for (name, s) in &g.spec.services {
                services.insert(
                    name.clone(),
                    ServiceStatus {
                        name: name.clone(),
                        replicas: s.replicas,
                        ..ServiceStatus::default()
                    },
                );
            }
        }
        for rec in records {
            let entry = services
                .entry(rec.service.clone())
                .or_insert_with(|| ServiceStatus {
                    name: rec.service.clone(),
                    ..ServiceStatus::default()
                });
            if rec.status == "healthy" {
                entry.healthy += 1;
            }
            let info = infos.get(&rec.id);
            entry.instances.push(InstanceStatusView {
                id: rec.id.clone(),
                generation: rec.generation,
                status: rec.status.clone(),
                in_rotation: rec.in_rotation,
                ports: serde_json::from_value(rec.data["ports"].clone()).unwrap_or_default(),
                pid: info.and_then(|i| match i.state {
                    InstanceState::Running { pid } => pid,
                    _ => None,
                }),
                isolation: info.map(|i| i.isolation.clone()).unwrap_or_default(),
                created_at: rec.created_at,
            });
        }
        let routes = self
            .routes
            .lock()
            .expect("routes")
            .iter()
            .map(|(name, r)| RouteStatus {
                name: name.clone(),
                listen: self
                    .proxy
                    .local_addr(name)
                    .map_or_else(|| r.listen.clone(), |a| a.to_string()),
                service: r.service.clone(),
                hosts: r.hosts.clone(),
                backends: self
                    .proxy
                    .backends(name)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|b| (b.id, b.addr.to_string(), b.weight))
                    .collect(),
            })
            .collect();
        Ok(Status {
            project: self.opts.project_name.clone(),
            daemon_pid: std::process::id(),
            driver: self.driver.name().to_owned(),
            driver_warning: self.driver_warning.clone(),
            active_generation: active.map(|(n, _)| n),
            rolling_out,
            services: services.into_values().collect(),
            routes,
        })
    }

    /// The ids of `service`'s instances, oldest first.
    pub fn instances_of(&self, service: &str) -> Result<Vec<String>, EngineError> {
        Ok(self
            .store
            .list_instances(Some(service))?
            .into_iter()
            .map(|r| r.id)
            .collect())
    }

    /// The captured output of an instance, at most `max` bytes per stream.
    pub async fn logs(&self, id: &str, max: u64) -> Result<(Vec<u8>, Vec<u8>), String> {
        let id = id.to_owned();
        self.blocking(move |d| d.logs(&id, max))
            .await
            .map_err(|e| e.to_string())
    }

    pub fn log_dir(&self, id: &str) -> PathBuf {
        self.materials.log_dir(id)
    }
}

pub(crate) fn upsert_of(rec: &InstanceRecord) -> InstanceUpsert {
    InstanceUpsert {
        id: rec.id.clone(),
        service: rec.service.clone(),
        identity: rec.identity.clone(),
        generation: rec.generation,
        spec: rec.spec.clone(),
        status: rec.status.clone(),
        in_rotation: rec.in_rotation,
        data: rec.data.clone(),
    }
}

fn make_driver(opts: &EngineOptions) -> Result<(AnyDriver, Option<String>), EngineError> {
    let dir = opts.state_dir.join("runtime");
    let unavailable = |e: kiln_runtime::RuntimeError| EngineError::Runtime(e.to_string());
    if let Some(fake) = &opts.fake {
        return Ok((AnyDriver::Fake(fake.clone()), None));
    }
    Ok(match opts.driver {
        model::Driver::Sandbox => kiln_runtime::select_local_driver(&dir).map_err(unavailable)?,
        model::Driver::Process => (
            AnyDriver::Process(kiln_runtime::Process::new(&dir).map_err(unavailable)?),
            Some(format!(
                "NO ISOLATION: `driver = \"process\"` runs instances as plain host processes ({})",
                kiln_runtime::process::ISOLATION
            )),
        ),
        model::Driver::Docker => (
            AnyDriver::Docker(
                kiln_runtime::docker::DockerDriver::connect(&opts.project_name)
                    .map_err(unavailable)?,
            ),
            None,
        ),
        model::Driver::Oci => {
            let runtime = if which("crun") {
                kiln_runtime::oci::OciRuntime::Crun
            } else {
                kiln_runtime::oci::OciRuntime::Runc
            };
            (
                AnyDriver::Oci(
                    kiln_runtime::oci::OciDriver::new(runtime, &dir).map_err(unavailable)?,
                ),
                None,
            )
        }
    })
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

fn probe_for(check: &model::Health, ports: &BTreeMap<String, u16>) -> Result<Probe, String> {
    let addr = |port: &str| {
        ports
            .get(port)
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
            .ok_or_else(|| {
                format!("the health check names port `{port}`, which the service does not declare")
            })
    };
    Ok(match &check.check {
        model::HealthCheck::Http { path, port } => Probe::Http {
            addr: addr(port)?,
            path: path.clone(),
        },
        model::HealthCheck::Tcp { port } => Probe::Tcp { addr: addr(port)? },
        model::HealthCheck::Exec { command } => {
            // `${PORT}` and `${PORT_<NAME>}` are the instance's own ports.
            let env = crate::instance::port_env(ports);
            Probe::Exec {
                argv: command
                    .iter()
                    .map(|a| crate::instance::expand(a, &env))
                    .collect(),
            }
        }
    })
}

/// `127.0.0.1:8080`, `:8080` (every address) or `8080`.
pub fn parse_listen(listen: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = listen.parse() {
        return Ok(addr);
    }
    let port = listen.strip_prefix(':').unwrap_or(listen);
    port.parse::<u16>()
        .map(|p| std::net::SocketAddr::from(([0, 0, 0, 0], p)))
        .map_err(|_| format!("route listen address `{listen}` is not HOST:PORT"))
}

/// How long a destroyed instance's process may take to be gone after the
/// driver said it stopped (the local drivers only return once it is).
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// Waits until the process behind `fd` (a pidfd) has ended, at most
/// `limit`.
pub(crate) async fn wait_exited(fd: std::os::fd::OwnedFd, limit: Duration) -> Result<(), ()> {
    // `new` is deprecated for fds the caller might close behind tokio's
    // back; this OwnedFd is moved in and owned by it.
    #[allow(deprecated)]
    let Ok(fd) = tokio::io::unix::AsyncFd::new(fd) else {
        return Ok(());
    };
    match tokio::time::timeout(limit, fd.readable()).await {
        Ok(_) => Ok(()),
        Err(_) => Err(()),
    }
}

pub(crate) fn pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok()
}

fn ports_text(ports: &BTreeMap<String, u16>) -> String {
    if ports.is_empty() {
        return String::new();
    }
    let list: Vec<String> = ports.iter().map(|(n, p)| format!("{n}={p}")).collect();
    format!(" (ports {})", list.join(", "))
}

pub(crate) fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A fresh lease token.
pub(crate) fn token() -> String {
    format!("{}-{}", std::process::id(), nanos())
}
