//! Debian packages against the real archive, with the machine's apt
//! configuration: resolve, fetch, verify, refuse what was tampered with.
//!
//! They need `apt-get`, `gpgv` and the network to the apt sources (CI has
//! them); without those they are skipped loudly, or fail when
//! `KILN_STRICT_TESTS=true`. The lists are downloaded once per test
//! process into a temporary private state (`apt-get update` as the caller,
//! no root, the host's apt state untouched).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use kiln_image::ImageError;
use kiln_image::debian::{self, Apt, ImageLock, Lock, LockedPackage};

struct Shared {
    _dir: tempfile::TempDir,
    root: PathBuf,
    apt: Mutex<Apt>,
}

/// The private state, updated once; `None` (after a loud skip) when the
/// machine cannot reach its apt sources.
fn shared() -> Option<&'static Shared> {
    static SHARED: OnceLock<Option<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if !common::require("apt-get", "Debian packages are resolved with apt")
                || !common::require("gpgv", "InRelease signatures are checked with gpgv")
            {
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("debian");
            let mut apt = Apt::open(&root).unwrap();
            if apt.sources().is_empty() {
                common::skip_or_fail("this machine has no apt `deb` sources");
                return None;
            }
            match apt.update() {
                Ok(()) => Some(Shared {
                    _dir: dir,
                    root,
                    apt: Mutex::new(apt),
                }),
                Err(e @ ImageError::DebianApt { .. }) => {
                    common::skip_or_fail(&format!("the apt sources are unreachable: {e}"));
                    None
                }
                Err(e) => panic!("apt update: {e}"),
            }
        })
        .as_ref()
}

