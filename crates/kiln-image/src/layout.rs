//! Import from and export to an OCI image layout directory — what skopeo
//! (`oci:DIR:NAME`), umoci (`--image DIR:NAME`) and buildkit read and write.
//!
//! Import walks the layout's `index.json` from the chosen entries down:
//! every blob is copied through [`Store::put_blob_from`] with the digest its
//! descriptor names, so a mismatching blob is refused naming that digest and
//! nothing of it is stored; its size must match the descriptor's too. An
//! entry that is an index (a multi-platform image) resolves to its
//! `linux/amd64` manifest, through nested indexes if need be; the store keeps
//! image manifests, so the name points at that manifest (whose digest
//! differs from the index's). The index blobs met on the way are stored too
//! and left to `gc`.
//!
//! Export writes the image's blobs (read verified) and points `NAME` at its
//! manifest in `index.json`, adding to a layout that is already there (a
//! blob already in it with the right size is not rewritten).
//!
//! Limits: sha256 digests only; Docker schema 1 manifests and artifact
//! manifests are refused; blobs only referenced by `urls` (foreign layers)
//! must be present in the layout.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType, Os,
};

use crate::digest::Digest;
use crate::error::ImageError;
use crate::image::{Image, descriptor_digest};
use crate::store::{REF_NAME, Store, ref_name};
use crate::unpack::io_error;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// How deep indexes may nest before an import gives up.
const MAX_NESTING: usize = 4;

/// A manifest-like JSON document, classified.
#[derive(Debug, Clone)]
pub enum Document {
    Manifest(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// Parses a manifest or an index (OCI or Docker v2), deciding which by the
/// descriptor's media type, the document's own, or its keys, and checks
/// that every descriptor in it names a sha256 digest.
pub fn parse_document(bytes: &[u8], media_type: Option<&str>) -> Result<Document, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let own = value.get("mediaType").and_then(|m| m.as_str());
    let kind_of = |m: &str| match m {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(false),
        OCI_INDEX | DOCKER_LIST => Some(true),
        _ => None,
    };
    let declared = media_type.and_then(kind_of);
    if let (Some(said), Some(is)) = (declared, own.and_then(kind_of))
        && said != is
    {
        return Err(format!(
            "its descriptor says {} but the document is a {}",
            media_type.unwrap_or(""),
            own.unwrap_or("")
        ));
    }
    let is_index = match declared.or_else(|| own.and_then(kind_of)) {
        Some(is_index) => is_index,
        None if own.is_some() || media_type.is_some() => {
            return Err(format!(
                "unsupported document type {} (kiln reads OCI and Docker v2 manifests and indexes)",
                own.or(media_type).unwrap_or("")
            ));
        }
        None if value.get("manifests").is_some() => true,
        None if value.get("layers").is_some() || value.get("config").is_some() => false,
        None => return Err("neither a manifest nor an index".to_owned()),
    };
    if value.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
        return Err("schemaVersion is not 2".to_owned());
    }
    let sha256 = |d: &Descriptor| descriptor_digest(d).map(drop).map_err(|e| e.to_string());
    if is_index {
        let index: ImageIndex =
            serde_json::from_value(value).map_err(|e| format!("not a valid index: {e}"))?;
        index.manifests().iter().try_for_each(sha256)?;
        Ok(Document::Index(Box::new(index)))
    } else {
        let manifest: ImageManifest =
            serde_json::from_value(value).map_err(|e| format!("not a valid manifest: {e}"))?;
        sha256(manifest.config())?;
        manifest.layers().iter().try_for_each(sha256)?;
        Ok(Document::Manifest(Box::new(manifest)))
    }
}

/// Where an import takes blobs from.
pub(crate) trait BlobSource {
    /// Names the source in errors.
    fn describe(&self) -> String;
    /// Puts the blob `d` names into the store, verified against its digest
    /// and size, and returns the digest.
    fn fetch(&self, store: &Store, d: &Descriptor) -> Result<Digest, ImageError>;
}

/// Checks a stored blob's size against its descriptor.
pub(crate) fn check_size(store: &Store, d: &Descriptor, digest: &Digest) -> Result<(), ImageError> {
    let path = store.blob_path(digest);
    let size = fs::metadata(&path)
        .map_err(|e| io_error("inspect", &path, e))?
        .len();
    if size != d.size() {
        return Err(ImageError::Invalid(format!(
            "blob {digest} has {size} bytes but its descriptor says {}",
            d.size()
        )));
    }
    Ok(())
}

struct LayoutDir {
    dir: PathBuf,
}

impl BlobSource for LayoutDir {
    fn describe(&self) -> String {
        format!("OCI layout {}", self.dir.display())
    }

