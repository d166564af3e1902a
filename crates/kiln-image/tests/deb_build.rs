//! Images with Debian packages, built from local fixture packages (made
//! with dpkg-deb) through [`LocalDebs`]: the files, dpkg's database, users
//! and dirs, conflicts, reproducibility, the warm cache, tampering.

mod deb_common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use deb_common::{Item, Listing, have_dpkg_deb, listing, make_deb};
use kiln_image::build::{BuildOutcome, Builder};
use kiln_image::debian::deb::{DebSource, LocalDebs, PinnedDeb};
use kiln_image::progress::Quiet;
use kiln_image::{Digest, ImageError, Store};
use kiln_spec::Spec;

fn spec(text: &str) -> Spec {
    kiln_spec::parse(text, "kiln.toml").unwrap_or_else(|d| panic!("{d:?}"))
}

/// A [`LocalDebs`] that counts fetches, or skips its verification.
struct Counting {
    inner: LocalDebs,
    fetched: Rc<Cell<usize>>,
    trust_blindly: bool,
}

impl DebSource for Counting {
    fn packages(
        &mut self,
        image: &str,
        requested: &[String],
    ) -> Result<Vec<PinnedDeb>, ImageError> {
        self.inner.packages(image, requested)
    }

    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError> {
        self.fetched.set(self.fetched.get() + 1);
        if self.trust_blindly {
            return Ok(self.inner.debs[&pkg.name].1.clone());
        }
        self.inner.fetch(pkg)
    }
}

fn build_with(
    store: &Store,
    source: Counting,
    text: &str,
    dir: &Path,
) -> Result<BTreeMap<String, BuildOutcome>, ImageError> {
    let mut quiet = Quiet;
    let mut builder = Builder::new(store, &mut quiet);
    builder.debian = Some(Box::new(source));
    let out = builder.build_all(&spec(text), dir, 0);
    builder.finish()?;
    out
}

/// [`build_with`] a [`counting`] source of `debs`.
fn build(
    store: &Store,
    debs: &LocalDebs,
    text: &str,
    dir: &Path,
) -> Result<BTreeMap<String, BuildOutcome>, ImageError> {
    build_with(store, counting(debs).0, text, dir)
}

fn counting(debs: &LocalDebs) -> (Counting, Rc<Cell<usize>>) {
    let fetched = Rc::new(Cell::new(0));
    (
        Counting {
            inner: debs.clone(),
            fetched: fetched.clone(),
            trust_blindly: false,
        },
        fetched,
    )
}

/// Two fixture packages: `tool` (files, setuid, hard link, symlink) and
/// `libfoo` (shares a directory and one identical file with it).
fn fixtures(out: &Path) -> LocalDebs {
    make_deb(
        out,
        "tool",
        "1.2-3",
        &[
            Item::File("usr/bin/tool", b"#!/bin/sh\necho tool\n".to_vec(), 0o755),
            Item::File("usr/bin/su-ish", b"setuid\n".to_vec(), 0o4755),
            Item::HardLink("usr/bin/tool-again", "usr/bin/tool"),
            Item::Symlink("usr/bin/t", "tool"),
            Item::File("usr/share/doc/common", b"same\n".to_vec(), 0o644),
            Item::Dir("var/lib/tool", 0o700),
        ],
        "xz",
    );
    make_deb(
        out,
        "libfoo",
        "2.0",
        &[
            Item::File("usr/lib/libfoo.so.2", vec![0x7f; 5000], 0o644),
            Item::Symlink("usr/lib/libfoo.so", "libfoo.so.2"),
            Item::File("usr/share/doc/common", b"same\n".to_vec(), 0o644),
        ],
        "gzip",
    );
    LocalDebs::open(out).unwrap()
}

const SPEC: &str = r#"
[project]
name = "x"

[image.app]
debian = ["tool", "libfoo"]
copy = [{ src = "app.conf", dst = "/etc/app.conf" }, { src = "override", dst = "/usr/bin/t" }]
users = [{ name = "app", uid = 1000, home = "/var/lib/tool", shell = "/bin/sh" }]
dirs = [{ path = "/var/lib/tool", mode = 0o750, owner = "app" }, { path = "/srv/data/x", owner = "1000:1001" }]
"#;

