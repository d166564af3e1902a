//! `docker save` archives in, `docker load` archives out.
//!
//! Import reads the archive once, as a stream (it may come from a pipe):
//! every member that can be a blob is hashed into the store on the way, the
//! small documents (`manifest.json`, `index.json`, `repositories`) are kept
//! in memory, and the legacy per-layer `json`/`VERSION` files are skipped.
//! Then:
//! - an archive with `index.json` (Docker 25+, OCI layout in a tar) is
//!   imported like an OCI layout: its manifests are kept byte for byte, every
//!   blob checked against the digest its descriptor names;
//! - a legacy archive (`manifest.json` only) gets an OCI manifest written by
//!   kiln around the config blob, which is kept byte for byte, so the config
//!   digest (Docker's image ID) is the same on both sides. Layers are stored
//!   as they come: `application/vnd.oci.image.layer.v1.tar`, whose digest
//!   must equal the config's diff_id, or `…tar+gzip` when compressed, whose
//!   uncompressed content is hashed and checked against the diff_id.
//!
//! Images are tagged under their `RepoTags`. Members stored before an import
//! fails stay in the store until `gc`.
//!
//! Export writes the legacy layout that every `docker load` reads:
//! `<config hex>.json`, `<diff_id hex>/layer.tar` (uncompressed: gzip
//! layers are decompressed, in a first pass that checks the diff_id and
//! learns the size, then a second that writes), `manifest.json` and
//! `repositories`. Headers are fixed (mode, owner, mtime), so the same image
//! and tag give the same bytes. On error the output is incomplete.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path};

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageManifestBuilder, MediaType,
};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, HashingReader};
use crate::error::ImageError;
use crate::image::Image;
use crate::layout::{BlobSource, check_size, import_entries};
use crate::store::{Store, ref_name};
use crate::unpack::{Compression, Watch, compression_of};

/// The largest `manifest.json`/`index.json`/`repositories` accepted.
const MAX_DOCUMENT: u64 = 16 << 20;
/// A fixed mtime for exported members (2000-01-01).
const EXPORT_MTIME: u64 = 946_684_800;

/// One image of `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
struct ArchiveImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Debug, Clone)]
struct Ingested {
    digest: Digest,
    size: u64,
    gzip: bool,
}

#[derive(Debug)]
enum Member {
    Blob(Ingested),
    /// A link to another member (by normalised path); `docker save` links
    /// identical layers.
    Link(String),
}

#[derive(Debug, Default)]
struct Contents {
    members: HashMap<String, Member>,
    documents: HashMap<String, Vec<u8>>,
}

impl Contents {
    fn lookup(&self, path: &str) -> Result<&Ingested, ImageError> {
        let mut at = clean(Path::new(path));
        for _ in 0..8 {
            match self.members.get(&at) {
                Some(Member::Blob(b)) => return Ok(b),
                Some(Member::Link(to)) => at = to.clone(),
                None => break,
            }
        }
        Err(ImageError::Invalid(format!(
            "the docker archive has no file `{path}` (named by its manifest.json)"
        )))
    }
}

/// The archive's blobs, by digest, for the OCI-layout path.
struct ArchiveBlobs<'a>(&'a Contents);

impl BlobSource for ArchiveBlobs<'_> {
    fn describe(&self) -> String {
        "the docker archive".to_owned()
    }

    fn fetch(&self, store: &Store, d: &Descriptor) -> Result<Digest, ImageError> {
        let digest = crate::image::descriptor_digest(d)?;
        let present = self
            .0
            .members
            .values()
            .any(|m| matches!(m, Member::Blob(b) if b.digest == digest));
        if !present {
            return Err(ImageError::Invalid(format!(
                "blob {digest} is missing from the docker archive"
            )));
        }
        check_size(store, d, &digest)?;
        Ok(digest)
    }
}

