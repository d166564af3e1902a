//! `kiln.lock`: the exact Debian packages of each image, next to the spec.
//!
//! TOML, one `[[image.NAME.package]]` block per package, images and
//! packages sorted by name: the file is deterministic, so a change of
//! versions shows up as a readable diff in review.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

use super::control::{is_package_name, is_pool_path, is_sha256};
use super::version;
use crate::error::ImageError;

/// One resolved package: what is fetched and verified.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Hex SHA256 of the .deb, from the signed `Packages` index.
    pub sha256: String,
    pub size: u64,
    /// Pool path under the archive's URI.
    pub filename: String,
}

/// The packages of one image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageLock {
    /// The image's `debian` list, sorted and deduplicated.
    pub requested: Vec<String>,
    /// The closure, sorted by name.
    pub packages: Vec<LockedPackage>,
}

/// A whole `kiln.lock`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    pub images: BTreeMap<String, ImageLock>,
}

pub const FILE_NAME: &str = "kiln.lock";
const FORMAT: u32 = 1;

/// `requested` in the form the lock keeps it.
pub fn normalize_requested(requested: &[String]) -> Vec<String> {
    let mut r = requested.to_vec();
    r.sort();
    r.dedup();
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLock {
    version: u32,
    #[serde(default)]
    image: BTreeMap<String, toml::Spanned<RawImage>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    requested: Vec<String>,
    #[serde(default)]
    package: Vec<toml::Spanned<RawPackage>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackage {
    name: String,
    version: String,
    arch: String,
    sha256: String,
    size: u64,
    filename: String,
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A table key: bare when TOML allows it, else quoted.
fn key(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        s.to_string()
    } else {
        quote(s)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(1, |t| t.bytes().filter(|&b| b == b'\n').count() + 1)
}

/// The line of `field = …` in the table that starts at `from` (1-based),
/// or `from` when it is not found (a dotted or inline form).
fn field_line(text: &str, from: usize, field: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .skip(1)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(field)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(from, |(i, _)| i + 1)
}

impl Lock {
    /// Parses the text of a lock; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Lock, ImageError> {
        let invalid = |line: usize, why: String| ImageError::LockInvalid {
            path: path.to_path_buf(),
            line,
            why,
        };
        let raw: RawLock = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            invalid(line, e.message().trim().to_string())
        })?;
        if raw.version != FORMAT {
            return Err(invalid(
                1,
                format!(
                    "format version {} is not {FORMAT}, the one this kiln writes",
                    raw.version
                ),
            ));
        }
        let mut lock = Lock::default();
        for (name, image) in raw.image {
            let image_line = line_of(text, image.span().start);
            let image = image.into_inner();
            if image.requested.iter().any(|r| !is_package_name(r)) {
                return Err(invalid(
                    image_line,
                    format!(
                        "image `{name}`: `requested` holds something that is not a package name"
                    ),
                ));
            }
            if normalize_requested(&image.requested) != image.requested {
                return Err(invalid(
                    image_line,
                    format!("image `{name}`: `requested` is not sorted and free of duplicates"),
                ));
            }
            let mut packages: Vec<LockedPackage> = Vec::new();
            for p in image.package {
                let line = line_of(text, p.span().start);
                let p = p.into_inner();
                // (field, why): the field names the line to point at.
                let why = if !is_package_name(&p.name) {
                    Some(("name", "`name` is not a Debian package name".to_string()))
                } else if !version::is_valid(&p.version) {
                    Some((
                        "version",
                        format!("`{}` is not a Debian version", p.version),
                    ))
                } else if p.arch.is_empty()
                    || !p
                        .arch
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    Some(("arch", "`arch` is not an architecture".into()))
                } else if !is_sha256(&p.sha256) {
                    Some(("sha256", "`sha256` is not 64 lowercase hex digits".into()))
                } else if !is_pool_path(&p.filename) {
                    Some((
                        "filename",
                        "`filename` is not a pool path ending in .deb".into(),
                    ))
                } else if packages.last().is_some_and(|last| last.name >= p.name) {
                    Some((
                        "name",
                        "packages are not sorted by name, or one appears twice".into(),
                    ))
                } else {
                    None
                };
                if let Some((field, why)) = why {
                    return Err(invalid(
                        field_line(text, line, field),
                        format!("image `{name}`, package `{}`: {why}", p.name),
                    ));
                }
                packages.push(LockedPackage {
                    name: p.name,
                    version: p.version,
                    arch: p.arch,
                    sha256: p.sha256,
                    size: p.size,
                    filename: p.filename,
                });
            }
            lock.images.insert(
                name,
                ImageLock {
                    requested: image.requested,
                    packages,
                },
            );
        }
        Ok(lock)
    }

    /// Reads `path`; `None` when there is no lock yet.
    pub fn read(path: &Path) -> Result<Option<Lock>, ImageError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|e| {
                    let line = line_of(
                        &String::from_utf8_lossy(e.as_bytes()),
                        e.utf8_error().valid_up_to(),
                    );
                    ImageError::LockInvalid {
                        path: path.to_path_buf(),
                        line,
                        why: "not UTF-8".into(),
                    }
                })?;
                Lock::parse(&text, path).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImageError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The file's text: deterministic for equal locks.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# kiln.lock: the exact Debian packages of each image, written by `kiln lock`.\n",
        );
        out.push_str("# Commit it; `kiln lock --update` moves versions forward.\n");
        let _ = writeln!(out, "version = {FORMAT}");
        for (name, image) in &self.images {
            let key = key(name);
            let _ = writeln!(out, "\n[image.{key}]");
            let requested: Vec<String> = image.requested.iter().map(|r| quote(r)).collect();
            let _ = writeln!(out, "requested = [{}]", requested.join(", "));
            for p in &image.packages {
                let _ = writeln!(out, "\n[[image.{key}.package]]");
                let _ = writeln!(out, "name = {}", quote(&p.name));
                let _ = writeln!(out, "version = {}", quote(&p.version));
                let _ = writeln!(out, "arch = {}", quote(&p.arch));
                let _ = writeln!(out, "size = {}", p.size);
                let _ = writeln!(out, "sha256 = {}", quote(&p.sha256));
                let _ = writeln!(out, "filename = {}", quote(&p.filename));
            }
        }
        out
    }

    /// Writes the lock atomically (temporary file + rename).
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        super::release::write_atomic(path, self.render().as_bytes())
    }

    /// What changed from `self` to `new`, one line each, images in order:
    /// `+ db: libpq5 15.10-0+deb12u1`, `- db: libfoo 1.0`,
    /// `~ db: libpq5 15.8-0+deb12u1 -> 15.10-0+deb12u1`.
    pub fn diff(&self, new: &Lock) -> Vec<String> {
        let mut out = Vec::new();
        let empty = ImageLock::default();
        let mut names: Vec<&String> = self.images.keys().chain(new.images.keys()).collect();
        names.sort();
        names.dedup();
        for image in names {
            let old = self.images.get(image).unwrap_or(&empty);
            let new = new.images.get(image).unwrap_or(&empty);
            let old_v: BTreeMap<&str, &str> = old
                .packages
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_str()))
                .collect();
            let new_v: BTreeMap<&str, &str> = new
                .packages
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_str()))
                .collect();
            let mut pkgs: Vec<&str> = old_v.keys().chain(new_v.keys()).copied().collect();
            pkgs.sort();
            pkgs.dedup();
            for p in pkgs {
                match (old_v.get(p), new_v.get(p)) {
                    (None, Some(v)) => out.push(format!("+ {image}: {p} {v}")),
                    (Some(v), None) => out.push(format!("- {image}: {p} {v}")),
                    (Some(a), Some(b)) if a != b => out.push(format!("~ {image}: {p} {a} -> {b}")),
                    _ => {}
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            sha256: "ab".repeat(32),
            size: 42,
            filename: format!("pool/main/p/{name}/{name}_{version}_amd64.deb"),
        }
    }

    fn sample() -> Lock {
        let mut lock = Lock::default();
        lock.images.insert(
            "db".into(),
            ImageLock {
                requested: vec!["postgresql-15".into()],
                packages: vec![
                    pkg("libc6", "2.36-9+deb12u10"),
                    pkg("libpq5", "15.8-0+deb12u1"),
                ],
            },
        );
        lock.images.insert(
            "my image".into(),
            ImageLock {
                requested: vec!["tzdata".into()],
                packages: vec![pkg("tzdata", "2025b-0+deb12u1")],
            },
        );
        lock
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let lock = sample();
        let text = lock.render();
        assert_eq!(Lock::parse(&text, Path::new("kiln.lock")).unwrap(), lock);
        assert_eq!(text, sample().render());
        assert!(
            text.contains("[[image.db.package]]\nname = \"libc6\"\n"),
            "{text}"
        );
        assert!(text.contains("[image.\"my image\"]"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(Lock::read(&path).unwrap(), None);
        lock.write(&path).unwrap();
        assert_eq!(Lock::read(&path).unwrap(), Some(lock));
    }

    #[test]
    fn diff_shows_added_removed_changed() {
        let old = sample();
        let mut new = sample();
        let db = new.images.get_mut("db").unwrap();
        db.packages[1] = pkg("libpq5", "15.10-0+deb12u1");
        db.packages.push(pkg("libssl3", "3.0.15-1~deb12u1"));
        new.images.remove("my image");
        assert_eq!(
            old.diff(&new),
            [
                "~ db: libpq5 15.8-0+deb12u1 -> 15.10-0+deb12u1",
                "+ db: libssl3 3.0.15-1~deb12u1",
                "- my image: tzdata 2025b-0+deb12u1",
            ]
        );
        assert!(new.diff(&new).is_empty());
    }

    #[test]
    fn malformed_locks_name_file_line_and_fix() {
        let good = sample().render();
        let cases: Vec<(String, usize, &str)> = vec![
            (good.replace("size = 42", "size = \"big\""), 12, "u64"),
            (
                good.replace("version = 1\n", "version = 2\n"),
                1,
                "format version",
            ),
            (good.replacen(&"ab".repeat(32), "zz", 1), 13, "sha256"),
            (
                good.replacen("pool/main/p/libc6", "../etc", 1),
                0,
                "filename",
            ),
            (
                good.replacen("name = \"libc6\"", "name = \"libz\"", 1),
                0,
                "sorted",
            ),
            (
                good.replacen("arch = \"amd64\"", "arch = \"amd64\"\nextra = 1", 1),
                0,
                "extra",
            ),
            ("version = 1\n[image.x\n".into(), 2, ""),
        ];
        for (text, line, what) in cases {
            let e = Lock::parse(&text, Path::new("/p/kiln.lock")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("/p/kiln.lock:"), "{msg}");
            assert!(msg.contains(what), "{msg}");
            assert!(msg.contains("kiln lock --update"), "{msg}");
            if line > 0 {
                assert!(msg.starts_with(&format!("/p/kiln.lock:{line}:")), "{msg}");
            }
            let ImageError::LockInvalid { line: l, .. } = e else {
                panic!("{msg}")
            };
            assert!(l >= 1 && l <= text.lines().count() + 1, "{msg}");
        }
    }
}
