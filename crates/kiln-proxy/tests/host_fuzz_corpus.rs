//! The `host_match` fuzz invariants on the stable toolchain: every seed of
//! `fuzz/seeds/host_match/` (committed) and every file of
//! `fuzz/corpus/host_match/` (after a local `scripts/fuzz` run) goes
//! through the checks the fuzzer makes (`invariants_host/mod.rs`).

mod invariants_host;

use std::path::{Path, PathBuf};

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_seed_and_corpus_file_keeps_the_invariants() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let seeds = files_in(&fuzz.join("seeds/host_match"));
    assert!(
        seeds.len() >= 5,
        "the host_match seeds are missing: {seeds:?}"
    );
    for path in seeds
        .iter()
        .chain(&files_in(&fuzz.join("corpus/host_match")))
    {
        // A running fuzzer may replace corpus files meanwhile.
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        if let Err(panic) = std::panic::catch_unwind(|| invariants_host::host_match(&bytes)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{}: {why}", path.display());
        }
    }
}
