//! A project of the crash tests: its own directory, state directory, image
//! store, unique project name (so its processes and containers are told
//! apart from every other test's) and the daemons it started, each stopped
//! when the project is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_engine::api::Status;
use serde_json::Value;

pub use crate::env::{hello_binary, is_root, may_run, sandbox_unavailable, say, show, text};

/// How long any condition may take to come true (tests run in parallel on
/// small machines; a killed daemon's lease lasts 15 s).
pub const DEADLINE: Duration = Duration::from_secs(90);

/// `GET path` over a fresh connection; the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer from {addr}: {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}{path} answered {head:?} {body:?}"));
    }
    Ok(body.to_owned())
}

/// Polls `f` until it gives `Ok`, up to `limit`; the last error otherwise.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let until = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// What the spec of a test project says (the rest is fixed: one service
/// `web` of the example's server, a health check, a rolling update one
/// instance at a time, one route).
#[derive(Debug, Clone)]
pub struct Spec {
    pub greeting: String,
    pub listen: String,
    pub replicas: u32,
    pub driver: Option<&'static str>,
    pub health_path: &'static str,
    pub healthy: u32,
    pub deadline: &'static str,
    /// Gives the instances an env var naming the project, so their
    /// identity (and ids) differ from every other project's: instances of
    /// equal identity share a host-wide cgroup (see the test
    /// `two_projects_with_the_same_service_do_not_kill_each_other`).
    pub unique: bool,
}

impl Spec {
    pub fn new(greeting: &str) -> Spec {
        Spec {
            greeting: greeting.to_owned(),
            listen: "127.0.0.1:0".into(),
            replicas: 2,
            driver: None,
            health_path: "/healthz",
            healthy: 1,
            deadline: "30s",
            unique: true,
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Proj {
    pub dir: tempfile::TempDir,
    /// Unique per test run: the instances' `KILN_PROJECT` and the docker
    /// driver's owner label.
    pub name: String,
    pub state: PathBuf,
    pub home: PathBuf,
    daemons: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Proj {
    /// A project named `<prefix>-<pid>-<n>` whose state is in `state` (its
    /// own `.kiln` if `None`).
    pub fn new(prefix: &str, state: Option<PathBuf>) -> Proj {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let p = dir.path();
        std::fs::create_dir_all(p.join("bin")).unwrap();
        std::fs::create_dir_all(p.join("config")).unwrap();
        std::fs::copy(hello_binary(), p.join("bin/hello")).unwrap();
        let state = state.unwrap_or_else(|| p.join(".kiln"));
        let home = p.join("home");
        Proj {
            dir,
            name,
            state,
            home,
            daemons: Vec::new(),
            logs: Vec::new(),
        }
    }

    pub fn spec_path(&self) -> PathBuf {
        self.dir.path().join("kiln.toml")
    }

    pub fn write(&self, s: &Spec) {
        let runtime = s
            .driver
            .map_or_else(String::new, |d| format!("[runtime]\ndriver = \"{d}\"\n"));
        let spec = format!(
            r#"[project]
name = "{name}"

{runtime}
[image.hello]
from = "scratch"
copy = [{{ src = "bin/hello", dst = "/app/hello", mode = 0o755 }}]
closure = true
entrypoint = ["/app/hello"]

[service.web]
image = "hello"
replicas = {replicas}
command = ["/app/hello", "--port", "${{PORT}}", "--config", "/etc/hello/config.toml"]
{env}
files = {{ "/etc/hello/config.toml" = "config/hello.toml" }}
ports = {{ http = {{}} }}
health = {{ http = "{health}", port = "http", interval = "200ms", timeout = "150ms", healthy = {healthy} }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, deadline = "{deadline}", drain_timeout = "1s" }}
stop_grace = "1s"

[route.web]
listen = "{listen}"
service = "web"
port = "http"
"#,
            name = self.name,
            replicas = s.replicas,
            health = s.health_path,
            healthy = s.healthy,
            deadline = s.deadline,
            listen = s.listen,
            env = if s.unique {
                format!("env = {{ CRASH_TEST_PROJECT = \"{}\" }}", self.name)
            } else {
                String::new()
            },
        );
        std::fs::write(self.spec_path(), spec).unwrap();
        std::fs::write(
            self.dir.path().join("config/hello.toml"),
            format!("greeting = \"{}\"\n", s.greeting),
        )
        .unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env("KILN_HOME", &self.home)
            .env("KILN_STATE_DIR", &self.state)
            .env("KILN_DRIFT_INTERVAL", "3600")
            .env_remove("KILN_FAILPOINT")
            .env_remove("KILN_IMAGE_STORE")
            .stdin(Stdio::null());
        c
    }

    /// Runs `kiln ARGS`, killed after `limit`.
    pub fn kiln_within(&self, args: &[&str], limit: Duration) -> Output {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let out = self.dir.path().join(format!("out-{n}"));
        let err = self.dir.path().join(format!("err-{n}"));
        let mut child = self
            .command(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("kiln runs");
        let status = wait_for(&mut child, limit).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`kiln {}` did not end within {limit:?}", args.join(" "))
        });
        Output {
            status,
            stdout: std::fs::read(&out).unwrap_or_default(),
            stderr: std::fs::read(&err).unwrap_or_default(),
        }
    }

    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_within(args, Duration::from_secs(120))
    }

    /// `kiln apply -y` of the spec as written now.
    pub fn apply(&self) -> Output {
        let spec = self.spec_path();
        self.kiln(&["apply", spec.to_str().unwrap(), "-y"])
    }

    pub fn apply_ok(&self) {
        let out = self.apply();
        assert_eq!(
            out.status.code(),
            Some(0),
            "apply failed:\n{}\n{}",
            show(&out),
            self.diagnostics()
        );
    }

    fn socket_up(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.state.join("kiln.sock")).is_ok()
    }

