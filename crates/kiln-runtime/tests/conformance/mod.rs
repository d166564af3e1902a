//! The conformance suite every driver must pass, against the real thing.
//!
//! A driver's test file declares one `#[test]` per case with
//! [`conformance_tests!`]:
//!
//! ```ignore
//! #[macro_use]
//! mod conformance;
//! conformance_tests!(make_driver, conformance::Expect::ISOLATED);
//! ```
//!
//! where `make_driver(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError>`.
//! A driver that answers `RuntimeError::Unavailable` (not root, no engine)
//! is skipped loudly on stderr, or fails the test when `KILN_STRICT_TESTS=true`.
//! Cases a driver cannot meet by design (the `process` driver has no
//! read-only root) are declared in [`Expect`] and print a note instead.
//!
//! The fixture is a root built from Debian's `busybox-static` in a temp
//! dir. Every instance's env carries `KILN_TEST_MARKER=<id>` so that the
//! "nothing left behind" check can find stray processes by their environ.
//! Tests wait on conditions with generous deadlines; nothing asserts timing.
#![allow(unused, reason = "each test file uses a subset of the harness")]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_runtime::{Driver, ImageRef, InstanceConfig, InstanceState, Limits, Mount, RuntimeError};

pub type MakeDriver = fn(&Path) -> Result<Box<dyn Driver>, RuntimeError>;

/// What a driver promises; cases outside it print a note and pass.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Writing to `/` fails inside the instance.
    pub read_only_root: bool,
    /// The instance sees only its own processes.
    pub pid_isolation: bool,
    /// Memory and pids limits are enforced.
    pub limits: bool,
    /// The instance runs from the fixture's directory itself, so tampering
    /// it from the host must show in `verify`.
    pub shares_host_root: bool,
    /// Volumes are mounted at their target inside the instance.
    pub mounts: bool,
}

impl Expect {
    pub const ISOLATED: Expect = Expect {
        read_only_root: true,
        pid_isolation: true,
        limits: true,
        shares_host_root: true,
        mounts: true,
    };
    pub const NONE: Expect = Expect {
        read_only_root: false,
        pid_isolation: false,
        limits: false,
        shares_host_root: true,
        mounts: false,
    };
}

/// Generous: this machine is noisy and CI shares it.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Declares one `#[test]` per conformance case.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr, $expect:expr) => {
        conformance_tests!(@cases $make, $expect;
            start_stop_exit_status, term_then_kill, root_is_read_only,
            volume_persists, volume_read_only, files_read_only, env_and_argv,
            memory_limit_oom, pids_limit,
            host_processes_hidden, logs_captured, logs_rotated,
            inspect_after_death_and_adoption, verify_detects_tamper,
            bad_missing_binary, bad_not_executable, bad_escaping_volume,
            bad_memory_below_minimum,
            exec_runs_inside, exec_refused_unless_running, exec_timeout_kills);
    };
    (@cases $make:expr, $expect:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                conformance::run(stringify!($case), conformance::$case, $make, $expect);
            }
        )*
    };
}

/// Writes straight to fd 2: libtest captures `eprintln!` of passing tests.
pub fn say(msg: &str) {
    let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
}

pub fn strict() -> bool {
    std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true")
}

/// Everything one case needs.
pub struct Ctx {
    pub driver: Box<dyn Driver>,
    pub make: MakeDriver,
    pub state_dir: PathBuf,
    pub fixture: Fixture,
    pub expect: Expect,
    pub case: &'static str,
}