impl Store {
    /// Imports every image of a `docker save` archive and tags each under
    /// its `RepoTags`. Returns one row per tag (or one unnamed row).
    pub fn import_docker_archive(
        &self,
        archive: impl Read,
    ) -> Result<Vec<(Option<String>, Image)>, ImageError> {
        let contents = self.ingest(archive)?;
        let saved = match contents.documents.get("manifest.json") {
            Some(bytes) => {
                let images: Vec<ArchiveImage> = serde_json::from_slice(bytes).map_err(|e| {
                    ImageError::Invalid(format!(
                        "the docker archive's manifest.json is not valid: {e}"
                    ))
                })?;
                images
            }
            None => Vec::new(),
        };
        let mut out = Vec::new();
        if let Some(bytes) = contents.documents.get("index.json") {
            let index: ImageIndex = serde_json::from_slice(bytes).map_err(|e| {
                ImageError::Invalid(format!("the docker archive's index.json is not valid: {e}"))
            })?;
            for (d, image) in import_entries(self, &ArchiveBlobs(&contents), &index, None)? {
                let mut names: Vec<String> = saved
                    .iter()
                    .filter(|a| {
                        contents
                            .lookup(&a.config)
                            .is_ok_and(|c| c.digest == image.config_digest)
                    })
                    .flat_map(|a| a.repo_tags.clone().unwrap_or_default())
                    .collect();
                if names.is_empty()
                    && let Some(name) = d
                        .annotations()
                        .as_ref()
                        .and_then(|a| a.get("io.containerd.image.name"))
                        .map(String::as_str)
                        .or_else(|| ref_name(d))
                {
                    names.push(name.to_owned());
                }
                self.tag_all(names, image, &mut out)?;
            }
        } else if !saved.is_empty() {
            for entry in &saved {
                let image = self.import_legacy(&contents, entry)?;
                self.tag_all(entry.repo_tags.clone().unwrap_or_default(), image, &mut out)?;
            }
        } else {
            return Err(ImageError::Invalid(
                "not a docker archive: it has neither manifest.json nor index.json\n  hint: make one with `docker save IMAGE -o FILE.tar`".to_owned(),
            ));
        }
        Ok(out)
    }

    fn tag_all(
        &self,
        names: Vec<String>,
        image: Image,
        out: &mut Vec<(Option<String>, Image)>,
    ) -> Result<(), ImageError> {
        if names.is_empty() {
            out.push((None, image));
            return Ok(());
        }
        for name in names {
            self.tag(&name, &image.descriptor())?;
            out.push((Some(name), image.clone()));
        }
        Ok(())
    }

