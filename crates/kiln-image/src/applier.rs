//! The layer applier: one tar stream applied onto a directory, with the
//! OCI layer rules and the security checks described in [`crate::unpack`]
//! (which owns the store side: verified reads, locking, the atomic rename).
//!
//! It is the only code that writes an image's files, and it writes only
//! below its root: entry names are normalised ([`normalise`]), parents are
//! resolved one component at a time without following links, files are
//! created with `O_EXCL`, hard-link targets must already exist inside the
//! root, devices are never created.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::ImageError;
use crate::unpack::{
    Compression, MAX_ENTRY_SIZE, UnpackReport, compression_of, io_error, remove_tree,
};

const OPAQUE: &[u8] = b".wh..wh..opq";

/// Metadata a directory gets once every layer is applied (until then it
/// stays owner-writable so later entries can be written into it).
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

/// The entry being applied, for error messages.
struct At<'a> {
    layer: &'a str,
    entry: &'a str,
}

impl At<'_> {
    fn refuse(&self, why: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_owned(),
            entry: self.entry.to_owned(),
            why: why.into(),
        }
    }

    fn bad(&self, source: io::Error) -> ImageError {
        ImageError::BadArchive {
            what: format!("layer {} at entry `{}`", self.layer, self.entry),
            source,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Unpacker {
    root: PathBuf,
    chown: bool,
    /// Relative paths known to be real directories; only this unpacker
    /// writes under `root`, so the cache stays true as long as removals of
    /// directories drop their entries.
    known_dirs: HashSet<PathBuf>,
    dirs: BTreeMap<PathBuf, Meta>,
    pub(crate) report: UnpackReport,
    buf: Vec<u8>,
}

impl Unpacker {
    pub(crate) fn new(root: &Path) -> Unpacker {
        Unpacker {
            root: root.to_path_buf(),
            chown: running_as_root(),
            known_dirs: HashSet::new(),
            dirs: BTreeMap::new(),
            report: UnpackReport::default(),
            buf: vec![0; 256 << 10],
        }
    }

    pub(crate) fn apply_stream(
        &mut self,
        label: &str,
        media_type: Option<&str>,
        input: &mut impl BufRead,
    ) -> Result<(), ImageError> {
        let bad = |source| ImageError::BadArchive {
            what: format!("layer {label}"),
            source,
        };
        let head = input.fill_buf().map_err(bad)?;
        let head = head[..head.len().min(4)].to_vec();
        self.report.layers += 1;
        match compression_of(label, media_type, &head)? {
            Compression::Gzip => self.apply_tar(label, flate2::bufread::MultiGzDecoder::new(input)),
            Compression::None => self.apply_tar(label, input),
        }
    }

    fn apply_tar(&mut self, label: &str, input: impl Read) -> Result<(), ImageError> {
        let bad = |source| ImageError::BadArchive {
            what: format!("layer {label}"),
            source,
        };
        // Paths this layer wrote (and their ancestors): whiteouts in a layer
        // hide lower layers' content only.
        let mut current = HashSet::new();
        let mut archive = tar::Archive::new(input);
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            self.report.entries += 1;
            self.apply_entry(label, &mut entry, &mut current)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &str,
        entry: &mut tar::Entry<R>,
        current: &mut HashSet<PathBuf>,
    ) -> Result<(), ImageError> {
        let raw = entry.path().map(|p| p.into_owned());
        let shown = match &raw {
            Ok(p) => p.display().to_string(),
            Err(_) => "<unreadable name>".to_owned(),
        };
        let at = At {
            layer,
            entry: &shown,
        };
        let raw = raw.map_err(|e| at.bad(e))?;
        let rel = normalise(&raw).map_err(|why| at.refuse(why))?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            return Ok(());
        }
        if let Some(name) = rel.file_name()
            && name.as_bytes().starts_with(b".wh.")
        {
            return self.whiteout(&at, &rel, name.as_bytes(), current);
        }
        let header = entry.header();
        let old = header.as_old();
        let meta = Meta {
            mode: numeric(&old.mode, header.mode().map(u64::from)).map_err(|e| at.bad(e))? as u32
                & 0o7777,
            uid: id(numeric(&old.uid, header.uid()).map_err(|e| at.bad(e))?)
                .map_err(|why| at.refuse(why))?,
            gid: id(numeric(&old.gid, header.gid()).map_err(|e| at.bad(e))?)
                .map_err(|why| at.refuse(why))?,
            mtime: numeric(&old.mtime, header.mtime()).map_err(|e| at.bad(e))?,
        };
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                return Ok(()); // the root itself (`./`): its metadata is kiln's
            }
            return Err(at.refuse("it names the image root"));
        }
        use tar::EntryType as T;
        let applied = match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                let size = entry.size();
                if size > MAX_ENTRY_SIZE {
                    return Err(at.refuse(format!(
                        "it declares {size} bytes, more than the {MAX_ENTRY_SIZE}-byte limit"
                    )));
                }
                self.parents(&at, &rel, true)?;
                self.file(&at, &rel, entry, size, meta)?;
                true
            }
            T::Directory => {
                self.parents(&at, &rel, true)?;
                self.directory(&rel, meta)?;
                true
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| at.bad(e))?
                    .map(|t| t.into_owned());
                let target = target
                    .filter(|t| !t.as_os_str().is_empty())
                    .ok_or_else(|| at.refuse("a symbolic link without a target"))?;
                self.parents(&at, &rel, true)?;
                self.clear(&rel)?;
                let abs = self.root.join(&rel);
                std::os::unix::fs::symlink(&target, &abs)
                    .map_err(|e| io_error("create symbolic link", &abs, e))?;
                self.own(&abs, meta)?;
                true
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| at.bad(e))?
                    .map(|t| t.into_owned());
                let target = target.ok_or_else(|| at.refuse("a hard link without a target"))?;
                self.hard_link(&at, &rel, &target)?
            }
            T::Char | T::Block | T::Fifo => {
                self.report.skipped_devices += 1;
                false
            }
            _ => {
                self.report.skipped_other += 1;
                false
            }
        };
        if applied {
            let mut p = rel.as_path();
            while !p.as_os_str().is_empty() && current.insert(p.to_path_buf()) {
                p = p.parent().unwrap_or(Path::new(""));
            }
        }
        Ok(())
    }

    /// Checks that every ancestor of `rel` is a real directory, creating
    /// missing ones when `create`; returns false if one is missing.
    fn parents(&mut self, at: &At, rel: &Path, create: bool) -> Result<bool, ImageError> {
        let mut sub = PathBuf::new();
        let components: Vec<_> = rel.components().collect();
        for c in &components[..components.len().saturating_sub(1)] {
            sub.push(c);
            if self.known_dirs.contains(&sub) {
                continue;
            }
            let abs = self.root.join(&sub);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(at.refuse(format!(
                        "its parent `{}` is a symbolic link, and kiln never follows links while unpacking",
                        sub.display()
                    )));
                }
                Ok(_) => {
                    return Err(
                        at.refuse(format!("its parent `{}` is not a directory", sub.display()))
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    make_dir(&abs, 0o755)?;
                }
                Err(e) => return Err(io_error("inspect", &abs, e)),
            }
            self.known_dirs.insert(sub.clone());
        }
        Ok(true)
    }

    /// Removes whatever is at `rel` (never following a link).
    fn clear(&mut self, rel: &Path) -> Result<(), ImageError> {
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => {
                remove_tree(&abs).map_err(|e| io_error("remove directory", &abs, e))?;
                self.known_dirs.retain(|d| !d.starts_with(rel));
                self.dirs.retain(|d, _| !d.starts_with(rel));
            }
            Ok(_) => fs::remove_file(&abs).map_err(|e| io_error("remove", &abs, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspect", &abs, e)),
        }
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        at: &At,
        rel: &Path,
        entry: &mut tar::Entry<R>,
        size: u64,
        meta: Meta,
    ) -> Result<(), ImageError> {
        self.clear(rel)?;
        let abs = self.root.join(rel);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&abs)
            .map_err(|e| io_error("create", &abs, e))?;
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(at.bad(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| io_error("write", &abs, e))?;
            written += n as u64;
        }
        if written != size {
            return Err(at.bad(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("it declares {size} bytes but the layer ends after {written}"),
            )));
        }
        if self.chown && std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)).is_err() {
            self.report.ownership_not_kept += 1;
        }
        file.set_permissions(fs::Permissions::from_mode(meta.mode))
            .map_err(|e| io_error("set mode of", &abs, e))?;
        if let Some(t) = mtime(meta.mtime) {
            file.set_modified(t)
                .map_err(|e| io_error("set mtime of", &abs, e))?;
        }
        self.report.files += 1;
        self.report.bytes += written;
        Ok(())
    }

    fn directory(&mut self, rel: &Path, meta: Meta) -> Result<(), ImageError> {
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => {
                fs::set_permissions(&abs, fs::Permissions::from_mode(meta.mode | 0o700))
                    .map_err(|e| io_error("set mode of", &abs, e))?
            }
            Ok(_) => {
                self.clear(rel)?;
                make_dir(&abs, meta.mode | 0o700)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(&abs, meta.mode | 0o700)?,
            Err(e) => return Err(io_error("inspect", &abs, e)),
        }
        self.known_dirs.insert(rel.to_path_buf());
        self.dirs.insert(rel.to_path_buf(), meta);
        Ok(())
    }

    fn hard_link(&mut self, at: &At, rel: &Path, target: &Path) -> Result<bool, ImageError> {
        let target =
            normalise(target).map_err(|why| at.refuse(format!("its link target {why}")))?;
        if target.as_os_str().is_empty() {
            return Err(at.refuse("it is a hard link to the image root"));
        }
        let missing = || {
            at.refuse(format!(
                "its link target `{}` is not in the image",
                target.display()
            ))
        };
        if !self.parents(at, &target, false)? {
            return Err(missing());
        }
        let target_abs = self.root.join(&target);
        match fs::symlink_metadata(&target_abs) {
            Ok(m) if m.is_dir() => return Err(at.refuse("it is a hard link to a directory")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(io_error("inspect", &target_abs, e)),
        }
        if target == rel {
            return Ok(false);
        }
        self.parents(at, rel, true)?;
        self.clear(rel)?;
        let abs = self.root.join(rel);
        // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the
        // symlink itself.
        fs::hard_link(&target_abs, &abs).map_err(|e| io_error("create hard link", &abs, e))?;
        Ok(true)
    }

    fn whiteout(
        &mut self,
        at: &At,
        rel: &Path,
        name: &[u8],
        current: &mut HashSet<PathBuf>,
    ) -> Result<(), ImageError> {
        self.report.whiteouts += 1;
        let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            // The directory exists in this layer, emptied of lower content.
            self.parents(at, rel, true)?;
            let mut p = dir.as_path();
            while !p.as_os_str().is_empty() && current.insert(p.to_path_buf()) {
                p = p.parent().unwrap_or(Path::new(""));
            }
            return self.clear_lower(&dir, current);
        }
        if name.starts_with(b".wh..wh.") {
            return Ok(()); // aufs bookkeeping (`.wh..wh.plnk` and friends)
        }
        let hidden = &name[4..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(at.refuse("a whiteout that names no file"));
        }
        let target = dir.join(OsStr::from_bytes(hidden));
        if !self.parents(at, &target, false)? || current.contains(&target) {
            return Ok(());
        }
        self.clear(&target)
    }

    /// Removes from `dir` everything lower layers put there.
    fn clear_lower(&mut self, dir: &Path, current: &HashSet<PathBuf>) -> Result<(), ImageError> {
        let abs = self.root.join(dir);
        let entries = fs::read_dir(&abs).map_err(|e| io_error("list", &abs, e))?;
        let mut children = Vec::new();
        for e in entries {
            let e = e.map_err(|e| io_error("list", &abs, e))?;
            let is_dir = e
                .file_type()
                .map_err(|err| io_error("inspect", &e.path(), err))?
                .is_dir();
            children.push((dir.join(e.file_name()), is_dir));
        }
        for (child, is_dir) in children {
            if !current.contains(&child) {
                self.clear(&child)?;
            } else if is_dir {
                self.clear_lower(&child, current)?;
            }
        }
        Ok(())
    }

    fn own(&mut self, abs: &Path, meta: Meta) -> Result<(), ImageError> {
        if self.chown && std::os::unix::fs::lchown(abs, Some(meta.uid), Some(meta.gid)).is_err() {
            self.report.ownership_not_kept += 1;
        }
        Ok(())
    }

    /// Gives directories their final metadata, deepest first (a parent's
    /// mtime changes when its children do, and a read-only parent would
    /// refuse them).
    pub(crate) fn finish(&mut self) -> Result<(), ImageError> {
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, meta) in dirs.iter().rev() {
            let abs = self.root.join(rel);
            if !fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if let Some(t) = mtime(meta.mtime) {
                File::open(&abs)
                    .and_then(|d| d.set_modified(t))
                    .map_err(|e| io_error("set mtime of", &abs, e))?;
            }
            self.own(&abs, *meta)?;
            fs::set_permissions(&abs, fs::Permissions::from_mode(meta.mode))
                .map_err(|e| io_error("set mode of", &abs, e))?;
        }
        Ok(())
    }
}

