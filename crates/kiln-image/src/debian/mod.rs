//! Debian packages as an image source: resolve, fetch, verify, lock.
//!
//! # API for the builder
//!
//! ```text
//! // The lock next to the spec (None: no kiln.lock yet).
//! let lock_path = debian::lock_path(&project_dir);           // <dir>/kiln.lock
//! let mut lock = Lock::read(&lock_path)?.unwrap_or_default();
//! // The private apt state; opening it runs nothing and touches no network.
//! let mut apt = Apt::open(&store.kiln_dir().join("debian"))?;
//! // Per image: from the lock when it has this image with the same
//! // requested list (no apt, no network), else resolved and put in `lock`.
//! let pkgs: Vec<LockedPackage> = debian::locked_packages(&mut lock, &mut apt, image, &image.debian)?;
//! // Each .deb, verified (size + SHA256 from the signed index / the lock),
//! // from <cache>/debs/<sha256>.deb; downloaded first when absent. A cached
//! // file is hashed on every call; a tampered one is refused
//! // (ImageError::DebianTampered), never used.
//! let deb: PathBuf = apt.fetch(&pkg)?;
//! // When the lock was missing this image (`is_locked` was false), write it:
//! lock.write(&lock_path)?;
//! ```
//!
//! Signatures:
//! - `pub fn lock_path(spec_dir: &Path) -> PathBuf`
//! - `pub fn locked_packages(lock: &mut Lock, apt: &mut Apt, image: &str, requested: &[String]) -> Result<Vec<LockedPackage>, ImageError>`
//! - `pub fn is_locked(lock: &Lock, image: &str, requested: &[String]) -> bool`
//! - `Lock { images: BTreeMap<String, ImageLock> }`, `ImageLock { requested, packages }`,
//!   `LockedPackage { name, version, arch, sha256, size, filename }`;
//!   `Lock::read(&Path) -> Result<Option<Lock>>`, `Lock::parse(&str, &Path)`,
//!   `Lock::write(&self, &Path)`, `Lock::render(&self) -> String`,
//!   `Lock::diff(&self, new: &Lock) -> Vec<String>`
//! - `Apt::open(cache_dir: &Path) -> Result<Apt>`, `Apt::update(&mut self)`,
//!   `Apt::resolve(&mut self, image, roots) -> Result<Vec<LockedPackage>>`,
//!   `Apt::fetch(&self, &LockedPackage) -> Result<PathBuf>`,
//!   `Apt::deb_path(&self, &LockedPackage) -> PathBuf`
//! - `fetch::verify_deb(path, &LockedPackage) -> Result<()>`
//!
//! # How trust flows
//! `gpgv` checks each `InRelease` against its source's `Signed-By` keyring;
//! the SHA256 of every `Packages` index kiln parses must be the one in that
//! signed text ([`release`]); the SHA256 and size of every .deb must be the
//! ones of its `Packages` entry, recorded in `kiln.lock` ([`lock`]) and
//! checked again on every use of the cached file ([`fetch`]). apt downloads,
//! kiln verifies.
//!
//! # Limits
//! One architecture (the host's, plus `all`); `Breaks`/`Conflicts` are not
//! checked; `Recommends` are not installed; `Essential` packages are not
//! added unless something depends on them; flat repositories and `Release`
//! without `InRelease` are refused; `Valid-Until` is left to apt's own
//! configuration.

pub mod control;
pub mod deb;
pub mod fetch;
pub mod lock;
pub mod release;
pub mod resolve;
pub mod users;
pub mod version;

use std::path::{Path, PathBuf};

pub use fetch::Apt;
pub use lock::{ImageLock, Lock, LockedPackage};

use crate::error::ImageError;

/// `kiln.lock` in the spec's directory.
pub fn lock_path(spec_dir: &Path) -> PathBuf {
    spec_dir.join(lock::FILE_NAME)
}

/// Whether `lock` pins `image` for exactly this `requested` list (order and
/// duplicates do not matter).
pub fn is_locked(lock: &Lock, image: &str, requested: &[String]) -> bool {
    lock.images
        .get(image)
        .is_some_and(|l| l.requested == lock::normalize_requested(requested))
}

/// The packages of `image`: from `lock` when it pins this image for the
/// same `requested` list (no apt, no network), else resolved with `apt`
/// and recorded in `lock` (the caller writes it).
pub fn locked_packages(
    lock: &mut Lock,
    apt: &mut Apt,
    image: &str,
    requested: &[String],
) -> Result<Vec<LockedPackage>, ImageError> {
    if is_locked(lock, image, requested) {
        return Ok(lock.images[image].packages.clone());
    }
    if requested.is_empty() {
        // Nothing to resolve: no reason to refresh lists or touch the lock.
        return Ok(Vec::new());
    }
    let requested = lock::normalize_requested(requested);
    let packages = apt.resolve(image, &requested)?;
    lock.images.insert(
        image.to_string(),
        ImageLock {
            requested,
            packages: packages.clone(),
        },
    );
    Ok(packages)
}
