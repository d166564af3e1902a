//! What must hold for every input of the Debian metadata parsers: the
//! deb822 / `Packages` parser (with the relation fields, versions and the
//! resolver run over what it accepts) and the `kiln.lock` parser.
//!
//! One copy, used twice: by the cargo-fuzz targets `debian_control` and
//! `kiln_lock` (`fuzz/fuzz_targets/`, through `#[path]`) and by
//! `tests/debian_fuzz_corpus.rs`, which replays their seeds on stable.
//! Each check panics with a message naming the problem.

#![allow(dead_code)] // each user calls a subset

use std::cmp::Ordering;
use std::path::Path;

use kiln_image::ImageError;
use kiln_image::debian::control::{self, is_package_name, is_pool_path, is_sha256};
use kiln_image::debian::lock::Lock;
use kiln_image::debian::release;
use kiln_image::debian::resolve::Index;
use kiln_image::debian::version;

fn lines(text: &str) -> usize {
    text.lines().count().max(1)
}

/// Any bytes as a `Packages` index (and as a Release text).
pub fn debian_control(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // kiln reads lists as UTF-8 and refuses others before parsing
    };
    let _ = release::release_digests(text);
    let stanzas = control::parse(text);
    assert_eq!(stanzas, control::parse(text), "parse is not deterministic");
    match &stanzas {
        Ok(stanzas) => {
            for s in stanzas {
                assert!(
                    s.line >= 1 && s.line <= lines(text),
                    "stanza line {} out of range",
                    s.line
                );
                for (name, _) in s.fields() {
                    assert!(
                        !name.is_empty() && !name.contains(':'),
                        "field name {name:?}"
                    );
                }
            }
        }
        Err(e) => {
            assert!(
                e.line >= 1 && e.line <= lines(text),
                "error line {} out of range",
                e.line
            );
            assert!(!e.why.is_empty());
        }
    }
    let Ok(entries) = control::parse_packages(text) else {
        assert!(control::parse_packages(text).is_err());
        return;
    };
    assert!(
        stanzas.is_ok(),
        "packages accepted from text the deb822 parser refuses"
    );
    for e in &entries {
        assert!(is_package_name(&e.name), "accepted name {:?}", e.name);
        assert!(
            version::is_valid(&e.version),
            "accepted version {:?}",
            e.version
        );
        assert!(is_sha256(&e.sha256) && is_pool_path(&e.filename), "{e:?}");
        assert_eq!(version::compare(&e.version, &e.version), Ordering::Equal);
        for field in [&e.depends, &e.pre_depends, &e.provides] {
            if let Ok(rel) = control::parse_relations(field) {
                let printed = control::format_relations(&rel);
                let again = control::parse_relations(&printed)
                    .unwrap_or_else(|err| panic!("{field:?} printed as {printed:?}: {err}"));
                assert_eq!(again, rel, "{field:?} does not round-trip");
            }
        }
    }
    for pair in entries.windows(2) {
        let (a, b) = (&pair[0].version, &pair[1].version);
        assert_eq!(
            version::compare(a, b),
            version::compare(b, a).reverse(),
            "{a} vs {b}"
        );
    }
    let mut index = Index::new("amd64");
    if index.add(entries.clone()).is_err() {
        return;
    }
    for root in entries.iter().take(4) {
        let roots = vec![root.name.clone()];
        let first = index.resolve("fuzz", &roots);
        match &first {
            Ok(pkgs) => {
                let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
                let mut sorted = names.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(names, sorted, "closure not sorted or not unique");
                assert!(!names.is_empty());
                let again = index.resolve("fuzz", &roots).unwrap();
                assert_eq!(pkgs, &again, "resolve is not deterministic");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("image `fuzz`") && msg.contains("hint:"),
                    "{msg}"
                );
            }
        }
    }
}

/// Any bytes as a `kiln.lock`.
pub fn kiln_lock(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // Lock::read refuses non-UTF-8 itself
    };
    let path = Path::new("kiln.lock");
    let first = Lock::parse(text, path);
    match first {
        Ok(lock) => {
            let rendered = lock.render();
            let again = Lock::parse(&rendered, path).unwrap_or_else(|e| {
                panic!("an accepted lock renders to text it refuses: {e}\n{rendered}")
            });
            assert_eq!(again, lock, "lock does not round-trip");
            assert_eq!(again.render(), rendered, "render is not a fixed point");
            assert!(lock.diff(&lock).is_empty());
            assert_eq!(
                lock.diff(&Lock::default()).len(),
                lock.images
                    .values()
                    .map(|i| i.packages.len())
                    .sum::<usize>()
            );
        }
        Err(ImageError::LockInvalid { line, why, .. }) => {
            assert!(
                line >= 1 && line <= lines(text) + 1,
                "line {line} out of range"
            );
            assert!(!why.is_empty());
            let msg = Lock::parse(text, path).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("kiln.lock:{line}: ")), "{msg}");
            assert!(msg.contains("kiln lock --update"), "{msg}");
        }
        Err(other) => panic!("not a LockInvalid error: {other}"),
    }
}
