//! What must hold for *every* input of kiln-image's parsers of untrusted
//! data: image JSON documents and layer tars.
//!
//! One copy, used twice: by the cargo-fuzz targets `image_json` and
//! `layer_unpack` (`fuzz/fuzz_targets/`, through `#[path]`) and by
//! `tests/fuzz_corpus.rs`, which replays the seed corpus on the stable
//! toolchain. Each check panics with a message naming the problem; a panic
//! is what the fuzzer reports as a crash.

#![allow(dead_code)] // each user calls a subset

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_image::Digest;
use kiln_image::image::descriptor_digest;
use kiln_image::layout::{Document, parse_document};
use kiln_image::unpack::apply_layer;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

const MEDIA_TYPES: [Option<&str>; 5] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/vnd.oci.image.layer.v1.tar"),
];

/// Manifest, index and config parsing: never panics, is deterministic, and
/// whatever `parse_document` accepts has only sha256 descriptors.
pub fn image_json(data: &[u8]) {
    for media_type in MEDIA_TYPES {
        let first = parse_document(data, media_type);
        let again = parse_document(data, media_type);
        assert_eq!(
            first.is_ok(),
            again.is_ok(),
            "parse_document is not deterministic"
        );
        match first {
            Ok(Document::Manifest(m)) => {
                assert!(
                    descriptor_digest(m.config()).is_ok(),
                    "an accepted manifest has a bad config digest"
                );
                for layer in m.layers() {
                    assert!(
                        descriptor_digest(layer).is_ok(),
                        "an accepted manifest has a bad layer digest"
                    );
                }
            }
            Ok(Document::Index(i)) => {
                for d in i.manifests() {
                    assert!(
                        descriptor_digest(d).is_ok(),
                        "an accepted index has a bad digest"
                    );
                }
            }
            Err(why) => assert!(!why.is_empty(), "an empty refusal"),
        }
    }
    // The raw oci-spec types kiln reads blobs into.
    if let Ok(m) = serde_json::from_slice::<ImageManifest>(data) {
        let _ = descriptor_digest(m.config());
        m.layers().iter().for_each(|l| drop(descriptor_digest(l)));
    }
    if let Ok(i) = serde_json::from_slice::<ImageIndex>(data) {
        i.manifests()
            .iter()
            .for_each(|d| drop(descriptor_digest(d)));
    }
    if let Ok(c) = serde_json::from_slice::<ImageConfiguration>(data) {
        for diff_id in c.rootfs().diff_ids() {
            if let Ok(d) = diff_id.parse::<Digest>() {
                assert_eq!(
                    &d.to_string(),
                    diff_id,
                    "a digest does not print back to itself"
                );
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = text.parse::<Digest>() {
        assert_eq!(
            d.to_string(),
            text,
            "a digest does not print back to itself"
        );
    }
}

/// A layer unpack: never panics, writes nothing outside the root (checked
/// by unpacking into `tmp/root` and finding `tmp/` holds only `root/`), and
/// leaves no device node or FIFO in it.
pub fn layer_unpack(data: &[u8]) {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let root = tmp.path().join("root");
    fs::create_dir(&root).expect("create root");
    let result = apply_layer(&root, data);
    let names: Vec<String> = fs::read_dir(tmp.path())
        .expect("list tmp")
        .map(|e| {
            e.expect("list tmp")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        ["root"],
        "the unpack wrote outside its root ({result:?})"
    );
    assert!(
        fs::symlink_metadata(&root).is_ok_and(|m| m.is_dir()),
        "the root itself was replaced"
    );
    check_tree(&root);
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty());
    }
}

/// Only files, directories and symbolic links; makes every directory
/// writable again so the temporary directory can be removed.
fn check_tree(dir: &Path) {
    let meta = fs::symlink_metadata(dir).expect("inspect");
    fs::set_permissions(
        dir,
        fs::Permissions::from_mode(meta.permissions().mode() | 0o700),
    )
    .expect("chmod");
    for entry in fs::read_dir(dir).expect("list") {
        let path = entry.expect("list").path();
        let kind = fs::symlink_metadata(&path).expect("inspect").file_type();
        assert!(
            kind.is_file() || kind.is_dir() || kind.is_symlink(),
            "{} is a device or FIFO",
            path.display()
        );
        if kind.is_dir() {
            check_tree(&path);
        }
    }
}
