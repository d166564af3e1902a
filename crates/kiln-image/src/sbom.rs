//! SBOMs: an SPDX 2.3 JSON document listing every file of an image.
//!
//! Every regular file the image's layers add up to (whiteouts applied) is
//! listed with its path and its SHA-1 (which SPDX 2.3 requires) and SHA-256.
//! A file that came from the shared-library closure also names the host
//! file it was copied from and, where dpkg knows it, the Debian package that
//! owns that file (found in `/var/lib/dpkg/info/*.list`, looking the path up
//! under both its `/usr` and its usr-merge alias, since Debian 12's lists
//! still say `/lib/x86_64-linux-gnu/libc.so.6` for what lives in
//! `/usr/lib/x86_64-linux-gnu`); each such package is an SPDX package with a
//! `pkg:deb` purl, which CONTAINS its files. So is each package of the
//! image's own `debian` list, which CONTAINS the files it put there (those
//! a copy replaced are not its).
//!
//! The document is deterministic: its only time is the image's `created`
//! (derived from `SOURCE_DATE_EPOCH`), its namespace is derived from the
//! manifest digest, and every list is sorted.
//!
//! **Where it is kept.** `kiln_dir()/sbom/<manifest hex>.spdx.json`, written
//! by the builder. Not a blob referenced from the manifest: the namespace
//! names the manifest digest, so the manifest cannot name the SBOM. It can
//! be regenerated from the image alone, except for the closure's package
//! owners, which are the reason it is written at build time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::digest::Digest;
use crate::elf::Closure;
use crate::error::ImageError;
use crate::image::Image;
use crate::rootfs::{NodeKind, RootFs};
use crate::store::Store;

/// A Debian package, as dpkg knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DebPackage {
    pub name: String,
    pub version: Option<String>,
    pub arch: Option<String>,
}

/// Where a closure file came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The host file (canonical path) whose content was copied.
    pub host_path: PathBuf,
    pub package: Option<DebPackage>,
}

/// Image path (absolute) → where it came from, for the closure's files.
pub type ClosureOwners = BTreeMap<String, Owner>;

/// The owners of a closure's files, from the dpkg database at `dpkg_dir`
/// (`/var/lib/dpkg`). Files dpkg does not know have no package.
pub fn closure_owners(closure: &Closure, dpkg_dir: &Path) -> ClosureOwners {
    if closure.files.is_empty() {
        return ClosureOwners::new();
    }
    let packages = dpkg_owners(&closure.host_paths(), dpkg_dir);
    closure
        .files
        .iter()
        .map(|(image, host)| {
            (
                image.clone(),
                Owner {
                    host_path: host.clone(),
                    package: packages.get(host).cloned(),
                },
            )
        })
        .collect()
}

/// The same path under the usr-merge alias: `/usr/lib/x` ↔ `/lib/x`.
fn aliases(path: &Path) -> Vec<PathBuf> {
    let s = path.to_string_lossy();
    let mut out = vec![path.to_path_buf()];
    for (usr, root) in [
        ("/usr/lib/", "/lib/"),
        ("/usr/lib64/", "/lib64/"),
        ("/usr/bin/", "/bin/"),
        ("/usr/sbin/", "/sbin/"),
    ] {
        if let Some(rest) = s.strip_prefix(usr) {
            out.push(PathBuf::from(format!("{root}{rest}")));
        } else if let Some(rest) = s.strip_prefix(root) {
            out.push(PathBuf::from(format!("{usr}{rest}")));
        }
    }
    out
}

