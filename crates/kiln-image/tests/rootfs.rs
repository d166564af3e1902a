//! Materialising images: once per digest, shared, complete or absent.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use kiln_image::ImageError;
use kiln_image::image::descriptor_digest;
use tar::EntryType as T;

#[test]
fn an_image_unpacks_with_its_files_modes_and_links() {
    let (_dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let first = store.materialise(&image).unwrap();
    assert_eq!(first.path, store.rootfs_dir().join(image.digest.hex()));
    let report = first.report.expect("the first call unpacks");
    assert_eq!(report.layers, 1);
    let root = first.path;
    assert_eq!(
        fs::read(root.join("app/hello.txt")).unwrap(),
        b"hello from kiln\n"
    );
    assert_eq!(
        fs::read_link(root.join("app/link")).unwrap().to_str(),
        Some("hello.txt")
    );
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("app/run.sh"), 0o755);
    assert_eq!(mode("app/data"), 0o750);
    assert_eq!(mode("app/data/secret"), 0o600);
    assert_eq!(mode("tmp"), 0o1777);
    let mtime = fs::metadata(root.join("app/hello.txt"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
    );
    assert_eq!(
        fs::metadata(store.rootfs_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let again = store.materialise(&image).unwrap();
    assert!(again.report.is_none(), "a second call must reuse the root");
}

#[test]
fn layers_apply_in_order_with_whiteouts() {
    let (_dir, store) = common::store();
    let e = |p: &str, k, d: &[u8]| {
        (
            p.to_owned(),
            k,
            if k == T::Directory { 0o755 } else { 0o644 },
            d.to_vec(),
        )
    };
    let base = common::tar_of(&[
        e("etc/", T::Directory, b""),
        e("etc/a", T::Regular, b"1"),
        e("etc/b", T::Regular, b"2"),
        e("var/", T::Directory, b""),
        e("var/log", T::Regular, b"3"),
    ]);
    let top = common::tar_of(&[
        e("etc/.wh.a", T::Regular, b""),
        e("var/.wh..wh..opq", T::Regular, b""),
        e("var/new", T::Regular, b"4"),
        e("etc/b", T::Regular, b"22"),
    ]);
    let image = common::put_image(&store, "layered", &[base, top]);
    let root = store.rootfs(&image).unwrap();
    assert_eq!(common::listing(&root), ["etc", "etc/b", "var", "var/new"]);
    assert_eq!(fs::read(root.join("etc/b")).unwrap(), b"22");
}

#[test]
fn concurrent_callers_share_one_unpack() {
    let (dir, store) = common::store();
    let image = Arc::new(common::test_image(&store, "web"));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let image = Arc::clone(&image);
            // A separate handle per thread, as separate processes would have.
            let store = kiln_image::Store::open(&dir.path().join("store")).unwrap();
            std::thread::spawn(move || store.materialise(&image).unwrap())
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.report.is_some()).count(),
        1,
        "unpacked more than once"
    );
    assert!(results.iter().all(|r| r.path == results[0].path));
    let names: Vec<String> = fs::read_dir(store.rootfs_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}"); // the root and its lock file
    assert_eq!(
        common::tree(&results[0].path)["app/hello.txt"].2,
        b"hello from kiln\n"
    );
}

#[test]
fn a_corrupt_layer_is_refused_by_digest_and_the_partial_root_removed() {
    let (_dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let layer = descriptor_digest(&image.layers()[0]).unwrap();
    let path = store.blob_path(&layer);
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&path, bytes).unwrap();
    let err = store.rootfs(&image).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&layer.to_string()));
    assert!(!store.rootfs_dir().join(image.digest.hex()).exists());
    assert!(
        !store
            .rootfs_dir()
            .join(format!("{}.partial", image.digest.hex()))
            .exists()
    );
}

#[test]
fn a_stale_partial_root_from_a_crash_is_replaced() {
    let (_dir, store) = common::store();
    let image = common::test_image(&store, "web");
    let partial = store
        .rootfs_dir()
        .join(format!("{}.partial", image.digest.hex()));
    fs::create_dir_all(partial.join("half/done")).unwrap();
    fs::set_permissions(partial.join("half"), fs::Permissions::from_mode(0o500)).unwrap();
    let root = store.rootfs(&image).unwrap();
    assert!(!root.join("half").exists() && !partial.exists());
}

#[test]
fn zstd_layers_are_refused_clearly() {
    let (_dir, store) = common::store();
    let zstd = [0x28u8, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
    let digest = store.put_blob(&zstd).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[digest.to_string()]}})).unwrap();
    let config_digest = store.put_blob(&config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType":"application/vnd.oci.image.config.v1+json","digest":config_digest.to_string(),"size":config.len()},
        "layers": [{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":digest.to_string(),"size":zstd.len()}],
    }))
    .unwrap();
    let image = store
        .load_image(&store.put_blob(&manifest).unwrap())
        .unwrap();
    let err = store.rootfs(&image).unwrap_err();
    assert!(
        matches!(err, ImageError::Unsupported(_)) && err.to_string().contains("zstd"),
        "{err}"
    );
}