    fn ingest(&self, archive: impl Read) -> Result<Contents, ImageError> {
        let bad = |source| ImageError::BadArchive {
            what: "the docker archive".to_owned(),
            source,
        };
        let mut contents = Contents::default();
        let mut archive = tar::Archive::new(archive);
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let path = clean(&entry.path().map_err(bad)?);
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(bad)?
                    .unwrap_or_default()
                    .into_owned();
                let to = if kind.is_symlink() {
                    clean(
                        &Path::new(&path)
                            .parent()
                            .unwrap_or(Path::new(""))
                            .join(target),
                    )
                } else {
                    clean(&target)
                };
                contents.members.insert(path, Member::Link(to));
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            if matches!(
                path.as_str(),
                "manifest.json" | "index.json" | "repositories" | "oci-layout"
            ) {
                let mut bytes = Vec::new();
                (&mut entry)
                    .take(MAX_DOCUMENT + 1)
                    .read_to_end(&mut bytes)
                    .map_err(bad)?;
                if bytes.len() as u64 > MAX_DOCUMENT {
                    return Err(ImageError::Invalid(format!(
                        "the docker archive's {path} is larger than {MAX_DOCUMENT} bytes"
                    )));
                }
                contents.documents.insert(path, bytes);
                continue;
            }
            if path.ends_with("/json") || path.ends_with("/VERSION") {
                continue; // legacy v1 metadata, superseded by the config
            }
            let expected = path
                .strip_prefix("blobs/sha256/")
                .map(|hex| format!("sha256:{hex}").parse::<Digest>())
                .transpose()
                .map_err(|e| ImageError::Invalid(format!("the docker archive's {path}: {e}")))?;
            let declared = entry.size();
            let mut head = Head::new(&mut entry);
            let (digest, size) = self.put_blob_from(&mut head, expected.as_ref())?;
            if size != declared {
                return Err(bad(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{path} declares {declared} bytes but the archive ends after {size}"),
                )));
            }
            let gzip = head.bytes.starts_with(&[0x1f, 0x8b]);
            contents
                .members
                .insert(path, Member::Blob(Ingested { digest, size, gzip }));
        }
        Ok(contents)
    }

    fn import_legacy(
        &self,
        contents: &Contents,
        entry: &ArchiveImage,
    ) -> Result<Image, ImageError> {
        let config = contents.lookup(&entry.config)?.clone();
        let parsed: ImageConfiguration = self.read_json(&config.digest, "image config")?;
        let diff_ids = parsed.rootfs().diff_ids();
        if diff_ids.len() != entry.layers.len() {
            return Err(ImageError::Invalid(format!(
                "the docker archive's image {} lists {} layers but its config has {} diff_ids",
                config.digest,
                entry.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (path, diff_id) in entry.layers.iter().zip(diff_ids) {
            let layer = contents.lookup(path)?;
            let diff_id: Digest = diff_id
                .parse()
                .map_err(|e| ImageError::Invalid(format!("image config {}: {e}", config.digest)))?;
            let (actual, media_type) = if layer.gzip {
                (
                    self.uncompressed_digest(&layer.digest)?.0,
                    MediaType::ImageLayerGzip,
                )
            } else {
                (layer.digest.clone(), MediaType::ImageLayer)
            };
            if actual != diff_id {
                return Err(ImageError::Invalid(format!(
                    "layer `{path}` of the docker archive has content {actual}, but the config says {diff_id}"
                )));
            }
            layers.push(Descriptor::new(media_type, layer.size, &layer.digest));
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config.size,
                &config.digest,
            ))
            .layers(layers)
            .build()
            .map_err(|e| ImageError::Invalid(format!("cannot build a manifest: {e}")))?;
        let (digest, _) = self.put_json(&manifest)?;
        self.load_image(&digest)
    }

    /// The digest and size of a gzip blob's uncompressed content, verified.
    pub fn uncompressed_digest(&self, digest: &Digest) -> Result<(Digest, u64), ImageError> {
        let reader = BufReader::with_capacity(256 << 10, Watch::new(self.open_blob(digest)?));
        let mut decoder = flate2::bufread::MultiGzDecoder::new(reader);
        let mut hashing = HashingReader::new(&mut decoder);
        let copied = io::copy(&mut hashing, &mut io::sink());
        let (uncompressed, size) = hashing.finish();
        let mut reader = decoder.into_inner();
        let drained = io::copy(&mut reader, &mut io::sink());
        let watch = reader.get_ref();
        if watch.corrupt {
            return Err(ImageError::Corrupt {
                digest: digest.clone(),
                path: self.blob_path(digest),
            });
        }
        copied
            .and(drained)
            .map_err(|source| ImageError::BadArchive {
                what: format!("gzip layer {digest}"),
                source,
            })?;
        Ok((uncompressed, size))
    }

    /// Writes `image` as a `docker load` archive tagged `repo_tag`
    /// (`REPO[:TAG]`, `latest` if no tag is given).
    pub fn export_docker_archive(
        &self,
        image: &Image,
        repo_tag: &str,
        out: impl Write,
    ) -> Result<(), ImageError> {
        let (repo, tag) = parse_repo_tag(repo_tag)?;
        let write_err = |source| ImageError::Io {
            op: "write docker archive",
            path: "<output>".into(),
            source,
        };
        let diff_ids: Vec<Digest> = image
            .config
            .rootfs()
            .diff_ids()
            .iter()
            .map(|d| d.parse::<Digest>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                ImageError::Invalid(format!("image config {}: {e}", image.config_digest))
            })?;
        if diff_ids.len() != image.layers().len() {
            return Err(ImageError::Invalid(format!(
                "image {} has {} layers but its config lists {} diff_ids",
                image.digest,
                image.layers().len(),
                diff_ids.len()
            )));
        }
        let mut tar = tar::Builder::new(out);
        let config_name = format!("{}.json", image.config_digest.hex());
        let config = self.read_blob(&image.config_digest)?;
        append(&mut tar, &config_name, config.len() as u64, &config[..]).map_err(write_err)?;
        let mut written: BTreeMap<Digest, String> = BTreeMap::new();
        let mut layer_names = Vec::new();
        for (layer, diff_id) in image.layers().iter().zip(&diff_ids) {
            let name = format!("{}/layer.tar", diff_id.hex());
            layer_names.push(name.clone());
            if written.insert(diff_id.clone(), name.clone()).is_some() {
                continue;
            }
            let mut dir = header(0, tar::EntryType::Directory);
            tar.append_data(&mut dir, format!("{}/", diff_id.hex()), io::empty())
                .map_err(write_err)?;
            let digest = crate::image::descriptor_digest(layer)?;
            self.append_layer(
                &mut tar,
                &name,
                &digest,
                layer.media_type().as_ref(),
                diff_id,
            )?;
        }
        let manifest = vec![ArchiveImage {
            config: config_name,
            repo_tags: Some(vec![format!("{repo}:{tag}")]),
            layers: layer_names.clone(),
        }];
        let manifest = serde_json::to_vec(&manifest).expect("manifest.json serialises");
        append(
            &mut tar,
            "manifest.json",
            manifest.len() as u64,
            &manifest[..],
        )
        .map_err(write_err)?;
        if let Some(top) = layer_names.last() {
            let top = top.trim_end_matches("/layer.tar");
            let repositories = serde_json::json!({ repo: { tag: top } }).to_string();
            append(
                &mut tar,
                "repositories",
                repositories.len() as u64,
                repositories.as_bytes(),
            )
            .map_err(write_err)?;
        }
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(write_err)
    }

    fn append_layer<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        name: &str,
        digest: &Digest,
        media_type: &str,
        diff_id: &Digest,
    ) -> Result<(), ImageError> {
        let mut reader = BufReader::with_capacity(256 << 10, Watch::new(self.open_blob(digest)?));
        let head = match reader.fill_buf() {
            Ok(head) => head[..head.len().min(4)].to_vec(),
            Err(e) => return Err(reader.get_ref().inner.error(e)),
        };
        let compression = compression_of(&digest.to_string(), Some(media_type), &head)?;
        let corrupt = || ImageError::Corrupt {
            digest: digest.clone(),
            path: self.blob_path(digest),
        };
        let result = match compression {
            Compression::None => {
                if digest != diff_id {
                    return Err(ImageError::Invalid(format!(
                        "uncompressed layer {digest} does not match its diff_id {diff_id}"
                    )));
                }
                let size = self.blob_len(digest)?;
                let result = append(tar, name, size, &mut reader);
                if reader.get_ref().corrupt {
                    return Err(corrupt());
                }
                result
            }
            Compression::Gzip => {
                drop(reader);
                let (actual, size) = self.uncompressed_digest(digest)?;
                if actual != *diff_id {
                    return Err(ImageError::Invalid(format!(
                        "layer {digest} uncompresses to {actual}, but the config says {diff_id}"
                    )));
                }
                let reader =
                    BufReader::with_capacity(256 << 10, Watch::new(self.open_blob(digest)?));
                let mut decoder = flate2::bufread::MultiGzDecoder::new(reader);
                let result = append(tar, name, size, &mut decoder);
                if decoder.get_ref().get_ref().corrupt {
                    return Err(corrupt());
                }
                result
            }
        };
        result.map_err(|source| ImageError::Io {
            op: "write docker archive",
            path: name.into(),
            source,
        })
    }
}

