//! The `.deb` reader's fuzz invariants on the stable toolchain: every seed
//! of `fuzz/seeds/deb_unpack/` (committed) and every file of
//! `fuzz/corpus/deb_unpack/` (after a local `scripts/fuzz deb_unpack` run,
//! ignored by git) goes through the checks the fuzzer makes.

mod invariants_deb;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use replay::root;

const TARGET: replay::Target = ("deb_unpack", invariants_deb::deb_unpack);

#[test]
fn seed_corpus_keeps_the_deb_invariants() {
    replay::seeds(&[TARGET], 10);
}

#[test]
fn the_valid_seeds_are_accepted() {
    // Guards the invariants themselves: without accepted inputs the checks
    // of what is accepted would never run.
    let dir = root().join("fuzz/seeds/deb_unpack");
    let unpack = |name: &str| {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        kiln_image::debian::deb::unpack(&bytes[..], tmp.path())
    };
    for name in [
        "valid_xz.deb",
        "valid_gzip.deb",
        "valid_zstd.deb",
        "valid_none.deb",
        "devices.deb",
    ] {
        let m = unpack(name).unwrap_or_else(|e| panic!("{name}: {e}"));
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
        assert!(unpack(name).is_err(), "{name} was accepted");
    }
}

#[test]
fn local_fuzz_corpus_keeps_the_deb_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    replay::corpus(&[TARGET]);
}