pub fn run(case: &'static str, f: fn(&Ctx), make: MakeDriver, expect: Expect) {
    let fixture = Fixture::new();
    let state_dir = fixture.dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let driver = match make(&state_dir) {
        Ok(d) => d,
        Err(e @ RuntimeError::Unavailable { .. }) => {
            if strict() {
                panic!("KILN_STRICT_TESTS=true and the driver is unavailable: {e}");
            }
            say(&format!("SKIPPED conformance::{case}: {e}"));
            return;
        }
        Err(e) => panic!("cannot make the driver: {e}"),
    };
    let ctx = Ctx {
        driver,
        make,
        state_dir,
        fixture,
        expect,
        case,
    };
    // A failed case still cleans up (best effort) before it fails the test.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&ctx)));
    if outcome.is_err() {
        for info in ctx.driver.list().unwrap_or_default() {
            let _ = ctx.driver.stop(&info.id, Duration::from_secs(1));
            let _ = ctx.driver.remove(&info.id);
        }
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    // Whatever the case left, remove it and check the host is clean.
    for info in ctx.driver.list().unwrap() {
        if info.state.can_stop() {
            ctx.driver.stop(&info.id, Duration::from_secs(1)).unwrap();
        }
        ctx.driver.remove(&info.id).unwrap();
        assert_nothing_left(&ctx, &info.id);
    }
}

/// Not applicable by design: a note, never a failure, even when strict.
pub fn not_applicable(ctx: &Ctx, why: &str) {
    say(&format!(
        "NOTE conformance::{} does not apply to driver {}: {why}",
        ctx.case,
        ctx.driver.name()
    ));
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique instance id (cgroups and containers are host-wide).
pub fn unique_id(ctx: &Ctx) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let case: String = ctx
        .case
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("t{}-{case}-{n}", std::process::id())
}

/// A root built from busybox-static, with a few files for the bad-input
/// and verify cases.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub digest: String,
    /// For engine-backed drivers: a `docker save` archive of the root, set
    /// by the driver's test file when it needs one.
    pub docker_archive: Option<PathBuf>,
}

pub const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "echo", "ls", "ps", "dd", "head", "yes", "true", "false", "env", "pwd",
    "touch", "kill", "seq", "grep", "wc", "hostname", "id", "mkdir", "rm", "tail", "printf", "tr",
];

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .expect("the fixture needs Debian's busybox-static (/bin/busybox)");
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        std::fs::write(bin.join("notexec"), "#!/bin/sh\necho no\n").unwrap();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/motd"), "hello from the image\n").unwrap();
        let digest = format!("sha256:{:0>64}", format!("{:x}", std::process::id()));
        Fixture {
            dir,
            rootfs,
            digest,
            docker_archive: None,
        }
    }
}

/// A config for `argv` with the fixture's image, a unique log dir and the
/// test marker in its env.
pub fn config(ctx: &Ctx, id: &str, argv: &[&str]) -> InstanceConfig {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/bin".to_string());
    env.insert("KILN_TEST_MARKER".to_string(), id.to_string());
    let mut labels = BTreeMap::new();
    labels.insert("kiln.test".to_string(), ctx.case.to_string());
    InstanceConfig {
        id: id.to_string(),
        service: "svc".to_string(),
        image: ImageRef {
            digest: ctx.fixture.digest.clone(),
            rootfs: ctx.fixture.rootfs.clone(),
            docker_archive: ctx.fixture.docker_archive.clone(),
        },
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env,
        workdir: None,
        user: None,
        files: vec![],
        volumes: vec![],
        resources: Limits::default(),
        log_dir: ctx.fixture.dir.path().join("logs").join(id),
        log_max_bytes: 1 << 20,
        labels,
    }
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the instance has exited and returns its final state.
pub fn wait_exited(ctx: &Ctx, id: &str) -> InstanceState {
    let mut last = None;
    wait_until(&format!("{id} to exit"), || {
        let s = ctx.driver.state(id).unwrap();
        last = Some(s);
        matches!(s, InstanceState::Exited { .. })
    });
    last.unwrap()
}

/// Creates and starts; panics with the error otherwise.
pub fn launch(ctx: &Ctx, config: &InstanceConfig) {
    ctx.driver
        .create(config)
        .unwrap_or_else(|e| panic!("create {}: {e}", config.id));
    ctx.driver
        .start(&config.id)
        .unwrap_or_else(|e| panic!("start {}: {e}", config.id));
}

/// Runs to completion and returns (state, stdout, stderr).
pub fn run_to_exit(ctx: &Ctx, config: &InstanceConfig) -> (InstanceState, String, String) {
    launch(ctx, config);
    let state = wait_exited(ctx, &config.id);
    let (out, err) = logs(ctx, &config.id);
    (state, out, err)
}

pub fn logs(ctx: &Ctx, id: &str) -> (String, String) {
    let (out, err) = ctx.driver.logs(id, 1 << 20).unwrap();
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn exit_code(state: InstanceState) -> Option<i32> {
    match state {
        InstanceState::Exited { code, .. } => code,
        _ => None,
    }
}

/// The host after a failure or a remove: no mount under the state dir or
/// naming the instance, no cgroup directory named after it, no process
/// carrying its marker.
pub fn assert_nothing_left(ctx: &Ctx, id: &str) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = ctx.state_dir.to_string_lossy().into_owned();
    for line in mountinfo.lines() {
        assert!(
            !line.contains(&state) && !line.contains(id),
            "stray mount for {id}: {line}"
        );
    }
    let mut stray = vec![];
    find_named(Path::new("/sys/fs/cgroup"), id, 4, &mut stray);
    assert!(stray.is_empty(), "stray cgroups for {id}: {stray:?}");
    let marker = format!("KILN_TEST_MARKER={id}");
    wait_until(&format!("the processes of {id} to be gone"), || {
        !std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
        })
    });
}

