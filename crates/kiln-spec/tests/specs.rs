//! Every bad spec under `tests/bad/` gets all of its errors, each located
//! and with a hint (insta snapshots); every example spec of the repository
//! validates and satisfies the JSON Schema.

use std::path::Path;

#[test]
fn bad_specs_report_every_error_with_location_and_hint() {
    insta::glob!("bad/*.toml", |path| {
        let source = std::fs::read_to_string(path).unwrap();
        let name = format!("bad/{}", path.file_name().unwrap().to_string_lossy());
        let err = kiln_spec::parse(&source, &name).expect_err("a bad spec must be refused");
        for d in &err.items {
            assert!(d.hint.is_some(), "{name}: `{}` has no hint", d.message);
        }
        insta::assert_snapshot!(err.render(false));
    });
}

fn example_specs() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut found = Vec::new();
    for dir in ["examples", "docs"] {
        walk(&root.join(dir), &mut found);
    }
    assert!(!found.is_empty(), "no example specs found");
    found
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.file_name().is_some_and(|n| n == "kiln.toml") {
            out.push(p);
        }
    }
}

#[test]
fn every_example_validates() {
    for path in example_specs() {
        let source = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = kiln_spec::parse(&source, &path.display().to_string()) {
            panic!("{e}");
        }
    }
}
