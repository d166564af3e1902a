//! The fuzz targets' invariants on the stable toolchain: every seed of
//! `fuzz/seeds/<target>/` (committed), every file of `fuzz/corpus/<target>/`
//! (cargo-fuzz's working corpus, present after a local `scripts/fuzz` run,
//! ignored by git), every spec of `tests/bad/` and every example spec is
//! replayed through the same checks the fuzzer makes (`invariants/mod.rs`).

mod invariants;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::{Path, PathBuf};

use replay::{files_in, root};

/// Fuzz inputs are bytes; the targets read them as (lossy) UTF-8, and so
/// does this replay.
const TARGETS: [replay::Target; 2] = [
    ("spec_parse", |b| {
        invariants::spec_parse(&String::from_utf8_lossy(b))
    }),
    ("units", |b| invariants::units(&String::from_utf8_lossy(b))),
];
const SPEC_PARSE: replay::Target = TARGETS[0];

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
fn bad_specs_keep_the_fuzz_invariants() {
    let bad = files_in(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad"));
    assert!(!bad.is_empty(), "tests/bad is empty");
    for path in bad {
        replay::replay_file(SPEC_PARSE.0, &path, SPEC_PARSE.1);
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
        replay::replay_file(SPEC_PARSE.0, &path, SPEC_PARSE.1);
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
