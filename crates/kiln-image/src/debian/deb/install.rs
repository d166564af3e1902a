//! Unpacked packages into an image's layer, with dpkg's database of them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{DebControl, DebEntry, DebEntryKind, Unpacked, unpacked_root};
use crate::error::ImageError;
use crate::layer::{EntryKind, FileSource, Layer, LayerEntry};
use crate::sbom::DebPackage;

/// Adds the files of `packages` (in lock order) to `layer`, then dpkg's
/// database of them (`/var/lib/dpkg/status`, `info/<pkg>.list` and
/// `info/<pkg>.md5sums`) so that the SBOM and scanners see them. On a base
/// image (`on_base`), whose own `status` must stay, each package's stanza
/// goes to `/var/lib/dpkg/status.d/<pkg>` instead, which scanners read too
/// (distroless images do the same).
///
/// A path in two packages must be the same in both (directories always
/// are; files by content, links by target), or the build fails naming both
/// packages, as dpkg would. A directory keeps the first package's mode and
/// owner; a file or link the last one's. Hard links are stored as files
/// here, and linked again by [`link_shared_blobs`] once the layer is final.
pub fn add_packages(
    layer: &mut Layer,
    image: &str,
    packages: &[Unpacked],
    on_base: bool,
) -> Result<(), ImageError> {
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for (i, pkg) in packages.iter().enumerate() {
        let files: BTreeMap<&str, &DebEntry> = pkg
            .manifest
            .entries
            .iter()
            .filter(|e| matches!(e.kind, DebEntryKind::File { .. }))
            .map(|e| (e.path.as_str(), e))
            .collect();
        for e in &pkg.manifest.entries {
            let kind = match &e.kind {
                DebEntryKind::Dir => EntryKind::Dir,
                DebEntryKind::File { size, sha256, blob } => EntryKind::File {
                    source: FileSource::Host(pkg.blob_path(*blob)),
                    size: *size,
                    digest: Some(sha256.clone()),
                },
                DebEntryKind::Symlink { target } => EntryKind::Symlink(target.clone()),
                DebEntryKind::HardLink { target } => match files.get(target.as_str()) {
                    Some(DebEntry {
                        kind: DebEntryKind::File { size, sha256, blob },
                        ..
                    }) => EntryKind::File {
                        source: FileSource::Host(pkg.blob_path(*blob)),
                        size: *size,
                        digest: Some(sha256.clone()),
                    },
                    _ => {
                        return Err(ImageError::Invalid(format!(
                            "package `{}`: hard link /{} has no target in {}\n  hint: delete that directory so that the package is unpacked again",
                            pkg.manifest.control.package,
                            e.path,
                            pkg.dir.display()
                        )));
                    }
                },
            };
            let entry = LayerEntry {
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
            };
            if let Some(old) = layer.get(&e.path) {
                let why = match (&old.kind, &entry.kind) {
                    (EntryKind::Dir, EntryKind::Dir) => continue,
                    (EntryKind::File { digest: a, .. }, EntryKind::File { digest: b, .. })
                        if a == b =>
                    {
                        None
                    }
                    (EntryKind::Symlink(a), EntryKind::Symlink(b)) if a == b => None,
                    (EntryKind::File { .. }, EntryKind::File { .. }) => {
                        Some("different contents".to_owned())
                    }
                    (EntryKind::Symlink(a), EntryKind::Symlink(b)) => {
                        Some(format!("links to `{a}` and to `{b}`"))
                    }
                    (a, b) => Some(format!("a {} and a {}", kind_name(a), kind_name(b))),
                };
                if let Some(why) = why {
                    let first = owners
                        .get(&e.path)
                        .map(|&o| packages[o].manifest.control.package.clone())
                        .unwrap_or_default();
                    return Err(ImageError::PackageConflict {
                        image: image.to_owned(),
                        path: e.path.clone(),
                        packages: Box::new((first, pkg.manifest.control.package.clone())),
                        why,
                    });
                }
            }
            owners.insert(e.path.clone(), i);
            layer.insert(&e.path, entry).map_err(ImageError::Invalid)?;
        }
    }
    if !packages.is_empty() {
        add_dpkg_database(layer, packages, on_base)?;
    }
    layer.check().map_err(|why| {
        ImageError::Invalid(format!(
            "image `{image}`: the packages do not fit together: {why}\n  hint: drop one of them from `debian`"
        ))
    })
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::Dir => "directory",
        EntryKind::File { .. } => "file",
        EntryKind::Symlink(_) => "symbolic link",
        EntryKind::HardLink(_) => "hard link",
    }
}

