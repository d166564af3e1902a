//! The image crate's fuzz invariants on the stable toolchain: every seed of
//! `fuzz/seeds/<target>/` (committed) and every file of
//! `fuzz/corpus/<target>/` (present after a local `scripts/fuzz` run,
//! ignored by git) is replayed through the checks the fuzzer makes
//! (`invariants/mod.rs`, `invariants_registry/mod.rs`).

mod invariants;
mod invariants_registry;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::Path;

use replay::root;

const TARGETS: [replay::Target; 4] = [
    ("image_json", invariants::image_json),
    ("layer_unpack", invariants::layer_unpack),
    ("registry_reference", |b| {
        invariants_registry::registry_reference(&String::from_utf8_lossy(b))
    }),
    ("minisig_parse", invariants_registry::minisig_parse),
];

#[test]
fn seed_corpus_keeps_the_fuzz_invariants() {
    replay::seeds(&TARGETS, 1);
}

#[test]
fn local_fuzz_corpus_keeps_the_fuzz_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    replay::corpus(&TARGETS);
}

#[test]
fn the_valid_signature_seed_is_accepted() {
    // Guards the invariants themselves: without an accepted input the
    // `Ok` branch would never be checked.
    let valid = std::fs::read(root().join("fuzz/seeds/minisig_parse/valid")).unwrap();
    let key =
        kiln_image::sign::parse_public_key(invariants_registry::PUBLIC_KEY, Path::new("fuzz.pub"))
            .unwrap();
    let digest = kiln_image::Digest::of(invariants_registry::MANIFEST);
    let by = kiln_image::sign::verify_bytes(invariants_registry::MANIFEST, &digest, &valid, &[key])
        .unwrap();
    assert_eq!(by.key_id, invariants_registry::KEY_ID);
}