fn names(pkgs: &[LockedPackage]) -> Vec<&str> {
    pkgs.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn postgresql_15_resolves_to_its_depends_closure_without_recommends() {
    let Some(s) = shared() else { return };
    let mut apt = s.apt.lock().unwrap();
    let pkgs = apt.resolve("db", &["postgresql-15".to_string()]).unwrap();
    let n = names(&pkgs);
    for want in [
        "postgresql-15",
        "libpq5",
        "libc6",
        "postgresql-common",
        "libssl3",
    ] {
        assert!(n.contains(&want), "{want} missing from {n:?}");
    }
    // Recommends of postgresql-15 (sysstat) and of postgresql-common are not followed.
    assert!(!n.contains(&"sysstat"), "{n:?}");
    let mut sorted = n.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(n, sorted, "sorted by name, each once");
    for p in &pkgs {
        assert!(p.arch == apt.arch() || p.arch == "all", "{p:?}");
        assert_eq!(p.sha256.len(), 64, "{p:?}");
        assert!(p.filename.starts_with("pool/") && p.size > 0, "{p:?}");
    }
    // Of bookworm and bookworm-security, the highest version wins.
    let pg = pkgs.iter().find(|p| p.name == "postgresql-15").unwrap();
    let highest = apt
        .load()
        .unwrap()
        .versions("postgresql-15")
        .next()
        .unwrap();
    assert_eq!(pg.version, highest.version);
    // Deterministic: the same lists give the same closure.
    assert_eq!(
        apt.resolve("db", &["postgresql-15".to_string()]).unwrap(),
        pkgs
    );
}

#[test]
fn an_unknown_package_names_the_image_and_hints_apt_cache_search() {
    let Some(s) = shared() else { return };
    let err = s
        .apt
        .lock()
        .unwrap()
        .resolve("web", &["kiln-no-such-package".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("image `web`"), "{err}");
    assert!(err.contains("`kiln-no-such-package`"), "{err}");
    assert!(
        err.contains("apt-cache search kiln-no-such-package"),
        "{err}"
    );
}

#[test]
fn a_fetched_deb_is_verified_and_a_tampered_cached_deb_is_refused() {
    let Some(s) = shared() else { return };
    let pkgs = s
        .apt
        .lock()
        .unwrap()
        .resolve("tz", &["tzdata".to_string()])
        .unwrap();
    let tz = pkgs.iter().find(|p| p.name == "tzdata").unwrap().clone();
    // A cache of its own, so that this test always downloads.
    let dir = tempfile::tempdir().unwrap();
    let apt = Apt::open(&dir.path().join("debian")).unwrap();
    let path = apt.fetch(&tz).unwrap();
    assert_eq!(path, apt.deb_path(&tz));
    assert_eq!(
        path.file_name().unwrap().to_str().unwrap(),
        format!("{}.deb", tz.sha256)
    );
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, tz.size);
    assert!(bytes.starts_with(b"!<arch>\n"), "a .deb is an ar archive");
    // Warm: the same verified file.
    assert_eq!(apt.fetch(&tz).unwrap(), path);

    // One byte flipped in the cached file: refused, by name, not used.
    let mut tampered = bytes.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    std::fs::write(&path, &tampered).unwrap();
    let err = apt.fetch(&tz).unwrap_err();
    assert!(matches!(err, ImageError::DebianTampered { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("refused") && msg.contains("rm "), "{msg}");
    // A truncated one too.
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert!(matches!(
        apt.fetch(&tz),
        Err(ImageError::DebianTampered { .. })
    ));
    // Deleted, as the hint says: fetched and verified anew.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(apt.fetch(&tz).unwrap(), path);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

/// A private state holding a copy of the shared lists.
fn copy_of_lists(s: &Shared) -> (tempfile::TempDir, Apt, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let apt = Apt::open(&dir.path().join("debian")).unwrap();
    let from = s.root.join("state/lists");
    let to = apt.lists_dir();
    for entry in std::fs::read_dir(&from).unwrap().flatten() {
        let p = entry.path();
        if p.is_file() && p.file_name().unwrap() != "lock" {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    (dir, apt, to)
}

fn smallest(lists: &Path, suffix: &str) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(lists)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    files.into_iter().next().unwrap()
}

#[test]
fn copied_lists_verify_offline() {
    let Some(s) = shared() else { return };
    let (_dir, mut apt, _) = copy_of_lists(s);
    // No apt-get update: the copied lists are checked and used as they are.
    let pkgs = apt.resolve_offline("db", &["libpq5".to_string()]).unwrap();
    assert!(names(&pkgs).contains(&"libpq5"));
}

#[test]
fn an_inrelease_with_a_bad_signature_is_refused() {
    let Some(s) = shared() else { return };
    let (_dir, mut apt, lists) = copy_of_lists(s);
    let inrelease = smallest(&lists, "_InRelease");
    let mut text = std::fs::read(&inrelease).unwrap();
    // Flip one byte of the signed text (inside the `Date:` line).
    let at = text.windows(6).position(|w| w == b"Date: ").unwrap() + 8;
    text[at] ^= 0x01;
    std::fs::write(&inrelease, &text).unwrap();
    let err = apt.load().unwrap_err();
    assert!(matches!(err, ImageError::DebianMetadata { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&inrelease.display().to_string()), "{msg}");
    assert!(msg.contains("signature does not verify"), "{msg}");
    assert!(msg.contains("hint:"), "{msg}");
}

#[test]
fn a_packages_index_that_does_not_match_inrelease_is_refused() {
    let Some(s) = shared() else { return };
    let (_dir, mut apt, lists) = copy_of_lists(s);
    let packages = smallest(&lists, "_Packages");
    let mut text = std::fs::read(&packages).unwrap();
    text.extend_from_slice(b"\nPackage: evil\nVersion: 1\nArchitecture: all\nFilename: pool/evil.deb\nSize: 1\nSHA256: 0000000000000000000000000000000000000000000000000000000000000000\n");
    std::fs::write(&packages, &text).unwrap();
    let err = apt.load().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::DebianMetadata { .. }), "{msg}");
    assert!(msg.contains(&packages.display().to_string()), "{msg}");
    assert!(msg.contains("does not match the signed"), "{msg}");
}

/// No network and no apt here: an Apt with no sources at all serves a
/// complete lock and a warm cache.
#[test]
fn a_complete_lock_and_a_warm_cache_need_no_apt_and_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc-apt"); // no sources: resolving would fail
    std::fs::create_dir_all(&etc).unwrap();
    let mut apt = Apt::open_with(&dir.path().join("debian"), &etc).unwrap();
    let deb = b"!<arch>\nnot really a package".to_vec();
    let pkg = LockedPackage {
        name: "hello".into(),
        version: "2.10-3".into(),
        arch: "amd64".into(),
        sha256: kiln_image::Digest::of(&deb).hex().to_string(),
        size: deb.len() as u64,
        filename: "pool/main/h/hello/hello_2.10-3_amd64.deb".into(),
    };
    let mut lock = Lock::default();
    lock.images.insert(
        "app".into(),
        ImageLock {
            requested: vec!["hello".into()],
            packages: vec![pkg.clone()],
        },
    );
    let got = debian::locked_packages(
        &mut lock,
        &mut apt,
        "app",
        &["hello".into(), "hello".into()],
    )
    .unwrap();
    assert_eq!(got, vec![pkg.clone()]);
    assert!(
        std::fs::read_dir(apt.lists_dir())
            .unwrap()
            .flatten()
            .all(|e| e.path().is_dir()),
        "no lists were downloaded"
    );
    // No packages: nothing resolved, nothing recorded.
    assert!(
        debian::locked_packages(&mut lock, &mut apt, "bare", &[])
            .unwrap()
            .is_empty()
    );
    assert!(!lock.images.contains_key("bare"));
    std::fs::write(apt.deb_path(&pkg), &deb).unwrap();
    assert_eq!(apt.fetch(&pkg).unwrap(), apt.deb_path(&pkg));
    // A different request is not served from the lock: it resolves, which
    // here has nothing to resolve from.
    assert!(debian::locked_packages(&mut lock, &mut apt, "app", &["other".into()]).is_err());
    assert!(debian::is_locked(&lock, "app", &["hello".into()]));
}

/// A source without `Signed-By` is checked against apt's trusted keyrings,
/// ASCII-armored ones (`trusted.gpg.d/*.asc`) included: gpgv only reads
/// binary keyrings, so kiln dearmors them.
#[test]
fn sources_without_signed_by_verify_with_the_trusted_keyrings() {
    let Some(s) = shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc-apt");
    std::fs::create_dir_all(etc.join("sources.list.d")).unwrap();
    std::fs::create_dir_all(etc.join("trusted.gpg.d")).unwrap();
    let host = Path::new("/etc/apt");
    let mut files = vec![host.join("sources.list")];
    files.extend(
        std::fs::read_dir(host.join("sources.list.d"))
            .unwrap()
            .flatten()
            .map(|e| e.path()),
    );
    for file in files.iter().filter(|f| f.is_file()) {
        let name = file.file_name().unwrap().to_str().unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        let stripped: String = text
            .lines()
            .filter(|l| !l.starts_with("Signed-By:"))
            .map(|l| {
                let mut l = l.to_string();
                while let Some(at) = l.find("signed-by=") {
                    let end = l[at..].find([' ', ']']).map_or(l.len(), |e| at + e);
                    l.replace_range(at..end, "");
                }
                l + "\n"
            })
            .collect();
        let dst = if name == "sources.list" {
            etc.join(name)
        } else {
            etc.join("sources.list.d").join(name)
        };
        std::fs::write(dst, stripped).unwrap();
    }
    let mut armored = 0;
    for entry in std::fs::read_dir(host.join("trusted.gpg.d"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "asc" || e == "gpg") {
            armored += usize::from(p.extension().unwrap() == "asc");
            std::fs::copy(&p, etc.join("trusted.gpg.d").join(p.file_name().unwrap())).unwrap();
        }
    }
    if armored == 0 {
        std::fs::copy(
            "/usr/share/keyrings/debian-archive-keyring.gpg",
            etc.join("trusted.gpg"),
        )
        .unwrap();
    }
    let mut apt = Apt::open_with(&dir.path().join("debian"), &etc).unwrap();
    assert!(!apt.sources().is_empty());
    assert!(apt.sources().iter().all(|s| !s.keyrings.is_empty()));
    let (_copy, _, lists) = copy_of_lists(s);
    for entry in std::fs::read_dir(&lists).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), apt.lists_dir().join(entry.file_name())).unwrap();
        }
    }
    let index = apt.load().unwrap();
    assert!(index.versions("libc6").next().is_some());

    // Without those keyrings the same lists are refused.
    std::fs::remove_dir_all(etc.join("trusted.gpg.d")).unwrap();
    let _ = std::fs::remove_file(etc.join("trusted.gpg"));
    let mut apt = Apt::open_with(&dir.path().join("debian"), &etc).unwrap();
    let err = apt.load().unwrap_err().to_string();
    assert!(err.contains("InRelease") && err.contains("hint:"), "{err}");
}
