//! Start → exit of busybox `true`, median of N runs (default 50): the
//! `docker` driver, `docker run --rm`, `runc run` on the oci driver's
//! bundle, and the `oci` driver (create + start + wait for exit + remove).
//!
//! ```text
//! cargo test --release -p kiln-runtime --test start_exit_bench -- --ignored --nocapture
//! KILN_BENCH_RUNS=100 …   # more runs
//! ```

#[allow(dead_code)]
mod conformance;

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_runtime::docker::{DockerDriver, image_tag};
use kiln_runtime::oci::{OciDriver, OciRuntime};
use kiln_runtime::{Driver, InstanceState};

fn runs() -> usize {
    std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(what: &str, v: Vec<Duration>) {
    let n = v.len();
    conformance::say(&format!(
        "start->exit median of {n}: {what}: {:.1} ms",
        median(v).as_secs_f64() * 1e3
    ));
}

fn time(mut f: impl FnMut(usize)) -> Vec<Duration> {
    f(usize::MAX); // warm-up (image load, caches)
    (0..runs())
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect()
}

fn run_driver(driver: &dyn Driver, ctx_config: &kiln_runtime::InstanceConfig, id: &str) {
    let mut cfg = ctx_config.clone();
    cfg.id = id.to_string();
    driver.create(&cfg).unwrap();
    driver.start(id).unwrap();
    while !matches!(driver.state(id).unwrap(), InstanceState::Exited { .. }) {
        std::thread::sleep(Duration::from_micros(100));
    }
    driver.remove(id).unwrap();
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn start_to_exit_of_true() {
    let fixture = conformance::Fixture::new();
    let state = fixture.dir.path().join("state");
    let base = kiln_runtime::InstanceConfig {
        id: String::new(),
        service: "bench".into(),
        image: kiln_runtime::ImageRef {
            digest: format!("sha256:{:0>64}", "be9c4"),
            rootfs: fixture.rootfs.clone(),
            docker_archive: None,
        },
        argv: vec!["/bin/true".into()],
        env: [("PATH".to_string(), "/bin".to_string())].into(),
        workdir: None,
        user: None,
        files: vec![],
        volumes: vec![],
        resources: Default::default(),
        log_dir: fixture.dir.path().join("logs"),
        log_max_bytes: 1 << 20,
        labels: Default::default(),
    };
    let pid = std::process::id();

    let sandbox = kiln_runtime::sandbox::Sandbox::new(fixture.dir.path().join("sandbox")).unwrap();
    report(
        "sandbox driver (built in)",
        time(|i| run_driver(&sandbox, &base, &format!("b{pid}-sb-{i}"))),
    );
    let process = kiln_runtime::process::Process::new(fixture.dir.path().join("process")).unwrap();
    report(
        "process driver (no isolation)",
        time(|i| run_driver(&process, &base, &format!("b{pid}-pr-{i}"))),
    );

    let oci = OciDriver::new(OciRuntime::Runc, &state).unwrap();
    report(
        "oci driver (runc)",
        time(|i| run_driver(&oci, &base, &format!("b{pid}-oci-{i}"))),
    );
    if let Ok(crun) = OciDriver::new(OciRuntime::Crun, fixture.dir.path().join("crun")) {
        report(
            "oci driver (crun)",
            time(|i| run_driver(&crun, &base, &format!("b{pid}-crun-{i}"))),
        );
    }

    // Plain `runc run` of the oci driver's bundle for the same config.
    let id = format!("b{pid}-bundle");
    let mut cfg = base.clone();
    cfg.id = id.clone();
    oci.create(&cfg).unwrap();
    let bundle = state.join("bundles").join(&id);
    let root = fixture.dir.path().join("runc-root");
    let runc = |_| {
        let status = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("b{pid}-plain"))
            .status()
            .unwrap();
        assert!(status.success());
    };
    report("`runc run` (same bundle)", time(runc));
    oci.remove(&id).unwrap();

    match DockerDriver::connect(&format!("bench-{pid}")) {
        Ok(docker) => {
            report(
                "docker driver",
                time(|i| run_driver(&docker, &base, &format!("b{pid}-dk-{i}"))),
            );
            let image = image_tag(&base.image.digest);
            let cli = |_| {
                let status = Command::new("docker")
                    .args([
                        "run",
                        "--rm",
                        "--read-only",
                        "--network",
                        "host",
                        "--entrypoint",
                        "",
                    ])
                    .arg(&image)
                    .arg("/bin/true")
                    .status()
                    .unwrap();
                assert!(status.success());
            };
            report("`docker run --rm` CLI", time(cli));
        }
        Err(e) => conformance::say(&format!("docker skipped: {e}")),
    }
}
