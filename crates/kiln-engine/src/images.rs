//! How a generation's image references become manifest digests: images of
//! the file are built (cached, reproducible), every other reference must
//! already be in the image store, and with `[policy] require_signed` every
//! image a service runs must carry a valid signature by a trusted key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_image::progress::Progress;
use kiln_image::{Digest as ImageDigest, Store};
use kiln_plan::Digest;
use kiln_spec::Spec;
use kiln_spec::model::ImageSource;

use crate::resolve::ResolveProblem;

/// Where a generation's image references are resolved.
pub trait ImageResolver {
    /// Builds every `[image.NAME]` of `spec` (cached); name → manifest digest.
    fn build_all(
        &mut self,
        spec: &Spec,
        dir: &Path,
    ) -> Result<BTreeMap<String, Digest>, ResolveProblem>;
    /// The manifest digest of a reference that is not an image of the file.
    fn source(&mut self, source: &ImageSource, dir: &Path) -> Result<Digest, String>;
    /// Checks the signature policy for one image a service runs.
    fn check_signed(&mut self, digest: &Digest, trusted_keys: &[PathBuf]) -> Result<(), String>;
}

/// The real resolver: kiln's image store.
pub struct StoreImages<'a> {
    pub store: &'a Store,
    /// SOURCE_DATE_EPOCH for builds (0 unless set).
    pub source_date_epoch: u64,
    pub progress: &'a mut dyn Progress,
}

impl std::fmt::Debug for StoreImages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreImages")
            .field("store", &self.store.root())
            .finish_non_exhaustive()
    }
}

/// `SOURCE_DATE_EPOCH` from the environment, 0 when unset.
pub fn source_date_epoch() -> Result<u64, String> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

fn to_plan(d: &ImageDigest) -> Digest {
    Digest(d.to_string())
}

fn to_image(d: &Digest) -> Result<ImageDigest, String> {
    d.0.parse()
        .map_err(|e: kiln_image::digest::BadDigest| e.to_string())
}

impl ImageResolver for StoreImages<'_> {
    fn build_all(
        &mut self,
        spec: &Spec,
        dir: &Path,
    ) -> Result<BTreeMap<String, Digest>, ResolveProblem> {
        let outcomes = kiln_image::build::build_all(
            self.store,
            spec,
            dir,
            self.source_date_epoch,
            self.progress,
        )
        .map_err(|e| ResolveProblem {
            what: "build".into(),
            why: e.to_string(),
            hint: "fix the image definition or its inputs, then run `kiln build`".into(),
        })?;
        Ok(outcomes
            .into_iter()
            .map(|(name, o)| (name, to_plan(&o.digest)))
            .collect())
    }

    fn source(&mut self, source: &ImageSource, dir: &Path) -> Result<Digest, String> {
        let in_store = |digest: &str, hint: &str| -> Result<Digest, String> {
            let d: ImageDigest = digest
                .parse()
                .map_err(|e: kiln_image::digest::BadDigest| e.to_string())?;
            if !self.store.has_blob(&d) {
                return Err(format!(
                    "{d} is not in the image store ({})\n  hint: {hint}",
                    self.store.root().display()
                ));
            }
            self.store.load_image(&d).map_err(|e| e.to_string())?;
            Ok(to_plan(&d))
        };
        match source {
            ImageSource::Digest(d) => in_store(
                d,
                "import it with `kiln image import` or pull it with `kiln image pull`",
            ),
            ImageSource::Registry { name, digest } => in_store(
                digest,
                &format!("pull it first: `kiln image pull {name}@{digest}`"),
            ),
            ImageSource::OciLayout(layout) => {
                let images = self
                    .store
                    .import_oci_layout(&dir.join(layout), None)
                    .map_err(|e| e.to_string())?;
                match images.as_slice() {
                    [(_, image)] => Ok(to_plan(&image.digest)),
                    [] => Err(format!("the OCI layout {layout} holds no image")),
                    many => Err(format!(
                        "the OCI layout {layout} holds {} images; kiln needs exactly one",
                        many.len()
                    )),
                }
            }
            ImageSource::Scratch => Err("`scratch` is not an image a service can run".into()),
            ImageSource::Local(name) => Err(format!("`{name}` is not an image of this file")),
        }
    }

    fn check_signed(&mut self, digest: &Digest, trusted_keys: &[PathBuf]) -> Result<(), String> {
        let d = to_image(digest)?;
        let image = self.store.load_image(&d).map_err(|e| e.to_string())?;
        kiln_image::sign::verify(self.store, &image, trusted_keys)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