/// dpkg's `status` stanza of a package: its control stanza with the
/// `Status` line dpkg adds after `Package`.
pub fn status_stanza(control: &DebControl) -> String {
    let mut out = String::new();
    let mut added = false;
    for line in control.stanza.lines() {
        out.push_str(line);
        out.push('\n');
        if !added && line.starts_with("Package:") {
            out.push_str("Status: install ok installed\n");
            added = true;
        }
    }
    out
}

fn add_dpkg_database(
    layer: &mut Layer,
    packages: &[Unpacked],
    on_base: bool,
) -> Result<(), ImageError> {
    let mut status = String::new();
    for pkg in packages {
        let control = &pkg.manifest.control;
        if on_base {
            layer
                .insert(
                    &format!("/var/lib/dpkg/status.d/{}", control.info_name()),
                    LayerEntry::bytes(status_stanza(control), 0o644),
                )
                .map_err(ImageError::Invalid)?;
        }
        if !status.is_empty() {
            status.push('\n');
        }
        status.push_str(&status_stanza(control));
        let mut list = String::from("/.\n");
        for e in &pkg.manifest.entries {
            list.push('/');
            list.push_str(&e.path);
            list.push('\n');
        }
        let info = format!("/var/lib/dpkg/info/{}", control.info_name());
        layer
            .insert(&format!("{info}.list"), LayerEntry::bytes(list, 0o644))
            .map_err(ImageError::Invalid)?;
        if let Some(md5sums) = &pkg.manifest.md5sums {
            layer
                .insert(
                    &format!("{info}.md5sums"),
                    LayerEntry::bytes(md5sums.clone(), 0o644),
                )
                .map_err(ImageError::Invalid)?;
        }
    }
    if on_base {
        return Ok(());
    }
    layer
        .insert("/var/lib/dpkg/status", LayerEntry::bytes(status, 0o644))
        .map_err(ImageError::Invalid)
}

/// Turns the files of the layer that share one unpacked blob (the hard
/// links of a package) back into hard links: the first path in layer order
/// stays a file, the others link to it. Files from elsewhere (copies) are
/// never linked, whatever their source.
pub fn link_shared_blobs(layer: &mut Layer, kiln_dir: &Path) {
    let root = unpacked_root(kiln_dir);
    // Hashed, and a byte prefix instead of `Path::starts_with`: a package
    // image has tens of thousands of files, and comparing paths component
    // by component was most of a no-op rebuild's time.
    let mut first: HashMap<&Path, &String> = HashMap::new();
    let mut links = Vec::new();
    for (path, e) in layer.entries() {
        if let EntryKind::File {
            source: FileSource::Host(host),
            ..
        } = &e.kind
            && in_dir(host, &root)
        {
            match first.get(host.as_path()) {
                Some(target) => links.push((path.clone(), (*target).clone(), e.clone())),
                None => {
                    first.insert(host, path);
                }
            }
        }
    }
    for (path, target, e) in links {
        let entry = LayerEntry {
            kind: EntryKind::HardLink(target),
            ..e
        };
        layer.insert(&path, entry).expect("paths are normalised");
    }
}

/// The package of every file of `layer` (image path `/…` → package) that
/// still comes from one of `packages` (a copy over it is not the
/// package's), for the SBOM.
pub fn packaged_files(
    layer: &Layer,
    packages: &[Unpacked],
    kiln_dir: &Path,
) -> BTreeMap<String, DebPackage> {
    let root = unpacked_root(kiln_dir);
    let by_dir: HashMap<&Path, DebPackage> = packages
        .iter()
        .map(|u| {
            let c = &u.manifest.control;
            (
                u.dir.as_path(),
                DebPackage {
                    name: c.package.clone(),
                    version: Some(c.version.clone()),
                    arch: Some(c.architecture.clone()),
                },
            )
        })
        .collect();
    let mut out = BTreeMap::new();
    for (path, e) in layer.entries() {
        let entry = match &e.kind {
            EntryKind::HardLink(target) => layer.entries().get(target).unwrap_or(e),
            _ => e,
        };
        if let EntryKind::File {
            source: FileSource::Host(host),
            ..
        } = &entry.kind
            && in_dir(host, &root)
            && let Some(pkg) = host
                .parent()
                .and_then(Path::parent)
                .and_then(|dir| by_dir.get(dir))
        {
            out.insert(format!("/{path}"), pkg.clone());
        }
    }
    out
}

/// Whether `path` is under `dir` (both as kiln wrote them: no `.`, no `//`).
fn in_dir(path: &Path, dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (p, d) = (path.as_os_str().as_bytes(), dir.as_os_str().as_bytes());
    p.len() > d.len() && p.starts_with(d) && p[d.len()] == b'/'
}
