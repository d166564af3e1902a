//! The builder: one `[image.NAME]` in, one content-addressed image out.
//!
//! An image is its base's layers plus **one** new layer holding the files
//! of its Debian packages (with dpkg's database of them), every copy on top
//! of them, with `closure = true` the shared libraries the copied ELF
//! binaries need (see [`crate::elf`]), and the `users` and `dirs`. The config is an OCI image config for this
//! host's architecture with `created` = `SOURCE_DATE_EPOCH`; the manifest is
//! an OCI v1 manifest with gzip layers. Same inputs, same bytes, same
//! digest, whatever the checkout path, the files' times or the machine.
//!
//! Steps, in order: resolve the base to a manifest digest; read the copies
//! (content digests from the stat cache); get the image's locked packages
//! from the [`DebSource`] and each one's unpacked directory (fetching and
//! unpacking only a package not unpacked yet: see [`crate::debian::deb`]);
//! add the closure, users and dirs; compute the recipe digest (see
//! [`crate::cache`]; it lists the packages' pins) and return the cached
//! image if it is complete; else
//! write the layer (placing paths through the base's symlinks), the config
//! and the manifest, tag the result, write the SBOM, record the recipe.
//!
//! **Names.** The result is tagged in the store's `index.json` as `NAME`,
//! the image's name in `kiln.toml`, unprefixed: a store belongs to one
//! project (`.kiln/images`). A caller that shares a store between projects
//! tags `PROJECT/NAME` itself with [`Store::tag`].
//!
//! **SBOM.** An SPDX 2.3 document of every file of the image, with the
//! Debian package owning each closure library, is written to
//! `kiln_dir()/sbom/<manifest hex>.spdx.json` (see [`crate::sbom`]). It is
//! not referenced from the manifest: its namespace is derived from the
//! manifest digest, which a reference would make circular.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use kiln_spec::Spec;
use kiln_spec::model::{Image as ImageDef, ImageSource};
use serde::Serialize;

use crate::cache::{self, StatCache};
use crate::config::{
    CONFIG_MEDIA_TYPE, ConfigDoc, DescriptorDoc, Empty, ExecConfig, HistoryDoc,
    LAYER_GZIP_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, ManifestDoc, RootFsDoc, host_arch, merge_env,
    oci_layer_media_type, rfc3339,
};
use crate::debian::deb::{self, DebSource, LockedApt};
use crate::debian::users;
use crate::digest::Digest;
use crate::elf::{Closure, Loader};
use crate::error::ImageError;
use crate::image::{Image, descriptor_digest};
use crate::inputs;
use crate::layer::{EntryKind, FileSource, Layer, LayerEntry};
use crate::progress::{Progress, Quiet};
use crate::rootfs::{NodeKind, RootFs};
use crate::sbom;
use crate::store::Store;

/// One image to build.
#[derive(Debug, Clone, Copy)]
pub struct BuildRequest<'a> {
    /// The `[image.NAME]` name: the tag of the result, and named in errors.
    pub name: &'a str,
    pub image: &'a ImageDef,
    /// The spec's directory: `copy.src` and `oci-layout:DIR` are relative
    /// to it.
    pub context: &'a Path,
    /// Read once by the caller (default 0); the only time in the image.
    pub source_date_epoch: u64,
    /// Manifest digests of the images of the same file built so far, for
    /// `from = "NAME"`.
    pub locals: &'a BTreeMap<String, Digest>,
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildOutcome {
    pub name: String,
    /// The manifest digest: the image's identity.
    pub digest: Digest,
    /// Whether the build cache had it (nothing was written).
    pub cached: bool,
    /// Number of layers, base layers included.
    pub layers: usize,
    /// Bytes of every blob of the image (manifest, config, layers).
    pub size: u64,
    /// The recipe digest the cache knows it by.
    pub recipe: Digest,
}

