//! Replays fuzz inputs on the stable toolchain, shared by the crates'
//! `tests/*fuzz_corpus.rs` (each includes it with
//! `#[path = "../../../fuzz/replay.rs"] mod replay;`): every seed of
//! `fuzz/seeds/<target>/` (committed) and every file of
//! `fuzz/corpus/<target>/` (cargo-fuzz's working corpus, present after a
//! local `scripts/fuzz` run, ignored by git) goes through the checks the
//! fuzzer makes; a check that panics fails the test naming the input.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fuzz target's name and the checks its fuzzer makes on an input.
pub type Target = (&'static str, fn(&[u8]));

/// The workspace root, seen from the including crate's directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The files of `dir`, sorted; none if it is not there.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
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

/// Runs `run` on `bytes`; a panic fails the test naming `target` and `path`.
fn check(target: &str, path: &Path, bytes: &[u8], run: fn(&[u8])) {
    if let Err(panic) = std::panic::catch_unwind(|| run(bytes)) {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{target} fails on {}: {why}", path.display());
    }
}

/// Replays the file at `path` (which must be readable) through `run`.
pub fn replay_file(target: &str, path: &Path, run: fn(&[u8])) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    check(target, path, &bytes, run);
}

/// Replays every seed of `fuzz/seeds/<target>/` through `run`, after
/// checking there are at least `min` of them; returns how many there are.
pub fn replay_seeds(target: &str, min: usize, run: fn(&[u8])) -> usize {
    let files = files_in(&root().join("fuzz/seeds").join(target));
    assert!(
        files.len() >= min.max(1),
        "fuzz/seeds/{target}/ has {} seeds, wants at least {}",
        files.len(),
        min.max(1)
    );
    for path in &files {
        replay_file(target, path, run);
    }
    files.len()
}

/// Replays every file of `fuzz/corpus/<target>/` (only there after fuzzing
/// on this machine) through `run`; returns how many were replayed. A file
/// that vanishes meanwhile is skipped: a running fuzzer replaces them.
pub fn replay_corpus(target: &str, run: fn(&[u8])) -> usize {
    let mut n = 0;
    for path in files_in(&root().join("fuzz/corpus").join(target)) {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        check(target, &path, &bytes, run);
        n += 1;
    }
    n
}

/// [`replay_seeds`] of every target: at least `min` seeds each.
pub fn seeds(targets: &[Target], min: usize) {
    for &(target, run) in targets {
        replay_seeds(target, min, run);
    }
}

/// [`replay_corpus`] of every target; says and returns how many inputs
/// it replayed.
pub fn corpus(targets: &[Target]) -> usize {
    let n = targets
        .iter()
        .map(|&(target, run)| replay_corpus(target, run))
        .sum();
    let names: Vec<&str> = targets.iter().map(|&(target, _)| target).collect();
    eprintln!(
        "replayed {n} inputs from fuzz/corpus/{{{}}}",
        names.join(",")
    );
    n
}
