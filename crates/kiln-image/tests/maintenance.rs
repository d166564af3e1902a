//! `verify_all` and `gc`: damage is found by name, and gc never removes a
//! reachable blob (a property test over random stores).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, SystemTime};

use kiln_image::image::descriptor_digest;
use kiln_image::verify::ProblemKind;
use kiln_image::{Digest, Store};
use proptest::prelude::*;
use serde_json::json;

#[test]
fn verify_finds_corrupt_missing_and_stray_blobs() {
    let (_dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let other = common::put_image(
        &store,
        "other",
        &[common::tar_of(&common::layer_entries(false))],
    );
    let clean = store.verify_all().unwrap();
    assert!(clean.ok(), "{clean:?}");
    assert_eq!(clean.images, 2);
    assert_eq!(clean.blobs, 6);
    assert!(clean.bytes > 0 && clean.bytes_per_sec() > 0.0);

    let layer = descriptor_digest(&image.layers()[0]).unwrap();
    let mut bytes = fs::read(store.blob_path(&layer)).unwrap();
    bytes[100] ^= 1;
    fs::write(store.blob_path(&layer), bytes).unwrap();
    fs::remove_file(store.blob_path(&other.config_digest)).unwrap();
    fs::write(store.root().join("blobs/sha256/not-a-digest"), b"?").unwrap();

    let report = store.verify_all().unwrap();
    assert!(!report.ok());
    assert_eq!(report.corrupt, [(layer.clone(), store.blob_path(&layer))]);
    assert_eq!(
        report.stray,
        [store.root().join("blobs/sha256/not-a-digest")]
    );
    let problems: Vec<(String, Digest, ProblemKind)> = report
        .problems
        .iter()
        .map(|p| (p.image.clone(), p.blob.clone(), p.kind.clone()))
        .collect();
    assert!(
        problems.contains(&("web".into(), layer.clone(), ProblemKind::Corrupt)),
        "{problems:?}"
    );
    assert!(
        problems.contains(&(
            "other".into(),
            other.config_digest.clone(),
            ProblemKind::Missing
        )),
        "{problems:?}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.to_string().contains(&layer.to_string()))
    );
}

fn age(store: &Store) {
    let old = SystemTime::now() - Duration::from_secs(3600);
    for d in store.blobs().unwrap() {
        fs::File::options()
            .write(true)
            .open(store.blob_path(&d))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
}

#[test]
fn gc_sweeps_unreachable_blobs_and_roots_but_keeps_the_rest() {
    let (_dir, store) = common::store();
    let kept = common::test_image(&store, "kept");
    let rooted = common::put_image(
        &store,
        "rooted",
        &[common::tar_of(&common::layer_entries(false))],
    );
    let dropped = common::put_image(
        &store,
        "dropped",
        &[common::tar_of(&common::layer_entries(false)[..3])],
    );
    for image in [&kept, &rooted, &dropped] {
        store.rootfs(image).unwrap();
    }
    store.untag("rooted").unwrap();
    store.untag("dropped").unwrap();
    let stray = store.put_blob(b"nobody needs me").unwrap();
    age(&store);
    let fresh = store.put_blob(b"written during gc").unwrap();
    fs::create_dir_all(store.kiln_dir().join("signatures")).unwrap();
    fs::write(
        store
            .kiln_dir()
            .join("signatures")
            .join(format!("{}.sig", dropped.digest.hex())),
        b"sig",
    )
    .unwrap();

    let dry = store
        .gc(std::slice::from_ref(&rooted.digest), true)
        .unwrap();
    assert!(dry.dry_run && !dry.removed_blobs.is_empty());
    assert!(store.has_blob(&stray), "a dry run removed something");

    let report = store
        .gc(std::slice::from_ref(&rooted.digest), false)
        .unwrap();
    assert_eq!(report.removed_blobs, dry.removed_blobs);
    assert!(
        report.removed_blobs.contains(&stray) && report.removed_blobs.contains(&dropped.digest)
    );
    assert!(
        store.has_blob(&fresh),
        "a blob newer than the gc was removed"
    );
    for image in [&kept, &rooted] {
        for blob in image.blobs().unwrap() {
            assert!(store.has_blob(&blob), "reachable {blob} removed");
        }
        assert!(store.rootfs_dir().join(image.digest.hex()).is_dir());
    }
    assert_eq!(
        report.removed_rootfs,
        [store.rootfs_dir().join(dropped.digest.hex())]
    );
    assert!(!store.rootfs_dir().join(dropped.digest.hex()).exists());
    assert_eq!(report.orphan_signatures.len(), 1);
    assert!(store.verify_all().unwrap().ok());
    store.rootfs(&kept).unwrap();
}

#[test]
fn gc_stops_without_removing_anything_when_an_image_is_unreadable() {
    let (_dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let stray = store.put_blob(b"garbage").unwrap();
    age(&store);
    fs::write(store.blob_path(&image.digest), b"{ corrupted").unwrap();
    let err = store.gc(&[], false).unwrap_err().to_string();
    assert!(
        err.contains("nothing was removed") && err.contains(&image.digest.to_string()),
        "{err}"
    );
    assert!(store.has_blob(&stray));
}

/// A random store: blobs, manifests over some of them, indexes over some
/// manifests; some tagged, some given as roots.
#[derive(Debug, Clone)]
struct Shape {
    blobs: usize,
    manifests: Vec<(usize, Vec<usize>)>,
    indexes: Vec<Vec<usize>>,
    tagged: Vec<usize>,
    roots: Vec<usize>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (2usize..8).prop_flat_map(|blobs| {
        let manifest = (0..blobs, prop::collection::vec(0..blobs, 0..4));
        (prop::collection::vec(manifest, 1..5), Just(blobs)).prop_flat_map(|(manifests, blobs)| {
            let m = manifests.len();
            let documents = m + 3;
            (
                Just(blobs),
                Just(manifests),
                prop::collection::vec(prop::collection::vec(0..m, 1..3), 0..3),
                prop::collection::vec(0..documents, 0..3),
                prop::collection::vec(0..documents + blobs, 0..3),
            )
                .prop_map(|(blobs, manifests, indexes, tagged, roots)| Shape {
                    blobs,
                    manifests,
                    indexes,
                    tagged,
                    roots,
                })
        })
    })
}

fn desc(digest: &Digest, size: usize, media_type: &str) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": digest.to_string(), "size": size })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gc_never_removes_a_reachable_blob(shape in shape()) {
        let (_dir, store) = common::store();
        let blobs: Vec<Digest> = (0..shape.blobs).map(|i| store.put_blob(format!("blob {i}").as_bytes()).unwrap()).collect();
        let mut documents = Vec::new();
        let mut edges: Vec<Vec<Digest>> = Vec::new();
        for (config, layers) in &shape.manifests {
            let m = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "config": desc(&blobs[*config], 7, "application/vnd.oci.image.config.v1+json"),
                "layers": layers.iter().map(|l| desc(&blobs[*l], 7, "application/vnd.oci.image.layer.v1.tar")).collect::<Vec<_>>(),
            })).unwrap();
            let d = store.put_blob(&m).unwrap();
            edges.push(std::iter::once(blobs[*config].clone()).chain(layers.iter().map(|l| blobs[*l].clone())).collect());
            documents.push((d, m.len()));
        }
        for members in &shape.indexes {
            let i = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "manifests": members.iter().map(|m| desc(&documents[*m].0, documents[*m].1, "application/vnd.oci.image.manifest.v1+json")).collect::<Vec<_>>(),
            })).unwrap();
            edges.push(members.iter().map(|m| documents[*m].0.clone()).collect());
            let d = store.put_blob(&i).unwrap();
            documents.push((d, i.len()));
        }
        // The model: what must stay.
        let mut must = BTreeSet::new();
        let mut todo: Vec<usize> = Vec::new();
        for t in &shape.tagged {
            if let Some((d, size)) = documents.get(*t) {
                store.tag(&format!("t{t}"), &kiln_image::store::manifest_descriptor(d, *size as u64)).unwrap();
                todo.push(*t);
            }
        }
        let mut roots = Vec::new();
        for r in &shape.roots {
            if let Some((d, _)) = documents.get(*r) {
                roots.push(d.clone());
                todo.push(*r);
            } else if let Some(b) = blobs.get(r - documents.len().min(*r)) {
                roots.push(b.clone());
                must.insert(b.clone());
            }
        }
        let mut followed = BTreeSet::new();
        while let Some(i) = todo.pop() {
            if followed.insert(i) {
                must.insert(documents[i].0.clone());
                for child in &edges[i] {
                    must.insert(child.clone());
                    if let Some(j) = documents.iter().position(|(d, _)| d == child) {
                        todo.push(j);
                    }
                }
            }
        }
        age(&store);
        let report = store.gc(&roots, false).unwrap();
        for d in &must {
            prop_assert!(store.has_blob(d), "reachable {} was removed", d);
        }
        let left: BTreeSet<Digest> = store.blobs().unwrap().into_iter().collect();
        prop_assert_eq!(&left, &must, "gc kept unreachable blobs");
        prop_assert_eq!(report.removed_blobs.len() + must.len(), shape.blobs + documents.len() - duplicates(&blobs, &documents));
    }
}