fn header(size: u64, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(EXPORT_MTIME);
    h
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: impl Read,
) -> io::Result<()> {
    let mut h = header(size, tar::EntryType::Regular);
    // `append_data` trusts the size; a short reader would leave a broken tar.
    let mut exact = ExactSize {
        inner: data,
        left: size,
    };
    tar.append_data(&mut h, name, &mut exact)?;
    if exact.left != 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{name} ended {} bytes early", exact.left),
        ));
    }
    Ok(())
}

/// Fails a read that would go past `left` or end before it.
struct ExactSize<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more data than declared",
                )),
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "less data than declared",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Remembers the first bytes read through it (to sniff compression).
struct Head<R> {
    inner: R,
    bytes: Vec<u8>,
}

impl<R> Head<R> {
    fn new(inner: R) -> Self {
        Head {
            inner,
            bytes: Vec::new(),
        }
    }
}

impl<R: Read> Read for Head<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let want = 4usize.saturating_sub(self.bytes.len()).min(n);
        self.bytes.extend_from_slice(&buf[..want]);
        Ok(n)
    }
}

/// A member path as a key: `.` and leading `/` dropped, `..` resolved
/// lexically (no file is ever written from these names).
fn clean(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

/// Splits `REPO[:TAG]` and checks both parts as Docker would.
pub fn parse_repo_tag(reference: &str) -> Result<(String, String), ImageError> {
    let (repo, tag) = match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (reference, "latest"),
    };
    let repo_ok = !repo.is_empty()
        && !repo.starts_with(['/', '.', '-', ':'])
        && !repo.ends_with(['/', '.', '-', ':'])
        && repo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
        && !repo.contains("//");
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !repo_ok || !tag_ok {
        return Err(ImageError::Invalid(format!(
            "`{reference}` is not a valid docker image name\n  hint: use REPO:TAG, lowercase, like `kiln/web:1.0`"
        )));
    }
    Ok((repo.to_owned(), tag.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_tags_parse_like_docker() {
        assert_eq!(
            parse_repo_tag("kiln/web:1.0").unwrap(),
            ("kiln/web".into(), "1.0".into())
        );
        assert_eq!(
            parse_repo_tag("web").unwrap(),
            ("web".into(), "latest".into())
        );
        assert_eq!(
            parse_repo_tag("localhost:5000/web").unwrap(),
            ("localhost:5000/web".into(), "latest".into())
        );
        for bad in ["", "Web:1", "web:", "web:-x", "/web", "web:a b"] {
            assert!(parse_repo_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn member_paths_are_cleaned_lexically() {
        assert_eq!(clean(Path::new("./a/../b/layer.tar")), "b/layer.tar");
        assert_eq!(clean(Path::new("/x/./y")), "x/y");
    }
}
