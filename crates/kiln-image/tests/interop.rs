//! kiln's images against the real tools: skopeo, umoci, Docker Engine.
//!
//! A missing tool (or a Docker daemon that does not answer) fails the test
//! when `KILN_STRICT_TESTS=true` (scripts/test in CI installs them and
//! starts dockerd) and skips it loudly otherwise.

mod common;

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;

use common::{require, run, skip_or_fail};
use kiln_image::Image;
use kiln_image::image::descriptor_digest;

fn layer_digests(image: &Image) -> Vec<String> {
    image
        .layers()
        .iter()
        .map(|l| l.digest().to_string())
        .collect()
}

#[test]
fn skopeo_reads_kiln_layouts_and_archives_and_kiln_reads_skopeos() {
    if !require("skopeo", "apt-get install skopeo") {
        return;
    }
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layout = dir.path().join("layout");
    store.export_oci_layout(&image, &layout, "web").unwrap();
    let oci = format!("oci:{}:web", layout.display());

    let inspect: serde_json::Value =
        serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &oci]))).unwrap();
    assert_eq!(inspect["Digest"], image.digest.to_string());
    assert_eq!(inspect["Layers"], serde_json::json!(layer_digests(&image)));
    let raw = run(Command::new("skopeo").args(["inspect", "--raw", &oci]));
    assert_eq!(raw.trim_end().as_bytes(), image.manifest_bytes.as_slice());

    // skopeo writes a layout; kiln imports the same image from it.
    let copy = dir.path().join("copy");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        &oci,
        &format!("oci:{}:copied", copy.display()),
    ]));
    let (_d2, other) = common::store();
    let imported = other.import_oci_layout(&copy, Some("copied")).unwrap();
    assert_eq!(imported[0].1.digest, image.digest);

    // skopeo reads kiln's docker archive: same config bytes.
    let archive = dir.path().join("kiln.tar");
    store
        .export_docker_archive(
            &image,
            "kiln-test/skopeo:1",
            File::create(&archive).unwrap(),
        )
        .unwrap();
    let config = Command::new("skopeo")
        .args([
            "inspect",
            "--config",
            "--raw",
            &format!("docker-archive:{}", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(
        config.status.success(),
        "{}",
        String::from_utf8_lossy(&config.stderr)
    );
    assert_eq!(kiln_image::Digest::of(&config.stdout), image.config_digest);

    // skopeo writes a docker archive; kiln imports it with the same config.
    let saved = dir.path().join("skopeo.tar");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        &oci,
        &format!("docker-archive:{}:kiln-test/from-skopeo:1", saved.display()),
    ]));
    let (_d3, third) = common::store();
    let imported = third
        .import_docker_archive(File::open(&saved).unwrap())
        .unwrap();
    // skopeo writes the normalised name (docker.io/…); kiln keeps names as written.
    assert!(
        imported[0]
            .0
            .as_deref()
            .is_some_and(|n| n.ends_with("kiln-test/from-skopeo:1")),
        "{:?}",
        imported[0].0
    );
    assert_eq!(imported[0].1.config_digest, image.config_digest);
    assert_eq!(
        common::tree(&store.rootfs(&image).unwrap()),
        common::tree(&third.rootfs(&imported[0].1).unwrap())
    );
}

#[test]
fn umoci_unpacks_the_same_files_as_kiln() {
    if !require("umoci", "apt-get install umoci") {
        return;
    }
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layout = dir.path().join("layout");
    store.export_oci_layout(&image, &layout, "web").unwrap();
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci").args([
        "unpack",
        "--rootless",
        "--image",
        &format!("{}:web", layout.display()),
        bundle.to_str().unwrap(),
    ]));
    let theirs = common::tree(&bundle.join("rootfs"));
    let ours = common::tree(&store.rootfs(&image).unwrap());
    assert!(ours.contains_key("app/run.sh") && ours.contains_key("app/link"));
    for (path, entry) in &ours {
        assert_eq!(
            theirs.get(path),
            Some(entry),
            "{path} differs between kiln and umoci"
        );
    }
    assert_eq!(
        theirs.len(),
        ours.len(),
        "umoci unpacked more: {:?}",
        theirs
            .keys()
            .filter(|k| !ours.contains_key(*k))
            .collect::<Vec<_>>()
    );
}

