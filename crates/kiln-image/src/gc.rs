//! Garbage collection: `kiln image gc`.
//!
//! Mark: every entry of `index.json` and every extra root is reachable, and
//! so is everything a reachable manifest or index names (`config`,
//! `layers`, `manifests`, `subject`, `blobs`), recursively. Index entries
//! must be readable manifests or indexes: if one is corrupt or unreadable,
//! gc stops without removing anything (it cannot know what that image
//! needs). Extra roots may be any blob (a manifest in use by a generation,
//! a cached layer): JSON documents among them are followed, others only
//! kept.
//!
//! Sweep: unreachable blobs, unpacked roots `kiln/rootfs/<hex>` whose
//! manifest is unreachable (each under its unpack lock: a root being
//! unpacked is left alone; a removed root is first renamed to
//! `<hex>.partial`, so a crash halfway never leaves a half root under a
//! digest's name), stale `.partial` directories and idle lock files, and
//! staging files in `tmp/` older than a day. Signatures under
//! `kiln/signatures/` are never removed; those of unreachable manifests are
//! listed in the report.
//!
//! Limits: the store has no global write lock. Unreachable blobs younger
//! than [`GRACE`] (15 minutes) are kept, which covers an import or a build
//! that has written blobs but not yet tagged its manifest; but one that
//! re-uses an old unreachable blob (deduplicated, so not rewritten) and
//! tags it while gc runs can lose it: run gc when nothing imports or builds
//! (the engine serialises them). Callers must pass as roots every image an
//! instance still runs from, or its root directory is removed.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::digest::Digest;
use crate::error::ImageError;
use crate::image::descriptor_digest;
use crate::store::Store;
use crate::unpack::{io_error, remove_tree, try_lock_path};

/// Larger blobs are not read as documents.
const MAX_DOCUMENT: u64 = 16 << 20;
/// Unreachable blobs younger than this are kept by [`Store::gc`]: an import
/// or a build writes its blobs before it tags the manifest that makes them
/// reachable.
pub const GRACE: Duration = Duration::from_secs(15 * 60);
/// Staging files older than this are a crashed writer's.
const TMP_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// What is reachable from the index and the roots.
#[derive(Debug, Clone, Default)]
pub struct Reachable {
    pub blobs: BTreeSet<Digest>,
    /// Reachable manifests and indexes (their roots and signatures are kept).
    pub documents: BTreeSet<Digest>,
    /// Named by a reachable document but absent from the store.
    pub missing: BTreeSet<Digest>,
}

/// What a gc removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub dry_run: bool,
    pub reachable: usize,
    pub removed_blobs: Vec<Digest>,
    pub freed_bytes: u64,
    /// Unreachable blobs younger than the grace period, kept.
    pub kept_recent: usize,
    pub removed_rootfs: Vec<PathBuf>,
    pub removed_tmp: Vec<PathBuf>,
    pub missing: Vec<Digest>,
    pub orphan_signatures: Vec<PathBuf>,
    /// SBOMs and build-cache entries of manifests that are gone.
    pub removed_metadata: Vec<PathBuf>,
}

impl Store {
    /// Marks everything reachable from `index.json` and `roots`.
    pub fn reachable(&self, roots: &[Digest]) -> Result<Reachable, ImageError> {
        let mut out = Reachable::default();
        let mut stack: Vec<(Digest, bool)> = roots.iter().map(|d| (d.clone(), false)).collect();
        for d in self.index()?.manifests() {
            stack.push((descriptor_digest(d)?, true));
        }
        // Documents are followed once each, whether or not they were
        // already marked as some other document's config or layer.
        let mut followed = BTreeSet::new();
        while let Some((digest, strict)) = stack.pop() {
            if !followed.insert(digest.clone()) {
                continue;
            }
            out.blobs.insert(digest.clone());
            if !self.has_blob(&digest) {
                out.missing.insert(digest);
                continue;
            }
            let Some(value) = self.document(&digest, strict)? else {
                continue;
            };
            let named = |key: &str| -> Vec<Digest> {
                let one = value.get(key).filter(|v| v.is_object()).into_iter();
                let many = value
                    .get(key)
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten();
                one.chain(many)
                    .filter_map(|d| d.get("digest")?.as_str()?.parse().ok())
                    .collect()
            };
            let (children, documents) = (
                [named("config"), named("layers"), named("blobs")].concat(),
                [named("manifests"), named("subject")].concat(),
            );
            if value.get("layers").is_some() || value.get("manifests").is_some() {
                out.documents.insert(digest.clone());
            }
            for child in children {
                if !self.has_blob(&child) {
                    out.missing.insert(child.clone());
                }
                out.blobs.insert(child);
            }
            stack.extend(documents.into_iter().map(|d| (d, true)));
        }
        Ok(out)
    }