fn find_named(dir: &Path, name: &str, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name().to_string_lossy().contains(name) {
            found.push(e.path());
        } else if depth > 0 {
            find_named(&e.path(), name, depth - 1, found);
        }
    }
}

/// A bad-input case: create-or-start must fail naming the instance, and
/// nothing may be left on the host afterwards.
fn expect_failure(ctx: &Ctx, config: &InstanceConfig, cause: &str) {
    let id = &config.id;
    let err = match ctx.driver.create(config) {
        Err(e) => e,
        Ok(_) => match ctx.driver.start(id) {
            Err(e) => e,
            Ok(_) => panic!("{cause}: {id} started"),
        },
    };
    let msg = err.to_string();
    assert!(
        msg.contains(id.as_str()),
        "{cause}: the error does not name {id}: {msg}"
    );
    say(&format!("conformance::{} error: {msg}", ctx.case));
    assert_nothing_left(ctx, id);
    if ctx.driver.inspect(id).is_ok() {
        ctx.driver.remove(id).unwrap();
        assert_nothing_left(ctx, id);
    }
}

// ---- cases ----------------------------------------------------------------

pub fn start_stop_exit_status(ctx: &Ctx) {
    let id = unique_id(ctx);
    let cfg = config(ctx, &id, &["sh", "-c", "exit 3"]);
    let info = ctx.driver.create(&cfg).unwrap();
    assert_eq!(info.state, InstanceState::Created);
    assert!(!info.isolation.is_empty());
    ctx.driver.start(&id).unwrap();
    assert_eq!(exit_code(wait_exited(ctx, &id)), Some(3));
    assert!(matches!(
        ctx.driver.start(&id),
        Err(RuntimeError::InvalidState { .. })
    ));
    ctx.driver.remove(&id).unwrap();
    assert!(matches!(
        ctx.driver.inspect(&id),
        Err(RuntimeError::NotFound { .. })
    ));
    assert_nothing_left(ctx, &id);

    // A service that exits cleanly on SIGTERM.
    let id = unique_id(ctx);
    let script = "trap 'exit 0' TERM; echo ready; while true; do sleep 1; done";
    launch(ctx, &config(ctx, &id, &["sh", "-c", script]));
    assert!(matches!(
        ctx.driver.state(&id).unwrap(),
        InstanceState::Running { .. }
    ));
    wait_until("ready", || logs(ctx, &id).0.contains("ready"));
    assert!(matches!(
        ctx.driver.remove(&id),
        Err(RuntimeError::InvalidState { .. })
    ));
    let info = ctx.driver.stop(&id, Duration::from_secs(30)).unwrap();
    assert_eq!(exit_code(info.state), Some(0), "{:?}", info.state);
    ctx.driver.remove(&id).unwrap();
    assert_nothing_left(ctx, &id);
}

pub fn term_then_kill(ctx: &Ctx) {
    let id = unique_id(ctx);
    let script = "trap '' TERM; echo ready; while true; do sleep 1; done";
    launch(ctx, &config(ctx, &id, &["sh", "-c", script]));
    wait_until("ready", || logs(ctx, &id).0.contains("ready"));
    let info = ctx.driver.stop(&id, Duration::from_millis(500)).unwrap();
    match info.state {
        InstanceState::Exited {
            signal: Some(9), ..
        } => {}
        other => panic!("a process ignoring SIGTERM must end by SIGKILL: {other:?}"),
    }
    ctx.driver.remove(&id).unwrap();
    assert_nothing_left(ctx, &id);
}

