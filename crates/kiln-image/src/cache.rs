//! The build cache: a no-op `kiln build` reads no file content.
//!
//! **Key.** A build's *recipe digest* is the SHA-256 of the canonical JSON of
//! the builder's version, the host architecture, the image definition (the
//! validated `[image.NAME]`), the base's manifest digest, the
//! `SOURCE_DATE_EPOCH`, the locked Debian packages (name, version,
//! architecture and the `.deb`'s sha256), and every entry of the layer to
//! be written (path, type, mode, owner, and the content digest of a file or
//! the target of a link) — which covers every copied input, every library
//! of the closure and every file of the packages. Absolute host paths are not in it, so two checkouts share keys.
//!
//! **Value.** `kiln_dir()/build-cache/<recipe hex>` holds the manifest digest
//! the recipe built. A hit is used only if the manifest, its config and all
//! its layers are still in the store (the manifest and config are read and
//! verified; layers are checked for presence); otherwise it is a miss.
//!
//! **Stat cache.** Hashing a 20 MB binary on every build would blow the
//! no-op budget, so content digests are remembered in
//! `kiln_dir()/build-cache/stat.json`, keyed by absolute path and validated
//! by (size, mtime ns, ctime ns, inode, device). Any change to those re-hashes
//! the file, and the content digest stays what the key is computed over. To
//! avoid the "racy clean" problem (a file rewritten within one timestamp tick
//! after it was hashed keeps its stat), an entry is recorded only for a file
//! whose mtime and ctime are at least [`RACY_SECS`] old when it is hashed; a
//! file written just before the build is simply hashed again next time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::elf::is_elf;
use crate::error::ImageError;
use crate::image::descriptor_digest;
use crate::layer::{EntryKind, Layer};
use crate::store::Store;

/// Changes whenever the builder would write different bytes for the same
/// inputs (layer format, config fields, closure placement).
pub const BUILDER_VERSION: &str = concat!("kiln-build/", env!("CARGO_PKG_VERSION"), "/v1");

/// How old a file's times must be before its digest is remembered.
pub const RACY_SECS: i64 = 1;

/// What hashing a file tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub digest: Digest,
    /// Starts with the ELF magic.
    pub elf: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
    sha256: Digest,
    elf: bool,
}

impl StatEntry {
    fn matches(&self, meta: &Metadata) -> bool {
        self.size == meta.len()
            && self.mtime_ns == mtime_ns(meta)
            && self.ctime_ns == ctime_ns(meta)
            && self.ino == meta.ino()
            && self.dev == meta.dev()
    }
}

fn mtime_ns(meta: &Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn ctime_ns(meta: &Metadata) -> i128 {
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
}

/// Content digests of host files, remembered by stat.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: BTreeMap<PathBuf, StatEntry>,
    used: BTreeSet<PathBuf>,
    dirty: bool,
    /// Files hashed (misses) since load: for tests and `--verbose`.
    pub hashed: u64,
}

impl StatCache {
    /// A cache that remembers nothing between runs.
    pub fn in_memory() -> StatCache {
        StatCache::default()
    }

    /// Loads the store's stat cache; an unreadable or corrupt one is empty
    /// (it is only an accelerator).
    pub fn load(store: &Store) -> StatCache {
        let path = cache_dir(store).join("stat.json");
        let entries = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        StatCache {
            path: Some(path),
            entries,
            ..StatCache::default()
        }
    }

    /// The digest of the file at `path` whose metadata is `meta`.
    pub fn facts(&mut self, path: &Path, meta: &Metadata) -> Result<FileFacts, ImageError> {
        if let Some(facts) = self.known(path, meta) {
            return Ok(facts);
        }
        let facts = hash_file(path)?;
        self.hashed += 1;
        self.remember(path, meta, &facts);
        Ok(facts)
    }

    /// The cached facts of `path`, when its metadata still matches; never
    /// reads the file.
    pub fn known(&mut self, path: &Path, meta: &Metadata) -> Option<FileFacts> {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let e = self.entries.get(&key).filter(|e| e.matches(meta))?;
        let facts = FileFacts {
            digest: e.sha256.clone(),
            elf: e.elf,
        };
        self.used.insert(key);
        Some(facts)
    }

