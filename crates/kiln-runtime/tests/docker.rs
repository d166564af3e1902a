//! The conformance suite against Docker Engine (the `docker` driver), plus
//! the engine-specific checks: `verify` through the engine's diff, and
//! adoption scoped to kiln's own containers.

#[macro_use]
mod conformance;

use std::path::Path;
use std::time::Duration;

use kiln_runtime::docker::{DockerDriver, LABEL_INSTANCE, LABEL_OWNER, container_name};
use kiln_runtime::{Drift, Driver, RuntimeError};

/// Each test's state dir is its own owner, so parallel tests (and other
/// kiln projects on this engine) never adopt each other's containers.
fn make(state_dir: &Path) -> Result<Box<dyn Driver>, RuntimeError> {
    Ok(Box::new(DockerDriver::connect(
        &state_dir.display().to_string(),
    )?))
}

// The container runs from the engine's copy of the image, so tampering the
// fixture's directory cannot show; `verify_sees_container_changes` covers
// verify for this driver.
// `env_and_argv` is replaced by `env_and_argv_docker`: the engine always
// adds HOSTNAME and HOME to a container's env.
conformance_tests!(@cases make, EXPECT;
    start_stop_exit_status, term_then_kill, root_is_read_only,
    volume_persists, volume_read_only, files_read_only, memory_limit_oom, pids_limit,
    host_processes_hidden, logs_captured, logs_rotated,
    inspect_after_death_and_adoption, verify_detects_tamper,
    bad_missing_binary, bad_not_executable, bad_escaping_volume,
    bad_memory_below_minimum,
    exec_runs_inside, exec_refused_unless_running, exec_timeout_kills);

const EXPECT: conformance::Expect = conformance::Expect {
    shares_host_root: false,
    ..conformance::Expect::ISOLATED
};

/// As `conformance::env_and_argv`, with the two variables Docker always
/// adds.
fn env_and_argv_docker(ctx: &conformance::Ctx) {
    let id = conformance::unique_id(ctx);
    let mut cfg = conformance::config(
        ctx,
        &id,
        &[
            "sh",
            "-c",
            r#"echo "$GREETING|$0|$1|$#""#,
            "zero",
            "one two",
        ],
    );
    cfg.env.insert("GREETING".into(), "hello world".into());
    let (_, out, err) = conformance::run_to_exit(ctx, &cfg);
    assert_eq!(out, "hello world|zero|one two|1\n", "{err}");
    let id = conformance::unique_id(ctx);
    let mut cfg = conformance::config(ctx, &id, &["sh", "-c", "pwd; env | sort"]);
    cfg.workdir = Some("/etc".into());
    let (_, out, _) = conformance::run_to_exit(ctx, &cfg);
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split('=').next())
        .collect();
    assert_eq!(out.lines().next(), Some("/etc"));
    assert_eq!(
        names,
        [
            "HOME",
            "HOSTNAME",
            "KILN_TEST_MARKER",
            "PATH",
            "PWD",
            "SHLVL"
        ],
        "{out}"
    );
}

#[test]
fn env_and_argv() {
    conformance::run("env_and_argv", env_and_argv_docker, make, EXPECT);
}

fn docker_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tampering the container's root from the host (it is read-only from
/// inside) shows in `verify`; the tmpfs and volume paths do
/// not.
fn verify_sees_container_changes(ctx: &conformance::Ctx) {
    let id = conformance::unique_id(ctx);
    let vol = ctx.fixture.dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let mut cfg = conformance::config(
        ctx,
        &id,
        &["sh", "-c", "echo x > /tmp/t; echo y > /data/v; sleep 600"],
    );
    cfg.volumes.push(kiln_runtime::Mount {
        source: vol,
        target: "/data".into(),
        read_only: false,
    });
    conformance::launch(ctx, &cfg);
    conformance::wait_until("the writes", || {
        ctx.fixture.dir.path().join("vol/v").exists()
    });
    assert_eq!(ctx.driver.verify(&id).unwrap(), vec![]);
    // The host's view of the container's root (overlay2's merged dir).
    let merged = docker_cli(&[
        "inspect",
        "-f",
        "{{.GraphDriver.Data.MergedDir}}",
        &container_name(&id),
    ]);
    std::fs::write(Path::new(&merged).join("etc/motd"), "tampered\n").unwrap();
    let drift = ctx.driver.verify(&id).unwrap();
    assert!(
        drift.contains(&Drift::RootChanged {
            path: "/etc/motd".into(),
            change: "changed".into()
        }),
        "{drift:?}"
    );
    ctx.driver.stop(&id, Duration::from_secs(1)).unwrap();
    ctx.driver.remove(&id).unwrap();
    assert_eq!(ctx.driver.verify(&id).unwrap(), vec![Drift::Missing]);
}

