//! The file tree an image's layers add up to, read from the store without
//! unpacking: used to place new files through a base image's symlinks and
//! to list every file of an image in its SBOM.
//!
//! Layers are applied in order with OCI whiteouts (`.wh.NAME` removes NAME,
//! `.wh..wh..opq` empties a directory of what lower layers put there).
//! Every layer is read through the store's verified reader: a corrupt layer
//! fails with [`ImageError::Corrupt`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read};

use oci_spec::image::Descriptor;
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::ImageError;
use crate::image::descriptor_digest;
use crate::layer::{EntryKind, Layer};
use crate::store::{CorruptBlob, Store};

/// What a path is in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    /// A regular file; digests only when hashing was asked for.
    File {
        size: u64,
        sha256: Option<Digest>,
        sha1: Option<String>,
    },
    Symlink(String),
    /// A hard link to another path of the tree.
    HardLink(String),
    /// Devices, FIFOs.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// An image's files by relative path (`usr/lib/x`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootFs {
    pub nodes: BTreeMap<String, Node>,
}

impl RootFs {
    /// Reads `layers` (base first) from `store`; with `hash`, every regular
    /// file's SHA-256 and SHA-1 are computed.
    pub fn read(store: &Store, layers: &[Descriptor], hash: bool) -> Result<RootFs, ImageError> {
        let mut fs = RootFs::default();
        for layer in layers {
            let digest = descriptor_digest(layer)?;
            let blob = store.open_blob(&digest)?;
            let path = store.blob_path(&digest);
            let map = |e: io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<CorruptBlob>())
            {
                Some(c) => ImageError::Corrupt {
                    digest: c.expected.clone(),
                    path: c.path.clone(),
                },
                None => ImageError::Io {
                    op: "read layer",
                    path: path.clone(),
                    source: e,
                },
            };
            let mut reader = BufReader::with_capacity(1 << 20, blob);
            let head = reader.fill_buf().map_err(map)?;
            if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                return Err(ImageError::Invalid(format!(
                    "layer {digest} is zstd-compressed, which kiln cannot read yet\n  hint: convert the image with `skopeo copy --dest-compress-format gzip`"
                )));
            }
            if head.starts_with(&[0x1f, 0x8b]) {
                let mut gz = flate2::bufread::GzDecoder::new(reader);
                fs.apply(&mut gz, hash).map_err(map)?;
                // Read to the end so the verified reader checks the digest.
                io::copy(&mut gz.into_inner(), &mut io::sink()).map_err(map)?;
            } else {
                fs.apply(&mut reader, hash).map_err(map)?;
                io::copy(&mut reader, &mut io::sink()).map_err(map)?;
            }
        }
        Ok(fs)
    }

    /// Applies one uncompressed layer.
    pub fn apply(&mut self, tar: impl Read, hash: bool) -> io::Result<()> {
        let mut archive = tar::Archive::new(tar);
        let mut this_layer: BTreeSet<String> = BTreeSet::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(path) = clean(&raw) else { continue };
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (d.to_owned(), n.to_owned()),
                None => (String::new(), path.clone()),
            };
            if name == ".wh..wh..opq" {
                let prefix = format!("{dir}/");
                self.nodes.retain(|p, _| {
                    !(dir.is_empty() || p.starts_with(&prefix)) || this_layer.contains(p)
                });
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let gone = if dir.is_empty() {
                    hidden.to_owned()
                } else {
                    format!("{dir}/{hidden}")
                };
                self.remove_tree(&gone);
                continue;
            }
            let h = entry.header();
            let (mode, uid, gid) = (
                h.mode().unwrap_or(0) & 0o7777,
                h.uid().unwrap_or(0),
                h.gid().unwrap_or(0),
            );
            let link = || {
                entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            let kind = match h.entry_type() {
                tar::EntryType::Directory => NodeKind::Dir,
                tar::EntryType::Symlink => NodeKind::Symlink(link()),
                tar::EntryType::Link => NodeKind::HardLink(clean(&link()).unwrap_or_default()),
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.size();
                    let (sha256, sha1) = if hash {
                        let (a, b) = hash_reader(&mut entry)?;
                        (Some(a), Some(b))
                    } else {
                        (None, None)
                    };
                    NodeKind::File { size, sha256, sha1 }
                }
                _ => NodeKind::Other,
            };
            // A non-directory replaces whatever was there, including a tree.
            if kind != NodeKind::Dir {
                self.remove_tree(&path);
            }
            this_layer.insert(path.clone());
            self.nodes.insert(
                path,
                Node {
                    kind,
                    mode,
                    uid,
                    gid,
                },
            );
        }
        Ok(())
    }

    /// Applies a layer kiln is writing, with the file digests
    /// [`Layer::write`] returned, without reading it back.
    pub fn add_layer(&mut self, layer: &Layer, sums: &BTreeMap<String, (Digest, String)>) {
        for (path, entry) in layer.with_parents() {
            let kind = match &entry.kind {
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::File { size, .. } => NodeKind::File {
                    size: *size,
                    sha256: sums.get(&path).map(|s| s.0.clone()),
                    sha1: sums.get(&path).map(|s| s.1.clone()),
                },
                EntryKind::Symlink(t) => NodeKind::Symlink(t.clone()),
                EntryKind::HardLink(t) => NodeKind::HardLink(t.clone()),
            };
            if kind != NodeKind::Dir {
                self.remove_tree(&path);
            }
            let node = Node {
                kind,
                mode: entry.mode,
                uid: entry.uid,
                gid: entry.gid,
            };
            self.nodes.insert(path, node);
        }
    }

    fn remove_tree(&mut self, path: &str) {
        self.nodes.remove(path);
        // Everything under `path/` sorts in [`path/`, `path0`): '0' follows '/'.
        let below: Vec<String> = self
            .nodes
            .range(format!("{path}/")..format!("{path}0"))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.nodes.remove(&k);
        }
    }

    /// `path` with every parent component that is a symlink in this tree
    /// resolved (the last component is kept as is), so a layer written on
    /// top never replaces a base's `lib → usr/lib` with a directory.
    pub fn resolve_parents(&self, path: &str) -> String {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((last, parents)) = parts.split_last() else {
            return String::new();
        };
        let mut cur = String::new();
        for part in parents {
            cur = join(&cur, part);
            let mut hops = 0;
            while let Some(Node {
                kind: NodeKind::Symlink(target),
                ..
            }) = self.nodes.get(&cur)
            {
                hops += 1;
                if hops > 40 {
                    break;
                }
                let parent = cur.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                let joined = if target.starts_with('/') {
                    target.clone()
                } else {
                    join(parent, target)
                };
                cur = normalize_lexically(&joined);
            }
        }
        join(&cur, last)
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a}/{b}")
    }
}