    /// Records facts computed elsewhere (while a layer was written) for the
    /// file whose metadata was `meta` when it was read.
    pub fn remember(&mut self, path: &Path, meta: &Metadata, facts: &FileFacts) {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let settled =
            now - mtime_ns(meta).max(ctime_ns(meta)) >= i128::from(RACY_SECS) * 1_000_000_000;
        if settled {
            self.entries.insert(
                key.clone(),
                StatEntry {
                    size: meta.len(),
                    mtime_ns: mtime_ns(meta),
                    ctime_ns: ctime_ns(meta),
                    ino: meta.ino(),
                    dev: meta.dev(),
                    sha256: facts.digest.clone(),
                    elf: facts.elf,
                },
            );
            self.dirty = true;
        } else {
            self.entries.remove(&key);
        }
        self.used.insert(key);
    }

    /// Writes the cache back if it changed, dropping entries of files that
    /// were not used in this run and no longer exist.
    pub fn save(&mut self, store: &Store) -> Result<(), ImageError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let used = &self.used;
        self.entries.retain(|p, _| used.contains(p) || p.exists());
        let dir = cache_dir(store);
        fs::create_dir_all(&dir).map_err(|source| ImageError::Io {
            op: "create build cache",
            path: dir.clone(),
            source,
        })?;
        store.write_atomic(
            path,
            &serde_json::to_vec(&self.entries).expect("the stat cache serialises"),
        )?;
        self.dirty = false;
        Ok(())
    }
}

/// Hashes a file's content and notes whether it is ELF.
pub fn hash_file(path: &Path) -> Result<FileFacts, ImageError> {
    let io_err = |source| ImageError::Io {
        op: "read input file",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if head.len() < 4 {
            head.extend_from_slice(&buf[..n.min(4 - head.len())]);
        }
        hasher.update(&buf[..n]);
    }
    Ok(FileFacts {
        digest: Digest::from_sha256(&hasher.finalize()),
        elf: is_elf(&head),
    })
}

/// Whether the file at `path` starts with the ELF magic (reads 4 bytes).
pub fn sniff_elf(path: &Path) -> Result<bool, ImageError> {
    let mut head = [0u8; 4];
    let mut file = File::open(path).map_err(|source| ImageError::Io {
        op: "read input file",
        path: path.to_path_buf(),
        source,
    })?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ImageError::Io {
                    op: "read input file",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(is_elf(&head[..read]))
}

fn cache_dir(store: &Store) -> PathBuf {
    store.kiln_dir().join("build-cache")
}

#[derive(Serialize)]
struct Recipe<'a> {
    builder: &'a str,
    arch: &'a str,
    image: &'a kiln_spec::model::Image,
    base: Option<&'a Digest>,
    source_date_epoch: u64,
    /// One line per locked Debian package: `name version arch sha256`
    /// (left out when empty, so images without packages keep their keys).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    debian: &'a [String],
    /// One line per layer entry: `path type mode uid:gid content`.
    entries: Vec<String>,
}

/// The recipe digest of a build (see the module docs).
pub fn recipe_digest(
    image: &kiln_spec::model::Image,
    base: Option<&Digest>,
    source_date_epoch: u64,
    arch: &str,
    debian: &[String],
    layer: &Layer,
) -> Digest {
    let entries = layer
        .entries()
        .iter()
        .map(|(path, e)| {
            let content = match &e.kind {
                EntryKind::Dir => "dir".to_owned(),
                EntryKind::File { digest, size, .. } => match digest {
                    Some(d) => format!("file {size} {d}"),
                    None => format!("file {size} unhashed"),
                },
                EntryKind::Symlink(t) => format!("symlink {t}"),
                EntryKind::HardLink(t) => format!("hardlink {t}"),
            };
            format!("{path}\0{:o}\0{}:{}\0{content}", e.mode, e.uid, e.gid)
        })
        .collect();
    let recipe = Recipe {
        builder: BUILDER_VERSION,
        arch,
        image,
        base,
        source_date_epoch,
        debian,
        entries,
    };
    Digest::of(&serde_json::to_vec(&recipe).expect("a recipe serialises"))
}

/// The manifest a recipe built, if it and every blob it needs are still in
/// the store.
pub fn lookup(store: &Store, recipe: &Digest) -> Option<Digest> {
    let text = fs::read_to_string(cache_dir(store).join(recipe.hex())).ok()?;
    let manifest: Digest = text.trim().parse().ok()?;
    let image = store.load_image(&manifest).ok()?;
    for layer in image.layers() {
        if !store.has_blob(&descriptor_digest(layer).ok()?) {
            return None;
        }
    }
    Some(manifest)
}

