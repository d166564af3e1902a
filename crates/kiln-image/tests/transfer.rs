//! OCI layout and docker archive import/export, without external tools:
//! round trips keep digests, and every kind of damage is refused by name.

mod common;

use std::fs;
use std::path::Path;

use kiln_image::{Digest, ImageError};
use serde_json::json;

#[test]
fn an_oci_layout_round_trip_keeps_every_digest() {
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layout = dir.path().join("layout");
    store.export_oci_layout(&image, &layout, "web").unwrap();
    store
        .export_oci_layout(&image, &layout, "web-again")
        .unwrap();

    let (_dir2, other) = common::store();
    let imported = other.import_oci_layout(&layout, Some("web")).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].0.as_deref(), Some("web"));
    assert_eq!(imported[0].1.digest, image.digest);
    assert_eq!(
        other.image("web").unwrap().manifest_bytes,
        image.manifest_bytes
    );
    let all = other.import_oci_layout(&layout, None).unwrap();
    let names: Vec<_> = all.iter().map(|(n, _)| n.clone().unwrap()).collect();
    assert_eq!(names, ["web", "web-again"]);

    let err = other
        .import_oci_layout(&layout, Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no image named `nope`") && err.contains("web-again"),
        "{err}"
    );
}

#[test]
fn a_corrupt_layout_blob_is_refused_by_digest_and_nothing_is_tagged() {
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layout = dir.path().join("layout");
    store.export_oci_layout(&image, &layout, "web").unwrap();
    let layer = kiln_image::image::descriptor_digest(&image.layers()[0]).unwrap();
    let path = layout.join("blobs/sha256").join(layer.hex());
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();

    let (_dir2, other) = common::store();
    let err = other.import_oci_layout(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert!(other.names().unwrap().is_empty());
    assert!(!other.has_blob(&layer));
}

#[test]
fn a_layout_that_is_not_one_is_refused_with_a_hint() {
    let (dir, store) = common::store();
    let err = store
        .import_oci_layout(dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not an OCI image layout") && err.contains("hint"),
        "{err}"
    );
}

/// Writes an OCI layout holding `manifests` (name → descriptor JSON) and
/// the given blobs.
fn write_layout(dir: &Path, blobs: &[&[u8]], manifests: serde_json::Value) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for blob in blobs {
        fs::write(dir.join("blobs/sha256").join(Digest::of(blob).hex()), blob).unwrap();
    }
    let index = json!({ "schemaVersion": 2, "manifests": manifests });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn descriptor(media_type: &str, bytes: &[u8], platform: Option<(&str, &str)>) -> serde_json::Value {
    let mut d = json!({ "mediaType": media_type, "digest": Digest::of(bytes).to_string(), "size": bytes.len() });
    if let Some((os, arch)) = platform {
        d["platform"] = json!({ "os": os, "architecture": arch });
    }
    d
}

#[test]
fn nested_indexes_resolve_to_linux_amd64_or_say_what_they_have() {
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let mut blobs: Vec<Vec<u8>> = image
        .blobs()
        .unwrap()
        .iter()
        .map(|d| store.read_blob(d).unwrap())
        .collect();
    let arm = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#.to_vec();
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor(mt, &arm, Some(("linux", "arm64"))), descriptor(mt, &image.manifest_bytes, Some(("linux", "amd64")))],
    }))
    .unwrap();
    // An index of an index: the outer one without platforms, as buildkit writes.
    let outer = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [descriptor("application/vnd.oci.image.index.v1+json", &list, None)],
    }))
    .unwrap();
    blobs.extend([list.clone(), outer.clone()]);
    let layout = dir.path().join("multi");
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    let mut entry = descriptor("application/vnd.oci.image.index.v1+json", &outer, None);
    entry["annotations"] = json!({ "org.opencontainers.image.ref.name": "multi" });
    write_layout(&layout, &refs, json!([entry]));

    let (_d2, other) = common::store();
    let imported = other.import_oci_layout(&layout, Some("multi")).unwrap();
    assert_eq!(
        imported[0].1.digest, image.digest,
        "the amd64 manifest was not chosen"
    );
    assert_eq!(other.image("multi").unwrap().digest, image.digest);

    let arm_only = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [descriptor(mt, &arm, Some(("linux", "arm64"))), descriptor(mt, &arm, Some(("windows", "amd64")))],
    }))
    .unwrap();
    let layout2 = dir.path().join("arm");
    write_layout(
        &layout2,
        &[&arm_only, &arm],
        json!([descriptor(
            "application/vnd.oci.image.index.v1+json",
            &arm_only,
            None
        )]),
    );
    let err = other
        .import_oci_layout(&layout2, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no linux/amd64 image") && err.contains("linux/arm64, windows/amd64"),
        "{err}"
    );
}

#[test]
fn a_descriptor_size_that_lies_is_refused() {
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layout = dir.path().join("layout");
    store.export_oci_layout(&image, &layout, "web").unwrap();
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]["size"] = json!(3);
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let (_d2, other) = common::store();
    let err = other
        .import_oci_layout(&layout, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&image.digest.to_string()) && err.contains("descriptor says 3"),
        "{err}"
    );
}

