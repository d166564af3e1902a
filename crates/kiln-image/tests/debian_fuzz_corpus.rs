//! The Debian parsers' fuzz invariants on the stable toolchain: every seed
//! of `fuzz/seeds/{debian_control,kiln_lock}/` (committed) and every file of
//! `fuzz/corpus/<target>/` (after a local `scripts/fuzz` run) is replayed
//! through the checks the fuzzer makes (`invariants_debian/mod.rs`).

mod invariants_debian;

use std::path::{Path, PathBuf};

const TARGETS: [&str; 2] = ["debian_control", "kiln_lock"];

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
        "debian_control" => invariants_debian::debian_control,
        "kiln_lock" => invariants_debian::kiln_lock,
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
fn debian_seed_corpus_keeps_the_fuzz_invariants() {
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
fn local_debian_fuzz_corpus_keeps_the_fuzz_invariants() {
    // Only there after fuzzing on this machine; CI replays the seeds above.
    let n = replay_dirs(&root().join("fuzz/corpus"));
    eprintln!("replayed {n} inputs from fuzz/corpus");
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