/// A builder with its collaborators; [`build`] and [`build_all`] use the
/// host's defaults.
pub struct Builder<'a> {
    store: &'a Store,
    stats: StatCache,
    progress: &'a mut dyn Progress,
    /// How ELF dependencies are resolved (tests point it elsewhere).
    pub loader: Loader,
    /// dpkg's database, for the SBOM's package owners.
    pub dpkg_dir: PathBuf,
    /// Where the `debian` packages of images come from. `None`: the first
    /// image that has some opens [`LockedApt`] (`kiln.lock` in the
    /// request's `context`, the apt state in the store's kiln dir);
    /// [`Builder::finish`] writes the lock back if it changed.
    pub debian: Option<Box<dyn DebSource + 'a>>,
}

impl std::fmt::Debug for Builder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("store", &self.store.root())
            .field("loader", &self.loader)
            .finish_non_exhaustive()
    }
}

/// Builds one image with the host's defaults and no progress output.
pub fn build(store: &Store, req: &BuildRequest<'_>) -> Result<BuildOutcome, ImageError> {
    let mut quiet = Quiet;
    let mut builder = Builder::new(store, &mut quiet);
    let outcome = builder.build(req);
    builder.finish()?;
    outcome
}

/// Builds every `[image.NAME]` of `spec` (relative paths against `dir`),
/// bases first. Returns each outcome by name.
pub fn build_all(
    store: &Store,
    spec: &Spec,
    dir: &Path,
    source_date_epoch: u64,
    progress: &mut dyn Progress,
) -> Result<BTreeMap<String, BuildOutcome>, ImageError> {
    let mut builder = Builder::new(store, progress);
    let outcomes = builder.build_all(spec, dir, source_date_epoch);
    builder.finish()?;
    outcomes
}