pub fn root_is_read_only(ctx: &Ctx) {
    if !ctx.expect.read_only_root {
        return not_applicable(ctx, "it runs without isolation, on the host's filesystem");
    }
    let id = unique_id(ctx);
    let script = "echo x > /probe && exit 10; echo x > /bin/probe && exit 11; \
                  mkdir /etc/probe && exit 12; echo x > /tmp/ok || exit 13; exit 0";
    let (state, _, err) = run_to_exit(ctx, &config(ctx, &id, &["sh", "-c", script]));
    assert_eq!(
        exit_code(state),
        Some(0),
        "wrote to the root? {state:?} {err}"
    );
    for p in ["probe", "bin/probe", "etc/probe"] {
        assert!(
            !ctx.fixture.rootfs.join(p).exists(),
            "the shared root was modified: {p}"
        );
    }
}

pub fn volume_persists(ctx: &Ctx) {
    if !ctx.expect.mounts {
        return not_applicable(ctx, "it has no mount namespace to mount volumes in");
    }
    let vol = ctx.fixture.dir.path().join("volume");
    std::fs::create_dir_all(&vol).unwrap();
    let volume = Mount {
        source: vol.clone(),
        target: "/data".into(),
        read_only: false,
    };
    let id = unique_id(ctx);
    let mut cfg = config(ctx, &id, &["sh", "-c", "echo persisted > /data/hello"]);
    cfg.volumes.push(volume.clone());
    let (state, _, err) = run_to_exit(ctx, &cfg);
    assert_eq!(exit_code(state), Some(0), "{err}");
    ctx.driver.remove(&id).unwrap();
    assert_eq!(
        std::fs::read_to_string(vol.join("hello")).unwrap(),
        "persisted\n"
    );

    let id = unique_id(ctx);
    let mut cfg = config(ctx, &id, &["cat", "/data/hello"]);
    cfg.volumes.push(volume);
    let (state, out, err) = run_to_exit(ctx, &cfg);
    assert_eq!(exit_code(state), Some(0), "{err}");
    assert_eq!(out, "persisted\n");
}

/// A volume declared read-only: its content is visible, and writing,
/// creating or removing in it fails.
pub fn volume_read_only(ctx: &Ctx) {
    if !ctx.expect.mounts {
        return not_applicable(ctx, "it has no mount namespace to mount volumes in");
    }
    let vol = ctx.fixture.dir.path().join("ro-volume");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("seed"), "seeded\n").unwrap();
    let id = unique_id(ctx);
    let script = "cat /data/seed; echo x > /data/seed && exit 10; \
                  echo x > /data/new && exit 11; rm /data/seed && exit 12; \
                  mkdir /data/dir && exit 13; exit 0";
    let mut cfg = config(ctx, &id, &["sh", "-c", script]);
    cfg.volumes.push(Mount {
        source: vol.clone(),
        target: "/data".into(),
        read_only: true,
    });
    let (state, out, err) = run_to_exit(ctx, &cfg);
    assert_eq!(
        exit_code(state),
        Some(0),
        "wrote to a read-only volume? {state:?} {err}"
    );
    assert_eq!(out, "seeded\n", "{err}");
    assert_eq!(
        std::fs::read_to_string(vol.join("seed")).unwrap(),
        "seeded\n"
    );
    assert!(!vol.join("new").exists() && !vol.join("dir").exists());
}

/// A declared file is visible with its content and read-only, even when
/// its `Mount` does not ask for it: drivers force `files` read-only.
pub fn files_read_only(ctx: &Ctx) {
    if !ctx.expect.mounts {
        return not_applicable(ctx, "it has no mount namespace to mount files in");
    }
    let file = ctx.fixture.dir.path().join("app.conf");
    std::fs::write(&file, "key=value\n").unwrap();
    let id = unique_id(ctx);
    let script = "cat /app.conf; echo x > /app.conf && exit 10; \
                  echo x >> /app.conf && exit 11; exit 0";
    let mut cfg = config(ctx, &id, &["sh", "-c", script]);
    cfg.files.push(Mount {
        source: file.clone(),
        target: "/app.conf".into(),
        read_only: false,
    });
    let (state, out, err) = run_to_exit(ctx, &cfg);
    assert_eq!(
        exit_code(state),
        Some(0),
        "wrote to a declared file? {state:?} {err}"
    );
    assert_eq!(out, "key=value\n", "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "key=value\n");
}

pub fn env_and_argv(ctx: &Ctx) {
    let id = unique_id(ctx);
    let script = r#"echo "$GREETING|$0|$1|$#""#;
    let mut cfg = config(ctx, &id, &["sh", "-c", script, "zero", "one two"]);
    cfg.env.insert("GREETING".into(), "hello world".into());
    let (state, out, err) = run_to_exit(ctx, &cfg);
    assert_eq!(exit_code(state), Some(0), "{err}");
    assert_eq!(out, "hello world|zero|one two|1\n");
    if ctx.expect.read_only_root {
        let id = unique_id(ctx);
        let mut cfg = config(ctx, &id, &["sh", "-c", "pwd; env | grep -c ="]);
        cfg.workdir = Some("/etc".into());
        let (_, out, _) = run_to_exit(ctx, &cfg);
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("/etc"));
        // Exactly the declared env (PATH, KILN_TEST_MARKER), plus what sh adds (PWD, SHLVL).
        let n: usize = lines.next().unwrap().trim().parse().unwrap();
        assert!(n <= 5, "the instance sees more env than declared: {out}");
    }
}