fn normalize_lexically(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    out.join("/")
}

/// A tar path as a tree key: no `./`, no leading or trailing `/`; `None`
/// for the root or a path that climbs out with `..`.
fn clean(raw: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => out.push(p),
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

/// SHA-256 and SHA-1 (hex) of everything `reader` yields.
pub fn hash_reader(reader: &mut impl Read) -> io::Result<(Digest, String)> {
    let mut sha256 = Sha256::new();
    let mut sha1 = Sha1::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha256.update(&buf[..n]);
        sha1.update(&buf[..n]);
    }
    Ok((
        Digest::from_sha256(&sha256.finalize()),
        hex::encode(sha1.finalize()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, data).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_symlinked_parents() {
        use tar::EntryType::*;
        let mut fs = RootFs::default();
        let base = tar(&[
            ("usr/", Directory, ""),
            ("usr/lib/", Directory, ""),
            ("usr/lib/a", Regular, "a"),
            ("lib", Symlink, "usr/lib"),
            ("lib64", Symlink, "/usr/lib64"),
            ("etc/", Directory, ""),
            ("etc/x", Regular, "x"),
            ("etc/y", Regular, "y"),
            ("opt/", Directory, ""),
            ("opt/z", Regular, "z"),
        ]);
        fs.apply(&base[..], true).unwrap();
        let top = tar(&[
            (".wh.etc", Regular, ""),
            ("opt/.wh..wh..opq", Regular, ""),
            ("opt/new", Regular, "n"),
        ]);
        fs.apply(&top[..], false).unwrap();
        let paths: Vec<_> = fs.nodes.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "lib",
                "lib64",
                "opt",
                "opt/new",
                "usr",
                "usr/lib",
                "usr/lib/a"
            ]
        );
        match &fs.nodes["usr/lib/a"].kind {
            NodeKind::File { sha256, sha1, .. } => {
                assert_eq!(sha256.as_ref().unwrap(), &Digest::of(b"a"));
                assert_eq!(
                    sha1.as_deref(),
                    Some("86f7e437faa5a7fce15d1ddcb9eaeaea377667b8")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fs.resolve_parents("/lib/x86_64-linux-gnu/libc.so.6"),
            "usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(fs.resolve_parents("lib64/ld.so"), "usr/lib64/ld.so");
        assert_eq!(fs.resolve_parents("lib"), "lib");
        assert_eq!(fs.resolve_parents("app/x"), "app/x");
    }
}
