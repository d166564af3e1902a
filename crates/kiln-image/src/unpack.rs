//! Materialising an image: its layers applied in order into one directory
//! per manifest digest, `kiln_dir()/rootfs/<hex>`, shared read-only by every
//! instance of the image.
//!
//! An image is unpacked once: into `<hex>.partial` under a per-digest lock
//! file, then renamed to `<hex>`, so a directory named by a digest is always
//! complete and concurrent callers wait for the one doing the work. Each
//! layer is read through the store's verifying reader; a corrupt layer is
//! refused by digest and the partial directory removed. The writing itself
//! is the layer applier's (`applier.rs`); [`apply_layer`] exposes it for one
//! stream (the fuzz target and the hostile-layer tests use it).
//!
//! Layers follow the OCI layer rules: `.wh.NAME` deletes `NAME` from lower
//! layers, `.wh..wh..opq` hides everything lower layers put in its
//! directory, a later entry replaces an earlier one of any type. Symbolic
//! links are stored as they are and never followed; hard links must point
//! inside the root; modes, owners (only when running as root) and mtimes of
//! files and directories are kept.
//!
//! Security: a layer is untrusted input, and nothing it says may write
//! outside the root.
//! - Entry names are normalised: a leading `/` is stripped, `.` dropped, and
//!   a `..` component anywhere refuses the entry (and so the image).
//! - Parents are resolved component by component with `symlink_metadata`:
//!   an entry whose parent is a symbolic link is refused (rather than the
//!   link being followed inside the root, or silently replaced by a
//!   directory, which would change what the image means). Files are created
//!   with `O_EXCL`, so a link in the final position is never written through.
//! - Hard-link targets are normalised the same way and must already exist in
//!   the root; links are made with `linkat` without `AT_SYMLINK_FOLLOW`.
//! - Device nodes and FIFOs are never created: they are skipped and counted
//!   in the [`UnpackReport`] (see [`UnpackReport::warnings`]).
//! - A declared entry size over [`MAX_ENTRY_SIZE`] is refused; data is
//!   streamed, never buffered by size, and an entry shorter than it declares
//!   is an error.
//!
//! Limits: gzip and uncompressed layers only (zstd is refused with a clear
//! error); extended attributes (file capabilities included) are not
//! restored; symbolic links keep the unpacker's mtime (std has no
//! `lutimes`); the `tar` crate buffers a GNU long name or PAX header in
//! memory, bounded by that header's real data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::applier::Unpacker;
pub use crate::applier::normalise;
use crate::digest::Digest;
use crate::error::ImageError;
use crate::image::{Image, descriptor_digest};
use crate::store::{CorruptBlob, Store};

/// The largest file a layer may declare (1 TiB): anything above is refused
/// as absurd before a byte is written.
pub const MAX_ENTRY_SIZE: u64 = 1 << 40;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What an unpack did, including what it deliberately did not do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackReport {
    pub layers: usize,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    /// Device nodes and FIFOs, never created.
    pub skipped_devices: u64,
    /// Entries of other types (GNU volume headers and the like).
    pub skipped_other: u64,
    /// Entries whose owner could not be set (running as root in a user
    /// namespace that does not map it).
    pub ownership_not_kept: u64,
}

impl UnpackReport {
    /// One line per kind of thing that was skipped, for the user.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.skipped_devices > 0 {
            out.push(format!(
                "{} device node(s) or FIFO(s) in the layers were not created (an image root carries no devices; the sandbox provides /dev)",
                self.skipped_devices
            ));
        }
        if self.skipped_other > 0 {
            out.push(format!(
                "{} layer entr(ies) of unsupported tar types were skipped",
                self.skipped_other
            ));
        }
        if self.ownership_not_kept > 0 {
            out.push(format!(
                "{} entr(ies) could not be given their owner",
                self.ownership_not_kept
            ));
        }
        out
    }
}

