//! The `.deb` reader's fuzz invariants on the stable toolchain: every seed
//! of `fuzz/seeds/deb_unpack/` (committed) and every file of
//! `fuzz/corpus/deb_unpack/` (after a local `scripts/fuzz deb_unpack` run,
//! ignored by git) goes through the checks the fuzzer makes.

mod invariants_deb;

use std::path::{Path, PathBuf};

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(dir: &Path) -> usize {
    let files = files_in(dir);
    for path in &files {
        // A fuzzer running meanwhile replaces corpus files.
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        if let Err(panic) = std::panic::catch_unwind(|| invariants_deb::deb_unpack(&bytes)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("deb_unpack fails on {}: {why}", path.display());
        }
    }
    files.len()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn seed_corpus_keeps_the_deb_invariants() {
    let n = replay(&root().join("fuzz/seeds/deb_unpack"));
    assert!(n >= 10, "fuzz/seeds/deb_unpack/ has {n} seeds");
}

#[test]
fn the_valid_seeds_are_accepted() {
    // Guards the invariants themselves: without accepted inputs the checks
    // of what is accepted would never run.
    let dir = root().join("fuzz/seeds/deb_unpack");
    for name in [
        "valid_xz.deb",
        "valid_gzip.deb",
        "valid_zstd.deb",
        "valid_none.deb",
        "devices.deb",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let m = kiln_image::debian::deb::unpack(&bytes[..], tmp.path())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!m.entries.is_empty(), "{name}");
    }
    for name in [
        "dotdot.deb",
        "absolute.deb",
        "under_symlink.deb",
        "hardlink_out.deb",
        "huge_member.deb",
        "truncated.deb",
        "wrong_magic.deb",
        "bz2.deb",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        assert!(
            kiln_image::debian::deb::unpack(&bytes[..], tmp.path()).is_err(),
            "{name} was accepted"
        );
    }
}

#[test]
fn local_fuzz_corpus_keeps_the_deb_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    let n = replay(&root().join("fuzz/corpus/deb_unpack"));
    eprintln!("replayed {n} inputs from fuzz/corpus/deb_unpack");
}