    fn fetch(&self, store: &Store, d: &Descriptor) -> Result<Digest, ImageError> {
        let digest = descriptor_digest(d)?;
        if !store.has_blob(&digest) {
            let path = self.dir.join("blobs/sha256").join(digest.hex());
            let file = File::open(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ImageError::Invalid(format!(
                    "blob {digest} is missing from {}",
                    self.describe()
                )),
                _ => io_error("open", &path, e),
            })?;
            store
                .put_blob_from(BufReader::with_capacity(1 << 20, file), Some(&digest))
                .map_err(|e| match e {
                    ImageError::DigestMismatch {
                        expected, actual, ..
                    } => ImageError::DigestMismatch {
                        expected,
                        actual,
                        path,
                    },
                    other => other,
                })?;
        }
        check_size(store, d, &digest)?;
        Ok(digest)
    }
}

/// Imports what `d` names: an image manifest, or the `linux/amd64` image of
/// an index. Returns the loaded image.
pub(crate) fn import_descriptor(
    store: &Store,
    src: &dyn BlobSource,
    d: &Descriptor,
    depth: usize,
) -> Result<Image, ImageError> {
    let digest = src.fetch(store, d)?;
    let bytes = store.read_blob(&digest)?;
    let media_type = d.media_type().to_string();
    let document = parse_document(&bytes, Some(media_type.as_str()).filter(|m| !m.is_empty()))
        .map_err(|why| ImageError::Invalid(format!("{digest} in {}: {why}", src.describe())))?;
    match document {
        Document::Manifest(manifest) => {
            src.fetch(store, manifest.config())?;
            for layer in manifest.layers() {
                src.fetch(store, layer)?;
            }
            store.load_image(&digest)
        }
        Document::Index(index) => {
            if depth >= MAX_NESTING {
                return Err(ImageError::Invalid(format!(
                    "index {digest} in {} nests more than {MAX_NESTING} levels deep",
                    src.describe()
                )));
            }
            let chosen = pick_platform(&index).ok_or_else(|| {
                let have: Vec<String> = index.manifests().iter().map(platform_name).collect();
                ImageError::Unsupported(format!(
                    "index {digest} in {} has no linux/amd64 image (it has: {})\n  hint: kiln runs linux/amd64 images; pick one that has that platform",
                    src.describe(),
                    if have.is_empty() { "nothing".to_owned() } else { have.join(", ") }
                ))
            })?;
            import_descriptor(store, src, chosen, depth + 1)
        }
    }
}

/// The `linux/amd64` entry of an index; a lone entry without a platform
/// counts as one (indexes written by hand or by `docker save` omit it).
fn pick_platform(index: &ImageIndex) -> Option<&Descriptor> {
    let manifests = index.manifests();
    manifests
        .iter()
        .find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        })
        .or_else(|| match manifests.as_slice() {
            [only] if only.platform().is_none() => Some(only),
            _ => None,
        })
}

fn platform_name(d: &Descriptor) -> String {
    match d.platform() {
        Some(p) => match p.variant() {
            Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
            None => format!("{}/{}", p.os(), p.architecture()),
        },
        None => "an entry without a platform".to_owned(),
    }
}

/// The entries of `index` that `name` selects (all when `None`), imported.
pub(crate) fn import_entries<'i>(
    store: &Store,
    src: &dyn BlobSource,
    index: &'i ImageIndex,
    name: Option<&str>,
) -> Result<Vec<(&'i Descriptor, Image)>, ImageError> {
    let chosen: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| name.is_none() || ref_name(d) == name)
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = index.manifests().iter().filter_map(ref_name).collect();
        let have = if names.is_empty() {
            "no named images".to_owned()
        } else {
            names.join(", ")
        };
        return Err(ImageError::Invalid(match name {
            Some(name) => format!(
                "no image named `{name}` in {} (it has: {have})",
                src.describe()
            ),
            None => format!("{} has no images", src.describe()),
        }));
    }
    chosen
        .into_iter()
        .map(|d| import_descriptor(store, src, d, 0).map(|image| (d, image)))
        .collect()
}

