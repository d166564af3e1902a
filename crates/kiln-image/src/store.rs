//! The content-addressed store: an OCI image layout on local disk.
//!
//! ```text
//! ROOT/oci-layout              {"imageLayoutVersion": "1.0.0"}
//! ROOT/index.json              names → manifest descriptors (ref.name annotation)
//! ROOT/blobs/sha256/<hex>      every blob, named by its digest
//! ROOT/tmp/                    staging for atomic writes (same filesystem)
//! ROOT/kiln/                   kiln's own data: build cache, signatures, unpacked roots
//! ```
//!
//! Writes are atomic: a blob is streamed into `tmp/`, hashed on the way,
//! fsynced, checked against the expected digest, then renamed into place and
//! the directory fsynced. Reads are verified: [`Store::open_blob`] hashes
//! while streaming and fails at end of file if the content does not match its
//! name, so a corrupted or truncated blob is never used. `ROOT` stays a valid
//! OCI layout that skopeo and umoci read directly (`oci:ROOT:NAME`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};

use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, HashingWriter};
use crate::error::ImageError;

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens the store at `root`, creating an empty layout if there is none.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        let store = Store {
            root: root.to_path_buf(),
        };
        for dir in [store.blobs_dir(), store.tmp_dir(), store.kiln_dir()] {
            fs::create_dir_all(&dir).map_err(|source| ImageError::Io {
                op: "create store directory",
                path: dir.clone(),
                source,
            })?;
        }
        let layout = root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !store.index_path().exists() {
            store.write_index(&empty_index())?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// kiln's own area inside the layout (ignored by other OCI tools).
    pub fn kiln_dir(&self) -> PathBuf {
        self.root.join("kiln")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// A fresh staging path inside the store (same filesystem as the blobs).
    pub fn temp_path(&self, what: &str) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir()
            .join(format!("{what}.{}.{n}", std::process::id()))
    }

    /// Stores `bytes` and returns their digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, ImageError> {
        let digest = Digest::of(bytes);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        self.put_blob_from(bytes, Some(&digest)).map(|(d, _)| d)
    }

    /// Streams a blob into the store. With `expected`, content that does not
    /// hash to it is refused and nothing is stored.
    pub fn put_blob_from(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), ImageError> {
        let tmp = self.temp_path("blob");
        let result = self.stage_blob(reader, &tmp, expected);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn stage_blob(
        &self,
        mut reader: impl Read,
        tmp: &Path,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), ImageError> {
        let io_err = |op, source| ImageError::Io {
            op,
            path: tmp.to_path_buf(),
            source,
        };
        let file = File::create(tmp).map_err(|e| io_err("create staging file", e))?;
        let mut writer = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file));
        io::copy(&mut reader, &mut writer).map_err(|e| io_err("write blob", e))?;
        let (buffered, digest, size) = writer.finish();
        let file = buffered
            .into_inner()
            .map_err(|e| io_err("write blob", e.into_error()))?;
        file.sync_all().map_err(|e| io_err("fsync blob", e))?;
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(ImageError::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
                path: tmp.to_path_buf(),
            });
        }
        let dest = self.blob_path(&digest);
        fs::rename(tmp, &dest).map_err(|source| ImageError::Io {
            op: "move blob into place",
            path: dest.clone(),
            source,
        })?;
        sync_dir(&self.blobs_dir())?;
        Ok((digest, size))
    }

    /// Opens a blob for reading; the reader fails at end of file unless the
    /// content hashes to `digest`. Read it to the end before trusting it.
    pub fn open_blob(&self, digest: &Digest) -> Result<VerifiedReader, ImageError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ImageError::BlobMissing {
                digest: digest.clone(),
                path: path.clone(),
            },
            _ => ImageError::Io {
                op: "open blob",
                path: path.clone(),
                source,
            },
        })?;
        Ok(VerifiedReader {
            inner: io::BufReader::with_capacity(1 << 20, file),
            hasher: Some(Sha256::new()),
            expected: digest.clone(),
            path,
        })
    }

    /// Reads a whole blob, verified.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let mut reader = self.open_blob(digest)?;
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| reader.error(e))?;
        Ok(bytes)
    }

    /// Reads and parses a JSON blob (manifest, config, index), verified.
    pub fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        digest: &Digest,
        what: &'static str,
    ) -> Result<T, ImageError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::BadJson {
            what,
            digest: digest.clone(),
            source,
        })
    }

    /// The current `index.json`.
    pub fn index(&self) -> Result<ImageIndex, ImageError> {
        let path = self.index_path();
        let bytes = fs::read(&path).map_err(|source| ImageError::Io {
            op: "read index",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::BadIndex { path, source })
    }

    /// Every named image, by name.
    pub fn names(&self) -> Result<Vec<(String, Descriptor)>, ImageError> {
        let mut out: Vec<(String, Descriptor)> = self
            .index()?
            .manifests()
            .iter()
            .filter_map(|d| ref_name(d).map(|n| (n.to_owned(), d.clone())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Points `name` at `descriptor` (replacing what it pointed at).
    pub fn tag(&self, name: &str, descriptor: &Descriptor) -> Result<(), ImageError> {
        let mut d = descriptor.clone();
        let mut annotations = d.annotations().clone().unwrap_or_default();
        annotations.insert(REF_NAME.to_owned(), name.to_owned());
        d.set_annotations(Some(annotations));
        self.update_index(|manifests| {
            manifests.retain(|m| ref_name(m) != Some(name));
            manifests.push(d);
        })
    }

    /// Removes `name`; returns whether it existed. Blobs stay until `gc`.
    pub fn untag(&self, name: &str) -> Result<bool, ImageError> {
        let mut found = false;
        self.update_index(|manifests| {
            let before = manifests.len();
            manifests.retain(|m| ref_name(m) != Some(name));
            found = manifests.len() != before;
        })?;
        Ok(found)
    }

    /// Finds an image by name, full digest, or a unique digest prefix of at
    /// least 12 hex digits.
    pub fn resolve(&self, reference: &str) -> Result<Descriptor, ImageError> {
        let names = self.names()?;
        if let Some((_, d)) = names.iter().find(|(n, _)| n == reference) {
            return Ok(d.clone());
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut hits: Vec<&Descriptor> = names
                .iter()
                .map(|(_, d)| d)
                .filter(|d| {
                    d.digest()
                        .to_string()
                        .trim_start_matches("sha256:")
                        .starts_with(hex)
                })
                .collect();
            hits.dedup_by(|a, b| a.digest() == b.digest());
            if hits.len() == 1 {
                return Ok(hits[0].clone());
            }
            if let Ok(digest) = reference.parse::<Digest>()
                && self.has_blob(&digest)
            {
                let bytes = self.read_blob(&digest)?;
                return Ok(manifest_descriptor(&digest, bytes.len() as u64));
            }
        }
        Err(ImageError::UnknownImage {
            reference: reference.to_owned(),
            store: self.root.clone(),
        })
    }

    fn update_index(&self, change: impl FnOnce(&mut Vec<Descriptor>)) -> Result<(), ImageError> {
        let lock_path = self.root.join("index.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| ImageError::Io {
                op: "open index lock",
                path: lock_path.clone(),
                source,
            })?;
        // Serialises read-modify-write of index.json across processes.
        lock.lock().map_err(|source| ImageError::Io {
            op: "lock index",
            path: lock_path.clone(),
            source,
        })?;
        let mut index = self.index()?;
        let mut manifests = index.manifests().clone();
        change(&mut manifests);
        manifests.sort_by(|a, b| {
            ref_name(a)
                .cmp(&ref_name(b))
                .then_with(|| a.digest().to_string().cmp(&b.digest().to_string()))
        });
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(index).expect("an index serialises");
        self.write_atomic(&self.index_path(), &bytes)
    }

    /// Writes a small file atomically (temp, fsync, rename, fsync dir).
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let tmp = self.temp_path("file");
        let io_err = |op, source| ImageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut f = File::create(&tmp).map_err(|e| io_err("create staging file", e))?;
        f.write_all(bytes).map_err(|e| io_err("write", e))?;
        f.sync_all().map_err(|e| io_err("fsync", e))?;
        fs::rename(&tmp, path).map_err(|e| io_err("rename into place", e))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Every blob digest present, sorted.
    pub fn blobs(&self) -> Result<Vec<Digest>, ImageError> {
        let dir = self.blobs_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|source| ImageError::Io {
            op: "list blobs",
            path: dir.clone(),
            source,
        })? {
            let entry = entry.map_err(|source| ImageError::Io {
                op: "list blobs",
                path: dir.clone(),
                source,
            })?;
            if let Ok(d) =
                format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>()
            {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a blob (for `gc`; callers decide what is unreachable).
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), ImageError> {
        let path = self.blob_path(digest);
        fs::remove_file(&path).map_err(|source| ImageError::Io {
            op: "remove blob",
            path,
            source,
        })
    }
}

/// The name of an index entry, if it has one.
pub fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

/// A descriptor for an OCI image manifest blob.
pub fn manifest_descriptor(digest: &Digest, size: u64) -> Descriptor {
    Descriptor::new(
        MediaType::ImageManifest,
        size,
        oci_spec::image::Digest::from(digest),
    )
}

fn empty_index() -> ImageIndex {
    ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::new())
        .build()
        .expect("an empty index is valid")
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ImageError::Io {
            op: "fsync directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// A blob reader that verifies the content against its digest at EOF.
#[derive(Debug)]
pub struct VerifiedReader {
    inner: io::BufReader<File>,
    /// `None` once the end was reached and the content checked.
    hasher: Option<Sha256>,
    expected: Digest,
    path: PathBuf,
}

impl VerifiedReader {
    /// Turns an I/O error from this reader into the error that names the
    /// blob: a failed verification becomes [`ImageError::Corrupt`].
    pub fn error(&self, e: io::Error) -> ImageError {
        if e.get_ref().is_some_and(|inner| inner.is::<CorruptBlob>()) {
            return ImageError::Corrupt {
                digest: self.expected.clone(),
                path: self.path.clone(),
            };
        }
        ImageError::Io {
            op: "read blob",
            path: self.path.clone(),
            source: e,
        }
    }
}

/// The payload of the I/O error a [`VerifiedReader`] returns on mismatch.
#[derive(Debug, thiserror::Error)]
#[error("blob {expected} at {path} refused: its content hashes to {actual}")]
pub struct CorruptBlob {
    pub expected: Digest,
    pub actual: Digest,
    pub path: PathBuf,
}

impl Read for VerifiedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(h) = self.hasher.as_mut() {
                h.update(&buf[..n]);
            }
        } else if let Some(h) = self.hasher.take() {
            let actual = Digest::from_sha256(&h.finalize());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    CorruptBlob {
                        expected: self.expected.clone(),
                        actual,
                        path: self.path.clone(),
                    },
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_corruption_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_blob(b"hello").unwrap();
        assert_eq!(store.read_blob(&d).unwrap(), b"hello");
        fs::write(store.blob_path(&d), b"hellO").unwrap();
        let err = store.read_blob(&d).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&d.to_string()));
        fs::write(store.blob_path(&d), b"hell").unwrap();
        assert!(matches!(
            store.read_blob(&d).unwrap_err(),
            ImageError::Corrupt { .. }
        ));
    }

    #[test]
    fn a_stream_that_does_not_match_its_digest_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wrong = Digest::of(b"other");
        assert!(store.put_blob_from(&b"content"[..], Some(&wrong)).is_err());
        assert!(!store.has_blob(&wrong));
        assert!(store.blobs().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn names_point_at_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_blob(b"{}").unwrap();
        store.tag("web", &manifest_descriptor(&d, 2)).unwrap();
        store.tag("web", &manifest_descriptor(&d, 2)).unwrap();
        assert_eq!(store.names().unwrap().len(), 1);
        assert_eq!(
            super::super::image::descriptor_digest(&store.resolve("web").unwrap()).unwrap(),
            d
        );
        assert!(store.resolve(&d.hex()[..12]).is_ok());
        assert!(store.untag("web").unwrap());
        assert!(store.resolve("web").is_err());
    }
}
