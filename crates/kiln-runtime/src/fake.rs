//! An in-memory driver for the engine's tests: instances, their states and
//! logs live in a map; tests script what happens (an exit on start, a
//! crash, an OOM kill, a failing create/start, drift) and read back every
//! call the engine made. Follows the same guards as the real drivers.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::driver::Driver;
use crate::error::RuntimeError;
use crate::types::{Drift, ExecOutput, InstanceConfig, InstanceInfo, InstanceState};

pub const ISOLATION: &str = "fake: in memory";

/// What a started instance does, scripted per id (or for every id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Keeps running until stopped; exits 0 on SIGTERM.
    Run,
    /// Ignores SIGTERM: `stop` ends it with SIGKILL.
    IgnoreTerm,
    /// Exits with this code right after starting.
    ExitOnStart(i32),
    /// Killed by this signal right after starting.
    CrashOnStart(i32),
    /// Killed by the OOM killer right after starting.
    OomOnStart,
}

/// What `exec` in an instance answers, scripted per id (default: exit 0,
/// no output). Kept until scripted again, so a health check sees the same
/// answer every time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecScript {
    /// The command ran and ended so.
    Output(ExecOutput),
    /// The command did not finish in time: `RuntimeError::ExecTimedOut`,
    /// at once (the fake never waits).
    TimedOut,
    /// The driver failed: a `Setup` error saying this.
    Fail(String),
}

impl ExecScript {
    /// Exited with `code`, writing `stdout` and `stderr`.
    pub fn exit(code: i32, stdout: &str, stderr: &str) -> ExecScript {
        ExecScript::Output(ExecOutput {
            code: Some(code),
            signal: None,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        })
    }
}

#[derive(Debug)]
struct Instance {
    config: InstanceConfig,
    state: InstanceState,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    drift: Vec<Drift>,
}

#[derive(Debug, Default)]
struct Inner {
    instances: BTreeMap<String, Instance>,
    scripts: BTreeMap<String, Script>,
    default_script: Option<Script>,
    fail_create: BTreeMap<String, String>,
    fail_start: BTreeMap<String, String>,
    exec_scripts: BTreeMap<String, ExecScript>,
    default_exec: Option<ExecScript>,
    calls: Vec<String>,
    next_pid: u32,
}

/// The fake driver: see the module docs. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Fake {
    inner: Mutex<Inner>,
}

impl Fake {
    pub fn new() -> Fake {
        Fake::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the instance `id` does when started (default: [`Script::Run`]).
    pub fn script(&self, id: &str, script: Script) {
        self.lock().scripts.insert(id.to_string(), script);
    }

    /// What every instance without its own script does.
    pub fn script_all(&self, script: Script) {
        self.lock().default_script = Some(script);
    }

    /// Makes `create` of `id` fail with a `Setup` error saying `why`.
    pub fn fail_create(&self, id: &str, why: &str) {
        self.lock()
            .fail_create
            .insert(id.to_string(), why.to_string());
    }

    /// Makes `start` of `id` fail with a `Setup` error saying `why`.
    pub fn fail_start(&self, id: &str, why: &str) {
        self.lock()
            .fail_start
            .insert(id.to_string(), why.to_string());
    }

    /// What `exec` in `id` answers from now on (default: exit 0).
    pub fn script_exec(&self, id: &str, script: ExecScript) {
        self.lock().exec_scripts.insert(id.to_string(), script);
    }

    /// What `exec` answers in every instance without its own script.
    pub fn script_exec_all(&self, script: ExecScript) {
        self.lock().default_exec = Some(script);
    }

    /// A running instance ends now: a crash, an exit, an OOM kill.
    pub fn exit(&self, id: &str, code: Option<i32>, signal: Option<i32>, oom: bool) {
        if let Some(i) = self.lock().instances.get_mut(id)
            && i.state.can_stop()
        {
            i.state = InstanceState::Exited { code, signal, oom };
        }
    }

    /// The instance vanishes from the runtime (as if removed behind kiln's back).
    pub fn vanish(&self, id: &str) {
        self.lock().instances.remove(id);
    }

    /// Adds drift that `verify` reports from now on.
    pub fn drift(&self, id: &str, drift: Drift) {
        if let Some(i) = self.lock().instances.get_mut(id) {
            i.drift.push(drift);
        }
    }

    /// Appends to the instance's captured output.
    pub fn write_logs(&self, id: &str, stdout: &[u8], stderr: &[u8]) {
        if let Some(i) = self.lock().instances.get_mut(id) {
            i.stdout.extend_from_slice(stdout);
            i.stderr.extend_from_slice(stderr);
        }
    }

    /// The config the instance was created with.
    pub fn config(&self, id: &str) -> Option<InstanceConfig> {
        self.lock().instances.get(id).map(|i| i.config.clone())
    }

    /// Every call so far, as `"op id"` (`"list"` for list).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn info(i: &Instance) -> InstanceInfo {
        InstanceInfo {
            id: i.config.id.clone(),
            state: i.state,
            image_digest: i.config.image.digest.clone(),
            labels: i.config.labels.clone(),
            isolation: ISOLATION.to_string(),
        }
    }
}

