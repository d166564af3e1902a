//! Hostile layers, built byte by byte (the `tar` crate refuses to write most
//! of them): each is unpacked into `tmp/root`, and nothing outside `root`
//! may change; each refusal or skip must say what and why.

mod common;

use std::fs;
use std::path::Path;

use kiln_image::ImageError;
use kiln_image::unpack::{MAX_ENTRY_SIZE, UnpackReport, apply_layer};
use tar::EntryType as T;

struct Raw<'a> {
    name: &'a [u8],
    kind: T,
    link: &'a [u8],
    data: &'a [u8],
    declared: Option<u64>,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        name: name.as_bytes(),
        kind: T::Regular,
        link: b"",
        data,
        declared: None,
    }
}

fn link<'a>(name: &'a str, kind: T, target: &'a str) -> Raw<'a> {
    Raw {
        name: name.as_bytes(),
        kind,
        link: target.as_bytes(),
        data: b"",
        declared: None,
    }
}

/// A tar written without any of the tar crate's path checks.
fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..e.name.len()].copy_from_slice(e.name);
        gnu.linkname[..e.link.len()].copy_from_slice(e.link);
        h.set_entry_type(e.kind);
        h.set_mode(if e.kind.is_dir() { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(e.declared.unwrap_or(e.data.len() as u64));
        if matches!(e.kind, T::Char | T::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(e.data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    if entries.iter().all(|e| e.declared.is_none()) {
        out.extend_from_slice(&[0; 1024]);
    }
    out
}

/// `tmp/` with `root/` (the target) and `outside/` holding one probe file.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("root")).unwrap();
        fs::create_dir(tmp.path().join("outside")).unwrap();
        fs::write(tmp.path().join("outside/target"), b"untouched").unwrap();
        Sandbox { tmp }
    }

    fn root(&self) -> std::path::PathBuf {
        self.tmp.path().join("root")
    }

    fn outside(&self) -> String {
        self.tmp.path().join("outside").display().to_string()
    }

    /// Unpacks and checks that nothing but `root/` changed in `tmp/`.
    fn unpack(&self, entries: &[Raw]) -> Result<UnpackReport, ImageError> {
        let result = apply_layer(&self.root(), &raw_tar(entries)[..]);
        let outside: Vec<String> = common::listing(self.tmp.path())
            .into_iter()
            .filter(|p| !p.starts_with("root/") && p != "root")
            .collect();
        assert_eq!(
            outside,
            ["outside", "outside/target"],
            "something was written outside the root"
        );
        let target = self.tmp.path().join("outside/target");
        assert_eq!(fs::read(&target).unwrap(), b"untouched");
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&fs::metadata(&target).unwrap()),
            1,
            "outside/target was hard-linked"
        );
        result
    }
}

fn refused(result: Result<UnpackReport, ImageError>, entry: &str, why: &str) {
    match result {
        Err(e @ ImageError::UnsafeEntry { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("`{entry}`")) && msg.contains(why),
                "unclear refusal: {msg}"
            );
        }
        other => panic!("entry {entry} was not refused: {other:?}"),
    }
}

#[test]
fn parent_components_are_refused() {
    let sb = Sandbox::new();
    refused(sb.unpack(&[file("../escape", b"x")]), "../escape", "`..`");
    refused(
        sb.unpack(&[file("a/../../outside/target", b"x")]),
        "a/../../outside/target",
        "`..`",
    );
    assert!(!sb.tmp.path().join("escape").exists());
}

#[test]
fn absolute_paths_land_inside_the_root() {
    let sb = Sandbox::new();
    let probe = format!("/etc/kiln-hostile-{}", std::process::id());
    let abs_outside = format!("{}/new", sb.outside());
    sb.unpack(&[file(&probe, b"x"), file(&abs_outside, b"y")])
        .unwrap();
    assert!(!Path::new(&probe).exists());
    assert_eq!(
        fs::read(sb.root().join(probe.trim_start_matches('/'))).unwrap(),
        b"x"
    );
    assert_eq!(
        fs::read(sb.root().join(abs_outside.trim_start_matches('/'))).unwrap(),
        b"y"
    );
}

#[test]
fn a_file_through_a_symlink_to_etc_is_refused() {
    let sb = Sandbox::new();
    let probe = format!("kiln-hostile-{}", std::process::id());
    refused(
        sb.unpack(&[
            link("etc", T::Symlink, "/etc"),
            file(&format!("etc/{probe}"), b"x"),
        ]),
        &format!("etc/{probe}"),
        "symbolic link",
    );
    assert!(!Path::new("/etc").join(&probe).exists());
    let outside = sb.outside();
    refused(
        sb.unpack(&[
            link("out", T::Symlink, &outside),
            file("out/target", b"owned"),
        ]),
        "out/target",
        "symbolic link",
    );
}

#[test]
fn symlink_chains_that_escape_are_never_followed() {
    let sb = Sandbox::new();
    refused(
        sb.unpack(&[
            link("a", T::Symlink, "b"),
            link("b", T::Symlink, "c/../.."),
            link("c", T::Symlink, "../outside"),
            file("a/outside/target", b"owned"),
        ]),
        "a/outside/target",
        "symbolic link",
    );
    // The links themselves are stored as they are.
    assert_eq!(
        fs::read_link(sb.root().join("b")).unwrap(),
        Path::new("c/../..")
    );
}

