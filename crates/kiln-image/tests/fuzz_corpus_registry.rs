//! The `registry_reference` and `minisig_parse` fuzz invariants on the
//! stable toolchain: every seed of `fuzz/seeds/<target>/` (committed) and
//! every file of `fuzz/corpus/<target>/` (present after a local
//! `scripts/fuzz` run) is replayed through the checks the fuzzer makes
//! (`invariants_registry/mod.rs`).

mod invariants_registry;

use std::path::{Path, PathBuf};

const TARGETS: [&str; 2] = ["registry_reference", "minisig_parse"];

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
    let result = std::panic::catch_unwind(|| match target {
        "registry_reference" => {
            invariants_registry::registry_reference(&String::from_utf8_lossy(&bytes))
        }
        "minisig_parse" => invariants_registry::minisig_parse(&bytes),
        other => panic!("no fuzz target `{other}`"),
    });
    if let Err(panic) = result {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{target} fails on {}: {why}", path.display());
    }
}

#[test]
fn seed_corpus_keeps_the_fuzz_invariants() {
    for target in TARGETS {
        let seeds = files_in(&root().join("fuzz/seeds").join(target));
        assert!(!seeds.is_empty(), "fuzz/seeds/{target}/ has no seeds");
        for path in seeds {
            replay(target, &path);
        }
    }
}

#[test]
fn the_valid_seed_is_accepted() {
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

#[test]
fn local_fuzz_corpus_keeps_the_fuzz_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    let mut n = 0;
    for target in TARGETS {
        for path in files_in(&root().join("fuzz/corpus").join(target)) {
            replay(target, &path);
            n += 1;
        }
    }
    eprintln!("replayed {n} inputs from fuzz/corpus");
}