/// Remembers that `recipe` built `manifest`.
pub fn record(store: &Store, recipe: &Digest, manifest: &Digest) -> Result<(), ImageError> {
    let dir = cache_dir(store);
    fs::create_dir_all(&dir).map_err(|source| ImageError::Io {
        op: "create build cache",
        path: dir.clone(),
        source,
    })?;
    store.write_atomic(&dir.join(recipe.hex()), manifest.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{FileSource, LayerEntry};

    fn old(path: &Path) {
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn unchanged_files_are_not_hashed_again_and_changed_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let f = dir.path().join("big");
        fs::write(&f, vec![7u8; 100_000]).unwrap();
        // ctime is "now": a fresh file is hashed but not remembered.
        let mut cache = StatCache::load(&store);
        let first = cache.facts(&f, &fs::metadata(&f).unwrap()).unwrap();
        cache.save(&store).unwrap();
        assert_eq!(
            StatCache::load(&store).entries.len(),
            0,
            "a file written just now is not remembered"
        );

        // Pretend it settled: insert an entry with its current stat.
        let mut cache = StatCache::load(&store);
        let meta = fs::metadata(&f).unwrap();
        cache.entries.insert(
            std::path::absolute(&f).unwrap(),
            StatEntry {
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
                ctime_ns: ctime_ns(&meta),
                ino: meta.ino(),
                dev: meta.dev(),
                sha256: first.digest.clone(),
                elf: false,
            },
        );
        cache.dirty = true;
        cache.save(&store).unwrap();
        let mut cache = StatCache::load(&store);
        assert_eq!(cache.facts(&f, &fs::metadata(&f).unwrap()).unwrap(), first);
        assert_eq!(cache.hashed, 0);

        // Same size, new content, old mtime: ctime still changes.
        fs::write(&f, vec![8u8; 100_000]).unwrap();
        old(&f);
        let second = cache.facts(&f, &fs::metadata(&f).unwrap()).unwrap();
        assert_ne!(second.digest, first.digest);
        assert_eq!(cache.hashed, 1);
    }

    #[test]
    fn recipes_depend_on_every_input() {
        let image = kiln_spec::model::Image {
            from: kiln_spec::model::ImageSource::Scratch,
            copy: vec![],
            closure: false,
            debian: vec![],
            entrypoint: None,
            cmd: None,
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            labels: BTreeMap::new(),
            expose: vec![],
            users: vec![],
            dirs: vec![],
        };
        let mut layer = Layer::new();
        let mut file = LayerEntry::file(FileSource::Host("/x".into()), 1, 0o644);
        if let EntryKind::File { digest, .. } = &mut file.kind {
            *digest = Some(Digest::of(b"a"));
        }
        layer.insert("/a", file.clone()).unwrap();
        let base = recipe_digest(&image, None, 0, "amd64", &[], &layer);
        assert_eq!(base, recipe_digest(&image, None, 0, "amd64", &[], &layer));
        assert_ne!(base, recipe_digest(&image, None, 1, "amd64", &[], &layer));
        assert_ne!(
            base,
            recipe_digest(&image, Some(&Digest::of(b"b")), 0, "amd64", &[], &layer)
        );
        let mut env = image.clone();
        env.env.insert("A".into(), "1".into());
        assert_ne!(base, recipe_digest(&env, None, 0, "amd64", &[], &layer));
        let mut moded = layer.clone();
        moded
            .insert(
                "/a",
                LayerEntry {
                    mode: 0o755,
                    ..file.clone()
                },
            )
            .unwrap();
        assert_ne!(base, recipe_digest(&image, None, 0, "amd64", &[], &moded));
        // The host path of an input is not part of the key.
        let mut moved = Layer::new();
        let mut elsewhere = file.clone();
        if let EntryKind::File { source, .. } = &mut elsewhere.kind {
            *source = FileSource::Host("/other/checkout/x".into());
        }
        moved.insert("/a", elsewhere).unwrap();
        assert_eq!(base, recipe_digest(&image, None, 0, "amd64", &[], &moved));
        // The locked packages are part of it.
        let pins = ["libc6 2.36-9 amd64 sha256:00".to_owned()];
        assert_ne!(base, recipe_digest(&image, None, 0, "amd64", &pins, &layer));
    }
}