fn project(dir: &Path) {
    fs::write(dir.join("app.conf"), "conf\n").unwrap();
    fs::write(dir.join("override"), "copied over the package's symlink\n").unwrap();
}

/// The [`fixtures`] in `<tmp>/debs` and a [`project`] in `<tmp>/project`:
/// (tmp, debs, project dir); `None`, skipped, without dpkg-deb.
fn setup() -> Option<(tempfile::TempDir, LocalDebs, PathBuf)> {
    if !have_dpkg_deb() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let debs = fixtures(&tmp.path().join("debs"));
    let dir = tmp.path().join("project");
    fs::create_dir_all(&dir).unwrap();
    project(&dir);
    Some((tmp, debs, dir))
}

fn file<'a>(l: &'a Listing, path: &str) -> &'a (char, u32, u64, u64, Vec<u8>) {
    l.get(path)
        .unwrap_or_else(|| panic!("no {path} in {:?}", l.keys().collect::<Vec<_>>()))
}

#[test]
fn an_image_has_its_packages_files_dpkg_database_users_and_dirs() {
    let Some((tmp, debs, dir)) = setup() else {
        return;
    };
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let out = build(&store, &debs, SPEC, &dir).unwrap();
    let image = store.load_image(&out["app"].digest).unwrap();
    let l = listing(&store, &image);

    assert_eq!(file(&l, "usr/bin/tool").4, b"#!/bin/sh\necho tool\n");
    assert_eq!(file(&l, "usr/bin/su-ish").1, 0o4755, "setuid as packaged");
    // The hard link of the package is one in the image too.
    let (a, b) = (file(&l, "usr/bin/tool"), file(&l, "usr/bin/tool-again"));
    assert_eq!((a.0, b.0), ('-', 'h'), "{a:?} {b:?}");
    assert_eq!(b.4, b"usr/bin/tool");
    assert_eq!(file(&l, "usr/lib/libfoo.so").4, b"libfoo.so.2");
    assert_eq!(file(&l, "usr/share/doc/common").4, b"same\n");
    // Copies go on top of the packages.
    assert_eq!(
        file(&l, "usr/bin/t").4,
        b"copied over the package's symlink\n"
    );
    assert_eq!(file(&l, "etc/app.conf").4, b"conf\n");

    let status = String::from_utf8(file(&l, "var/lib/dpkg/status").4.clone()).unwrap();
    let libfoo = status.find("Package: libfoo").unwrap();
    let tool = status.find("Package: tool").unwrap();
    assert!(libfoo < tool, "stanzas in lock order:\n{status}");
    assert!(
        status.contains("Package: tool\nStatus: install ok installed\nVersion: 1.2-3\n"),
        "{status}"
    );
    assert!(
        status.contains("\n\nPackage: tool"),
        "stanzas are separated"
    );
    let list = String::from_utf8(file(&l, "var/lib/dpkg/info/tool.list").4.clone()).unwrap();
    assert!(
        list.starts_with("/.\n") && list.contains("\n/usr/bin/tool\n"),
        "{list}"
    );
    assert!(l.contains_key("var/lib/dpkg/info/libfoo.md5sums"));

    assert_eq!(
        file(&l, "etc/passwd").4,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/var/lib/tool:/bin/sh\n"
    );
    assert_eq!(file(&l, "etc/group").4, b"root:x:0:\napp:x:1000:\n");
    assert!(!l.contains_key("etc/shadow"));
    let var_lib_tool = file(&l, "var/lib/tool");
    assert_eq!(
        (
            var_lib_tool.0,
            var_lib_tool.1,
            var_lib_tool.2,
            var_lib_tool.3
        ),
        ('d', 0o750, 1000, 1000),
        "dirs override the package's mode and owner"
    );
    let srv = file(&l, "srv/data/x");
    assert_eq!((srv.1, srv.2, srv.3), (0o755, 1000, 1001));
    assert_eq!(file(&l, "srv/data").2, 0, "missing parents are root's");

    // The SBOM names the packages and what they contain.
    let doc = kiln_image::sbom::read_sbom(&store, &image.digest)
        .unwrap()
        .expect("the build wrote an SBOM");
    let packages = doc["packages"].as_array().unwrap();
    let tool_pkg = packages
        .iter()
        .find(|p| p["name"] == "tool")
        .unwrap_or_else(|| panic!("no package `tool` in {packages:?}"));
    assert_eq!(tool_pkg["versionInfo"], "1.2-3");
    let tool_id = tool_pkg["SPDXID"].as_str().unwrap();
    let contained: Vec<&str> = doc["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["spdxElementId"] == tool_id)
        .map(|r| r["relatedSpdxElement"].as_str().unwrap())
        .collect();
    let names: Vec<&str> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| contained.contains(&f["SPDXID"].as_str().unwrap()))
        .map(|f| f["fileName"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"./usr/bin/tool"), "{names:?}");
    assert!(
        !names.contains(&"./usr/bin/t"),
        "the copy over the package's link is not the package's: {names:?}"
    );

    let config = image.config.history().clone().unwrap();
    assert_eq!(
        config.last().unwrap().created_by().as_deref(),
        Some("kiln build: debian, copy")
    );
}