pub fn memory_limit_oom(ctx: &Ctx) {
    if !ctx.expect.limits {
        return not_applicable(ctx, "it enforces no resource limits");
    }
    let id = unique_id(ctx);
    // The shell keeps the whole substitution in memory: ~400 MB.
    let mut cfg = config(
        ctx,
        &id,
        &["sh", "-c", "x=$(yes | head -c 400000000); echo survived"],
    );
    cfg.resources.memory_bytes = Some(32 << 20);
    let (state, out, _) = run_to_exit(ctx, &cfg);
    assert!(
        matches!(state, InstanceState::Exited { oom: true, .. }),
        "{state:?} {out}"
    );
    assert!(!out.contains("survived"));
}

pub fn pids_limit(ctx: &Ctx) {
    if !ctx.expect.limits {
        return not_applicable(ctx, "it enforces no resource limits");
    }
    let id = unique_id(ctx);
    let script = "i=0; while [ $i -lt 200 ]; do sleep 600 & i=$((i+1)); done; echo spawned-all";
    let mut cfg = config(ctx, &id, &["sh", "-c", script]);
    cfg.resources.pids = Some(16);
    launch(ctx, &cfg);
    wait_until("the fork to fail", || {
        let (out, err) = logs(ctx, &id);
        assert!(
            !out.contains("spawned-all"),
            "200 processes under a limit of 16"
        );
        err.contains("fork")
    });
}

pub fn host_processes_hidden(ctx: &Ctx) {
    if !ctx.expect.pid_isolation {
        return not_applicable(ctx, "it has no PID namespace");
    }
    let id = unique_id(ctx);
    let (state, out, err) = run_to_exit(ctx, &config(ctx, &id, &["ls", "/proc"]));
    assert_eq!(exit_code(state), Some(0), "{err}");
    let pids = out
        .split_whitespace()
        .filter(|w| w.bytes().all(|b| b.is_ascii_digit()))
        .count();
    assert!(pids <= 3, "the instance sees {pids} processes: {out}");
}

pub fn logs_captured(ctx: &Ctx) {
    let id = unique_id(ctx);
    let cfg = config(
        ctx,
        &id,
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
    );
    let (state, out, err) = run_to_exit(ctx, &cfg);
    assert_eq!(exit_code(state), Some(0));
    assert_eq!(out, "to-stdout\n");
    assert_eq!(err, "to-stderr\n");
    assert!(ctx.driver.logs(&id, 4).unwrap().0.len() <= 4);
}

pub fn logs_rotated(ctx: &Ctx) {
    let id = unique_id(ctx);
    let script = "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done";
    let mut cfg = config(ctx, &id, &["sh", "-c", script]);
    cfg.log_max_bytes = 4096;
    let (state, out, _) = run_to_exit(ctx, &cfg);
    assert_eq!(exit_code(state), Some(0));
    assert!(out.ends_with("line-1999\n"), "the last line is kept");
    assert!(
        out.len() <= 2 * 4096 + 64,
        "rotation keeps the logs bounded: {} bytes",
        out.len()
    );
    let total: u64 = std::fs::read_dir(&cfg.log_dir)
        .map(|d| d.flatten().map(|e| e.metadata().unwrap().len()).sum())
        .unwrap_or(0);
    assert!(total <= 4 * 4096 + 1024, "log files on disk: {total} bytes");
}

