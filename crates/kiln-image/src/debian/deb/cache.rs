//! The unpacked cache: each verified `.deb` unpacked once, in a directory
//! named by its sha256 (see the parent module's docs).

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use super::{DebError, DebManifest, UNPACKED_FORMAT, unpack};
use crate::digest::{Digest, HashingReader};
use crate::error::ImageError;

/// A package unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `KILN_DIR/debian/unpacked/<hex>`.
    pub dir: PathBuf,
    /// The `.deb`'s sha256.
    pub sha256: Digest,
    pub manifest: DebManifest,
}

impl Unpacked {
    /// Where the content of a file entry is.
    pub fn blob_path(&self, blob: u64) -> PathBuf {
        self.dir.join("files").join(blob.to_string())
    }
}

/// The unpacked directory of the `.deb` whose sha256 is `sha256`, in
/// `kiln_dir`, if it is there and complete.
pub fn cached(kiln_dir: &Path, sha256: &Digest) -> Option<Unpacked> {
    let dir = unpacked_root(kiln_dir).join(sha256.hex());
    let bytes = fs::read(dir.join("manifest.json")).ok()?;
    let manifest: DebManifest = serde_json::from_slice(&bytes).ok()?;
    (manifest.format == UNPACKED_FORMAT).then(|| Unpacked {
        dir,
        sha256: sha256.clone(),
        manifest,
    })
}

pub(super) fn unpacked_root(kiln_dir: &Path) -> PathBuf {
    kiln_dir.join("debian").join("unpacked")
}

/// The unpacked directory of `deb` (package `package`, for errors), whose
/// bytes must hash to `sha256`: from the cache, or unpacked now.
pub fn unpack_once(
    kiln_dir: &Path,
    deb: &Path,
    package: &str,
    sha256: &Digest,
) -> Result<Unpacked, ImageError> {
    if let Some(done) = cached(kiln_dir, sha256) {
        return Ok(done);
    }
    let root = unpacked_root(kiln_dir);
    let io_err = |op, path: &Path, source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(&root).map_err(|e| io_err("create", &root, e))?;
    remove_stale(&root, sha256);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = root.join(format!(
        ".tmp-{}-{}-{nanos}",
        sha256.hex(),
        std::process::id()
    ));
    fs::create_dir(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    let result = unpack_into(deb, package, sha256, &tmp);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let dir = root.join(sha256.hex());
    if let Err(e) = fs::rename(&tmp, &dir) {
        let _ = fs::remove_dir_all(&tmp);
        // Another build unpacked it meanwhile: use theirs.
        return cached(kiln_dir, sha256).ok_or_else(|| io_err("rename into place", &dir, e));
    }
    Ok(Unpacked {
        dir,
        sha256: sha256.clone(),
        manifest,
    })
}

fn unpack_into(
    deb: &Path,
    package: &str,
    sha256: &Digest,
    tmp: &Path,
) -> Result<DebManifest, ImageError> {
    let file = File::open(deb).map_err(|source| ImageError::Io {
        op: "open package file",
        path: deb.to_path_buf(),
        source,
    })?;
    let mut hashing = HashingReader::new(BufReader::with_capacity(256 * 1024, file));
    let unpacked = unpack(&mut hashing, tmp);
    // Hash whatever the reader left (an error stops it early) so the
    // check below says "changed" rather than the parse error when both.
    let _ = io::copy(&mut hashing, &mut io::sink());
    let (actual, _) = hashing.finish();
    if &actual != sha256 {
        return Err(ImageError::DebMismatch {
            package: package.to_owned(),
            deb: deb.to_path_buf(),
            expected: sha256.clone(),
            actual,
        });
    }
    let manifest = unpacked.map_err(|source| ImageError::BadDeb {
        package: package.to_owned(),
        deb: deb.to_path_buf(),
        source,
    })?;
    if manifest.control.package != package {
        return Err(ImageError::BadDeb {
            package: package.to_owned(),
            deb: deb.to_path_buf(),
            source: DebError::Malformed(format!("it holds package `{}`", manifest.control.package)),
        });
    }
    let path = tmp.join("manifest.json");
    let mut out = File::create_new(&path).map_err(|source| ImageError::Io {
        op: "create",
        path: path.clone(),
        source,
    })?;
    out.write_all(&serde_json::to_vec(&manifest).expect("a manifest serialises"))
        .and_then(|()| out.sync_all())
        .map_err(|source| ImageError::Io {
            op: "write",
            path: path.clone(),
            source,
        })?;
    Ok(manifest)
}

/// Removes what an unpacking of the same package left when its process
/// died (`.tmp-<hex>-<pid>-…` of a pid that no longer runs).
fn remove_stale(root: &Path, sha256: &Digest) {
    let prefix = format!(".tmp-{}-", sha256.hex());
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
