//! What must hold for *every* input of the `.deb` reader.
//!
//! One copy, used twice: by the cargo-fuzz target `deb_unpack`
//! (`fuzz/fuzz_targets/`, through `#[path]`) and by `tests/deb_fuzz_corpus.rs`,
//! which replays the seeds on the stable toolchain. Each check panics with a
//! message naming the problem.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use kiln_image::Digest;
use kiln_image::debian::deb::{self, DebEntryKind};

/// Arbitrary bytes as a `.deb` unpacked into a fresh directory: no panic;
/// only numbered plain files are written, under `files/`, none setuid;
/// and what is accepted is consistent: normalised unique paths, nothing
/// under a non-directory, hard links to earlier files, file entries whose
/// blob has the recorded size and digest, a control stanza naming the
/// package.
pub fn deb_unpack(data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let result = deb::unpack(data, dir.path());
    check_written(dir.path());
    let control = deb::read_control_of(data);
    let Ok(m) = result else {
        return;
    };
    assert_eq!(
        control.as_ref().ok(),
        Some(&m.control),
        "the control-only reader disagrees with the full one"
    );
    assert!(!m.control.package.is_empty() && !m.control.version.is_empty());
    let mut kinds: BTreeMap<&str, &DebEntryKind> = BTreeMap::new();
    for e in &m.entries {
        assert!(
            !e.path.is_empty()
                && !e.path.starts_with('/')
                && !e.path.ends_with('/')
                && e.path
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
            "accepted path `{}`",
            e.path
        );
        assert!(e.mode <= 0o7777, "mode {:o}", e.mode);
        let mut parent = e.path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            if let Some(k) = kinds.get(p) {
                assert_eq!(
                    **k,
                    DebEntryKind::Dir,
                    "{} is under non-directory {p}",
                    e.path
                );
            }
            parent = p;
        }
        match &e.kind {
            DebEntryKind::File { size, sha256, blob } => {
                let bytes = fs::read(dir.path().join("files").join(blob.to_string()))
                    .expect("a file entry has its blob");
                assert_eq!(bytes.len() as u64, *size);
                assert_eq!(&Digest::of(&bytes), sha256);
            }
            DebEntryKind::HardLink { target } => {
                assert!(
                    matches!(kinds.get(target.as_str()), Some(DebEntryKind::File { .. })),
                    "hard link {} to {target}, not an earlier file",
                    e.path
                );
            }
            DebEntryKind::Symlink { target } => assert!(!target.is_empty()),
            DebEntryKind::Dir => {}
        }
        assert!(
            kinds.insert(&e.path, &e.kind).is_none(),
            "{} accepted twice",
            e.path
        );
    }
}

fn check_written(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.file_name(), "files", "unpack wrote {:?}", e.path());
        assert!(e.file_type().unwrap().is_dir());
    }
    let files = dir.join("files");
    let Ok(entries) = fs::read_dir(&files) else {
        return;
    };
    for e in entries {
        let e = e.unwrap();
        let meta = fs::symlink_metadata(e.path()).unwrap();
        assert!(meta.is_file(), "unpack made a non-file {:?}", e.path());
        assert!(
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u64>().is_ok()),
            "unpack wrote {:?}",
            e.path()
        );
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7000,
            0,
            "a setuid/setgid/sticky file on the host"
        );
    }
}
