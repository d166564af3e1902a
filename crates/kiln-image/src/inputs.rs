//! Reading an image's `copy` entries from the host into a [`Layer`].
//!
//! Semantics of one `{ src, dst, mode }` (src relative to the spec's
//! directory, dst absolute in the image):
//! - `src` a file (a symlink named as `src` itself is followed): it is
//!   written at `dst`, or at `dst/<file name>` when `dst` ends with `/`;
//! - `src` a directory: `dst` is that directory (with the source's mode) and
//!   the tree below is copied as is; symlinks inside the tree stay symlinks
//!   (never followed), sockets, FIFOs and devices are refused;
//! - `mode` overrides the permission bits of **regular files** only;
//!   directories and symlinks keep theirs (so `mode = 0o644` on a tree does
//!   not make its directories untraversable);
//! - files that are hard links of each other **within one copy tree** are
//!   stored once, the others as hard links to the first in path order; the
//!   same inode reached through two different copies is stored twice;
//! - modes read from disk lose their group and other write bits
//!   ([`host_mode`]): a checkout made under umask 002 (0664 files) and one
//!   made under 022 (0644) must give the same digest; an explicit `mode` is
//!   kept exactly;
//! - owners are 0:0 and times come from `SOURCE_DATE_EPOCH`;
//! - later copies replace earlier ones at the same path; putting anything
//!   under a path that is not a directory is an error;
//! - kiln's own directories (the project's `.kiln/` and the image store)
//!   are skipped when a copied tree contains them (`src = "."`), or every
//!   build would change its own input.
//!
//! Every file's content digest comes from the [`StatCache`] and is checked
//! again while the layer is written.

use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_spec::model::Image;

use crate::cache::StatCache;
use crate::error::ImageError;
use crate::layer::{EntryKind, FileSource, Layer, LayerEntry, normalize};

/// A copied file that starts with the ELF magic: a root of the closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInput {
    pub host: PathBuf,
    /// Absolute image path.
    pub image: String,
}

/// The copies of an image, read.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub layer: Layer,
    pub elf: Vec<ElfInput>,
    /// Files the stat cache did not know: their digests are computed while
    /// the layer is written (one read instead of two), from the metadata
    /// they had here, and whether they are ELF.
    pub pending: BTreeMap<PathBuf, (Metadata, bool)>,
}

/// Reads every `copy` of `image` (named `name`, for errors) relative to
/// `dir`. Directories in `exclude` (kiln's own state and image store, when
/// they sit inside a copied tree) are skipped.
pub fn collect(
    name: &str,
    image: &Image,
    dir: &Path,
    stats: &mut StatCache,
    exclude: &[PathBuf],
) -> Result<Inputs, ImageError> {
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    let mut inputs = Inputs::default();
    for copy in &image.copy {
        let src = dir.join(&copy.src);
        let bad = |why: String, hint: &str| ImageError::BadCopy {
            image: name.to_owned(),
            why,
            hint: hint.to_owned(),
        };
        let meta = fs::metadata(&src).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ImageError::CopySourceMissing {
                image: name.to_owned(),
                src: copy.src.clone(),
                path: src.clone(),
            },
            _ => ImageError::Io {
                op: "read copy source",
                path: src.clone(),
                source,
            },
        })?;
        let mut dst = copy.dst.clone();
        if meta.is_file() && dst.ends_with('/') {
            let file_name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            dst.push_str(file_name);
        }
        let dst = normalize(&dst).map_err(|why| {
            bad(
                format!("copy destination {why}"),
                "use an absolute path without `..`",
            )
        })?;
        if meta.is_file() {
            let Some(dst) = dst else {
                return Err(bad(
                    format!("copy `{}` puts a file at `/`", copy.src),
                    "give the file's path in the image as `dst`",
                ));
            };
            let mut tree = Tree::default();
            tree.file(&src, &dst, &meta, copy.mode, stats)?;
            tree.add_to(&mut inputs);
        } else if meta.is_dir() {
            let mut tree = Tree {
                exclude: exclude.clone(),
                ..Tree::default()
            };
            // Walked from its canonical path, so `exclude` compares exactly.
            let root = fs::canonicalize(&src).map_err(|source| ImageError::Io {
                op: "read copy source",
                path: src.clone(),
                source,
            })?;
            if let Some(dst) = &dst {
                tree.entries
                    .insert(dst.clone(), (LayerEntry::dir(host_mode(&meta)), None));
            }
            tree.walk(name, &root, dst.as_deref(), copy.mode, stats)?;
            tree.link_duplicates();
            tree.add_to(&mut inputs);
        } else {
            return Err(bad(
                format!(
                    "copy source `{}` ({}) is not a file or a directory",
                    copy.src,
                    src.display()
                ),
                "copy regular files, directories and symlinks only",
            ));
        }
    }
    inputs.layer.check().map_err(|why| ImageError::BadCopy {
        image: name.to_owned(),
        why,
        hint: "check the `dst` of each copy in kiln.toml".into(),
    })?;
    Ok(inputs)
}