pub fn inspect_after_death_and_adoption(ctx: &Ctx) {
    let id = unique_id(ctx);
    launch(ctx, &config(ctx, &id, &["sh", "-c", "exit 7"]));
    assert_eq!(exit_code(wait_exited(ctx, &id)), Some(7));
    let running = unique_id(ctx);
    launch(ctx, &config(ctx, &running, &["sleep", "600"]));
    // A new driver over the same state dir: the daemon restarted.
    let again = (ctx.make)(&ctx.state_dir).unwrap();
    assert_eq!(exit_code(again.inspect(&id).unwrap().state), Some(7));
    let ids: Vec<String> = again.list().unwrap().into_iter().map(|i| i.id).collect();
    assert!(ids.contains(&id) && ids.contains(&running), "{ids:?}");
    assert!(matches!(
        again.state(&running).unwrap(),
        InstanceState::Running { .. }
    ));
    let info = again.stop(&running, Duration::from_millis(500)).unwrap();
    assert!(matches!(info.state, InstanceState::Exited { .. }));
}

pub fn verify_detects_tamper(ctx: &Ctx) {
    if !ctx.expect.shares_host_root {
        return not_applicable(ctx, "it runs from its own copy of the image");
    }
    let id = unique_id(ctx);
    launch(ctx, &config(ctx, &id, &["sleep", "600"]));
    assert_eq!(ctx.driver.verify(&id).unwrap(), vec![]);
    std::fs::write(ctx.fixture.rootfs.join("etc/motd"), "tampered\n").unwrap();
    std::fs::write(ctx.fixture.rootfs.join("etc/added"), "new\n").unwrap();
    let drift = ctx.driver.verify(&id).unwrap();
    let text = format!("{drift:?}");
    assert!(
        text.contains("/etc/motd") && text.contains("/etc/added"),
        "{text}"
    );
}

pub fn bad_missing_binary(ctx: &Ctx) {
    let id = unique_id(ctx);
    expect_failure(ctx, &config(ctx, &id, &["/bin/nope"]), "missing binary");
    let id = unique_id(ctx);
    expect_failure(ctx, &config(ctx, &id, &["nope"]), "missing binary on PATH");
}

pub fn bad_not_executable(ctx: &Ctx) {
    let id = unique_id(ctx);
    expect_failure(ctx, &config(ctx, &id, &["/bin/notexec"]), "not executable");
}

pub fn bad_escaping_volume(ctx: &Ctx) {
    let vol = ctx.fixture.dir.path().join("volume");
    std::fs::create_dir_all(&vol).unwrap();
    for target in ["/data/../../escape", "relative/path", "/"] {
        let id = unique_id(ctx);
        let mut cfg = config(ctx, &id, &["true"]);
        cfg.volumes.push(Mount {
            source: vol.clone(),
            target: target.into(),
            read_only: false,
        });
        expect_failure(ctx, &cfg, "escaping volume");
    }
}

pub fn bad_memory_below_minimum(ctx: &Ctx) {
    if !ctx.expect.limits {
        return not_applicable(ctx, "it enforces no resource limits");
    }
    let id = unique_id(ctx);
    let mut cfg = config(ctx, &id, &["true"]);
    cfg.resources.memory_bytes = Some(64 << 10);
    expect_failure(ctx, &cfg, "memory below what starts");
}

/// A running instance to exec into: waits until it has said `ready`.
fn running(ctx: &Ctx, env: &[(&str, &str)]) -> String {
    let id = unique_id(ctx);
    let script = "trap 'exit 0' TERM; echo ready; while true; do sleep 1; done";
    let mut cfg = config(ctx, &id, &["sh", "-c", script]);
    for (k, v) in env {
        cfg.env.insert(k.to_string(), v.to_string());
    }
    launch(ctx, &cfg);
    wait_until("ready", || logs(ctx, &id).0.contains("ready"));
    id
}