    /// Reads a blob as a JSON document. Strict: it must be one (an index
    /// entry, a manifest named by an index); otherwise anything that is not
    /// a small JSON object is just not followed.
    fn document(
        &self,
        digest: &Digest,
        strict: bool,
    ) -> Result<Option<serde_json::Value>, ImageError> {
        let unreadable = |why: String| {
            ImageError::Invalid(format!(
                "gc stopped, nothing was removed: {digest} is named as a manifest but {why}\n  hint: `kiln image verify` lists what is broken; untag or re-import that image"
            ))
        };
        let path = self.blob_path(digest);
        let size = fs::metadata(&path)
            .map_err(|e| io_error("inspect", &path, e))?
            .len();
        if size > MAX_DOCUMENT {
            return if strict {
                Err(unreadable(format!("has {size} bytes")))
            } else {
                Ok(None)
            };
        }
        if !strict {
            let mut first = [0u8; 1];
            let mut file = fs::File::open(&path).map_err(|e| io_error("open", &path, e))?;
            if file
                .read(&mut first)
                .map_err(|e| io_error("read", &path, e))?
                == 0
                || first[0] != b'{'
            {
                return Ok(None);
            }
        }
        let bytes = self
            .read_blob(digest)
            .map_err(|e| unreadable(e.to_string()))?;
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) if v.is_object() => Ok(Some(v)),
            _ if strict => Err(unreadable("is not a JSON document".to_owned())),
            _ => Ok(None),
        }
    }

    /// Removes what nothing reachable needs, sparing blobs younger than
    /// [`GRACE`]; see the module docs.
    pub fn gc(&self, roots: &[Digest], dry_run: bool) -> Result<GcReport, ImageError> {
        self.gc_with_grace(roots, dry_run, GRACE)
    }

    /// [`Store::gc`] with another grace period (zero when nothing else can
    /// be writing to the store).
    pub fn gc_with_grace(
        &self,
        roots: &[Digest],
        dry_run: bool,
        grace: Duration,
    ) -> Result<GcReport, ImageError> {
        let started = SystemTime::now();
        let young = started.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let reachable = self.reachable(roots)?;
        let mut report = GcReport {
            dry_run,
            reachable: reachable.blobs.len(),
            missing: reachable.missing.iter().cloned().collect(),
            ..GcReport::default()
        };
        for digest in self.blobs()? {
            if reachable.blobs.contains(&digest) {
                continue;
            }
            let path = self.blob_path(&digest);
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.modified().is_ok_and(|t| t >= young) {
                report.kept_recent += 1;
                continue;
            }
            if !dry_run {
                self.remove_blob(&digest)?;
            }
            report.freed_bytes += meta.len();
            report.removed_blobs.push(digest);
        }
        self.sweep_rootfs(&reachable, dry_run, &mut report)?;
        self.sweep_metadata(dry_run, &mut report)?;
        self.sweep_tmp(started, dry_run, &mut report)?;
        let signatures = self.kiln_dir().join("signatures");
        if let Ok(entries) = fs::read_dir(&signatures) {
            for entry in entries.flatten() {
                if hex_prefix(&entry.file_name().to_string_lossy())
                    .is_some_and(|d| !reachable.documents.contains(&d))
                {
                    report.orphan_signatures.push(entry.path());
                }
            }
            report.orphan_signatures.sort();
        }
        Ok(report)
    }

    /// Removes the SBOM (`kiln/sbom/<hex>.spdx.json`) and the build-cache
    /// entries (`kiln/build-cache/<recipe>`, holding a manifest digest) of
    /// manifests that no longer exist (or that this gc removes).
    fn sweep_metadata(&self, dry_run: bool, report: &mut GcReport) -> Result<(), ImageError> {
        let gone = |d: &Digest| !self.has_blob(d) || report.removed_blobs.contains(d);
        let mut doomed = Vec::new();
        if let Ok(entries) = fs::read_dir(self.kiln_dir().join("sbom")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(hex) = name.strip_suffix(".spdx.json")
                    && let Ok(d) = format!("sha256:{hex}").parse::<Digest>()
                    && gone(&d)
                {
                    doomed.push(entry.path());
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.kiln_dir().join("build-cache")) {
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if format!("sha256:{name}").parse::<Digest>().is_err() {
                    continue; // stat.json and other files of the cache
                }
                let target = fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse::<Digest>().ok());
                if target.is_none_or(|d| gone(&d)) {
                    doomed.push(path);
                }
            }
        }
        doomed.sort();
        for path in doomed {
            if !dry_run {
                fs::remove_file(&path).map_err(|e| io_error("remove", &path, e))?;
            }
            report.removed_metadata.push(path);
        }
        Ok(())
    }

    fn sweep_rootfs(
        &self,
        reachable: &Reachable,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), ImageError> {
        let base = self.rootfs_dir();
        let Ok(entries) = fs::read_dir(&base) else {
            return Ok(());
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let (hex, suffix) = name.split_once('.').unwrap_or((&name, ""));
            let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            let in_use = reachable.documents.contains(&digest) || reachable.blobs.contains(&digest);
            let path = base.join(&name);
            match suffix {
                "" if !in_use => {
                    if dry_run {
                        report.removed_rootfs.push(path);
                        continue;
                    }
                    let lock = base.join(format!("{hex}.lock"));
                    let Some(_held) = try_lock_path(&lock)? else {
                        continue;
                    };
                    let doomed = base.join(format!("{hex}.partial"));
                    remove_tree(&doomed).map_err(|e| io_error("remove", &doomed, e))?;
                    fs::rename(&path, &doomed).map_err(|e| io_error("move aside", &path, e))?;
                    remove_tree(&doomed).map_err(|e| io_error("remove", &doomed, e))?;
                    fs::remove_file(&lock).map_err(|e| io_error("remove", &lock, e))?;
                    report.removed_rootfs.push(path);
                }
                "partial" | "lock" if !dry_run => {
                    let lock = base.join(format!("{hex}.lock"));
                    let Some(_held) = try_lock_path(&lock)? else {
                        continue;
                    };
                    if suffix == "partial" {
                        remove_tree(&path).map_err(|e| io_error("remove", &path, e))?;
                        report.removed_rootfs.push(path);
                    } else if !base.join(hex).exists() {
                        fs::remove_file(&lock).map_err(|e| io_error("remove", &lock, e))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn sweep_tmp(
        &self,
        started: SystemTime,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), ImageError> {
        let tmp = self.root().join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return Ok(());
        };
        let cutoff = started
            .checked_sub(TMP_EXPIRY)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old {
                if !dry_run {
                    remove_tree(&entry.path()).map_err(|e| io_error("remove", &entry.path(), e))?;
                }
                report.removed_tmp.push(entry.path());
            }
        }
        report.removed_tmp.sort();
        Ok(())
    }
}

/// The digest a kiln file is named after (`<64 hex>` or `<64 hex>.ext`).
fn hex_prefix(name: &str) -> Option<Digest> {
    format!("sha256:{}", name.get(..64)?)
        .parse()
        .ok()
        .filter(|_| name.len() == 64 || name.as_bytes()[64] == b'.')
}