impl<'a> Builder<'a> {
    pub fn new(store: &'a Store, progress: &'a mut dyn Progress) -> Builder<'a> {
        Builder {
            store,
            stats: StatCache::load(store),
            progress,
            loader: Loader::host(),
            dpkg_dir: PathBuf::from("/var/lib/dpkg"),
            debian: None,
        }
    }

    /// Saves the stat cache and the lock of the Debian packages (if the
    /// builds changed it).
    pub fn finish(mut self) -> Result<(), ImageError> {
        if let Some(source) = &mut self.debian {
            source.save()?;
        }
        self.stats.save(self.store)
    }

    /// Files hashed so far (stat cache misses).
    pub fn files_hashed(&self) -> u64 {
        self.stats.hashed
    }

    /// See [`build_all`].
    pub fn build_all(
        &mut self,
        spec: &Spec,
        dir: &Path,
        source_date_epoch: u64,
    ) -> Result<BTreeMap<String, BuildOutcome>, ImageError> {
        let mut order = Vec::new();
        let mut state = BTreeMap::new();
        for name in spec.images.keys() {
            visit(spec, name, &mut state, &mut order)?;
        }
        let mut locals = BTreeMap::new();
        let mut outcomes = BTreeMap::new();
        for name in order {
            let outcome = self.build(&BuildRequest {
                name: &name,
                image: &spec.images[&name],
                context: dir,
                source_date_epoch,
                locals: &locals,
            })?;
            locals.insert(name.clone(), outcome.digest.clone());
            outcomes.insert(name, outcome);
        }
        Ok(outcomes)
    }

    /// See [`build`].
    pub fn build(&mut self, req: &BuildRequest<'_>) -> Result<BuildOutcome, ImageError> {
        let base = self.resolve_base(req)?;
        let arch = host_arch();
        if let Some(b) = &base {
            let base_arch = b.config.architecture().to_string();
            if base_arch != arch {
                return Err(ImageError::BaseUnavailable {
                    image: req.name.to_owned(),
                    base: req.image.from.to_string(),
                    why: format!("is built for {base_arch}, and this host builds {arch} images"),
                    hint: format!("use a base image for {arch}"),
                });
            }
        }
        let exclude = [req.context.join(".kiln"), self.store.root().to_path_buf()];
        let inputs = inputs::collect(req.name, req.image, req.context, &mut self.stats, &exclude)?;
        let pending = inputs.pending;
        // Packages first, copies on top of them, then the closure of the
        // copies, then users and dirs.
        let (pins, unpacked, mut layer) = self.debian_layer(req, base.is_some())?;
        for (path, entry) in inputs.layer.entries() {
            layer
                .insert(path, entry.clone())
                .map_err(ImageError::Invalid)?;
        }
        layer.check().map_err(|why| ImageError::BadCopy {
            image: req.name.to_owned(),
            why: format!("a copy conflicts with the Debian packages: {why}"),
            hint: "copy to another path, or copy the whole directory".into(),
        })?;
        let closure = if req.image.closure {
            self.add_closure(req.name, &inputs.elf, &mut layer)?
        } else {
            Closure::default()
        };
        users::add_users_and_dirs(&mut layer, req.image).map_err(|why| ImageError::BadCopy {
            image: req.name.to_owned(),
            why,
            hint: "fix `users` or `dirs` in kiln.toml".into(),
        })?;
        deb::link_shared_blobs(&mut layer, &self.store.kiln_dir());
        let packaged = deb::packaged_files(&layer, &unpacked, &self.store.kiln_dir());
        let debian: Vec<String> = pins.iter().map(deb::PinnedDeb::recipe_line).collect();

        let base_digest = base.as_ref().map(|b| &b.digest);
        // With every input's digest known (from the stat cache), the recipe
        // can be asked of the cache before anything is read. Otherwise the
        // unknown digests come from writing the layer (one read of each
        // file, not two) and the recipe is computed afterwards.
        if pending.is_empty() {
            let recipe = cache::recipe_digest(
                req.image,
                base_digest,
                req.source_date_epoch,
                arch,
                &debian,
                &layer,
            );
            if let Some(digest) = cache::lookup(self.store, &recipe) {
                let image = self.store.load_image(&digest)?;
                self.publish(req.name, &image, &closure, &packaged, None)?;
                return Ok(outcome(req.name, &image, true, recipe));
            }
        }
        let unplaced = layer.clone();

        // The base's files, hashed for the SBOM; the new layer is added to
        // them from what writing it computed, not read back.
        let mut tree = match &base {
            Some(b) => RootFs::read(self.store, b.layers(), true)?,
            None => RootFs::default(),
        };
        if base.is_some() {
            layer = place_on(&layer, &tree);
        }
        self.progress.layer_started(req.name, layer.content_size());
        let progress = &mut *self.progress;
        let written = self
            .store
            .put_layer(&layer, req.source_date_epoch, &mut |n| {
                progress.layer_advanced(n)
            });
        self.progress.layer_finished();
        let written = written.map_err(|e| unpacked_changed(e, &self.store.kiln_dir()))?;
        tree.add_layer(&layer, &written.files);
        let unplaced = self.learn_digests(unplaced, &layer, &written.files, &pending);
        let recipe = cache::recipe_digest(
            req.image,
            base_digest,
            req.source_date_epoch,
            arch,
            &debian,
            &unplaced,
        );
        if !pending.is_empty()
            && let Some(digest) = cache::lookup(self.store, &recipe)
        {
            // Inputs the stat cache could not vouch for (too freshly
            // written) turned out to be what the cache already built.
            let image = self.store.load_image(&digest)?;
            self.publish(req.name, &image, &closure, &packaged, None)?;
            return Ok(outcome(req.name, &image, true, recipe));
        }

        let config = image_config(
            req,
            base.as_ref(),
            arch,
            &written.diff_id,
            req.image.closure,
        )?;
        let (config_digest, config_size) = self.store.put_json(&config)?;
        let mut layers = match &base {
            Some(b) => b
                .layers()
                .iter()
                .map(descriptor_doc)
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        layers.push(DescriptorDoc {
            media_type: LAYER_GZIP_MEDIA_TYPE.into(),
            digest: written.digest.clone(),
            size: written.size,
            annotations: BTreeMap::new(),
        });
        let manifest = ManifestDoc {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.into(),
            config: DescriptorDoc {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: config_digest,
                size: config_size,
                annotations: BTreeMap::new(),
            },
            layers,
        };
        let (digest, _) = self.store.put_json(&manifest)?;
        let image = self.store.load_image(&digest)?;
        self.publish(req.name, &image, &closure, &packaged, Some(&tree))?;
        cache::record(self.store, &recipe, &digest)?;
        Ok(outcome(req.name, &image, false, recipe))
    }

    /// The layer of the image's Debian packages (with dpkg's database of
    /// them) and their pins, in lock order; empty without `debian`. Each
    /// package comes from its unpacked directory, keyed by the `.deb`'s
    /// sha256; one that is not unpacked yet is fetched through the source
    /// (which verifies it) and unpacked (which verifies it again). On a
    /// base image (`on_base`) dpkg's status goes to `status.d/`.
    fn debian_layer(
        &mut self,
        req: &BuildRequest<'_>,
        on_base: bool,
    ) -> Result<(Vec<deb::PinnedDeb>, Vec<deb::Unpacked>, Layer), ImageError> {
        let mut layer = Layer::new();
        if req.image.debian.is_empty() {
            return Ok((Vec::new(), Vec::new(), layer));
        }
        let kiln_dir = self.store.kiln_dir();
        let source = match &mut self.debian {
            Some(source) => source,
            None => self
                .debian
                .insert(Box::new(LockedApt::open(req.context, &kiln_dir)?)),
        };
        let pins = source.packages(req.name, &req.image.debian)?;
        let mut slots: Vec<Option<deb::Unpacked>> = Vec::with_capacity(pins.len());
        let mut missing = Vec::new();
        for (i, pin) in pins.iter().enumerate() {
            let u = deb::cached(&kiln_dir, &pin.sha256);
            if u.is_none() {
                missing.push((i, source.fetch(pin)?));
            }
            slots.push(u);
        }
        for (i, u) in unpack_all(&kiln_dir, &pins, &missing) {
            slots[i] = Some(u?);
        }
        let unpacked: Vec<deb::Unpacked> = slots.into_iter().flatten().collect();
        deb::add_packages(&mut layer, req.name, &unpacked, on_base)?;
        Ok((pins, unpacked, layer))
    }

    /// Fills the digests `unplaced` lacked from what writing `written` (the
    /// same entries, maybe moved onto a base) computed, and teaches them to
    /// the stat cache when the file did not change while it was read.
    fn learn_digests(
        &mut self,
        mut unplaced: Layer,
        written: &Layer,
        sums: &BTreeMap<String, (Digest, String)>,
        pending: &BTreeMap<PathBuf, (fs::Metadata, bool)>,
    ) -> Layer {
        if pending.is_empty() {
            return unplaced;
        }
        let mut by_host: BTreeMap<&Path, &Digest> = BTreeMap::new();
        for (path, entry) in written.entries() {
            if let EntryKind::File {
                source: FileSource::Host(host),
                ..
            } = &entry.kind
                && let Some((digest, _)) = sums.get(path)
            {
                by_host.insert(host.as_path(), digest);
            }
        }
        let mut filled = Vec::new();
        for (path, entry) in unplaced.entries() {
            if let EntryKind::File {
                source: FileSource::Host(host),
                size,
                digest: None,
            } = &entry.kind
                && let Some(digest) = by_host.get(host.as_path())
            {
                let mut e = entry.clone();
                e.kind = EntryKind::File {
                    source: FileSource::Host(host.clone()),
                    size: *size,
                    digest: Some((*digest).clone()),
                };
                filled.push((path.clone(), e));
                self.stats.hashed += 1;
                if let Some((before, elf)) = pending.get(host)
                    && fs::metadata(host).is_ok_and(|now| same_file_state(before, &now))
                {
                    let facts = cache::FileFacts {
                        digest: (*digest).clone(),
                        elf: *elf,
                    };
                    self.stats.remember(host, before, &facts);
                }
            }
        }
        for (path, entry) in filled {
            unplaced.insert(&path, entry).expect("paths are normalised");
        }
        unplaced
    }

    /// Adds the shared-library closure of the copied ELF files `elf` to
    /// `layer` and returns it.
    fn add_closure(
        &mut self,
        name: &str,
        elf: &[inputs::ElfInput],
        layer: &mut Layer,
    ) -> Result<Closure, ImageError> {
        let roots: Vec<_> = elf
            .iter()
            .map(|e| (e.host.clone(), e.image.clone()))
            .collect();
        let provided = layer.entries().keys().map(|p| format!("/{p}")).collect();
        let closure = self.loader.closure(&roots, &provided)?;
        for (image_path, host) in &closure.files {
            let meta = fs::metadata(host).map_err(|source| ImageError::Io {
                op: "read library",
                path: host.clone(),
                source,
            })?;
            let facts = self.stats.facts(host, &meta)?;
            let entry = LayerEntry {
                kind: EntryKind::File {
                    source: FileSource::Host(host.clone()),
                    size: meta.len(),
                    digest: Some(facts.digest),
                },
                mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
                uid: 0,
                gid: 0,
            };
            layer
                .insert(image_path, entry)
                .map_err(ImageError::Invalid)?;
        }
        for (image_path, target) in &closure.links {
            if layer.get(image_path).is_none() {
                layer
                    .insert(image_path, LayerEntry::symlink(target.clone()))
                    .map_err(ImageError::Invalid)?;
            }
        }
        layer.check().map_err(|why| ImageError::BadCopy {
            image: name.to_owned(),
            why: format!("the shared-library closure conflicts with a copy: {why}"),
            hint: "copy the library yourself and set `closure = false`".into(),
        })?;
        Ok(closure)
    }

    /// Tags the image under `name` (unless it already is) and makes sure
    /// its SBOM exists (from `tree`, the image's files, when given).
    fn publish(
        &self,
        name: &str,
        image: &Image,
        closure: &Closure,
        packaged: &BTreeMap<String, sbom::DebPackage>,
        tree: Option<&RootFs>,
    ) -> Result<(), ImageError> {
        let tagged = self
            .store
            .resolve(name)
            .ok()
            .and_then(|d| descriptor_digest(&d).ok());
        if tagged.as_ref() != Some(&image.digest) {
            self.store.tag(name, &image.descriptor())?;
        }
        if !sbom::sbom_path(self.store, &image.digest).is_file() {
            let mut owners = sbom::closure_owners(closure, &self.dpkg_dir);
            for (path, package) in packaged {
                owners.entry(path.clone()).or_insert_with(|| sbom::Owner {
                    host_path: PathBuf::new(),
                    package: Some(package.clone()),
                });
            }
            let doc = match tree {
                Some(tree) => sbom::sbom_from_tree(image, tree, &owners),
                None => sbom::sbom(self.store, image, &owners)?,
            };
            sbom::write_sbom(self.store, &image.digest, &doc)?;
        }
        Ok(())
    }

    fn resolve_base(&self, req: &BuildRequest<'_>) -> Result<Option<Image>, ImageError> {
        let unavailable = |why: String, hint: String| ImageError::BaseUnavailable {
            image: req.name.to_owned(),
            base: req.image.from.to_string(),
            why,
            hint,
        };
        let load = |digest: &Digest, hint: &str| {
            self.store.load_image(digest).map_err(|e| match e {
                ImageError::BlobMissing { .. } => {
                    unavailable("is not in the image store".into(), hint.to_owned())
                }
                other => other,
            })
        };
        match &req.image.from {
            ImageSource::Scratch => Ok(None),
            ImageSource::Local(base) => match req.locals.get(base) {
                Some(d) => load(d, "rebuild it with `kiln build`").map(Some),
                None => Err(unavailable(
                    "has not been built yet".into(),
                    format!(
                        "build [image.{base}] first (`kiln build` builds bases before the images that use them)"
                    ),
                )),
            },
            ImageSource::Digest(d) => {
                let digest: Digest = d.parse().map_err(|e: crate::digest::BadDigest| {
                    unavailable(e.to_string(), "write `sha256:` and 64 hex digits".into())
                })?;
                load(
                    &digest,
                    "`kiln image ls` lists the images kiln has; `kiln image import` adds one",
                )
                .map(Some)
            }
            ImageSource::Registry { name, digest } => {
                let parsed: Digest = digest.parse().map_err(|e: crate::digest::BadDigest| {
                    unavailable(e.to_string(), "pin it as `REF@sha256:<64 hex>`".into())
                })?;
                load(
                    &parsed,
                    &format!("pull it first with `kiln image pull {name}@{digest}`"),
                )
                .map(Some)
            }
            ImageSource::OciLayout(dir) => self.layout_base(req, &req.context.join(dir)).map(Some),
        }
    }

    /// The single image of an OCI layout: used from the store when its
    /// manifest and blobs are already there, imported otherwise.
    fn layout_base(&self, req: &BuildRequest<'_>, dir: &Path) -> Result<Image, ImageError> {
        let unavailable = |why: String, hint: &str| ImageError::BaseUnavailable {
            image: req.name.to_owned(),
            base: req.image.from.to_string(),
            why,
            hint: hint.to_owned(),
        };
        let index_path = dir.join("index.json");
        let bytes = fs::read(&index_path).map_err(|e| {
            unavailable(
                format!("cannot be read: {}: {e}", index_path.display()),
                "make it with `skopeo copy docker://IMAGE oci:DIR`",
            )
        })?;
        let index: oci_spec::image::ImageIndex =
            serde_json::from_slice(&bytes).map_err(|source| ImageError::BadIndex {
                path: index_path.clone(),
                source,
            })?;
        if let [only] = index.manifests().as_slice()
            && matches!(only.media_type(), oci_spec::image::MediaType::ImageManifest)
        {
            let digest = descriptor_digest(only)?;
            if let Ok(image) = self.store.load_image(&digest)
                && image.blobs()?.iter().all(|b| self.store.has_blob(b))
            {
                return Ok(image);
            }
        }
        let mut images = self.store.import_oci_layout(dir, None)?;
        match images.len() {
            1 => Ok(images.remove(0).1),
            n => Err(unavailable(
                format!("holds {n} images; `oci-layout:` needs a layout with exactly one"),
                "copy the one you want into its own layout: `skopeo copy oci:DIR:NAME oci:NEWDIR`",
            )),
        }
    }
}