/// Documents can collide (two identical manifests): count distinct blobs.
fn duplicates(blobs: &[Digest], documents: &[(Digest, usize)]) -> usize {
    let all: Vec<&Digest> = blobs
        .iter()
        .chain(documents.iter().map(|(d, _)| d))
        .collect();
    all.len() - all.iter().collect::<BTreeSet<_>>().len()
}

/// Throughput of `verify_all` on 1 GiB of blobs (in the page cache, so this
/// measures hashing): `cargo test --release -p kiln-image --test
/// maintenance -- --ignored --nocapture verify_throughput`.
#[test]
#[ignore = "a measurement, run by hand in release mode"]
fn verify_throughput() {
    let (_dir, store) = common::store();
    let mut chunk = vec![0u8; 256 << 20];
    for i in 0..4u8 {
        chunk
            .iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (j as u8) ^ i);
        store.put_blob(&chunk).unwrap();
    }
    for _ in 0..3 {
        let report = store.verify_all().unwrap();
        assert!(report.ok());
        let gbs = report.bytes_per_sec() / 1e9;
        eprintln!(
            "verify_all: {} MiB in {:?} on {} threads: {gbs:.2} GB/s, {:.2} GB/s per thread",
            report.bytes >> 20,
            report.elapsed,
            report.threads,
            gbs / report.threads as f64
        );
    }
}