#[test]
fn a_docker_archive_round_trip_keeps_the_config_byte_for_byte() {
    let (_dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let mut archive = Vec::new();
    store
        .export_docker_archive(&image, "kiln/web:1", &mut archive)
        .unwrap();
    let mut again = Vec::new();
    store
        .export_docker_archive(&image, "kiln/web:1", &mut again)
        .unwrap();
    assert!(archive == again, "exports are not deterministic");

    let (_d2, other) = common::store();
    let imported = other.import_docker_archive(&archive[..]).unwrap();
    assert_eq!(imported.len(), 1);
    let (name, copy) = &imported[0];
    assert_eq!(name.as_deref(), Some("kiln/web:1"));
    assert_eq!(copy.config_digest, image.config_digest);
    let layer = &copy.layers()[0];
    assert_eq!(
        layer.media_type().to_string(),
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(
        layer.digest().to_string(),
        image.config.rootfs().diff_ids()[0]
    );
    // Same files either way.
    assert_eq!(
        common::tree(&store.rootfs(&image).unwrap()),
        common::tree(&other.rootfs(copy).unwrap())
    );
}

/// Builds a docker archive from members (path, bytes) and symlinks.
fn archive_of(files: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, *data).unwrap();
    }
    for (path, target) in links {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, path, target).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn legacy_archives_with_linked_and_gzip_layers_import() {
    let (_dir, store) = common::store();
    let layer = common::tar_of(&common::layer_entries(false));
    let gz = common::gzip(&layer);
    let diff = Digest::of(&layer).to_string();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [diff, diff, diff] },
    }))
    .unwrap();
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name, "RepoTags": ["kiln/legacy:1", "kiln/legacy:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]))
    .unwrap();
    let archive = archive_of(
        &[
            (&config_name, &config),
            ("aaa/layer.tar", &layer),
            ("aaa/json", b"{}"),
            ("aaa/VERSION", b"1.0"),
            ("ccc/layer.tar", &gz),
            ("manifest.json", &manifest),
        ],
        &[("bbb/layer.tar", "../aaa/layer.tar")],
    );
    let imported = store.import_docker_archive(&archive[..]).unwrap();
    assert_eq!(imported.len(), 2);
    let image = &imported[0].1;
    assert_eq!(image.config_digest, Digest::of(&config));
    let types: Vec<String> = image
        .layers()
        .iter()
        .map(|l| l.media_type().to_string())
        .collect();
    assert_eq!(types[0], "application/vnd.oci.image.layer.v1.tar");
    assert_eq!(types[2], "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_eq!(
        store.image("kiln/legacy:latest").unwrap().digest,
        image.digest
    );
    assert!(store.verify_all().unwrap().ok());

    // A layer whose content is not the config's diff_id is refused.
    let bad = archive_of(
        &[
            (&config_name, &config),
            ("aaa/layer.tar", b"not the layer"),
            ("manifest.json", &manifest),
        ],
        &[
            ("bbb/layer.tar", "../aaa/layer.tar"),
            ("ccc/layer.tar", "../aaa/layer.tar"),
        ],
    );
    let err = store
        .import_docker_archive(&bad[..])
        .unwrap_err()
        .to_string();
    assert!(err.contains(&diff), "{err}");
}

#[test]
fn oci_archives_from_newer_docker_keep_their_manifests() {
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layout = dir.path().join("layout");
    store.export_oci_layout(&image, &layout, "1").unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for name in ["oci-layout", "index.json"] {
        files.push((name.to_owned(), fs::read(layout.join(name)).unwrap()));
    }
    for d in image.blobs().unwrap() {
        files.push((
            format!("blobs/sha256/{}", d.hex()),
            store.read_blob(&d).unwrap(),
        ));
    }
    let manifest = serde_json::to_vec(&json!([{
        "Config": format!("blobs/sha256/{}", image.config_digest.hex()),
        "RepoTags": ["kiln/oci:1"],
        "Layers": [format!("blobs/sha256/{}", kiln_image::image::descriptor_digest(&image.layers()[0]).unwrap().hex())],
    }]))
    .unwrap();
    files.push(("manifest.json".to_owned(), manifest));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let archive = archive_of(&refs, &[]);

    let (_d2, other) = common::store();
    let imported = other.import_docker_archive(&archive[..]).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].0.as_deref(), Some("kiln/oci:1"));
    assert_eq!(imported[0].1.digest, image.digest);

    // A blob whose name is not its digest is refused by that name.
    let mut tampered = files.clone();
    let config_path = format!("blobs/sha256/{}", image.config_digest.hex());
    for (p, b) in &mut tampered {
        if *p == config_path {
            b.push(b' ');
        }
    }
    let refs: Vec<(&str, &[u8])> = tampered
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (_d3, third) = common::store();
    let err = third
        .import_docker_archive(&archive_of(&refs, &[])[..])
        .unwrap_err();
    assert!(
        err.to_string().contains(&image.config_digest.to_string()),
        "{err}"
    );
    assert!(third.names().unwrap().is_empty());
}

#[test]
fn garbage_is_not_a_docker_archive() {
    let (_dir, store) = common::store();
    let err = store
        .import_docker_archive(&archive_of(&[("hello", b"x")], &[])[..])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a docker archive") && err.contains("docker save"),
        "{err}"
    );
    assert!(store.import_docker_archive(&b"\x00garbage"[..]).is_err());
}

#[test]
fn exporting_a_corrupt_image_names_the_blob() {
    let (dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layer = kiln_image::image::descriptor_digest(&image.layers()[0]).unwrap();
    let path = store.blob_path(&layer);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff; // the gzip trailer: decodes, but hashes wrong
    fs::write(&path, bytes).unwrap();
    let err = store
        .export_oci_layout(&image, &dir.path().join("out"), "web")
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Corrupt { .. }) && err.to_string().contains(&layer.to_string()),
        "{err}"
    );
    let err = store
        .export_docker_archive(&image, "web:1", Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
}