impl Store {
    /// Imports the images of the OCI layout `dir` — the one named `name`, or
    /// all of them — and tags each under its layout name. Returns each
    /// image with its name.
    pub fn import_oci_layout(
        &self,
        dir: &Path,
        name: Option<&str>,
    ) -> Result<Vec<(Option<String>, Image)>, ImageError> {
        let layout = dir.join("oci-layout");
        if !layout.is_file() {
            return Err(ImageError::Invalid(format!(
                "{} is not an OCI image layout (it has no oci-layout file)\n  hint: `skopeo copy SRC oci:DIR:NAME` writes one",
                dir.display()
            )));
        }
        let index_path = dir.join("index.json");
        let bytes = fs::read(&index_path).map_err(|e| io_error("read", &index_path, e))?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|source| ImageError::BadIndex {
                path: index_path.clone(),
                source,
            })?;
        let src = LayoutDir {
            dir: dir.to_path_buf(),
        };
        let mut out = Vec::new();
        for (d, image) in import_entries(self, &src, &index, name)? {
            let name = ref_name(d).map(str::to_owned);
            if let Some(name) = &name {
                self.tag(name, &image.descriptor())?;
            }
            out.push((name, image));
        }
        Ok(out)
    }

    /// Writes `image` into the OCI layout `dir` (created if missing, added
    /// to if present) under `name`.
    pub fn export_oci_layout(
        &self,
        image: &Image,
        dir: &Path,
        name: &str,
    ) -> Result<(), ImageError> {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageError::Invalid(format!(
                "`{name}` is not a valid image name for an OCI layout"
            )));
        }
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| io_error("create", &blobs, e))?;
        let layout = dir.join("oci-layout");
        if !layout.is_file() {
            write_file_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        for digest in image.blobs()? {
            let dest = blobs.join(digest.hex());
            if fs::metadata(&dest)
                .is_ok_and(|m| m.len() == self.blob_len(&digest).unwrap_or(u64::MAX))
            {
                continue;
            }
            let tmp = blobs.join(format!(".{}.tmp", digest.hex()));
            let result = File::create(&tmp)
                .map_err(|e| io_error("create", &tmp, e))
                .and_then(|mut f| {
                    self.copy_blob(&digest, &mut f, &tmp)?;
                    f.sync_all().map_err(|e| io_error("fsync", &tmp, e))
                })
                .and_then(|()| {
                    fs::rename(&tmp, &dest).map_err(|e| io_error("move into place", &dest, e))
                });
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result?;
        }
        let index_path = dir.join("index.json");
        let mut index = match fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice::<ImageIndex>(&bytes).map_err(|source| {
                ImageError::BadIndex {
                    path: index_path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ImageIndexBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageIndex)
                .manifests(Vec::new())
                .build()
                .expect("an empty index is valid"),
            Err(e) => return Err(io_error("read", &index_path, e)),
        };
        let mut entry = image.descriptor();
        if let Some(mt) = image.manifest.media_type() {
            entry.set_media_type(mt.clone());
        }
        entry.set_annotations(Some([(REF_NAME.to_owned(), name.to_owned())].into()));
        let mut manifests = index.manifests().clone();
        manifests.retain(|m| ref_name(m) != Some(name));
        manifests.push(entry);
        index.set_manifests(manifests);
        let bytes = serde_json::to_vec_pretty(&index).expect("an index serialises");
        write_file_atomic(&index_path, &bytes)
    }

    /// Streams blob `digest` into `out`, verified: a corrupt blob is refused
    /// by digest (after `out` got its bytes: callers discard `out` on error).
    pub fn copy_blob(
        &self,
        digest: &Digest,
        out: &mut impl Write,
        out_path: &Path,
    ) -> Result<u64, ImageError> {
        let mut reader = self.open_blob(digest)?;
        let mut buf = vec![0; 1 << 20];
        let mut total = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(reader.error(e)),
            };
            out.write_all(&buf[..n])
                .map_err(|e| io_error("write", out_path, e))?;
            total += n as u64;
        }
    }

    /// The size of a stored blob.
    pub fn blob_len(&self, digest: &Digest) -> Result<u64, ImageError> {
        let path = self.blob_path(digest);
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ImageError::BlobMissing {
                    digest: digest.clone(),
                    path: path.clone(),
                },
                _ => io_error("inspect", &path, e),
            })
    }
}

/// Writes a file next to its destination, then renames it into place.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| io_error("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_classified_by_media_type_then_keys() {
        let d = Digest::of(b"x");
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_document(manifest.as_bytes(), None),
            Ok(Document::Manifest(_))
        ));
        assert!(parse_document(manifest.as_bytes(), Some(OCI_INDEX)).is_err());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}]}}"#
        );
        assert!(matches!(
            parse_document(index.as_bytes(), Some(DOCKER_LIST)),
            Ok(Document::Index(_))
        ));
        let sha512 = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"sha512:{}","size":1}}]}}"#,
            "a".repeat(128)
        );
        assert!(
            parse_document(sha512.as_bytes(), None)
                .unwrap_err()
                .contains("sha256")
        );
        assert!(parse_document(br#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#, None).is_err());
    }
}