/// Which installed package owns each of `paths` (and its version).
pub fn dpkg_owners(paths: &BTreeSet<PathBuf>, dpkg_dir: &Path) -> BTreeMap<PathBuf, DebPackage> {
    let mut wanted: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for p in paths {
        for alias in aliases(p) {
            wanted.insert(alias, p.clone());
        }
    }
    let mut found: BTreeMap<PathBuf, (String, Option<String>)> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(dpkg_dir.join("info")) else {
        return BTreeMap::new();
    };
    let mut lists: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "list"))
        .collect();
    lists.sort();
    for list in lists {
        let Ok(text) = fs::read_to_string(&list) else {
            continue;
        };
        let stem = list
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let (name, arch) = match stem.split_once(':') {
            Some((n, a)) => (n.to_owned(), Some(a.to_owned())),
            None => (stem.to_owned(), None),
        };
        for line in text.lines() {
            if let Some(original) = wanted.get(Path::new(line)) {
                found
                    .entry(original.clone())
                    .or_insert_with(|| (name.clone(), arch.clone()));
            }
        }
    }
    let status = fs::read_to_string(dpkg_dir.join("status")).unwrap_or_default();
    let versions = parse_status(&status);
    found
        .into_iter()
        .map(|(path, (name, arch))| {
            let key_arch = arch.clone();
            let (version, status_arch) = versions
                .iter()
                .find(|((n, a), _)| {
                    *n == name && (key_arch.is_none() || key_arch.as_deref() == Some(a.as_str()))
                })
                .map(|((_, a), v)| (Some(v.clone()), Some(a.clone())))
                .unwrap_or((None, None));
            (
                path,
                DebPackage {
                    name,
                    version,
                    arch: arch.or(status_arch),
                },
            )
        })
        .collect()
}

/// (package, architecture) → version of every installed package in a dpkg
/// `status` file.
fn parse_status(text: &str) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_owned())
            })
        };
        if let (Some(p), Some(v)) = (field("Package"), field("Version"))
            && field("Status").is_none_or(|s| s.ends_with(" installed"))
        {
            out.insert((p, field("Architecture").unwrap_or_default()), v);
        }
    }
    out
}

/// Where the builder keeps the SBOM of image `digest`.
pub fn sbom_path(store: &Store, digest: &Digest) -> PathBuf {
    store
        .kiln_dir()
        .join("sbom")
        .join(format!("{}.spdx.json", digest.hex()))
}

/// Writes the SBOM of `digest` (atomically).
pub fn write_sbom(store: &Store, digest: &Digest, doc: &Value) -> Result<(), ImageError> {
    let path = sbom_path(store, digest);
    let dir = path.parent().expect("the sbom path has a parent");
    fs::create_dir_all(dir).map_err(|source| ImageError::Io {
        op: "create sbom directory",
        path: dir.to_path_buf(),
        source,
    })?;
    store.write_atomic(
        &path,
        &serde_json::to_vec_pretty(doc).expect("JSON serialises"),
    )
}

/// The stored SBOM of `digest`, if the builder wrote one.
pub fn read_sbom(store: &Store, digest: &Digest) -> Result<Option<Value>, ImageError> {
    let path = sbom_path(store, digest);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ImageError::Invalid(format!("{} is not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ImageError::Io {
            op: "read sbom",
            path,
            source,
        }),
    }
}

/// The SPDX 2.3 document of `image` (see the module docs).
pub fn sbom(
    store: &Store,
    image: &Image,
    closure_owners: &ClosureOwners,
) -> Result<Value, ImageError> {
    let tree = RootFs::read(store, image.layers(), true)?;
    Ok(sbom_from_tree(image, &tree, closure_owners))
}

