//! Shared helpers of the image tests: a small deterministic test image
//! built with tar + flate2 directly (one gzip layer: a directory, files, a
//! symbolic link, an executable shell script and, when the machine has a
//! static busybox, `/bin/busybox` with `/bin/sh` so Docker can run it), and
//! the rule for external tools (missing + `KILN_STRICT_TESTS=true` fails).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_image::{Digest, Image, Store};
use serde_json::json;

pub const GREETING_OUTPUT: &str = "hello: hello from kiln";

/// A fresh store in a temporary directory.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

/// What the test layer holds: (path, kind, mode, content or link target).
pub fn layer_entries(with_busybox: bool) -> Vec<(String, tar::EntryType, u32, Vec<u8>)> {
    use tar::EntryType as T;
    let mut out = vec![
        ("app/".to_owned(), T::Directory, 0o755, Vec::new()),
        (
            "app/hello.txt".to_owned(),
            T::Regular,
            0o644,
            b"hello from kiln\n".to_vec(),
        ),
        (
            "app/link".to_owned(),
            T::Symlink,
            0o777,
            b"hello.txt".to_vec(),
        ),
        (
            "app/run.sh".to_owned(),
            T::Regular,
            0o755,
            b"#!/bin/sh\nread line < /app/hello.txt\necho \"$GREETING: $line\"\n".to_vec(),
        ),
        ("app/data/".to_owned(), T::Directory, 0o750, Vec::new()),
        (
            "app/data/secret".to_owned(),
            T::Regular,
            0o600,
            b"s3cret".to_vec(),
        ),
        ("etc/".to_owned(), T::Directory, 0o755, Vec::new()),
        (
            "etc/hostname".to_owned(),
            T::Regular,
            0o644,
            b"kiln\n".to_vec(),
        ),
        ("tmp/".to_owned(), T::Directory, 0o1777, Vec::new()),
    ];
    if with_busybox && let Some(busybox) = static_busybox() {
        out.push(("bin/".to_owned(), T::Directory, 0o755, Vec::new()));
        out.push((
            "bin/busybox".to_owned(),
            T::Regular,
            0o755,
            fs::read(busybox).unwrap(),
        ));
        out.push(("bin/sh".to_owned(), T::Symlink, 0o777, b"busybox".to_vec()));
    }
    out
}

/// An uncompressed tar of `entries`, with fixed owners and mtimes.
pub fn tar_of(entries: &[(String, tar::EntryType, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        if kind.is_symlink() {
            h.set_size(0);
            h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
            b.append_data(&mut h, path, &[][..]).unwrap();
        } else {
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Stores an image made of `layers` (uncompressed tars, each stored
/// gzipped) and tags it `name`.
pub fn put_image(store: &Store, name: &str, layers: &[Vec<u8>]) -> Image {
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let gz = gzip(tar);
        let digest = store.put_blob(&gz).unwrap();
        diff_ids.push(Digest::of(tar).to_string());
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest.to_string(),
            "size": gz.len(),
        }));
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/app/run.sh"],
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/app",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = store.put_blob(&config).unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": descriptors,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let digest = store.put_blob(&manifest).unwrap();
    let image = store.load_image(&digest).unwrap();
    store.tag(name, &image.descriptor()).unwrap();
    image
}

/// The test image (busybox included when available).
pub fn test_image(store: &Store, name: &str) -> Image {
    put_image(store, name, &[tar_of(&layer_entries(true))])
}

/// `/bin/busybox` if it is a static executable (Debian's busybox-static).
pub fn static_busybox() -> Option<PathBuf> {
    let path = PathBuf::from("/bin/busybox");
    let elf = fs::read(&path).ok()?;
    if elf.get(..4)? != b"\x7fELF" || elf.get(4)? != &2 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    // PT_INTERP (3) names the dynamic loader: a static binary has none.
    let dynamic = (0..count)
        .any(|i| elf.get(phoff + i * size..phoff + i * size + 4) == Some(&3u32.to_le_bytes()[..]));
    (!dynamic).then_some(path)
}

pub fn strict() -> bool {
    std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true")
}

/// Whether `program` can be used; in strict mode its absence fails the
/// test, otherwise it is skipped loudly.
pub fn require(program: &str, why: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_or_fail(&format!("`{program}` is not installed ({why})"));
    }
    found
}

/// Panics in strict mode; otherwise prints a loud skip notice.
pub fn skip_or_fail(what: &str) {
    if strict() {
        panic!("{what}, and KILN_STRICT_TESTS=true: install it (scripts/test does, as root)");
    }
    // Straight to stderr: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED: {what}; set KILN_STRICT_TESTS=true to make this a failure !!!!!\n"
    );
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A tree as comparable data: relative path → (kind, mode, content or
/// link target). The root itself is left out.
pub fn tree(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            out.insert(
                rel,
                (
                    'l',
                    0,
                    fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ),
            );
        } else if meta.is_dir() {
            out.insert(rel, ('d', mode, Vec::new()));
            walk(root, &path, out);
        } else {
            out.insert(rel, ('f', mode, fs::read(&path).unwrap()));
        }
    }
}

/// Every path under `dir` (to check that nothing else was written).
pub fn listing(dir: &Path) -> Vec<String> {
    tree(dir).into_keys().collect()
}

pub fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}