/// An unpacked image root; `report` is `Some` when this call did the work.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub path: PathBuf,
    pub report: Option<UnpackReport>,
}

impl Store {
    /// Where unpacked image roots live.
    pub fn rootfs_dir(&self) -> PathBuf {
        self.kiln_dir().join("rootfs")
    }

    /// The image's root directory, unpacked on first use.
    pub fn rootfs(&self, image: &Image) -> Result<PathBuf, ImageError> {
        self.materialise(image).map(|r| r.path)
    }

    /// Like [`Store::rootfs`], and says what the unpack did if it ran.
    pub fn materialise(&self, image: &Image) -> Result<Rootfs, ImageError> {
        let base = self.rootfs_dir();
        ensure_private_dir(&base)?;
        let hex = image.digest.hex();
        let dest = base.join(hex);
        if dest.is_dir() {
            return Ok(Rootfs {
                path: dest,
                report: None,
            });
        }
        let _lock = lock_path(&base.join(format!("{hex}.lock")))?;
        if dest.is_dir() {
            return Ok(Rootfs {
                path: dest,
                report: None,
            });
        }
        // Under the lock, a partial directory is a crashed attempt's.
        let partial = base.join(format!("{hex}.partial"));
        remove_tree(&partial).map_err(|e| io_error("remove stale partial unpack", &partial, e))?;
        fs::create_dir(&partial).map_err(|e| io_error("create", &partial, e))?;
        let report = match self.unpack_image(image, &partial) {
            Ok(report) => report,
            Err(e) => {
                let _ = remove_tree(&partial);
                return Err(e);
            }
        };
        sync_tree(&partial)?;
        fs::rename(&partial, &dest)
            .map_err(|e| io_error("move unpacked root into place", &dest, e))?;
        File::open(&base)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("fsync", &base, e))?;
        Ok(Rootfs {
            path: dest,
            report: Some(report),
        })
    }

    /// Applies the image's layers, in order, onto the empty directory `dest`.
    pub fn unpack_image(&self, image: &Image, dest: &Path) -> Result<UnpackReport, ImageError> {
        let mut unpacker = Unpacker::new(dest);
        for layer in image.layers() {
            let digest = descriptor_digest(layer)?;
            self.apply_stored_layer(&mut unpacker, &digest, layer.media_type().as_ref())?;
        }
        unpacker.finish()?;
        Ok(unpacker.report)
    }

    fn apply_stored_layer(
        &self,
        unpacker: &mut Unpacker,
        digest: &Digest,
        media_type: &str,
    ) -> Result<(), ImageError> {
        let verified = self.open_blob(digest)?;
        let mut input = BufReader::with_capacity(256 << 10, Watch::new(verified));
        let label = digest.to_string();
        let result = unpacker.apply_stream(&label, Some(media_type), &mut input);
        // Read what the decoder left, so the check at the end of the blob
        // runs even after a failure: a corrupt blob is reported as corrupt,
        // not as a bad tar.
        let drained = io::copy(&mut input, &mut io::sink());
        let watch = input.get_ref();
        if watch.corrupt {
            return Err(ImageError::Corrupt {
                digest: digest.clone(),
                path: self.blob_path(digest),
            });
        }
        result?;
        drained.map_err(|e| watch.inner.error(e))?;
        Ok(())
    }
}

/// Applies one layer (a tar, or a gzip-compressed tar) onto `root`, with
/// every rule and check of an image unpack, and sets directory metadata at
/// the end. `root` must exist.
pub fn apply_layer(root: &Path, layer: impl Read) -> Result<UnpackReport, ImageError> {
    let mut unpacker = Unpacker::new(root);
    unpacker.apply_stream("<stream>", None, &mut BufReader::new(layer))?;
    unpacker.finish()?;
    Ok(unpacker.report)
}

/// How a layer's bytes are compressed, decided by its first bytes (media
/// types lie in the wild; the magic does not) and its media type for zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

