//! The image crate's fuzz invariants on the stable toolchain: every seed of
//! `fuzz/seeds/<target>/` (committed) and every file of
//! `fuzz/corpus/<target>/` (present after a local `scripts/fuzz` run,
//! ignored by git) is replayed through the checks the fuzzer makes
//! (`invariants/mod.rs`, `invariants_registry/mod.rs`).

mod invariants;
mod invariants_registry;

use std::path::{Path, PathBuf};

const TARGETS: [&str; 4] = [
    "image_json",
    "layer_unpack",
    "registry_reference",
    "minisig_parse",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

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

fn replay(target: &str, path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let run: fn(&[u8]) = match target {
        "image_json" => invariants::image_json,
        "layer_unpack" => invariants::layer_unpack,
        "registry_reference" => {
            |b| invariants_registry::registry_reference(&String::from_utf8_lossy(b))
        }
        "minisig_parse" => invariants_registry::minisig_parse,
        other => panic!("{}: no fuzz target `{other}`", path.display()),
    };
    if let Err(panic) = std::panic::catch_unwind(|| run(&bytes)) {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{target} fails on {}: {why}", path.display());
    }
}

fn replay_dirs(base: &Path) -> usize {
    let mut n = 0;
    for target in TARGETS {
        for path in files_in(&base.join(target)) {
            replay(target, &path);
            n += 1;
        }
    }
    n
}

#[test]
fn seed_corpus_keeps_the_fuzz_invariants() {
    let seeds = root().join("fuzz/seeds");
    for target in TARGETS {
        assert!(
            !files_in(&seeds.join(target)).is_empty(),
            "fuzz/seeds/{target}/ has no seeds"
        );
    }
    replay_dirs(&seeds);
}

#[test]
fn local_fuzz_corpus_keeps_the_fuzz_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    let n = replay_dirs(&root().join("fuzz/corpus"));
    eprintln!("replayed {n} inputs from fuzz/corpus");
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