/// Unpacks the fetched `.deb`s `missing` (index in `pins`, path) on every
/// core: xz decompression is most of a build from a warm `.deb` cache. The
/// results come back in `pins` order, so the first error reported is the
/// same on every run.
fn unpack_all(
    kiln_dir: &Path,
    pins: &[deb::PinnedDeb],
    missing: &[(usize, PathBuf)],
) -> Vec<(usize, Result<deb::Unpacked, ImageError>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(missing.len());
    let next = AtomicUsize::new(0);
    let mut results: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while let Some((i, path)) = missing.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let pin = &pins[*i];
                        out.push((*i, deb::unpack_once(kiln_dir, path, &pin.name, &pin.sha256)));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("unpacking a package does not panic"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results
}

/// Depth-first order of `[image.NAME]`s so that bases come first.
fn visit(
    spec: &Spec,
    name: &str,
    state: &mut BTreeMap<String, bool>,
    order: &mut Vec<String>,
) -> Result<(), ImageError> {
    match state.get(name) {
        Some(true) => return Ok(()),
        Some(false) => {
            return Err(ImageError::BaseUnavailable {
                image: name.to_owned(),
                base: name.to_owned(),
                why: "is part of a cycle of images built from one another".into(),
                hint: "one image of the chain must start from scratch or a digest".into(),
            });
        }
        None => {}
    }
    state.insert(name.to_owned(), false);
    let image = spec
        .images
        .get(name)
        .ok_or_else(|| ImageError::UnknownImage {
            reference: name.to_owned(),
            store: PathBuf::from("kiln.toml"),
        })?;
    if let ImageSource::Local(base) = &image.from {
        visit(spec, base, state, order)?;
    }
    state.insert(name.to_owned(), true);
    order.push(name.to_owned());
    Ok(())
}

/// The layer with every path placed through the base's symlinked parents
/// and every implied parent that the base has given the base's metadata
/// (so `/tmp` keeps 1777 and `/lib → usr/lib` stays a symlink).
fn place_on(layer: &Layer, base: &RootFs) -> Layer {
    let mut out = Layer::new();
    for (path, entry) in layer.entries() {
        let mut entry = entry.clone();
        if let EntryKind::HardLink(target) = &entry.kind {
            entry.kind = EntryKind::HardLink(base.resolve_parents(target));
        }
        // A directory also goes through a symlink at its own path (copying
        // a tree to `/lib` on a usr-merged base fills `/usr/lib`); anything
        // else replaces what the base has there.
        let placed = if entry.kind == EntryKind::Dir {
            let through = base.resolve_parents(&format!("{path}/-"));
            through.strip_suffix("/-").unwrap_or(&through).to_owned()
        } else {
            base.resolve_parents(path)
        };
        out.insert(&placed, entry).expect("paths are normalised");
    }
    let mut parents = BTreeSet::new();
    for path in out.entries().keys() {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            parents.insert(parent.to_owned());
            p = parent;
        }
    }
    for parent in parents {
        if out.get(&parent).is_none()
            && let Some(node) = base.nodes.get(&parent)
            && node.kind == NodeKind::Dir
        {
            let entry = LayerEntry {
                uid: node.uid,
                gid: node.gid,
                ..LayerEntry::dir(node.mode)
            };
            out.insert(&parent, entry).expect("paths are normalised");
        }
    }
    out
}

