//! The conformance suite against the built-in `sandbox` driver. Needs root
//! and cgroups: skipped loudly without them, failed when KILN_STRICT_TESTS=true.

#[macro_use]
mod conformance;

use std::path::Path;

use kiln_runtime::{Driver, RuntimeError, Sandbox};

fn make(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError> {
    Ok(Box::new(Sandbox::new(state_dir)?))
}

conformance_tests!(make, conformance::Expect::ISOLATED);

// ---- the init (PID 1 of the instance's PID namespace) ---------------------

use std::time::Duration;

use conformance::{Ctx, config, launch, run, unique_id, wait_exited, wait_until};
use kiln_runtime::InstanceState;

fn check(case: &'static str, f: fn(&Ctx)) {
    run(case, f, make, conformance::Expect::ISOLATED);
}

/// The reported pid, once the program runs (its cmdline is `argv`).
fn program_pid(ctx: &Ctx, id: &str, argv: &str) -> u32 {
    let mut pid = 0;
    wait_until(&format!("{id} to run {argv}"), || {
        if let InstanceState::Running { pid: Some(p) } = ctx.driver.state(id).unwrap() {
            pid = p;
        }
        pid != 0
            && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.replace('\0', " ").trim_end() == argv)
    });
    pid
}

fn ended_by(state: InstanceState) -> Option<i32> {
    match state {
        InstanceState::Exited { signal, .. } => signal,
        other => panic!("not exited: {other:?}"),
    }
}

/// A program with no SIGTERM handler is not the namespace's PID 1, so
/// `stop`'s SIGTERM ends it (signal 15), not the SIGKILL after the grace.
fn stop_ends_a_program_without_handler_by_term(ctx: &Ctx) {
    let id = unique_id(ctx);
    launch(ctx, &config(ctx, &id, &["sleep", "1000"]));
    program_pid(ctx, &id, "sleep 1000");
    let info = ctx.driver.stop(&id, Duration::from_secs(30)).unwrap();
    assert_eq!(ended_by(info.state), Some(15), "{:?}", info.state);
}

/// The reported pid is the program's (its env, its argv); a signal that
/// kills it from the host is its exit status.
fn reported_pid_is_the_program(ctx: &Ctx) {
    let id = unique_id(ctx);
    launch(ctx, &config(ctx, &id, &["sleep", "1000"]));
    let pid = program_pid(ctx, &id, "sleep 1000");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let marker = format!("KILN_TEST_MARKER={id}");
    assert!(
        environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()),
        "pid {pid} lacks the instance's env"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t2"), "{nspid}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::SEGV,
    )
    .unwrap();
    let state = wait_exited(ctx, &id);
    assert_eq!(ended_by(state), Some(11), "{state:?}");
}

/// The init forwards the signals it gets (here from inside: `kill -HUP 1`)
/// to the program.
fn init_forwards_signals(ctx: &Ctx) {
    let id = unique_id(ctx);
    launch(ctx, &config(ctx, &id, &["sleep", "1000"]));
    program_pid(ctx, &id, "sleep 1000");
    let argv = ["sh", "-c", "cat /proc/1/comm; kill -HUP 1"].map(String::from);
    let out = ctx.driver.exec(&id, &argv, conformance::DEADLINE).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "kiln-init\n",
        "{out:?}"
    );
    let state = wait_exited(ctx, &id);
    assert_eq!(ended_by(state), Some(1), "{state:?}");
}

/// An orphan (its parent exited) is reparented to the init, which reaps it
/// when it ends: no zombie is left in the instance.
fn init_reaps_orphans(ctx: &Ctx) {
    let id = unique_id(ctx);
    launch(
        ctx,
        &config(ctx, &id, &["sh", "-c", "(sleep 1 &); exec sleep 1000"]),
    );
    program_pid(ctx, &id, "sleep 1000");
    let argv = ["sh", "-c", "cat /proc/[0-9]*/stat"].map(String::from);
    let mut last = String::new();
    wait_until("the orphan to be reaped", || {
        let out = ctx.driver.exec(&id, &argv, conformance::DEADLINE).unwrap();
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let state = |l: &str| {
            l.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        };
        let sleeps = last.lines().filter(|l| l.contains(" (sleep) ")).count();
        let done = sleeps == 1 && !last.lines().any(|l| state(l) == Some(true));
        if !done {
            conformance::say(&last);
        }
        done
    });
    assert!(matches!(
        ctx.driver.state(&id).unwrap(),
        InstanceState::Running { .. }
    ));
    ctx.driver.stop(&id, Duration::from_secs(30)).unwrap();
}

#[test]
fn init_stop_ends_a_program_without_handler_by_term() {
    check(
        "stop_ends_a_program_without_handler_by_term",
        stop_ends_a_program_without_handler_by_term,
    );
}

#[test]
fn init_reported_pid_is_the_program() {
    check("reported_pid_is_the_program", reported_pid_is_the_program);
}

#[test]
fn init_forwards_signals_to_the_program() {
    check("init_forwards_signals", init_forwards_signals);
}

#[test]
fn init_reaps_orphaned_zombies() {
    check("init_reaps_orphans", init_reaps_orphans);
}
