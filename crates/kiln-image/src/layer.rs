//! Deterministic layer tarballs: the same entries give the same bytes, on
//! any machine, from any checkout path, whatever the files' times on disk.
//!
//! What goes into a header, and what never does:
//! - entries are sorted by path (byte order, so a directory precedes its
//!   contents); a parent that no entry declares is added as a directory,
//!   mode 0755, owned by 0:0;
//! - uid/gid are 0 unless the entry says otherwise; user and group names are
//!   empty; mtime is the caller's `SOURCE_DATE_EPOCH` (read once by the
//!   caller, never here); atime, ctime, device numbers and xattrs are never
//!   written;
//! - modes are the entry's (the caller keeps the source's or overrides it);
//!   symlinks are stored as symlinks with their target verbatim;
//! - hard links are stored as hard links to an earlier entry of the same
//!   layer (the caller decides which paths are links: see `inputs.rs`);
//! - paths over 100 bytes and link targets over 100 bytes use GNU long-name
//!   entries (`././@LongLink`, types `L` and `K`), whose own headers are
//!   fixed (mode 0644, 0:0, mtime 0); GNU tar, Go's archive/tar (Docker,
//!   umoci, skopeo) and the `tar` crate read them;
//! - gzip at a fixed level with a header that has mtime 0, no file name and
//!   the OS byte 255 ("unknown"), compressed on every core in fixed 1 MiB
//!   pieces ([`crate::gzip`]), so the compressed digest depends only on the
//!   tar stream and the compressor's version (`zlib-rs`, whose SIMD paths
//!   produce the same bytes as its portable ones), never on the thread
//!   count. The build cache is keyed on inputs, not on compressed bytes.
//!
//! A file entry may carry the digest its content had when the build's recipe
//! was computed; the content is hashed again while it is written and a
//! mismatch aborts the layer ([`ImageError::InputChanged`]), so a cache key
//! can never name a layer made from different bytes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha1::{Digest as _, Sha1};

use crate::digest::{Digest, HashingReader, HashingWriter};
use crate::error::ImageError;
use crate::gzip::ParallelGz;
use crate::store::Store;

/// The gzip level of every layer kiln writes. Level 1: on a 200 MB tree it
/// builds a third faster than zlib's default 6 for a layer about 5% larger
/// (BENCHMARKS.md); builds sit on the path of every change, a few percent
/// of transfer size do not. Part of the digest: changing it changes every
/// image kiln builds.
pub const GZIP_LEVEL: u32 = 1;

/// Where a regular file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// A file on the host, read when the layer is written.
    Host(PathBuf),
    /// Bytes held in memory.
    Bytes(Vec<u8>),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        source: FileSource,
        size: u64,
        /// The content's digest as seen when the recipe was computed;
        /// checked again while writing.
        digest: Option<Digest>,
    },
    /// A symbolic link, its target stored verbatim.
    Symlink(String),
    /// A hard link to another entry of the same layer (a relative path that
    /// sorts before this one).
    HardLink(String),
}

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    pub kind: EntryKind,
    /// Permission bits (0o7777 at most).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