pub fn compression_of(
    label: &str,
    media_type: Option<&str>,
    head: &[u8],
) -> Result<Compression, ImageError> {
    if head.starts_with(&ZSTD_MAGIC) || media_type.is_some_and(|m| m.contains("zstd")) {
        return Err(ImageError::Unsupported(format!(
            "layer {label} is zstd-compressed; kiln unpacks gzip and uncompressed layers\n  hint: rebuild or convert the image with gzip layers (`skopeo copy --dest-compress-format gzip`)"
        )));
    }
    Ok(if head.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else {
        Compression::None
    })
}

/// Passes reads through and remembers whether the verifying reader below
/// refused the blob (the error may be wrapped or swallowed by decoders).
#[derive(Debug)]
pub(crate) struct Watch<R> {
    pub(crate) inner: R,
    pub(crate) corrupt: bool,
}

impl<R> Watch<R> {
    pub(crate) fn new(inner: R) -> Self {
        Watch {
            inner,
            corrupt: false,
        }
    }
}

impl<R: Read> Read for Watch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.get_ref().is_some_and(|i| i.is::<CorruptBlob>()) {
                self.corrupt = true;
            }
        })
    }
}

pub(crate) fn io_error(op: &'static str, path: &Path, source: io::Error) -> ImageError {
    ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a file or a whole tree, never following links, making
/// directories writable on the way (image roots may hold `0555` ones).
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    if meta.mode() & 0o700 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() | 0o700))?;
    }
    for entry in fs::read_dir(path)? {
        remove_tree(&entry?.path())?;
    }
    fs::remove_dir(path)
}

/// Flushes every file and directory of a freshly unpacked tree to disk, so
/// a root renamed into place survives a power loss. Files the unpacker may
/// not open (non-root, mode 000) are skipped.
fn sync_tree(path: &Path) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(path).map_err(|e| io_error("inspect", path, e))?;
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries {
                let entry = entry.map_err(|e| io_error("list", path, e))?;
                sync_tree(&entry.path())?;
            }
        }
    } else if !meta.is_file() {
        return Ok(());
    }
    match File::open(path) {
        Ok(f) => f.sync_all().map_err(|e| io_error("fsync", path, e)),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(io_error("open for fsync", path, e)),
    }
}

/// A `0700` directory (image roots hold set-uid files: other local users
/// must not reach them).
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), ImageError> {
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error("set mode of", dir, e))?;
    }
    Ok(())
}

/// Takes the exclusive lock file `path`. `gc` deletes lock files while
/// holding them; a lock taken on a file that was meanwhile unlinked is
/// dropped and taken again on the new one.
pub(crate) fn lock_path(path: &Path) -> Result<File, ImageError> {
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_error("open lock", path, e))?;
        file.lock().map_err(|e| io_error("lock", path, e))?;
        if same_file(&file, path) {
            return Ok(file);
        }
    }
}

/// Like [`lock_path`], but gives up (`None`) if someone holds the lock.
pub(crate) fn try_lock_path(path: &Path) -> Result<Option<File>, ImageError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_error("open lock", path, e))?;
    match file.try_lock() {
        Ok(()) if same_file(&file, path) => Ok(Some(file)),
        Ok(()) | Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(io_error("lock", path, e)),
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_is_refused_clearly_and_gzip_is_sniffed() {
        let err = compression_of(
            "sha256:x",
            Some("application/vnd.oci.image.layer.v1.tar+zstd"),
            b"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("zstd"), "{err}");
        assert!(compression_of("l", None, &ZSTD_MAGIC).is_err());
        assert_eq!(
            compression_of(
                "l",
                Some("application/vnd.oci.image.layer.v1.tar"),
                &GZIP_MAGIC
            )
            .unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            compression_of(
                "l",
                Some("application/vnd.oci.image.layer.v1.tar+gzip"),
                b"ab"
            )
            .unwrap(),
            Compression::None
        );
    }
}