/// Normalises an entry name to a path relative to the root: a leading `/`
/// and `.` components are dropped; `..` is refused wherever it appears.
pub fn normalise(raw: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                return Err(
                    "has a `..` component, which could reach outside the image root".to_owned(),
                );
            }
            Component::Prefix(_) => return Err("has a path prefix".to_owned()),
        }
    }
    Ok(out)
}

/// A numeric header field; blank (all NUL or spaces) reads as 0, as in Go's
/// archive/tar, which wrote many layers in the wild.
fn numeric(field: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    match parsed {
        Err(_) if field.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        other => other,
    }
}

fn id(raw: u64) -> Result<u32, String> {
    u32::try_from(raw).map_err(|_| format!("its owner id {raw} is out of range"))
}

fn mtime(secs: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn make_dir(abs: &Path, mode: u32) -> Result<(), ImageError> {
    fs::create_dir(abs).map_err(|e| io_error("create directory", abs, e))?;
    // Explicit, so the umask does not decide.
    fs::set_permissions(abs, fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("set mode of", abs, e))
}

/// Whether the effective uid is 0 (read from /proc: std has no geteuid and
/// the crate has no libc).
fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpack::apply_layer;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_mtime(1_000_000);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType as T;

    #[test]
    fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut u = Unpacker::new(root);
        let lower = tar_of(&[
            ("a/", T::Directory, b"", None),
            ("a/old", T::Regular, b"1", None),
            ("a/sub/deep", T::Regular, b"2", None),
            ("b", T::Regular, b"3", None),
            ("c/keep", T::Regular, b"4", None),
        ]);
        let upper = tar_of(&[
            ("a/new", T::Regular, b"5", None),
            ("a/sub/fresh", T::Regular, b"6", None),
            ("a/.wh..wh..opq", T::Regular, b"", None),
            (".wh.b", T::Regular, b"", None),
            ("c/.wh.missing", T::Regular, b"", None),
        ]);
        u.apply_stream("lower", None, &mut &lower[..]).unwrap();
        u.apply_stream("upper", None, &mut &upper[..]).unwrap();
        u.finish().unwrap();
        let mut found = Vec::new();
        walk(root, root, &mut found);
        assert_eq!(found, ["a", "a/new", "a/sub", "a/sub/fresh", "c", "c/keep"]);
        assert_eq!(u.report.whiteouts, 3);
    }

    #[test]
    fn later_entries_replace_earlier_ones_of_any_type() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let layer = tar_of(&[
            ("x/y", T::Regular, b"1", None),
            ("x", T::Symlink, b"", Some("/etc")),
            ("f", T::Regular, b"old", None),
            ("h", T::Link, b"", Some("f")),
            ("f", T::Regular, b"new", None),
        ]);
        apply_layer(root, &layer[..]).unwrap();
        assert_eq!(fs::read_link(root.join("x")).unwrap(), Path::new("/etc"));
        assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
        assert_eq!(
            fs::read(root.join("h")).unwrap(),
            b"old",
            "a replaced file breaks the hard link"
        );
    }

    #[test]
    fn normalise_strips_roots_and_refuses_parents() {
        assert_eq!(normalise(Path::new("/a/./b/")).unwrap(), Path::new("a/b"));
        assert_eq!(normalise(Path::new("./")).unwrap(), Path::new(""));
        assert!(normalise(Path::new("a/../b")).is_err());
        assert!(normalise(Path::new("..")).is_err());
    }

    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
}