#[test]
fn same_packages_same_digest_and_a_warm_rebuild_fetches_nothing() {
    let Some((tmp, debs, dir)) = setup() else {
        return;
    };

    let store_a = Store::open(&tmp.path().join("a")).unwrap();
    let (source, fetched) = counting(&debs);
    let first = build_with(&store_a, source, SPEC, &dir).unwrap();
    assert_eq!(fetched.get(), 2, "each package fetched once");
    assert!(!first["app"].cached);

    // A second, fresh store: unpacked again, same bytes.
    let store_b = Store::open(&tmp.path().join("b")).unwrap();
    let second = build(&store_b, &debs, SPEC, &dir).unwrap();
    assert_eq!(first["app"].digest, second["app"].digest);
    assert_eq!(first["app"].recipe, second["app"].recipe);

    // Warm: the recipe comes from the unpacked directories; no .deb is
    // fetched or read.
    let (source, fetched) = counting(&debs);
    let again = build_with(&store_a, source, SPEC, &dir).unwrap();
    assert!(again["app"].cached);
    assert_eq!(again["app"].digest, first["app"].digest);
    assert_eq!(fetched.get(), 0);

    // Another version of a package is another image.
    let newer = tmp.path().join("debs2");
    fs::create_dir_all(&newer).unwrap();
    fs::copy(
        tmp.path().join("debs/libfoo_2.0_amd64.deb"),
        newer.join("libfoo_2.0_amd64.deb"),
    )
    .unwrap();
    make_deb(
        &newer,
        "tool",
        "1.2-4",
        &[Item::File("usr/bin/tool", b"v2\n".to_vec(), 0o755)],
        "zstd",
    );
    let changed = build(&store_a, &LocalDebs::open(&newer).unwrap(), SPEC, &dir).unwrap();
    assert_ne!(changed["app"].digest, first["app"].digest);
    assert_ne!(changed["app"].recipe, first["app"].recipe);
}

#[test]
fn a_tampered_deb_is_refused_by_the_source_and_again_by_the_unpacker() {
    let Some((tmp, debs, dir)) = setup() else {
        return;
    };
    // The pins are taken before the file is changed (as the lock was).
    let deb = tmp.path().join("debs/tool_1.2-3_amd64.deb");
    let mut bytes = fs::read(&deb).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x55;
    fs::write(&deb, &bytes).unwrap();

    let store = Store::open(&tmp.path().join("s")).unwrap();
    let err = build(&store, &debs, SPEC, &dir).unwrap_err();
    assert!(matches!(err, ImageError::DebMismatch { .. }), "{err}");
    assert!(err.to_string().contains("tool_1.2-3_amd64.deb"), "{err}");

    // A source that forgot to verify: the unpacker hashes what it reads.
    let (mut source, _) = counting(&debs);
    source.trust_blindly = true;
    let err = build_with(&store, source, SPEC, &dir).unwrap_err();
    assert!(matches!(err, ImageError::DebMismatch { .. }), "{err}");
    assert!(store.resolve("app").is_err(), "nothing was tagged");
}