fn descriptor_doc(d: &oci_spec::image::Descriptor) -> Result<DescriptorDoc, ImageError> {
    Ok(DescriptorDoc {
        media_type: oci_layer_media_type(d.media_type().as_ref()),
        digest: descriptor_digest(d)?,
        size: d.size(),
        annotations: d
            .annotations()
            .as_ref()
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    })
}

fn image_config(
    req: &BuildRequest<'_>,
    base: Option<&Image>,
    arch: &str,
    diff_id: &Digest,
    closure: bool,
) -> Result<ConfigDoc, ImageError> {
    let def = req.image;
    let created = rfc3339(req.source_date_epoch);
    let base_cfg = base.and_then(|b| b.config.config().clone());
    let b = |f: fn(&oci_spec::image::Config) -> Option<String>| base_cfg.as_ref().and_then(f);
    let mut labels: BTreeMap<String, String> = base_cfg
        .as_ref()
        .and_then(|c| c.labels().clone())
        .map(|l| l.into_iter().collect())
        .unwrap_or_default();
    labels.extend(def.labels.clone());
    let mut exposed_ports: BTreeMap<String, Empty> = base_cfg
        .as_ref()
        .and_then(|c| c.exposed_ports().clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p, Empty {}))
        .collect();
    exposed_ports.extend(def.expose.iter().map(|p| (format!("{p}/tcp"), Empty {})));
    let volumes = base_cfg
        .as_ref()
        .and_then(|c| c.volumes().clone())
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v, Empty {}))
        .collect();
    // As in a Dockerfile: an image that sets its entrypoint drops the
    // base's cmd unless it sets its own.
    let entrypoint = def
        .entrypoint
        .clone()
        .or_else(|| base_cfg.as_ref().and_then(|c| c.entrypoint().clone()));
    let cmd = match (&def.cmd, &def.entrypoint) {
        (Some(cmd), _) => Some(cmd.clone()),
        (None, Some(_)) => None,
        (None, None) => base_cfg.as_ref().and_then(|c| c.cmd().clone()),
    };
    let base_env = base_cfg
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    let exec = ExecConfig {
        user: def.user.clone().or_else(|| b(|c| c.user().clone())),
        exposed_ports,
        env: merge_env(&base_env, &def.env),
        entrypoint,
        cmd,
        volumes,
        working_dir: def
            .workdir
            .clone()
            .or_else(|| b(|c| c.working_dir().clone())),
        labels,
        stop_signal: b(|c| c.stop_signal().clone()),
    };
    let mut diff_ids = Vec::new();
    let mut history = Vec::new();
    if let Some(base) = base {
        for d in base.config.rootfs().diff_ids() {
            diff_ids.push(d.parse::<Digest>().map_err(|e| {
                ImageError::Invalid(format!("base image {}: diff_id {e}", base.digest))
            })?);
        }
        for h in base.config.history().clone().unwrap_or_default() {
            history.push(HistoryDoc {
                created: h.created().clone(),
                created_by: h.created_by().clone(),
                comment: h.comment().clone(),
                empty_layer: h.empty_layer().unwrap_or(false),
            });
        }
    }
    diff_ids.push(diff_id.clone());
    history.push(HistoryDoc {
        created: Some(created.clone()),
        created_by: Some(
            match (def.debian.is_empty(), closure) {
                (true, true) => "kiln build: copy, closure",
                (true, false) => "kiln build: copy",
                (false, true) => "kiln build: debian, copy, closure",
                (false, false) => "kiln build: debian, copy",
            }
            .into(),
        ),
        comment: None,
        empty_layer: false,
    });
    Ok(ConfigDoc {
        created,
        architecture: arch.into(),
        os: "linux".into(),
        config: exec,
        rootfs: RootFsDoc {
            typ: "layers".into(),
            diff_ids,
        },
        history,
    })
}