impl LayerEntry {
    pub fn dir(mode: u32) -> LayerEntry {
        LayerEntry {
            kind: EntryKind::Dir,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub fn file(source: FileSource, size: u64, mode: u32) -> LayerEntry {
        LayerEntry {
            kind: EntryKind::File {
                source,
                size,
                digest: None,
            },
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub fn bytes(bytes: impl Into<Vec<u8>>, mode: u32) -> LayerEntry {
        let bytes = bytes.into();
        let size = bytes.len() as u64;
        LayerEntry::file(FileSource::Bytes(bytes), size, mode)
    }

    pub fn symlink(target: impl Into<String>) -> LayerEntry {
        LayerEntry {
            kind: EntryKind::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }
}

/// The digests of a written layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigests {
    /// Digest of the gzip stream: the blob's name.
    pub digest: Digest,
    /// Size of the gzip stream.
    pub size: u64,
    /// Digest of the uncompressed tar stream (the config's `diff_id`).
    pub diff_id: Digest,
    /// Size of the uncompressed tar stream.
    pub tar_size: u64,
    /// Every regular file written (by layer path): its SHA-256 and SHA-1
    /// (hex), as read while writing, for the SBOM.
    pub files: BTreeMap<String, (Digest, String)>,
}

/// A layer being assembled: entries by normalised relative path
/// (`app/web`, never `/app/web` or `app/./web`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    entries: BTreeMap<String, LayerEntry>,
}

/// Turns an absolute or relative image path into the layer's form
/// (`/app//web/` → `app/web`); `None` for the root itself. Refuses `..`.
pub fn normalize(path: &str) -> Result<Option<String>, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("`{path}` contains `..`")),
            p => parts.push(p),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

impl Layer {
    pub fn new() -> Layer {
        Layer::default()
    }

    /// Adds (or replaces) the entry at `path`. The root itself is ignored.
    pub fn insert(&mut self, path: &str, entry: LayerEntry) -> Result<(), String> {
        if let Some(p) = normalize(path)? {
            self.entries.insert(p, entry);
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<&LayerEntry> {
        normalize(path)
            .ok()
            .flatten()
            .and_then(|p| self.entries.get(&p))
    }

    pub fn entries(&self) -> &BTreeMap<String, LayerEntry> {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of file content the layer holds (for progress).
    pub fn content_size(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// The entries with every implied parent made explicit, sorted.
    pub fn with_parents(&self) -> BTreeMap<String, LayerEntry> {
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                all.entry(p.to_owned())
                    .or_insert_with(|| LayerEntry::dir(0o755));
                parent = p;
            }
        }
        all
    }

    /// Checks that nothing sits under a non-directory and that every hard
    /// link points at an earlier regular file of the layer.
    pub fn check(&self) -> Result<(), String> {
        for (path, entry) in &self.entries {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                if let Some(e) = self.entries.get(p)
                    && !matches!(e.kind, EntryKind::Dir)
                {
                    return Err(format!(
                        "/{path} would be inside /{p}, which is not a directory"
                    ));
                }
                parent = p;
            }
            if let EntryKind::HardLink(target) = &entry.kind {
                match self.entries.get(target) {
                    Some(LayerEntry {
                        kind: EntryKind::File { .. },
                        ..
                    }) if target < path => {}
                    _ => {
                        return Err(format!(
                            "hard link /{path} must point at an earlier file, not /{target}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the layer as a gzipped tar to `out`. `progress` is called
    /// with the number of content bytes written since the last call.
    pub fn write<W: Write>(
        &self,
        mtime: u64,
        out: W,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(LayerDigests, W), ImageError> {
        self.check().map_err(ImageError::Invalid)?;
        let tar_err = |source: io::Error| ImageError::Io {
            op: "write layer",
            path: PathBuf::from("<layer>"),
            source,
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let gz = ParallelGz::new(HashingWriter::new(out), GZIP_LEVEL, threads).map_err(tar_err)?;
        let tar_out = HashingWriter::new(gz);
        let mut builder = tar::Builder::new(tar_out);
        let mut files = BTreeMap::new();
        for (path, entry) in self.with_parents() {
            let mut h = tar::Header::new_gnu();
            h.set_mode(entry.mode & 0o7777);
            h.set_uid(entry.uid);
            h.set_gid(entry.gid);
            h.set_mtime(mtime);
            match &entry.kind {
                EntryKind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    builder
                        .append_data(&mut h, format!("{path}/"), io::empty())
                        .map_err(tar_err)?;
                }
                EntryKind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    builder
                        .append_link(&mut h, &path, target)
                        .map_err(tar_err)?;
                }
                EntryKind::HardLink(target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    builder
                        .append_link(&mut h, &path, target)
                        .map_err(tar_err)?;
                }
                EntryKind::File {
                    source,
                    size,
                    digest,
                } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(*size);
                    let sums = append_file(
                        &mut builder,
                        &mut h,
                        &path,
                        source,
                        *size,
                        digest.as_ref(),
                        progress,
                    )?;
                    files.insert(path, sums);
                }
            }
        }
        let tar_out = builder.into_inner().map_err(tar_err)?;
        let (gz, diff_id, tar_size) = tar_out.finish();
        let gz_out = gz.finish().map_err(tar_err)?;
        let (out, digest, size) = gz_out.finish();
        Ok((
            LayerDigests {
                digest,
                size,
                diff_id,
                tar_size,
                files,
            },
            out,
        ))
    }
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    path: &str,
    source: &FileSource,
    size: u64,
    expected: Option<&Digest>,
    progress: &mut dyn FnMut(u64),
) -> Result<(Digest, String), ImageError> {
    let (host_path, reader): (PathBuf, Box<dyn Read + '_>) = match source {
        FileSource::Bytes(bytes) => (
            PathBuf::from(format!("<memory>/{path}")),
            Box::new(&bytes[..]),
        ),
        FileSource::Host(p) => {
            let file = File::open(p).map_err(|source| ImageError::Io {
                op: "open input file",
                path: p.clone(),
                source,
            })?;
            (
                p.clone(),
                Box::new(io::BufReader::with_capacity(256 * 1024, file)),
            )
        }
    };
    let mut reader = Progress {
        inner: HashingReader::new(reader.take(size)),
        progress,
        sha1: Sha1::new(),
    };
    builder
        .append_data(header, path, &mut reader)
        .map_err(|source| ImageError::Io {
            op: "add file to layer",
            path: host_path.clone(),
            source,
        })?;
    let sha1 = hex::encode(reader.sha1.finalize());
    let (actual, read) = reader.inner.finish();
    if read != size {
        return Err(ImageError::Io {
            op: "add file to layer",
            path: host_path,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("expected {size} bytes, read {read}: it changed during the build"),
            ),
        });
    }
    if let Some(expected) = expected
        && *expected != actual
    {
        return Err(ImageError::InputChanged {
            path: host_path,
            expected: expected.clone(),
            actual,
        });
    }
    Ok((actual, sha1))
}

/// Reports progress and computes the SHA-1 the SBOM needs on the way.
struct Progress<'a, R> {
    inner: R,
    progress: &'a mut dyn FnMut(u64),
    sha1: Sha1,
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha1.update(&buf[..n]);
        (self.progress)(n as u64);
        Ok(n)
    }
}

impl Store {
    /// Writes `layer` straight into the store (staged in `tmp/`, fsynced,
    /// renamed to its digest) and returns its digests.
    pub fn put_layer(
        &self,
        layer: &Layer,
        mtime: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<LayerDigests, ImageError> {
        let tmp = self.temp_path("layer");
        let result = self.stage_layer(layer, mtime, &tmp, progress);
        if tmp.exists() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn stage_layer(
        &self,
        layer: &Layer,
        mtime: u64,
        tmp: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<LayerDigests, ImageError> {
        let io_err = |op, source| ImageError::Io {
            op,
            path: tmp.to_path_buf(),
            source,
        };
        let file = File::create(tmp).map_err(|e| io_err("create staging file", e))?;
        let (digests, out) =
            layer.write(mtime, io::BufWriter::with_capacity(1 << 20, file), progress)?;
        let file = out
            .into_inner()
            .map_err(|e| io_err("write layer", e.into_error()))?;
        file.sync_all().map_err(|e| io_err("fsync layer", e))?;
        let dest = self.blob_path(&digests.digest);
        if !dest.exists() {
            fs::rename(tmp, &dest).map_err(|source| ImageError::Io {
                op: "move layer into place",
                path: dest.clone(),
                source,
            })?;
            if let Some(dir) = dest.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| ImageError::Io {
                        op: "fsync directory",
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
        }
        Ok(digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample(dir: &Path) -> Layer {
        let mut layer = Layer::new();
        let f = dir.join("bin");
        fs::write(&f, b"\x7fELF pretend").unwrap();
        layer
            .insert("/app/bin", LayerEntry::file(FileSource::Host(f), 12, 0o755))
            .unwrap();
        layer
            .insert("/app/link", LayerEntry::symlink("bin"))
            .unwrap();
        layer
            .insert("/etc/motd", LayerEntry::bytes("hi\n", 0o644))
            .unwrap();
        let long = format!("/deep/{}/{}", "d".repeat(90), "f".repeat(120));
        layer
            .insert(&long, LayerEntry::bytes("long", 0o600))
            .unwrap();
        layer
            .insert("/lnk", LayerEntry::symlink(format!("/{}", "t".repeat(150))))
            .unwrap();
        layer
    }

    fn write(layer: &Layer, mtime: u64) -> (LayerDigests, Vec<u8>) {
        layer.write(mtime, Vec::new(), &mut |_| {}).unwrap()
    }

    #[test]
    fn same_entries_give_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let layer = sample(dir.path());
        let (a, bytes_a) = write(&layer, 0);
        let (b, bytes_b) = write(&layer, 0);
        assert_eq!(bytes_a, bytes_b);
        assert_eq!(a, b);
        assert_eq!(a.digest, Digest::of(&bytes_a));
        assert_eq!(a.size, bytes_a.len() as u64);
        // The epoch is the only time in the layer.
        assert_ne!(write(&layer, 1_700_000_000).0.diff_id, a.diff_id);
    }

    #[test]
    fn gzip_header_has_no_time_name_or_os() {
        let (_, bytes) = write(&Layer::new(), 0);
        // ID1 ID2 CM FLG MTIME(4) XFL OS; XFL says "fastest" (4) at level 1
        // and "best" (2) at level 9, as gzip(1) writes it: a function of the
        // level, never of the machine.
        let xfl = match GZIP_LEVEL {
            1 => 4,
            9 => 2,
            _ => 0,
        };
        assert_eq!(&bytes[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]);
    }

    #[test]
    fn times_on_disk_do_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        let layer = sample(dir.path());
        let before = write(&layer, 0).0;
        let f = File::options()
            .write(true)
            .open(dir.path().join("bin"))
            .unwrap();
        f.set_modified(
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_234_567),
        )
        .unwrap();
        drop(f);
        assert_eq!(write(&layer, 0).0, before);
    }

    #[test]
    fn the_tar_is_sorted_with_parents_and_fixed_headers() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = write(&sample(dir.path()), 42);
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let mut paths = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(h.mtime().unwrap(), 42);
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            if h.entry_type().is_dir() {
                assert_eq!(h.mode().unwrap(), 0o755);
            }
            paths.push(
                entry
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_owned(),
            );
        }
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        assert_eq!(&paths[..4], ["app", "app/bin", "app/link", "deep"]);
        assert!(
            paths.iter().any(|p| p.ends_with(&"f".repeat(120))),
            "{paths:?}"
        );
    }

    #[test]
    fn two_copies_of_a_tree_at_different_paths_give_the_same_digest() {
        let build = |root: &Path| {
            fs::create_dir_all(root.join("src/sub")).unwrap();
            fs::write(root.join("src/a"), "a").unwrap();
            fs::write(root.join("src/sub/b"), "bb").unwrap();
            fs::set_permissions(root.join("src/a"), fs::Permissions::from_mode(0o750)).unwrap();
            let mut layer = Layer::new();
            for (rel, size) in [("a", 1), ("sub/b", 2)] {
                let p = root.join("src").join(rel);
                let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                layer
                    .insert(
                        &format!("/app/{rel}"),
                        LayerEntry::file(FileSource::Host(p), size, mode),
                    )
                    .unwrap();
            }
            write(&layer, 0).0
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        assert_eq!(
            build(&a.path().join("one")),
            build(&b.path().join("x/y/two"))
        );
    }

    #[test]
    fn a_file_that_changed_since_it_was_hashed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, "new").unwrap();
        let mut layer = Layer::new();
        let mut entry = LayerEntry::file(FileSource::Host(f), 3, 0o644);
        if let EntryKind::File { digest, .. } = &mut entry.kind {
            *digest = Some(Digest::of(b"old"));
        }
        layer.insert("/f", entry).unwrap();
        let err = layer.write(0, Vec::new(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::InputChanged { .. }), "{err}");
    }

    #[test]
    fn nothing_may_sit_under_a_file_and_links_point_backwards() {
        let mut layer = Layer::new();
        layer.insert("/a", LayerEntry::bytes("x", 0o644)).unwrap();
        layer.insert("/a/b", LayerEntry::bytes("y", 0o644)).unwrap();
        assert!(layer.check().unwrap_err().contains("not a directory"));
        let mut layer = Layer::new();
        layer.insert("/b", LayerEntry::bytes("x", 0o644)).unwrap();
        let link = LayerEntry {
            kind: EntryKind::HardLink("b".into()),
            ..LayerEntry::dir(0o644)
        };
        layer.insert("/a", link).unwrap();
        assert!(layer.check().is_err());
        assert!(normalize("/x/../y").is_err());
        assert_eq!(normalize("//x/./y/").unwrap().as_deref(), Some("x/y"));
        assert_eq!(normalize("/").unwrap(), None);
    }

    #[test]
    fn put_layer_stores_the_blob_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let layer = sample(dir.path());
        let d = store.put_layer(&layer, 0, &mut |_| {}).unwrap();
        assert_eq!(store.read_blob(&d.digest).unwrap(), write(&layer, 0).1);
        assert_eq!(
            fs::read_dir(dir.path().join("store/tmp")).unwrap().count(),
            0
        );
    }
}