#[test]
fn a_changed_unpacked_file_is_refused_and_named() {
    let Some((tmp, debs, dir)) = setup() else {
        return;
    };
    let store = Store::open(&tmp.path().join("s")).unwrap();
    build(&store, &debs, SPEC, &dir).unwrap();
    // Change a file of the unpacked cache and force a rebuild (SOURCE_DATE_EPOCH).
    let sha = &debs.debs["libfoo"].0.sha256;
    let blob_dir = store
        .kiln_dir()
        .join("debian/unpacked")
        .join(sha.hex())
        .join("files");
    for f in fs::read_dir(&blob_dir).unwrap() {
        let f = f.unwrap().path();
        if fs::metadata(&f).unwrap().len() == 5000 {
            fs::write(&f, vec![0x00; 5000]).unwrap();
        }
    }
    let (source, _) = counting(&debs);
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store, &mut quiet);
    builder.debian = Some(Box::new(source));
    let err = builder.build_all(&spec(SPEC), &dir, 7).unwrap_err();
    assert!(matches!(err, ImageError::UnpackedChanged { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("package `libfoo`") && msg.contains(sha.hex()),
        "{msg}"
    );
}

#[test]
fn packages_that_disagree_on_a_path_are_refused_naming_both() {
    if !have_dpkg_deb() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("debs");
    make_deb(
        &out,
        "aaa",
        "1",
        &[Item::File("etc/thing", b"a\n".to_vec(), 0o644)],
        "xz",
    );
    make_deb(
        &out,
        "bbb",
        "1",
        &[Item::File("etc/thing", b"b\n".to_vec(), 0o644)],
        "xz",
    );
    let debs = LocalDebs::open(&out).unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let text = "[project]\nname = \"x\"\n[image.c]\ndebian = [\"bbb\", \"aaa\"]\n";
    let err = build(&store, &debs, text, tmp.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::PackageConflict { .. }), "{msg}");
    assert!(
        msg.contains("/etc/thing") && msg.contains("`aaa`") && msg.contains("`bbb`"),
        "{msg}"
    );
}

#[test]
fn users_and_dirs_work_without_packages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let text = r#"
[project]
name = "x"
[image.u]
users = [{ name = "svc", uid = 500 }]
dirs = [{ path = "/data", mode = 0o700, owner = "svc" }]
"#;
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store, &mut quiet);
    let out = builder.build_all(&spec(text), tmp.path(), 0).unwrap();
    builder.finish().unwrap();
    let image = store.load_image(&out["u"].digest).unwrap();
    let l = listing(&store, &image);
    assert_eq!(
        file(&l, "etc/passwd").4,
        b"root:x:0:0:root:/root:/bin/sh\nsvc:x:500:500::/nonexistent:/usr/sbin/nologin\n"
    );
    let data = file(&l, "data");
    assert_eq!((data.0, data.1, data.2, data.3), ('d', 0o700, 500, 500));
    assert!(
        !l.contains_key("var/lib/dpkg/status"),
        "no packages, no database"
    );
    // The recipe has them: changing a dir's mode is another image.
    let changed = text.replace("0o700", "0o750");
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store, &mut quiet);
    let again = builder.build_all(&spec(&changed), tmp.path(), 0).unwrap();
    assert_ne!(again["u"].digest, out["u"].digest);
    let _ = Digest::of(b"");
}

#[test]
fn on_a_base_image_the_bases_dpkg_status_stays() {
    let Some((tmp, debs, _)) = setup() else {
        return;
    };
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let text = r#"
[project]
name = "x"
[image.base]
debian = ["tool"]
[image.top]
from = "base"
debian = ["libfoo"]
"#;
    let out = build(&store, &debs, text, tmp.path()).unwrap();
    let image = store.load_image(&out["top"].digest).unwrap();
    assert_eq!(image.layers().len(), 2);
    let l = listing(&store, &image);
    let status = String::from_utf8(file(&l, "var/lib/dpkg/status").4.clone()).unwrap();
    assert!(
        status.contains("Package: tool\n") && !status.contains("libfoo"),
        "the base's status stays:\n{status}"
    );
    let own = String::from_utf8(file(&l, "var/lib/dpkg/status.d/libfoo").4.clone()).unwrap();
    assert!(
        own.starts_with("Package: libfoo\nStatus: install ok installed\n"),
        "{own}"
    );
    assert!(l.contains_key("usr/bin/tool") && l.contains_key("usr/lib/libfoo.so.2"));
}