/// Docker is usable: the CLI exists, the daemon answers, and the test
/// image can run (it needs a static busybox for /bin/sh).
fn docker_ready() -> bool {
    if !require("docker", "apt-get install docker.io") {
        return false;
    }
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    if !info.is_ok_and(|o| o.status.success()) {
        skip_or_fail(
            "the Docker daemon does not answer `docker info` (scripts/test starts dockerd as root)",
        );
        return false;
    }
    if common::static_busybox().is_none() {
        skip_or_fail("/bin/busybox is not a static busybox (apt-get install busybox-static)");
        return false;
    }
    true
}

/// Removes the tagged images when the test ends, passing or not.
struct Tags(Vec<String>);

impl Drop for Tags {
    fn drop(&mut self) {
        for tag in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
    }
}

fn docker_id(tag: &str) -> String {
    run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", tag]))
        .trim()
        .to_owned()
}

#[test]
fn docker_loads_and_runs_a_kiln_export_read_only() {
    if !docker_ready() {
        return;
    }
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let tag = format!("kiln-test/load-{}:1", std::process::id());
    let _cleanup = Tags(vec![tag.clone()]);
    let archive = dir.path().join("image.tar");
    store
        .export_docker_archive(&image, &tag, File::create(&archive).unwrap())
        .unwrap();
    let loaded = run(Command::new("docker").args(["load", "-i", archive.to_str().unwrap()]));
    assert!(loaded.contains(&tag), "{loaded}");
    assert_eq!(
        docker_id(&tag),
        image.config_digest.to_string(),
        "docker's image ID is the config digest"
    );
    let out =
        run(Command::new("docker").args(["run", "--rm", "--read-only", "--network", "none", &tag]));
    assert_eq!(out.trim_end(), common::GREETING_OUTPUT);
}

#[test]
fn docker_save_imports_into_kiln_with_the_same_config_digest() {
    if !docker_ready() {
        return;
    }
    let (dir, store) = common::store();
    let pid = std::process::id();

    // An image Docker made itself, from our root filesystem tar.
    let imported_tag = format!("kiln-test/imported-{pid}:1");
    let roundtrip_tag = format!("kiln-test/roundtrip-{pid}:1");
    let _cleanup = Tags(vec![imported_tag.clone(), roundtrip_tag.clone()]);
    let rootfs = dir.path().join("rootfs.tar");
    fs::write(&rootfs, common::tar_of(&common::layer_entries(true))).unwrap();
    run(Command::new("docker").args([
        "import",
        "--change",
        r#"ENTRYPOINT ["/app/run.sh"]"#,
        rootfs.to_str().unwrap(),
        &imported_tag,
    ]));
    let saved = save(dir.path(), &imported_tag);
    let imported = store
        .import_docker_archive(File::open(&saved).unwrap())
        .unwrap();
    assert_eq!(imported[0].0.as_deref(), Some(imported_tag.as_str()));
    let image = &imported[0].1;
    assert_eq!(image.config_digest.to_string(), docker_id(&imported_tag));
    let root = store.rootfs(image).unwrap();
    assert_eq!(
        fs::read(root.join("app/hello.txt")).unwrap(),
        b"hello from kiln\n"
    );

    // kiln → docker load → docker save → kiln: the same config, layers, files.
    let original = common::test_image(&store, "web");
    let archive = dir.path().join("kiln.tar");
    store
        .export_docker_archive(&original, &roundtrip_tag, File::create(&archive).unwrap())
        .unwrap();
    run(Command::new("docker").args(["load", "-i", archive.to_str().unwrap()]));
    let saved = save(dir.path(), &roundtrip_tag);
    let (_d2, other) = common::store();
    let back = &other
        .import_docker_archive(File::open(&saved).unwrap())
        .unwrap()[0]
        .1;
    assert_eq!(back.config_digest, original.config_digest);
    assert_eq!(
        back.config.rootfs().diff_ids(),
        original.config.rootfs().diff_ids()
    );
    assert_eq!(
        descriptor_digest(&back.layers()[0]).unwrap().to_string(),
        original.config.rootfs().diff_ids()[0]
    );
    assert_eq!(
        common::tree(&store.rootfs(&original).unwrap()),
        common::tree(&other.rootfs(back).unwrap())
    );
    assert!(other.verify_all().unwrap().ok());
}

fn save(dir: &Path, tag: &str) -> std::path::PathBuf {
    let out = dir.join(format!("{}.tar", tag.replace(['/', ':'], "_")));
    run(Command::new("docker").args(["save", "-o", out.to_str().unwrap(), tag]));
    out
}