/// The SPDX document of `image`, whose files (with digests) are `tree`.
pub fn sbom_from_tree(image: &Image, tree: &RootFs, closure_owners: &ClosureOwners) -> Value {
    let created = image
        .config
        .created()
        .clone()
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into());
    let image_id = "SPDXRef-Image";
    let mut files = Vec::new();
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    let mut packages: BTreeMap<DebPackage, (String, Vec<String>)> = BTreeMap::new();
    let mut n = 0;
    for (path, node) in &tree.nodes {
        let node = match &node.kind {
            NodeKind::HardLink(target) => tree.nodes.get(target).unwrap_or(node),
            _ => node,
        };
        let NodeKind::File {
            sha256: Some(sha256),
            sha1: Some(sha1),
            ..
        } = &node.kind
        else {
            continue;
        };
        n += 1;
        let id = format!("SPDXRef-File-{n}");
        let mut file = json!({
            "SPDXID": id,
            "fileName": format!("./{path}"),
            "checksums": [
                { "algorithm": "SHA1", "checksumValue": sha1 },
                { "algorithm": "SHA256", "checksumValue": sha256.hex() },
            ],
        });
        if let Some(owner) = closure_owners.get(&format!("/{path}")) {
            // Files of the image's own Debian packages have no host path.
            if !owner.host_path.as_os_str().is_empty() {
                file["comment"] = json!(format!(
                    "shared-library closure: copied from the build host's {}",
                    owner.host_path.display()
                ));
            }
            if let Some(pkg) = &owner.package {
                let spdx_id = package_id(pkg);
                packages
                    .entry(pkg.clone())
                    .or_insert_with(|| (spdx_id, Vec::new()))
                    .1
                    .push(id.clone());
            }
        }
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
        files.push(file);
    }
    let mut package_docs = vec![json!({
        "SPDXID": image_id,
        "name": image.digest.to_string(),
        "versionInfo": image.digest.to_string(),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "checksums": [{ "algorithm": "SHA256", "checksumValue": image.digest.hex() }],
    })];
    for (pkg, (id, contained)) in &packages {
        let mut doc = json!({
            "SPDXID": id,
            "name": pkg.name,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "supplier": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(pkg),
            }],
        });
        if let Some(v) = &pkg.version {
            doc["versionInfo"] = json!(v);
        }
        package_docs.push(doc);
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
        for file in contained {
            relationships.push(json!({
                "spdxElementId": id,
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": file,
            }));
        }
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("kiln image {}", image.digest),
        "documentNamespace": format!("https://kiln.invalid/spdx/sha256/{}", image.digest.hex()),
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
        },
        "documentDescribes": [image_id],
        "packages": package_docs,
        "files": files,
        "relationships": relationships,
    })
}

fn package_id(pkg: &DebPackage) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    match &pkg.arch {
        Some(a) => format!("SPDXRef-Package-deb-{}-{}", clean(&pkg.name), clean(a)),
        None => format!("SPDXRef-Package-deb-{}", clean(&pkg.name)),
    }
}

/// `pkg:deb/debian/NAME@VERSION?arch=ARCH`, percent-encoding the version.
fn purl(pkg: &DebPackage) -> String {
    let mut s = format!("pkg:deb/debian/{}", pkg.name);
    if let Some(v) = &pkg.version {
        s.push('@');
        for c in v.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' | '~' => s.push(c),
                c => s.push_str(&format!("%{:02X}", c as u32)),
            }
        }
    }
    if let Some(a) = &pkg.arch {
        s.push_str(&format!("?arch={a}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_is_owned_by_libc6_through_the_usr_merge_alias() {
        let libc = fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        assert!(libc.starts_with("/usr/lib"), "{libc:?}");
        let owners = dpkg_owners(&BTreeSet::from([libc.clone()]), Path::new("/var/lib/dpkg"));
        let pkg = &owners[&libc];
        assert_eq!(pkg.name, "libc6");
        assert_eq!(pkg.arch.as_deref(), Some("amd64"));
        assert!(
            pkg.version.as_deref().is_some_and(|v| v.starts_with("2.")),
            "{pkg:?}"
        );
        assert!(
            purl(pkg).starts_with("pkg:deb/debian/libc6@2."),
            "{}",
            purl(pkg)
        );
    }

    #[test]
    fn status_and_aliases() {
        let status = "Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:2.0+b1\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n";
        let v = parse_status(status);
        assert_eq!(v.len(), 1);
        assert_eq!(v[&("a".to_owned(), "amd64".to_owned())], "1:2.0+b1");
        let pkg = DebPackage {
            name: "a".into(),
            version: Some("1:2.0+b1".into()),
            arch: Some("amd64".into()),
        };
        assert_eq!(purl(&pkg), "pkg:deb/debian/a@1%3A2.0%2Bb1?arch=amd64");
        assert_eq!(
            aliases(Path::new("/usr/lib/x/y")),
            [PathBuf::from("/usr/lib/x/y"), PathBuf::from("/lib/x/y")]
        );
        assert_eq!(
            aliases(Path::new("/lib64/ld")),
            [PathBuf::from("/lib64/ld"), PathBuf::from("/usr/lib64/ld")]
        );
    }
}