/// The entries of one copy, with the inode of each regular file (for hard
/// links) and the ELF files found.
#[derive(Debug, Default)]
struct Tree {
    entries: BTreeMap<String, (LayerEntry, Option<(u64, u64)>)>,
    elf: Vec<ElfInput>,
    pending: BTreeMap<PathBuf, (Metadata, bool)>,
    exclude: Vec<PathBuf>,
}

impl Tree {
    fn file(
        &mut self,
        host: &Path,
        dst: &str,
        meta: &Metadata,
        mode: Option<u32>,
        stats: &mut StatCache,
    ) -> Result<(), ImageError> {
        let (digest, elf) = match stats.known(host, meta) {
            Some(facts) => (Some(facts.digest), facts.elf),
            None => {
                let elf = crate::cache::sniff_elf(host)?;
                self.pending.insert(host.to_path_buf(), (meta.clone(), elf));
                (None, elf)
            }
        };
        if elf {
            self.elf.push(ElfInput {
                host: host.to_path_buf(),
                image: format!("/{dst}"),
            });
        }
        let entry = LayerEntry {
            kind: EntryKind::File {
                source: FileSource::Host(host.to_path_buf()),
                size: meta.len(),
                digest,
            },
            mode: mode.map_or_else(|| host_mode(meta), |m| m & 0o7777),
            uid: 0,
            gid: 0,
        };
        let inode = (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
        self.entries.insert(dst.to_owned(), (entry, inode));
        Ok(())
    }

    fn walk(
        &mut self,
        name: &str,
        dir: &Path,
        dst: Option<&str>,
        mode: Option<u32>,
        stats: &mut StatCache,
    ) -> Result<(), ImageError> {
        let io_err = |op, path: &Path, source| ImageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut children: Vec<_> = fs::read_dir(dir)
            .map_err(|e| io_err("list copy source", dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_err("list copy source", dir, e))?;
        children.sort();
        for child in children {
            let host = dir.join(&child);
            let Some(child) = child.to_str() else {
                return Err(ImageError::BadCopy {
                    image: name.to_owned(),
                    why: format!("{} is not valid UTF-8", host.display()),
                    hint: "rename the file; image paths must be UTF-8".into(),
                });
            };
            let path = match dst {
                Some(d) => format!("{d}/{child}"),
                None => child.to_owned(),
            };
            let meta =
                fs::symlink_metadata(&host).map_err(|e| io_err("read copy source", &host, e))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = fs::read_link(&host).map_err(|e| io_err("read symlink", &host, e))?;
                let Some(target) = target.to_str() else {
                    return Err(ImageError::BadCopy {
                        image: name.to_owned(),
                        why: format!(
                            "the target of symlink {} is not valid UTF-8",
                            host.display()
                        ),
                        hint: "image paths must be UTF-8".into(),
                    });
                };
                self.entries
                    .insert(path, (LayerEntry::symlink(target), None));
            } else if ft.is_dir() && self.exclude.contains(&host) {
                continue;
            } else if ft.is_dir() {
                self.entries
                    .insert(path.clone(), (LayerEntry::dir(host_mode(&meta)), None));
                self.walk(name, &host, Some(&path), mode, stats)?;
            } else if ft.is_file() {
                self.file(&host, &path, &meta, mode, stats)?;
            } else {
                return Err(ImageError::BadCopy {
                    image: name.to_owned(),
                    why: format!("{} is a socket, FIFO or device", host.display()),
                    hint: "copy regular files, directories and symlinks only".into(),
                });
            }
        }
        Ok(())
    }

    /// Turns every regular file that shares an inode with an earlier path
    /// (in byte order, which is the layer's order) into a hard link.
    fn link_duplicates(&mut self) {
        let mut first: BTreeMap<(u64, u64), String> = BTreeMap::new();
        for (path, (entry, inode)) in self.entries.iter_mut() {
            let Some(inode) = inode else { continue };
            match first.get(inode) {
                Some(target) => entry.kind = EntryKind::HardLink(target.clone()),
                None => {
                    first.insert(*inode, path.clone());
                }
            }
        }
    }

    fn add_to(self, inputs: &mut Inputs) {
        for (path, (entry, _)) in self.entries {
            // A path that a later copy replaces is no longer a closure root.
            inputs.elf.retain(|e| e.image[1..] != path);
            inputs
                .layer
                .insert(&path, entry)
                .expect("paths are normalised");
        }
        inputs.elf.extend(self.elf);
        inputs.pending.extend(self.pending);
    }
}

/// The permission bits of a file or directory as the image records them:
/// the source's, less group and other write (which only the umask of the
/// checkout decides).
pub fn host_mode(meta: &Metadata) -> u32 {
    meta.permissions().mode() & 0o7755
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spec::model::{Copy, ImageSource};

    pub(crate) fn image(copies: &[(&str, &str, Option<u32>)]) -> Image {
        Image {
            from: ImageSource::Scratch,
            copy: copies
                .iter()
                .map(|(s, d, m)| Copy {
                    src: (*s).into(),
                    dst: (*d).into(),
                    mode: *m,
                })
                .collect(),
            closure: false,
            debian: vec![],
            entrypoint: None,
            cmd: None,
            env: Default::default(),
            workdir: None,
            user: None,
            labels: Default::default(),
            expose: vec![],
            users: vec![],
            dirs: vec![],
        }
    }

    #[test]
    fn trees_files_links_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("static/css")).unwrap();
        fs::write(d.join("static/css/a.css"), "a").unwrap();
        fs::write(d.join("static/index.html"), "i").unwrap();
        fs::hard_link(d.join("static/index.html"), d.join("static/copy.html")).unwrap();
        std::os::unix::fs::symlink("index.html", d.join("static/home")).unwrap();
        fs::write(d.join("web"), "\x7fELF...").unwrap();
        let img = image(&[
            ("static", "/app/static", Some(0o600)),
            ("web", "/app/bin/", None),
        ]);
        let inputs = collect("web", &img, d, &mut StatCache::in_memory(), &[]).unwrap();
        let e = inputs.layer.entries();
        let paths: Vec<_> = e.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "app/bin/web",
                "app/static",
                "app/static/copy.html",
                "app/static/css",
                "app/static/css/a.css",
                "app/static/home",
                "app/static/index.html"
            ]
        );
        assert_eq!(e["app/static/css/a.css"].mode, 0o600);
        assert_eq!(
            e["app/static/css"].mode,
            fs::metadata(d.join("static/css"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7755
        );
        assert_eq!(
            e["app/static/home"].kind,
            EntryKind::Symlink("index.html".into())
        );
        assert_eq!(
            e["app/static/index.html"].kind,
            EntryKind::HardLink("app/static/copy.html".into())
        );
        assert_eq!(
            inputs.elf,
            [ElfInput {
                host: d.join("web"),
                image: "/app/bin/web".into()
            }]
        );
    }

    #[test]
    fn a_missing_source_names_the_image_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = collect(
            "api",
            &image(&[("target/release/api", "/api", None)]),
            dir.path(),
            &mut StatCache::in_memory(),
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ImageError::CopySourceMissing { .. }));
        assert!(
            text.contains("image `api`") && text.contains("target/release/api"),
            "{text}"
        );
    }

    #[test]
    fn a_file_under_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "x").unwrap();
        let err = collect(
            "x",
            &image(&[("f", "/a", None), ("f", "/a/b", None)]),
            dir.path(),
            &mut StatCache::in_memory(),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn kilns_own_directories_are_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join(".kiln/images/blobs")).unwrap();
        fs::write(d.join(".kiln/state.db"), "x").unwrap();
        fs::write(d.join("app"), "a").unwrap();
        let img = image(&[(".", "/srv", None)]);
        let inputs = collect(
            "x",
            &img,
            d,
            &mut StatCache::in_memory(),
            &[d.join(".kiln")],
        )
        .unwrap();
        let paths: Vec<_> = inputs.layer.entries().keys().map(String::as_str).collect();
        assert_eq!(paths, ["srv", "srv/app"]);
    }
}
