//! The Debian parsers' fuzz invariants on the stable toolchain: every seed
//! of `fuzz/seeds/{debian_control,kiln_lock}/` (committed) and every file of
//! `fuzz/corpus/<target>/` (after a local `scripts/fuzz` run) is replayed
//! through the checks the fuzzer makes (`invariants_debian/mod.rs`).

mod invariants_debian;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::Path;

use replay::root;

const TARGETS: [replay::Target; 2] = [
    ("debian_control", invariants_debian::debian_control),
    ("kiln_lock", invariants_debian::kiln_lock),
];

#[test]
fn debian_seed_corpus_keeps_the_fuzz_invariants() {
    replay::seeds(&TARGETS, 1);
}

#[test]
fn local_debian_fuzz_corpus_keeps_the_fuzz_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    replay::corpus(&TARGETS);
}

/// Guards the invariants themselves: the seeds must reach the `Ok`
/// branches (accepted packages, a resolved closure, an accepted lock).
#[test]
fn the_valid_seeds_are_accepted() {
    let seeds = root().join("fuzz/seeds");
    let packages = std::fs::read_to_string(seeds.join("debian_control/packages_valid")).unwrap();
    let entries = kiln_image::debian::control::parse_packages(&packages).unwrap();
    let mut index = kiln_image::debian::resolve::Index::new("amd64");
    index.add(entries).unwrap();
    let closure = index.resolve("fuzz", &["postgresql-15".into()]).unwrap();
    assert!(closure.len() >= 3, "{closure:?}");
    let lock = std::fs::read_to_string(seeds.join("kiln_lock/valid")).unwrap();
    let lock = kiln_image::debian::Lock::parse(&lock, Path::new("kiln.lock")).unwrap();
    assert!(!lock.images.is_empty());
}