/// A container carrying kiln's instance label but another owner (another
/// project) is neither listed nor touched.
fn adopts_only_its_own(ctx: &conformance::Ctx) {
    let id = conformance::unique_id(ctx);
    conformance::launch(ctx, &conformance::config(ctx, &id, &["sleep", "600"]));
    let foreign = format!("{id}-foreign");
    let image = docker_cli(&["inspect", "-f", "{{.Config.Image}}", &container_name(&id)]);
    docker_cli(&[
        "create",
        "--name",
        &container_name(&foreign),
        "--label",
        &format!("{LABEL_INSTANCE}={foreign}"),
        "--label",
        &format!("{LABEL_OWNER}=someone-else"),
        &image,
        "true",
    ]);
    let ids: Vec<String> = ctx
        .driver
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    docker_cli(&["rm", "-f", &container_name(&foreign)]);
    assert_eq!(ids, vec![id]);
}

#[test]
fn verify_sees_container_changes_test() {
    conformance::run(
        "verify_sees_container_changes",
        verify_sees_container_changes,
        make,
        conformance::Expect::ISOLATED,
    );
}

#[test]
fn adopts_only_its_own_test() {
    conformance::run(
        "adopts_only_its_own",
        adopts_only_its_own,
        make,
        conformance::Expect::ISOLATED,
    );
}

/// Removes the test's image from the engine, even when the test fails.
struct RemoveImage(Vec<String>);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = std::process::Command::new("docker")
                .args(["image", "rm", "-f", r])
                .output();
        }
    }
}

/// A legacy `docker save` archive of `rootfs` (manifest.json, the config
/// JSON named by its digest, one `<id>/layer.tar`) whose config carries
/// `label`; returns (archive bytes, config hex = the image ID).
fn docker_save_archive(rootfs: &Path, label: &str) -> (Vec<u8>, String) {
    use sha2::{Digest as _, Sha256};
    let mut layer = tar::Builder::new(Vec::new());
    layer.follow_symlinks(false);
    layer.append_dir_all(".", rootfs).unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_hex = hex::encode(Sha256::digest(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Labels": { "io.kiln.test.archive": label },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_hex}")] },
        "history": [{ "created_by": "kiln conformance test" }],
    }))
    .unwrap();
    let config_hex = hex::encode(Sha256::digest(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": null,
        "Layers": [format!("{layer_hex}/layer.tar")],
    }]))
    .unwrap();
    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut header, path, data).unwrap();
    };
    add(&format!("{layer_hex}/layer.tar"), &layer);
    add(&format!("{layer_hex}/VERSION"), b"1.0");
    add(&format!("{config_hex}.json"), &config);
    add("manifest.json", &manifest);
    (archive.into_inner().unwrap(), config_hex)
}

/// `ImageRef::docker_archive` set: the driver loads that archive (the
/// image carries the archive's config label, which a rootfs import would
/// not), tags it by the kiln digest and runs from it.
fn loads_docker_archive(ctx: &conformance::Ctx) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let label = format!("{}-{nanos}", std::process::id());
    let (bytes, config_hex) = docker_save_archive(&ctx.fixture.rootfs, &label);
    let archive = ctx.fixture.dir.path().join("image.tar");
    std::fs::write(&archive, bytes).unwrap();
    // A digest of its own, so no other test's image can stand in for it.
    let digest = format!("sha256:{config_hex}");
    let tag = kiln_runtime::docker::image_tag(&digest);
    let _cleanup = RemoveImage(vec![tag.clone(), format!("sha256:{config_hex}")]);
    for r in [&tag, &config_hex] {
        let absent = std::process::Command::new("docker")
            .args(["image", "inspect", r])
            .output()
            .unwrap();
        assert!(!absent.status.success(), "{r} is already in the engine");
    }

    let id = conformance::unique_id(ctx);
    let mut cfg = conformance::config(ctx, &id, &["cat", "/etc/motd"]);
    cfg.image.digest = digest;
    cfg.image.docker_archive = Some(archive);
    let (state, out, err) = conformance::run_to_exit(ctx, &cfg);
    assert!(
        matches!(
            state,
            kiln_runtime::InstanceState::Exited { code: Some(0), .. }
        ),
        "{state:?} {err}"
    );
    assert_eq!(out, "hello from the image\n");
    let labels = docker_cli(&[
        "image",
        "inspect",
        "-f",
        "{{index .Config.Labels \"io.kiln.test.archive\"}} {{.Id}}",
        &tag,
    ]);
    assert_eq!(labels, format!("{label} sha256:{config_hex}"));
    let ran = docker_cli(&["inspect", "-f", "{{.Image}}", &container_name(&id)]);
    assert_eq!(ran, format!("sha256:{config_hex}"));
    ctx.driver.remove(&id).unwrap();
}

#[test]
fn loads_docker_archive_test() {
    conformance::run(
        "loads_docker_archive",
        loads_docker_archive,
        make,
        conformance::Expect::ISOLATED,
    );
}