    /// Starts `kiln daemon` (with `KILN_FAILPOINT=failpoint` if given) and
    /// waits until it answers. A daemon killed by SIGKILL holds its lease
    /// until it expires (15 s): the start is retried until then.
    pub fn start_daemon(&mut self, failpoint: Option<&str>) -> u32 {
        let until = Instant::now() + DEADLINE;
        loop {
            let log = self
                .dir
                .path()
                .join(format!("daemon-{}.log", self.logs.len()));
            self.logs.push(log.clone());
            let mut cmd = self.command(&["daemon", self.spec_path().to_str().unwrap()]);
            if let Some(f) = failpoint {
                cmd.env("KILN_FAILPOINT", f);
            }
            let mut child = cmd
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("kiln daemon starts");
            let pid = child.id();
            loop {
                if self.socket_up() {
                    self.daemons.push(child);
                    return pid;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        text.contains("another kiln daemon serves") && Instant::now() < until,
                        "kiln daemon exited ({status}) before it answered:\n{text}"
                    );
                    std::thread::sleep(Duration::from_millis(250));
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "kiln daemon did not answer within {DEADLINE:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Waits for the daemon `pid` (started here) to end.
    pub fn wait_daemon(&mut self, pid: u32, limit: Duration) -> Option<ExitStatus> {
        let child = self.daemons.iter_mut().find(|c| c.id() == pid)?;
        wait_for(child, limit)
    }

    pub fn signal(pid: u32, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }

    /// SIGTERM to a daemon started here (instances keep running) and waits
    /// for its end.
    pub fn stop_daemon(&mut self, pid: u32) {
        Proj::signal(pid, "TERM");
        let status = self.wait_daemon(pid, Duration::from_secs(30));
        assert!(status.is_some(), "the daemon {pid} ignored SIGTERM");
    }

    /// SIGKILL to a daemon started here, waited for.
    pub fn kill_daemon(&mut self, pid: u32) {
        Proj::signal(pid, "KILL");
        let status = self.wait_daemon(pid, Duration::from_secs(30));
        assert_eq!(status.and_then(|s| s.signal()), Some(9));
    }

    pub fn daemon_logs(&self) -> String {
        self.logs
            .iter()
            .map(|l| {
                format!(
                    "--- {}\n{}",
                    l.display(),
                    std::fs::read_to_string(l).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn status(&self) -> Result<Status, String> {
        let spec = self.spec_path();
        let out = self.kiln_within(
            &["status", spec.to_str().unwrap(), "--json"],
            Duration::from_secs(30),
        );
        if !out.status.success() {
            return Err(format!("kiln status failed: {}", show(&out)));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("kiln status --json: {e}: {}", text(&out.stdout)))
    }

    /// `kiln history --json`: (number, status) of every generation.
    pub fn history(&self) -> Result<Vec<(u64, String)>, String> {
        let spec = self.spec_path();
        let out = self.kiln_within(
            &["history", spec.to_str().unwrap(), "--json"],
            Duration::from_secs(30),
        );
        if !out.status.success() {
            return Err(format!("kiln history failed: {}", show(&out)));
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("kiln history --json: {e}: {}", text(&out.stdout)))?;
        Ok(v.as_array()
            .ok_or("kiln history --json is not an array")?
            .iter()
            .map(|g| {
                (
                    g["number"].as_u64().unwrap_or_default(),
                    g["status"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect())
    }

    /// Events, history and daemon logs, for a failure message.
    pub fn diagnostics(&self) -> String {
        let spec = self.spec_path();
        let events = self.kiln_within(&["events", spec.to_str().unwrap()], Duration::from_secs(30));
        format!(
            "--- events\n{}--- history\n{:?}\n{}",
            text(&events.stdout),
            self.history(),
            self.daemon_logs()
        )
    }

    /// Instances the sandbox/process driver keeps state for.
    pub fn runtime_ids(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.state.join("runtime"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().join("state.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Host processes of this project's service: (pid, `KILN_INSTANCE`,
    /// `--port`), found by the `KILN_PROJECT` in their environment.
    pub fn hello_processes(&self) -> Vec<(u32, String, u16)> {
        let mut out = Vec::new();
        let want = format!("KILN_PROJECT={}", self.name);
        for (pid, argv) in processes() {
            if argv.first().map(String::as_str) != Some("/app/hello") {
                continue;
            }
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let vars: Vec<String> = environ
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            if !vars.contains(&want) {
                continue;
            }
            let instance = vars
                .iter()
                .find_map(|v| v.strip_prefix("KILN_INSTANCE="))
                .unwrap_or_default()
                .to_owned();
            let port = argv
                .iter()
                .position(|a| a == "--port")
                .and_then(|i| argv.get(i + 1))
                .and_then(|p| p.parse().ok())
                .unwrap_or_default();
            out.push((pid, instance, port));
        }
        out
    }

    /// Every process this project left: its service's processes and their
    /// supervisors (which carry the daemon's command line, with this
    /// project's spec path).
    fn leftovers(&self) -> Vec<u32> {
        let spec = self.spec_path().to_string_lossy().into_owned();
        let mut pids: Vec<u32> = self.hello_processes().iter().map(|p| p.0).collect();
        for (pid, argv) in processes() {
            if argv.contains(&spec) && pid != std::process::id() {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Every process's pid and argv.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, argv));
    }
    out
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Proj {
    /// `kiln down` (starting a daemon for it if none runs), then, as a last
    /// resort, SIGKILL to whatever this project still runs.
    fn drop(&mut self) {
        let left = self.hello_processes().len() + self.runtime_ids().len();
        let spec = self.spec_path();
        let spec = spec.to_str().unwrap();
        if !self.socket_up() && (left > 0 || self.driver_is_docker()) {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.start_daemon(None);
            }));
        }
        if self.socket_up() {
            let _ = self.kiln_within(&["down", spec], Duration::from_secs(60));
        }
        for child in &mut self.daemons {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        for pid in self.leftovers() {
            say(&format!(
                "crash tests: killing pid {pid} left by project {}",
                self.name
            ));
            Proj::signal(pid, "KILL");
        }
    }
}

impl Proj {
    fn driver_is_docker(&self) -> bool {
        std::fs::read_to_string(self.spec_path()).is_ok_and(|s| s.contains("driver = \"docker\""))
    }

    /// Checks that what runs is exactly generation `g`'s replicas, all
    /// healthy and in rotation, behind the route, with nothing else left
    /// running or recorded, and that no generation is left mid-rollout.
    /// `greetings` maps a generation to what its instances answer.
    /// Returns the active generation.
    pub fn converged(
        &self,
        greetings: &BTreeMap<u64, String>,
        replicas: usize,
    ) -> Result<u64, String> {
        let status = self.status()?;
        let g = status.active_generation.ok_or("no generation is active")?;
        if let Some(r) = status.rolling_out {
            return Err(format!("generation {r} is still rolling out"));
        }
        let history = self.history()?;
        if let Some((n, s)) = history
            .iter()
            .find(|(_, s)| s == "rolling-out" || s == "pending")
        {
            return Err(format!("history: generation {n} is left {s}: {history:?}"));
        }
        if !history.iter().any(|(n, s)| *n == g && s == "active") {
            return Err(format!("history does not show {g} active: {history:?}"));
        }
        let greeting = greetings
            .get(&g)
            .ok_or_else(|| format!("generation {g} is active, expected one of {greetings:?}"))?;
        let [web] = &status.services[..] else {
            return Err(format!("expected one service: {:?}", status.services));
        };
        let mut ids = BTreeSet::new();
        let mut ports = BTreeMap::new();
        for i in &web.instances {
            if i.generation != g || i.status != "healthy" || !i.in_rotation || i.pid.is_none() {
                return Err(format!(
                    "instance {} is of generation {}, {}, in rotation {}, pid {:?} (active {g})",
                    i.id, i.generation, i.status, i.in_rotation, i.pid
                ));
            }
            ids.insert(i.id.clone());
            ports.insert(i.id.clone(), i.ports.get("http").copied().unwrap_or(0));
        }
        if ids.len() != replicas {
            return Err(format!("{} instances, want {replicas}: {ids:?}", ids.len()));
        }
        let [route] = &status.routes[..] else {
            return Err(format!("expected one route: {:?}", status.routes));
        };
        let backends: BTreeSet<String> = route.backends.iter().map(|b| b.0.clone()).collect();
        if backends != ids {
            return Err(format!("route backends {backends:?}, instances {ids:?}"));
        }
        let mut addr: SocketAddr = route
            .listen
            .parse()
            .map_err(|e| format!("route listen {}: {e}", route.listen))?;
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        for _ in 0..4 {
            let body = http_get(addr, "/")?;
            let from = body
                .trim_end()
                .strip_prefix(&format!("{greeting} from "))
                .ok_or_else(|| format!("the route answered {body:?}, want {greeting:?} from …"))?;
            if !ids.contains(from) {
                return Err(format!("answered by {from}, not one of {ids:?}"));
            }
        }
        if !self.driver_is_docker() {
            let known = self.runtime_ids();
            if known != ids {
                return Err(format!(
                    "the driver keeps state for {known:?}, status shows {ids:?} (orphans?)"
                ));
            }
        }
        let running = self.hello_processes();
        let found: BTreeMap<String, u16> = running.iter().map(|p| (p.1.clone(), p.2)).collect();
        if running.len() != replicas || found != ports {
            return Err(format!(
                "service processes (pid, instance, port) {running:?}, status shows {ports:?} (orphans?)"
            ));
        }
        Ok(g)
    }
}