#[test]
fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
    let sb = Sandbox::new();
    let target = format!("{}/target", sb.outside());
    sb.unpack(&[link("f", T::Symlink, &target), file("f", b"mine")])
        .unwrap();
    assert_eq!(fs::read(sb.root().join("f")).unwrap(), b"mine");
    assert!(
        !fs::symlink_metadata(sb.root().join("f"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn hard_links_must_stay_inside_the_root() {
    let sb = Sandbox::new();
    refused(
        sb.unpack(&[link("pw", T::Link, "/etc/passwd")]),
        "pw",
        "not in the image",
    );
    assert!(!sb.root().join("pw").exists());
    refused(
        sb.unpack(&[link("t", T::Link, "../outside/target")]),
        "t",
        "`..`",
    );
    let outside = format!("{}/target", sb.outside());
    refused(
        sb.unpack(&[link("t", T::Link, &outside)]),
        "t",
        "not in the image",
    );
    // Through a symlinked parent: refused, not followed.
    refused(
        sb.unpack(&[
            link("o", T::Symlink, &sb.outside()),
            link("t", T::Link, "o/target"),
        ]),
        "t",
        "symbolic link",
    );
    // A hard link to a symlink links the symlink, never its target; writing
    // the link's name later replaces it.
    sb.unpack(&[
        link("s", T::Symlink, &outside),
        link("h", T::Link, "s"),
        file("h", b"mine"),
    ])
    .unwrap();
    assert_eq!(
        fs::read_link(sb.root().join("s")).unwrap(),
        Path::new(&outside)
    );
}

#[test]
fn device_nodes_and_fifos_are_skipped_and_counted() {
    let sb = Sandbox::new();
    let report = sb
        .unpack(&[
            link("dev/null", T::Char, ""),
            link("dev/sda", T::Block, ""),
            link("run/fifo", T::Fifo, ""),
            file("ok", b"1"),
        ])
        .unwrap();
    assert_eq!(report.skipped_devices, 3);
    assert!(!sb.root().join("dev/null").exists() && !sb.root().join("run/fifo").exists());
    assert!(
        report.warnings()[0].contains("3 device node(s) or FIFO(s)"),
        "{:?}",
        report.warnings()
    );
}

#[test]
fn absurd_or_lying_sizes_are_refused_gracefully() {
    let sb = Sandbox::new();
    let huge = Raw {
        declared: Some(MAX_ENTRY_SIZE + 1),
        ..file("huge", b"")
    };
    refused(sb.unpack(&[huge]), "huge", "limit");
    let short = Raw {
        declared: Some(1 << 39),
        ..file("short", b"only this")
    };
    match sb.unpack(&[short]) {
        Err(e @ ImageError::BadArchive { .. }) => assert!(e.to_string().contains("short"), "{e}"),
        other => panic!("a short entry was accepted: {other:?}"),
    }
}

#[test]
fn whiteouts_cannot_delete_outside() {
    let sb = Sandbox::new();
    refused(sb.unpack(&[file(".wh...", b"")]), ".wh...", "names no file");
    refused(
        sb.unpack(&[file("../outside/.wh.target", b"")]),
        "../outside/.wh.target",
        "`..`",
    );
    let outside = sb.outside();
    refused(
        sb.unpack(&[link("o", T::Symlink, &outside), file("o/.wh.target", b"")]),
        "o/.wh.target",
        "symbolic link",
    );
    refused(
        sb.unpack(&[link("p", T::Symlink, &outside), file("p/.wh..wh..opq", b"")]),
        "p/.wh..wh..opq",
        "symbolic link",
    );
    // A whiteout of a symlink (in a lower layer) removes the link, not what
    // it points at.
    sb.unpack(&[link("q", T::Symlink, &outside)]).unwrap();
    sb.unpack(&[file(".wh.q", b"")]).unwrap();
    assert!(fs::symlink_metadata(sb.root().join("q")).is_err());
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let sb = Sandbox::new();
    for bytes in [
        &b"not a tar at all"[..],
        &[0x1f, 0x8b, 0, 0][..],
        &[0x28, 0xb5, 0x2f, 0xfd][..],
        &[0xff; 1024][..],
    ] {
        assert!(apply_layer(&sb.root(), bytes).is_err() || common::listing(&sb.root()).is_empty());
    }
}

#[test]
fn a_hostile_image_leaves_no_root_behind() {
    let (_dir, store) = common::store();
    let layer = raw_tar(&[
        file("ok", b"1"),
        link("etc", T::Symlink, "/etc"),
        file("etc/evil", b"x"),
    ]);
    let image = common::put_image(&store, "hostile", &[layer]);
    let err = store.rootfs(&image).unwrap_err();
    assert!(err.to_string().contains("etc/evil"), "{err}");
    let left: Vec<_> = fs::read_dir(store.rootfs_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
