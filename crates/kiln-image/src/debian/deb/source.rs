//! Where the builder gets an image's packages: [`DebSource`], with the
//! real one ([`LockedApt`]: `kiln.lock` + the private apt state) and a
//! directory of `.deb` files ([`LocalDebs`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::read_control_of;
use crate::digest::Digest;
use crate::error::ImageError;

/// A package pinned by the lock: what the builder needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinnedDeb {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Of the `.deb` file.
    pub sha256: Digest,
}

impl PinnedDeb {
    /// Its line in the build's recipe.
    pub fn recipe_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.name, self.version, self.arch, self.sha256
        )
    }
}

/// Where an image's Debian packages come from: the lock, and a cache of
/// verified `.deb` files.
pub trait DebSource {
    /// The packages of image `image` — the dependency closure of
    /// `requested`, as pinned by the lock (resolved and pinned now if the
    /// lock lacks them) — sorted by name.
    fn packages(&mut self, image: &str, requested: &[String])
    -> Result<Vec<PinnedDeb>, ImageError>;

    /// The `.deb` of `pkg`, verified against `pkg.sha256` (downloaded when
    /// the cache does not have it).
    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError>;

    /// Writes what the source learnt (the lock), once the builds are done.
    fn save(&mut self) -> Result<(), ImageError> {
        Ok(())
    }
}

/// A [`DebSource`] of the `.deb` files of one directory, each named by the
/// package it holds; no dependency resolution: an image gets exactly the
/// packages it names. For tests, and for offline builds from a directory of
/// packages one trusts.
#[derive(Debug, Clone, Default)]
pub struct LocalDebs {
    /// By package name: the pin and the file.
    pub debs: BTreeMap<String, (PinnedDeb, PathBuf)>,
}

impl LocalDebs {
    /// Reads the control file and hashes every `*.deb` of `dir`.
    pub fn open(dir: &Path) -> Result<LocalDebs, ImageError> {
        let io_err = |path: &Path, source| ImageError::Io {
            op: "read package directory",
            path: path.to_path_buf(),
            source,
        };
        let mut debs = BTreeMap::new();
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        paths.sort();
        for path in paths {
            let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
            let control =
                read_control_of(bytes.as_slice()).map_err(|source| ImageError::BadDeb {
                    package: path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    deb: path.clone(),
                    source,
                })?;
            let pin = PinnedDeb {
                name: control.package.clone(),
                version: control.version,
                arch: control.architecture,
                sha256: Digest::of(&bytes),
            };
            debs.insert(control.package, (pin, path));
        }
        Ok(LocalDebs { debs })
    }
}

impl DebSource for LocalDebs {
    fn packages(
        &mut self,
        image: &str,
        requested: &[String],
    ) -> Result<Vec<PinnedDeb>, ImageError> {
        let mut names: Vec<&String> = requested.iter().collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                self.debs.get(name).map(|(pin, _)| pin.clone()).ok_or_else(|| {
                    ImageError::Invalid(format!(
                        "image `{image}`: no .deb of package `{name}` in the package directory\n  hint: put {name}_*.deb there"
                    ))
                })
            })
            .collect()
    }

    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError> {
        let (_, path) = &self.debs[&pkg.name];
        let bytes = fs::read(path).map_err(|source| ImageError::Io {
            op: "read package file",
            path: path.clone(),
            source,
        })?;
        let actual = Digest::of(&bytes);
        if actual != pkg.sha256 {
            return Err(ImageError::DebMismatch {
                package: pkg.name.clone(),
                deb: path.clone(),
                expected: pkg.sha256.clone(),
                actual,
            });
        }
        Ok(path.clone())
    }
}

/// The real [`DebSource`]: `kiln.lock` next to the spec and the private
/// apt state of [`crate::debian::fetch::Apt`]. Packages the lock pins come from it
/// without apt or network; an image the lock lacks (or whose `debian` list
/// changed) is resolved and recorded, and [`LockedApt::save`] writes the
/// lock back.
#[derive(Debug)]
pub struct LockedApt {
    pub lock: crate::debian::Lock,
    pub apt: crate::debian::Apt,
    pub lock_path: PathBuf,
    /// Whether the lock gained or changed an image since it was read.
    pub changed: bool,
    /// The locked packages handed out, to fetch them by pin.
    pinned: BTreeMap<(String, Digest), crate::debian::LockedPackage>,
}

impl LockedApt {
    /// Reads `<spec_dir>/kiln.lock` (an absent one is empty) and opens the
    /// apt state under `kiln_dir/debian` (no network).
    pub fn open(spec_dir: &Path, kiln_dir: &Path) -> Result<LockedApt, ImageError> {
        let lock_path = crate::debian::lock_path(spec_dir);
        let lock = crate::debian::Lock::read(&lock_path)?.unwrap_or_default();
        let apt = crate::debian::Apt::open(&kiln_dir.join("debian"))?;
        Ok(LockedApt {
            lock,
            apt,
            lock_path,
            changed: false,
            pinned: BTreeMap::new(),
        })
    }
}

impl DebSource for LockedApt {
    fn packages(
        &mut self,
        image: &str,
        requested: &[String],
    ) -> Result<Vec<PinnedDeb>, ImageError> {
        if !crate::debian::is_locked(&self.lock, image, requested) {
            self.changed = true;
        }
        let locked =
            crate::debian::locked_packages(&mut self.lock, &mut self.apt, image, requested)?;
        let mut out = Vec::with_capacity(locked.len());
        for p in locked {
            let sha256: Digest = format!("sha256:{}", p.sha256).parse().map_err(|e| {
                ImageError::Invalid(format!(
                    "{}: package `{}` has sha256 `{}`: {e}\n  hint: `kiln lock --update` writes it anew",
                    self.lock_path.display(),
                    p.name,
                    p.sha256
                ))
            })?;
            let pin = PinnedDeb {
                name: p.name.clone(),
                version: p.version.clone(),
                arch: p.arch.clone(),
                sha256: sha256.clone(),
            };
            self.pinned.insert((p.name.clone(), sha256), p);
            out.push(pin);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError> {
        let locked = self
            .pinned
            .get(&(pkg.name.clone(), pkg.sha256.clone()))
            .ok_or_else(|| {
                ImageError::Invalid(format!(
                    "package `{}` {} was not handed out by the lock",
                    pkg.name, pkg.sha256
                ))
            })?;
        self.apt.fetch(locked)
    }

    /// Writes the lock if it changed.
    fn save(&mut self) -> Result<(), ImageError> {
        if self.changed {
            self.lock.write(&self.lock_path)?;
            self.changed = false;
        }
        Ok(())
    }
}