fn exec(ctx: &Ctx, id: &str, argv: &[&str]) -> kiln_runtime::ExecOutput {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    ctx.driver
        .exec(id, &argv, DEADLINE)
        .unwrap_or_else(|e| panic!("exec {argv:?} in {id}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn exec_runs_inside(ctx: &Ctx) {
    let id = running(ctx, &[("GREETING", "hello world")]);
    let out = exec(ctx, &id, &["echo", "hi"]);
    assert!(out.success(), "{out:?}");
    assert_eq!((out.code, text(&out.stdout)), (Some(0), "hi\n".to_string()));
    let out = exec(ctx, &id, &["sh", "-c", "echo oops >&2; exit 3"]);
    assert!(!out.success());
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(text(&out.stderr), "oops\n");
    // The instance's env, not the caller's.
    let out = exec(
        ctx,
        &id,
        &[
            "sh",
            "-c",
            r#"echo "$GREETING|$KILN_TEST_MARKER|${CARGO:-none}""#,
        ],
    );
    assert_eq!(
        text(&out.stdout),
        format!("hello world|{id}|none\n"),
        "{out:?}"
    );
    // The instance's working directory in the image: relative to it the
    // image's own file is found by every driver, `process` included.
    let out = exec(ctx, &id, &["cat", "etc/motd"]);
    assert_eq!(text(&out.stdout), "hello from the image\n", "{out:?}");
    if ctx.expect.read_only_root {
        // The instance's root: `/` is the image, read-only.
        let out = exec(ctx, &id, &["cat", "/etc/motd"]);
        assert_eq!(text(&out.stdout), "hello from the image\n", "{out:?}");
        let out = exec(ctx, &id, &["sh", "-c", "touch /written 2>/dev/null"]);
        assert!(!out.success(), "exec wrote to the read-only root: {out:?}");
    } else {
        not_applicable(ctx, "it has no root of its own: `/` is the host's");
    }
    if ctx.expect.pid_isolation {
        // The instance's PID namespace: the exec sees the instance's
        // processes (the instance's sh among them, next to an init such as
        // the sandbox's), not the host's.
        let out = exec(
            ctx,
            &id,
            &[
                "sh",
                "-c",
                "for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline; echo; done 2>/dev/null",
            ],
        );
        let stdout = text(&out.stdout);
        assert!(stdout.lines().any(|l| l.contains("echo ready")), "{stdout}");
        let n = stdout.lines().count();
        assert!(n <= 12, "the exec sees {n} processes: {stdout}");
    } else {
        not_applicable(ctx, "it has no PID namespace");
    }
    ctx.driver.stop(&id, Duration::from_secs(30)).unwrap();
    if ctx.expect.read_only_root {
        // The instance's working directory and user.
        let id = unique_id(ctx);
        let script = "trap 'exit 0' TERM; echo ready; while true; do sleep 1; done";
        let mut cfg = config(ctx, &id, &["sh", "-c", script]);
        cfg.workdir = Some("/etc".into());
        cfg.user = Some((1000, 1001));
        launch(ctx, &cfg);
        wait_until("ready", || logs(ctx, &id).0.contains("ready"));
        let out = exec(ctx, &id, &["sh", "-c", "pwd; id -u; id -g; cat motd"]);
        assert_eq!(
            text(&out.stdout),
            "/etc\n1000\n1001\nhello from the image\n",
            "{out:?}"
        );
        ctx.driver.stop(&id, Duration::from_secs(30)).unwrap();
    }
}

pub fn exec_refused_unless_running(ctx: &Ctx) {
    let argv = vec!["true".to_string()];
    let id = unique_id(ctx);
    ctx.driver
        .create(&config(ctx, &id, &["sh", "-c", "exit 0"]))
        .unwrap();
    let err = ctx.driver.exec(&id, &argv, DEADLINE).unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidState { .. }), "{err}");
    assert!(err.to_string().contains(&id), "{err}");
    ctx.driver.start(&id).unwrap();
    wait_exited(ctx, &id);
    let err = ctx.driver.exec(&id, &argv, DEADLINE).unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidState { .. }), "{err}");
    let err = ctx
        .driver
        .exec("no-such-instance", &argv, DEADLINE)
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
}

pub fn exec_timeout_kills(ctx: &Ctx) {
    let id = running(ctx, &[]);
    let token = format!("kilnexec{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let argv: Vec<String> = ["sh", "-c", &format!("sleep 600; echo {token}")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let err = ctx
        .driver
        .exec(&id, &argv, Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::ExecTimedOut { .. }), "{err}");
    assert!(err.to_string().contains("killed"), "{err}");
    // Killed, while the instance runs on.
    wait_until("the timed-out command to be killed", || {
        !std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.windows(token.len()).any(|w| w == token.as_bytes()))
        })
    });
    assert!(ctx.driver.state(&id).unwrap().can_stop());
    assert!(exec(ctx, &id, &["true"]).success());
    ctx.driver.stop(&id, Duration::from_secs(30)).unwrap();
}
