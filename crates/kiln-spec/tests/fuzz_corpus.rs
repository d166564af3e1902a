//! The fuzz targets' invariants on the stable toolchain: every seed of
//! `fuzz/seeds/<target>/` (committed), every file of `fuzz/corpus/<target>/`
//! (cargo-fuzz's working corpus, present after a local `scripts/fuzz` run,
//! ignored by git), every spec of `tests/bad/` and every example spec is
//! replayed through the same checks the fuzzer makes (`invariants/mod.rs`).

mod invariants;

use std::path::{Path, PathBuf};

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

/// Fuzz inputs are bytes; the targets read them as (lossy) UTF-8, and so
/// does this replay.
fn replay(target: &str, path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let run = match target {
        "spec_parse" => invariants::spec_parse,
        "units" => invariants::units,
        other => panic!("{}: no fuzz target `{other}`", path.display()),
    };
    if let Err(panic) = std::panic::catch_unwind(|| run(&text)) {
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
    for target in ["spec_parse", "units"] {
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
    for target in ["spec_parse", "units"] {
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
fn bad_specs_keep_the_fuzz_invariants() {
    let bad = files_in(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad"));
    assert!(!bad.is_empty(), "tests/bad is empty");
    for path in bad {
        replay("spec_parse", &path);
    }
}

#[test]
fn example_specs_keep_the_fuzz_invariants() {
    let mut found = Vec::new();
    for dir in ["examples", "docs"] {
        walk(&root().join(dir), &mut found);
    }
    assert!(found.len() >= 2, "example specs not found: {found:?}");
    for path in found {
        replay("spec_parse", &path);
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            walk(&p, out);
        } else if p.file_name().is_some_and(|n| n == "kiln.toml") {
            out.push(p);
        }
    }
}
