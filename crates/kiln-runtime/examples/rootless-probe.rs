//! Selects the local driver as the calling user (see
//! `kiln_runtime::select_local_driver`) and, when it is the sandbox, runs
//! one instance of `<rootfs>/bin/sh -c SCRIPT` to its exit. Used by
//! `tests/rootless.rs` under `setpriv --reuid=65534`; prints `key=value`
//! lines: driver, warning, isolation, state, then the instance's stdout;
//! then it starts a second, long-running instance and prints what
//! `Driver::exec` of `hostname`, `id -u` and a count of visible pids in it
//! says (`exec=HOST:UID:PIDS`, `exec_code=N`).
//!
//! Usage: rootless-probe ROOTFS WORKDIR SCRIPT
//! (`PROBE_MEMORY_BYTES=N` declares a memory limit.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_runtime::{Driver, ImageRef, InstanceConfig, InstanceState, Limits};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, rootfs, work, script] = &args[..] else {
        eprintln!("usage: rootless-probe ROOTFS WORKDIR SCRIPT");
        std::process::exit(2);
    };
    let work = PathBuf::from(work);
    let (driver, warning) = match kiln_runtime::select_local_driver(work.join("state")) {
        Ok(x) => x,
        Err(e) => {
            println!("error={e}");
            std::process::exit(1);
        }
    };
    println!("driver={}", driver.name());
    println!("warning={}", warning.unwrap_or_default().replace('\n', " "));
    let config = InstanceConfig {
        id: "probe-0".into(),
        service: "probe".into(),
        image: ImageRef {
            digest: "sha256:probe".into(),
            rootfs: PathBuf::from(rootfs),
            docker_archive: None,
        },
        argv: vec!["/bin/sh".into(), "-c".into(), script.clone()],
        env: BTreeMap::from([("PATH".to_string(), "/bin".to_string())]),
        workdir: None,
        user: None,
        files: vec![],
        volumes: vec![],
        resources: Limits {
            memory_bytes: std::env::var("PROBE_MEMORY_BYTES")
                .ok()
                .and_then(|m| m.parse().ok()),
            ..Limits::default()
        },
        log_dir: work.join("logs"),
        log_max_bytes: 1 << 20,
        labels: BTreeMap::new(),
    };
    let run = || -> Result<(InstanceState, String, String), kiln_runtime::RuntimeError> {
        let info = driver.create(&config)?;
        println!("isolation={}", info.isolation);
        driver.start(&config.id)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut state = driver.inspect(&config.id)?.state;
        while !matches!(state, kiln_runtime::InstanceState::Exited { .. })
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
            state = driver.inspect(&config.id)?.state;
        }
        let (out, err) = driver.logs(&config.id, 1 << 16)?;
        driver.stop(&config.id, Duration::from_secs(1))?;
        driver.remove(&config.id)?;
        Ok((
            state,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        ))
    };
    let exec = || -> Result<kiln_runtime::ExecOutput, kiln_runtime::RuntimeError> {
        let mut config = config.clone();
        config.id = "probe-1".into();
        config.log_dir = work.join("logs-1");
        config.argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo ready; while true; do sleep 1; done".into(),
        ];
        driver.create(&config)?;
        driver.start(&config.id)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !driver.logs(&config.id, 64)?.0.starts_with(b"ready") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let script = "echo exec=$(hostname):$(id -u):$(ls /proc | grep -c '^[0-9]')";
        let argv = ["sh", "-c", script].map(String::from);
        let out = driver.exec(&config.id, &argv, Duration::from_secs(20));
        driver.stop(&config.id, Duration::from_secs(1))?;
        driver.remove(&config.id)?;
        out
    };
    match run() {
        Ok((state, out, err)) => {
            println!("state={state:?}");
            println!("stderr={}", err.replace('\n', " | "));
            print!("{out}");
            match exec() {
                Ok(out) => {
                    print!("{}", String::from_utf8_lossy(&out.stdout));
                    println!("exec_code={:?}", out.code);
                    println!(
                        "exec_stderr={}",
                        String::from_utf8_lossy(&out.stderr).replace('\n', " | ")
                    );
                }
                Err(e) => println!("exec_error={}", e.to_string().replace('\n', " ")),
            }
        }
        Err(e) => {
            println!("error={}", e.to_string().replace('\n', " "));
            std::process::exit(1);
        }
    }
}
