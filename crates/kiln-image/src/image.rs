//! An image as stored: its manifest (kept as the exact bytes its digest
//! names), its config, and its layers.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageManifest, MediaType};

use crate::digest::Digest;
use crate::error::ImageError;
use crate::store::{Store, manifest_descriptor};

/// A loaded, verified image.
#[derive(Debug, Clone)]
pub struct Image {
    pub digest: Digest,
    /// The manifest exactly as stored (its digest is over these bytes).
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config: ImageConfiguration,
}

impl Image {
    /// The layers, in order (base first).
    pub fn layers(&self) -> &[Descriptor] {
        self.manifest.layers()
    }

    /// Every blob this image needs: manifest, config, layers.
    pub fn blobs(&self) -> Result<Vec<Digest>, ImageError> {
        let mut out = vec![self.digest.clone(), self.config_digest.clone()];
        for layer in self.layers() {
            out.push(descriptor_digest(layer)?);
        }
        Ok(out)
    }

    pub fn descriptor(&self) -> Descriptor {
        manifest_descriptor(&self.digest, self.manifest_bytes.len() as u64)
    }
}

/// The digest of a descriptor, refusing anything but sha256.
pub fn descriptor_digest(d: &Descriptor) -> Result<Digest, ImageError> {
    Digest::try_from(d.digest()).map_err(|e| ImageError::Invalid(e.to_string()))
}

impl Store {
    /// Loads and verifies the manifest and config of image `digest`.
    pub fn load_image(&self, digest: &Digest) -> Result<Image, ImageError> {
        let manifest_bytes = self.read_blob(digest)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| ImageError::BadJson {
                what: "manifest",
                digest: digest.clone(),
                source,
            })?;
        if let Some(mt) = manifest.media_type()
            && !matches!(mt, MediaType::ImageManifest)
            && mt.to_string() != "application/vnd.docker.distribution.manifest.v2+json"
        {
            return Err(ImageError::Invalid(format!(
                "{digest} is a {mt}, not an image manifest"
            )));
        }
        let config_digest = descriptor_digest(manifest.config())?;
        let config = self.read_json(&config_digest, "image config")?;
        Ok(Image {
            digest: digest.clone(),
            manifest_bytes,
            manifest,
            config_digest,
            config,
        })
    }

    /// Loads the image a name or digest refers to.
    pub fn image(&self, reference: &str) -> Result<Image, ImageError> {
        let d = self.resolve(reference)?;
        self.load_image(&descriptor_digest(&d)?)
    }

    /// Stores a JSON document exactly as serialised and returns its digest
    /// and size.
    pub fn put_json<T: serde::Serialize>(&self, value: &T) -> Result<(Digest, u64), ImageError> {
        let bytes = serde_json::to_vec(value).expect("OCI documents serialise");
        let digest = self.put_blob(&bytes)?;
        Ok((digest, bytes.len() as u64))
    }
}