fn not_found(id: &str) -> RuntimeError {
    RuntimeError::NotFound {
        id: id.to_string(),
        driver: "fake",
    }
}

impl Driver for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn create(&self, config: &InstanceConfig) -> Result<InstanceInfo, RuntimeError> {
        let mut g = self.lock();
        let id = &config.id;
        g.calls.push(format!("create {id}"));
        if let Some(why) = g.fail_create.get(id) {
            return Err(RuntimeError::Setup {
                id: id.clone(),
                what: why.clone(),
                hint: "scripted failure".into(),
            });
        }
        if g.instances.contains_key(id) {
            return Err(RuntimeError::AlreadyExists {
                id: id.clone(),
                driver: "fake",
            });
        }
        let i = Instance {
            config: config.clone(),
            state: InstanceState::Created,
            stdout: vec![],
            stderr: vec![],
            drift: vec![],
        };
        let info = Fake::info(&i);
        g.instances.insert(id.clone(), i);
        Ok(info)
    }

    fn start(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let mut g = self.lock();
        g.calls.push(format!("start {id}"));
        if let Some(why) = g.fail_start.get(id) {
            return Err(RuntimeError::Setup {
                id: id.into(),
                what: why.clone(),
                hint: "scripted failure".into(),
            });
        }
        let script = g
            .scripts
            .get(id)
            .or(g.default_script.as_ref())
            .cloned()
            .unwrap_or(Script::Run);
        g.next_pid += 1;
        let pid = 1000 + g.next_pid;
        let i = g.instances.get_mut(id).ok_or_else(|| not_found(id))?;
        if !i.state.can_start() {
            return Err(RuntimeError::invalid_state(id, "start", i.state));
        }
        i.state = match script {
            Script::Run | Script::IgnoreTerm => InstanceState::Running { pid: Some(pid) },
            Script::ExitOnStart(code) => InstanceState::Exited {
                code: Some(code),
                signal: None,
                oom: false,
            },
            Script::CrashOnStart(sig) => InstanceState::Exited {
                code: None,
                signal: Some(sig),
                oom: false,
            },
            Script::OomOnStart => InstanceState::Exited {
                code: None,
                signal: Some(9),
                oom: true,
            },
        };
        Ok(Fake::info(i))
    }

    fn stop(&self, id: &str, _grace: Duration) -> Result<InstanceInfo, RuntimeError> {
        let mut g = self.lock();
        g.calls.push(format!("stop {id}"));
        let ignores_term =
            g.scripts.get(id).or(g.default_script.as_ref()) == Some(&Script::IgnoreTerm);
        let i = g.instances.get_mut(id).ok_or_else(|| not_found(id))?;
        match i.state {
            InstanceState::Running { .. } => {
                i.state = if ignores_term {
                    InstanceState::Exited {
                        code: None,
                        signal: Some(9),
                        oom: false,
                    }
                } else {
                    InstanceState::Exited {
                        code: Some(0),
                        signal: None,
                        oom: false,
                    }
                };
            }
            InstanceState::Exited { .. } => {}
            s @ InstanceState::Created => return Err(RuntimeError::invalid_state(id, "stop", s)),
        }
        Ok(Fake::info(i))
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut g = self.lock();
        g.calls.push(format!("remove {id}"));
        let i = g.instances.get(id).ok_or_else(|| not_found(id))?;
        if !i.state.can_remove() {
            return Err(RuntimeError::invalid_state(id, "remove", i.state));
        }
        g.instances.remove(id);
        Ok(())
    }

    fn inspect(&self, id: &str) -> Result<InstanceInfo, RuntimeError> {
        self.lock()
            .instances
            .get(id)
            .map(Fake::info)
            .ok_or_else(|| not_found(id))
    }

    fn list(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        let mut g = self.lock();
        g.calls.push("list".into());
        Ok(g.instances.values().map(Fake::info).collect())
    }

    fn logs(&self, id: &str, max_bytes: u64) -> Result<(Vec<u8>, Vec<u8>), RuntimeError> {
        let g = self.lock();
        let i = g.instances.get(id).ok_or_else(|| not_found(id))?;
        let tail = |b: &[u8]| b[b.len().saturating_sub(max_bytes as usize)..].to_vec();
        Ok((tail(&i.stdout), tail(&i.stderr)))
    }

    fn verify(&self, id: &str) -> Result<Vec<Drift>, RuntimeError> {
        let g = self.lock();
        let i = g.instances.get(id).ok_or_else(|| not_found(id))?;
        Ok(i.drift.clone())
    }

    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let mut g = self.lock();
        g.calls.push(format!("exec {id}"));
        let i = g.instances.get(id).ok_or_else(|| not_found(id))?;
        i.state.ensure_can_exec(id)?;
        match g.exec_scripts.get(id).or(g.default_exec.as_ref()).cloned() {
            None => Ok(ExecOutput {
                code: Some(0),
                signal: None,
                stdout: vec![],
                stderr: vec![],
            }),
            Some(ExecScript::Output(out)) => Ok(out),
            Some(ExecScript::TimedOut) => Err(crate::exec::timed_out(id, argv, timeout)),
            Some(ExecScript::Fail(why)) => Err(RuntimeError::Setup {
                id: id.into(),
                what: why,
                hint: "scripted failure".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str) -> InstanceConfig {
        InstanceConfig::placeholder(id)
    }

    #[test]
    fn lifecycle_and_guards() {
        let f = Fake::new();
        f.create(&config("a")).unwrap();
        assert!(matches!(
            f.create(&config("a")),
            Err(RuntimeError::AlreadyExists { .. })
        ));
        assert!(matches!(
            f.stop("a", Duration::ZERO),
            Err(RuntimeError::InvalidState { .. })
        ));
        f.start("a").unwrap();
        assert!(matches!(
            f.remove("a"),
            Err(RuntimeError::InvalidState { .. })
        ));
        let info = f.stop("a", Duration::ZERO).unwrap();
        assert_eq!(
            info.state,
            InstanceState::Exited {
                code: Some(0),
                signal: None,
                oom: false
            }
        );
        f.remove("a").unwrap();
        assert!(matches!(f.inspect("a"), Err(RuntimeError::NotFound { .. })));
        assert_eq!(
            f.calls(),
            [
                "create a", "create a", "stop a", "start a", "remove a", "stop a", "remove a"
            ]
        );
    }

    #[test]
    fn scripted_exits_and_crashes() {
        let f = Fake::new();
        f.script("oom", Script::OomOnStart);
        f.script("stubborn", Script::IgnoreTerm);
        for id in ["oom", "stubborn", "crash"] {
            f.create(&config(id)).unwrap();
            f.start(id).unwrap();
        }
        assert!(matches!(
            f.state("oom").unwrap(),
            InstanceState::Exited { oom: true, .. }
        ));
        let s = f.stop("stubborn", Duration::ZERO).unwrap().state;
        assert_eq!(
            s,
            InstanceState::Exited {
                code: None,
                signal: Some(9),
                oom: false
            }
        );
        f.exit("crash", None, Some(11), false);
        assert_eq!(
            f.state("crash").unwrap(),
            InstanceState::Exited {
                code: None,
                signal: Some(11),
                oom: false
            }
        );
        f.fail_start("x", "no");
        f.create(&config("x")).unwrap();
        assert!(f.start("x").unwrap_err().to_string().contains("instance x"));
    }

    #[test]
    fn scripted_exec() {
        let f = Fake::new();
        let argv = vec!["check".to_string()];
        let t = Duration::from_secs(1);
        f.create(&config("a")).unwrap();
        assert!(matches!(
            f.exec("a", &argv, t),
            Err(RuntimeError::InvalidState { .. })
        ));
        f.start("a").unwrap();
        assert!(f.exec("a", &argv, t).unwrap().success());
        f.script_exec("a", ExecScript::exit(3, "", "not ready\n"));
        let out = f.exec("a", &argv, t).unwrap();
        assert_eq!((out.code, &out.stderr[..]), (Some(3), &b"not ready\n"[..]));
        f.script_exec("a", ExecScript::TimedOut);
        assert!(matches!(
            f.exec("a", &argv, t),
            Err(RuntimeError::ExecTimedOut { .. })
        ));
        f.script_exec("a", ExecScript::Fail("boom".into()));
        assert!(
            f.exec("a", &argv, t)
                .unwrap_err()
                .to_string()
                .contains("boom")
        );
        f.stop("a", t).unwrap();
        assert!(matches!(
            f.exec("a", &argv, t),
            Err(RuntimeError::InvalidState { .. })
        ));
    }
}
