//! Helpers of the `.deb` tests: packages made with the host's `dpkg-deb`,
//! hand-made hostile archives (ar and tar written byte by byte, so they can
//! hold what no tool writes), and a listing of a built image's layer.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_image::{Digest, Image, Store};

/// What a fixture package holds.
#[derive(Debug, Clone)]
pub enum Item {
    Dir(&'static str, u32),
    File(&'static str, Vec<u8>, u32),
    Symlink(&'static str, &'static str),
    /// A hard link (path, existing file).
    HardLink(&'static str, &'static str),
}

pub fn strict() -> bool {
    std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true")
}

/// Whether dpkg-deb is there; fails in strict mode, skips loudly otherwise.
pub fn have_dpkg_deb() -> bool {
    let found = Command::new("dpkg-deb").arg("--version").output().is_ok();
    if !found {
        let what = "`dpkg-deb` is not installed (it makes the fixture packages)";
        if strict() {
            panic!("{what}, and KILN_STRICT_TESTS=true: apt-get install dpkg");
        }
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIPPED: {what}; set KILN_STRICT_TESTS=true to make this a failure !!!!!\n"
        );
    }
    found
}

/// Builds `<out>/<name>_<version>_amd64.deb` with `dpkg-deb -Z<compression>`
/// (`xz`, `gzip`, `zstd`, `none`), files owned by root.
pub fn make_deb(
    out: &Path,
    name: &str,
    version: &str,
    items: &[Item],
    compression: &str,
) -> PathBuf {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("pkg");
    fs::create_dir_all(root.join("DEBIAN")).unwrap();
    fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: kiln tests <t@example.invalid>\nInstalled-Size: 1\nDescription: a kiln test package\n a longer description\n"
        ),
    )
    .unwrap();
    for item in items {
        match item {
            Item::Dir(p, mode) => {
                let d = root.join(p);
                fs::create_dir_all(&d).unwrap();
                fs::set_permissions(&d, fs::Permissions::from_mode(*mode)).unwrap();
            }
            Item::File(p, content, mode) => {
                let f = root.join(p);
                fs::create_dir_all(f.parent().unwrap()).unwrap();
                fs::write(&f, content).unwrap();
                fs::set_permissions(&f, fs::Permissions::from_mode(*mode)).unwrap();
            }
            Item::Symlink(p, target) => {
                let f = root.join(p);
                fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(target, &f).unwrap();
            }
            Item::HardLink(p, existing) => {
                let f = root.join(p);
                fs::create_dir_all(f.parent().unwrap()).unwrap();
                fs::hard_link(root.join(existing), &f).unwrap();
            }
        }
    }
    // md5sums, as a real package has.
    let mut md5 = String::new();
    for item in items {
        if let Item::File(p, content, _) = item {
            md5.push_str(&format!("{:x}  {p}\n", md5_of(content)));
        }
    }
    fs::write(root.join("DEBIAN/md5sums"), md5).unwrap();
    fs::create_dir_all(out).unwrap();
    let deb = out.join(format!("{name}_{version}_amd64.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", &format!("-Z{compression}"), "--build"])
        .arg(&root)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", "0")
        .output()
        .expect("dpkg-deb runs");
    assert!(
        status.status.success(),
        "dpkg-deb failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    deb
}

/// Not a real md5 (no md5 crate here): the checksum text only has to look
/// like an md5sums file.
fn md5_of(content: &[u8]) -> u128 {
    let d = Digest::of(content);
    u128::from_str_radix(&d.hex()[..32], 16).unwrap()
}

/// An ar archive of `members`, as dpkg-deb lays it out.
pub fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"!<arch>\n".to_vec();
    for (name, data) in members {
        out.extend_from_slice(&ar_header(name, &data.len().to_string()));
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}

/// One 60-byte ar header with the size field as given.
pub fn ar_header(name: &str, size: &str) -> Vec<u8> {
    let mut h = format!(
        "{name:<16}{:<12}{:<6}{:<6}{:<8}{size:<10}",
        0, 0, 0, "100644"
    )
    .into_bytes();
    h.extend_from_slice(b"`\n");
    assert_eq!(h.len(), 60);
    h
}

/// One raw tar entry: name bytes as given (no checks), type, mode, link,
/// content.
pub struct Raw<'a> {
    pub name: &'a [u8],
    pub typ: u8,
    pub mode: u32,
    pub link: &'a [u8],
    pub data: &'a [u8],
}

pub fn raw(name: &str, typ: u8, data: &[u8]) -> Raw<'static> {
    Raw {
        name: Box::leak(name.as_bytes().to_vec().into_boxed_slice()),
        typ,
        mode: 0o644,
        link: b"",
        data: Box::leak(data.to_vec().into_boxed_slice()),
    }
}

pub fn raw_link(name: &str, typ: u8, link: &str) -> Raw<'static> {
    Raw {
        link: Box::leak(link.as_bytes().to_vec().into_boxed_slice()),
        ..raw(name, typ, b"")
    }
}

/// A ustar stream of `entries`, written byte by byte.
pub fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        h[..e.name.len()].copy_from_slice(e.name);
        let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(e.mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, e.data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = e.typ;
        h[157..157 + e.link.len()].copy_from_slice(e.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(e.data);
        let pad = (512 - e.data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// A minimal valid control.tar (uncompressed) for package `name`.
pub fn control_tar(name: &str) -> Vec<u8> {
    let control = format!("Package: {name}\nVersion: 1.0\nArchitecture: amd64\n");
    raw_tar(&[raw("./control", b'0', control.as_bytes())])
}

/// A .deb with an uncompressed data.tar of `data` entries.
pub fn deb_with_data(name: &str, data: &[Raw<'_>]) -> Vec<u8> {
    ar(&[
        ("debian-binary", b"2.0\n"),
        ("control.tar", &control_tar(name)),
        ("data.tar", &raw_tar(data)),
    ])
}

/// What the image's layers hold: path → (type char, mode, uid, gid,
/// content or link target), later layers over earlier ones.
pub type Listing = BTreeMap<String, (char, u32, u64, u64, Vec<u8>)>;

pub fn listing(store: &Store, image: &Image) -> Listing {
    let mut out = BTreeMap::new();
    for layer in image.layers() {
        let digest: Digest = layer.digest().to_string().parse().unwrap();
        let bytes = store.read_blob(&digest).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let (kind, data) = match h.entry_type() {
                tar::EntryType::Directory => ('d', Vec::new()),
                tar::EntryType::Symlink => ('l', e.link_name_bytes().unwrap().into_owned()),
                tar::EntryType::Link => ('h', e.link_name_bytes().unwrap().into_owned()),
                _ => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                    ('-', v)
                }
            };
            let path = String::from_utf8_lossy(&e.path_bytes())
                .trim_end_matches('/')
                .to_owned();
            out.insert(
                path,
                (
                    kind,
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    data,
                ),
            );
        }
    }
    out
}