/// A file of an unpacked package that no longer has the digest it was
/// unpacked with is named as such (the fix is to unpack it again).
fn unpacked_changed(e: ImageError, kiln_dir: &Path) -> ImageError {
    match e {
        ImageError::InputChanged {
            path,
            expected,
            actual,
        } if path.starts_with(kiln_dir.join("debian").join("unpacked")) => {
            let dir = path.parent().and_then(Path::parent).unwrap_or(&path);
            let package = fs::read(dir.join("manifest.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<deb::DebManifest>(&b).ok())
                .map(|m| m.control.package)
                .unwrap_or_default();
            ImageError::UnpackedChanged {
                package,
                path,
                expected,
                actual,
            }
        }
        other => other,
    }
}

fn outcome(name: &str, image: &Image, cached: bool, recipe: Digest) -> BuildOutcome {
    let size = image.manifest_bytes.len() as u64
        + image.manifest.config().size()
        + image.layers().iter().map(|l| l.size()).sum::<u64>();
    BuildOutcome {
        name: name.to_owned(),
        digest: image.digest.clone(),
        cached,
        layers: image.layers().len(),
        size,
        recipe,
    }
}

/// Whether a file was left alone between two `stat`s.
fn same_file_state(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.len() == b.len()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.ctime() == b.ctime()
        && a.ctime_nsec() == b.ctime_nsec()
        && a.ino() == b.ino()
        && a.dev() == b.dev()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::Node;

    fn node(kind: NodeKind, mode: u32) -> Node {
        Node {
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn new_files_go_through_the_bases_symlinks_and_keep_its_directories() {
        let mut base = RootFs::default();
        base.nodes.insert("usr".into(), node(NodeKind::Dir, 0o755));
        base.nodes
            .insert("usr/lib".into(), node(NodeKind::Dir, 0o755));
        base.nodes.insert(
            "lib".into(),
            node(NodeKind::Symlink("usr/lib".into()), 0o777),
        );
        base.nodes.insert("tmp".into(), node(NodeKind::Dir, 0o1777));
        let mut layer = Layer::new();
        layer.insert("/lib", LayerEntry::dir(0o700)).unwrap();
        layer
            .insert("/lib/x/y.so", LayerEntry::bytes("y", 0o644))
            .unwrap();
        layer
            .insert("/tmp/a", LayerEntry::bytes("a", 0o600))
            .unwrap();
        let out = place_on(&layer, &base);
        let paths: Vec<_> = out.entries().keys().map(String::as_str).collect();
        assert_eq!(paths, ["tmp", "tmp/a", "usr", "usr/lib", "usr/lib/x/y.so"]);
        assert_eq!(
            out.entries()["tmp"].mode,
            0o1777,
            "the base's /tmp keeps its mode"
        );
        assert_eq!(
            out.entries()["usr/lib"].mode,
            0o700,
            "the copied directory's own mode"
        );
        // `lib` itself is not in the layer: the base's symlink stays.
        assert!(out.get("lib").is_none());
    }
}
