//! The `.deb` reader on packages made by dpkg-deb (every compression it
//! writes) and on hostile archives, and the unpacked cache.

mod deb_common;

use std::fs;
use std::path::Path;

use deb_common::{
    Item, ar, ar_header, control_tar, deb_with_data, have_dpkg_deb, make_deb, raw, raw_link,
    raw_tar,
};
use kiln_image::debian::deb::{self, DebEntryKind, DebManifest};
use kiln_image::{Digest, ImageError};

fn fixture_items() -> Vec<Item> {
    vec![
        Item::Dir("usr/bin", 0o755),
        Item::File("usr/bin/tool", b"#!/bin/sh\necho tool\n".to_vec(), 0o755),
        Item::File("usr/bin/su-ish", b"setuid\n".to_vec(), 0o4755),
        Item::HardLink("usr/bin/tool-again", "usr/bin/tool"),
        Item::Symlink("usr/bin/t", "tool"),
        Item::File("etc/tool.conf", b"a = 1\n".to_vec(), 0o644),
        Item::Dir("var/lib/tool", 0o700),
    ]
}

fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<DebManifest, deb::DebError>) {
    let dir = tempfile::tempdir().unwrap();
    let result = deb::unpack(bytes, dir.path());
    (dir, result)
}

fn entry<'a>(m: &'a DebManifest, path: &str) -> &'a deb::DebEntry {
    m.entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no {path} in {:?}", m.entries))
}

#[test]
fn reads_what_dpkg_deb_writes_with_every_compression() {
    if !have_dpkg_deb() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    for compression in ["xz", "gzip", "zstd", "none"] {
        let deb = make_deb(
            &out.path().join(compression),
            "tool",
            "1.2-3",
            &fixture_items(),
            compression,
        );
        let (dir, m) = unpack_bytes(&fs::read(&deb).unwrap());
        let m = m.unwrap_or_else(|e| panic!("{compression}: {e}"));
        assert_eq!(
            (
                m.control.package.as_str(),
                m.control.version.as_str(),
                m.control.architecture.as_str()
            ),
            ("tool", "1.2-3", "amd64"),
            "{compression}"
        );
        assert!(m.control.stanza.contains(" a longer description"));
        assert!(m.md5sums.as_deref().unwrap().contains("usr/bin/tool"));
        let tool = entry(&m, "usr/bin/tool");
        let DebEntryKind::File { size, sha256, blob } = &tool.kind else {
            panic!("{tool:?}")
        };
        let content = b"#!/bin/sh\necho tool\n";
        assert_eq!(
            (*size, sha256),
            (content.len() as u64, &Digest::of(content))
        );
        assert_eq!(
            fs::read(dir.path().join("files").join(blob.to_string())).unwrap(),
            content
        );
        assert_eq!((tool.mode, tool.uid, tool.gid), (0o755, 0, 0));
        assert_eq!(
            entry(&m, "usr/bin/su-ish").mode,
            0o4755,
            "setuid is kept as the package has it"
        );
        // One of the two names is the file, the other links to it.
        let again = entry(&m, "usr/bin/tool-again");
        let links: Vec<_> = [tool, again]
            .iter()
            .filter_map(|e| match &e.kind {
                DebEntryKind::HardLink { target } => Some(target.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(links.len(), 1, "{tool:?} {again:?}");
        assert_eq!(
            entry(&m, "usr/bin/t").kind,
            DebEntryKind::Symlink {
                target: "tool".into()
            }
        );
        assert_eq!(entry(&m, "var/lib/tool").mode, 0o700);
        assert!(m.entries.iter().all(|e| !e.path.starts_with('.')));
        // Nothing but numbered plain files was written.
        for f in fs::read_dir(dir.path().join("files")).unwrap() {
            let f = f.unwrap();
            assert!(f.file_type().unwrap().is_file());
            assert!(f.file_name().to_str().unwrap().parse::<u64>().is_ok());
            assert_eq!(
                f.metadata().unwrap().permissions().mode() & 0o7000,
                0,
                "no setuid file on the host"
            );
        }
        // The control-only reader agrees.
        let control = deb::read_control_of(fs::File::open(&deb).unwrap()).unwrap();
        assert_eq!(control, m.control);
    }
}

use std::os::unix::fs::PermissionsExt;

fn refused(bytes: &[u8], expect: &str) {
    let (_dir, result) = unpack_bytes(bytes);
    match result {
        Ok(m) => panic!("accepted, expected `{expect}`: {m:?}"),
        Err(e) => assert!(
            e.to_string().contains(expect),
            "expected `{expect}` in: {e}"
        ),
    }
}

#[test]
fn hostile_paths_are_refused() {
    for (name, expect) in [
        ("../etc/passwd", "`..`"),
        ("./usr/../../etc/passwd", "`..`"),
        ("/etc/passwd", "absolute path"),
    ] {
        refused(&deb_with_data("evil", &[raw(name, b'0', b"x")]), expect);
    }
    // A hard link that points outside, at a later entry, or at nothing.
    refused(
        &deb_with_data("evil", &[raw_link("./a", b'1', "../../etc/shadow")]),
        "`..`",
    );
    refused(
        &deb_with_data(
            "evil",
            &[raw_link("./a", b'1', "./b"), raw("./b", b'0', b"x")],
        ),
        "not an earlier file",
    );
    // A file under a symlink would be written through it.
    refused(
        &deb_with_data(
            "evil",
            &[
                raw_link("./etc", b'2', "/etc"),
                raw("./etc/passwd", b'0', b"x"),
            ],
        ),
        "not a directory",
    );
    refused(
        &deb_with_data("evil", &[raw("./a", b'0', b"1"), raw("./a", b'0', b"2")]),
        "twice",
    );
    refused(
        &deb_with_data("evil", &[raw_link("./a", b'2', "")]),
        "target",
    );
}

#[test]
fn device_nodes_and_fifos_are_skipped_with_a_note() {
    let bytes = deb_with_data(
        "devs",
        &[
            raw("./dev/", b'5', b""),
            raw("./dev/null", b'3', b""),
            raw("./dev/sda", b'4', b""),
            raw("./dev/fifo", b'6', b""),
            raw("./ok", b'0', b"ok"),
        ],
    );
    let (_dir, m) = unpack_bytes(&bytes);
    let m = m.unwrap();
    let skipped: Vec<_> = m.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(skipped, ["dev/null", "dev/sda", "dev/fifo"]);
    assert!(m.skipped[0].why.contains("device"));
    let paths: Vec<_> = m.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["dev", "ok"]);
}

#[test]
fn malformed_archives_are_refused_with_what_is_wrong() {
    let good = deb_with_data("ok", &[raw("./a", b'0', b"abc")]);
    assert!(unpack_bytes(&good).1.is_ok());

    refused(b"", "does not start with `!<arch>`");
    refused(b"PK\x03\x04 a zip", "does not start with `!<arch>`");
    refused(b"!<arch>\n", "empty");
    // Truncated anywhere: never a panic, always an error.
    for cut in [
        9,
        60,
        68,
        100,
        good.len() / 2,
        good.len() - 600,
        good.len() - 1,
    ] {
        let (_d, r) = unpack_bytes(&good[..cut]);
        assert!(r.is_err(), "cut at {cut} of {} was accepted", good.len());
    }
    // A member that says it is far larger than the file.
    let mut huge = b"!<arch>\n".to_vec();
    huge.extend(ar_header("debian-binary", "4"));
    huge.extend(b"2.0\n");
    huge.extend(ar_header("control.tar", "9999999999"));
    huge.extend(control_tar("xx"));
    refused(&huge, "truncated");
    let mut bad_size = b"!<arch>\n".to_vec();
    bad_size.extend(ar_header("debian-binary", "-4"));
    refused(&bad_size, "size `-4`");

    let ctl = control_tar("xx");
    let data = raw_tar(&[raw("./a", b'0', b"abc")]);
    refused(
        &ar(&[
            ("debian-binary", b"3.0\n"),
            ("control.tar", &ctl),
            ("data.tar", &data),
        ]),
        "format version `3.0`",
    );
    refused(
        &ar(&[("control.tar", &ctl), ("data.tar", &data)]),
        "not `debian-binary`",
    );
    refused(
        &ar(&[
            ("debian-binary", b"2.0\n"),
            ("data.tar", &data),
            ("control.tar", &ctl),
        ]),
        "out of place",
    );
    refused(
        &ar(&[("debian-binary", b"2.0\n"), ("control.tar", &ctl)]),
        "no data.tar",
    );
    refused(
        &ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar", &ctl),
            ("data.tar.bz2", &data),
        ]),
        "compression `bz2`",
    );
    refused(
        &ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar", &ctl),
            ("data.tar.xz", &data),
        ]),
        "data.tar.xz",
    );
    refused(
        &ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar", &ctl),
            ("evil", &data),
        ]),
        "unexpected ar member `evil`",
    );
    refused(
        &ar(&[("debian-binary", b"2.0\n"), ("#1/20", &ctl)]),
        "ar member name",
    );
    // dpkg's `_`-members (signatures) are skipped.
    let signed = ar(&[
        ("debian-binary", b"2.0\n"),
        ("_gpgorigin", b"sig"),
        ("control.tar", &ctl),
        ("data.tar", &data),
    ]);
    assert!(unpack_bytes(&signed).1.is_ok());
    // Control files that are not one valid stanza.
    for (control, expect) in [
        ("Version: 1\nArchitecture: all\n", "`Package`"),
        (
            "Package: Bad_Name\nVersion: 1\nArchitecture: all\n",
            "not a Debian package name",
        ),
        (
            "Package: a1\nVersion: 1\nArchitecture: all\n\nPackage: b1\n",
            "2 stanzas",
        ),
    ] {
        let ctl = raw_tar(&[raw("./control", b'0', control.as_bytes())]);
        refused(
            &ar(&[
                ("debian-binary", b"2.0\n"),
                ("control.tar", &ctl),
                ("data.tar", &data),
            ]),
            expect,
        );
    }
}

#[test]
fn a_package_is_unpacked_once_and_only_from_the_bytes_it_is_named_by() {
    let kiln = tempfile::tempdir().unwrap();
    let debs = tempfile::tempdir().unwrap();
    let bytes = deb_with_data("pkg", &[raw("./a", b'0', b"abc")]);
    let path = debs.path().join("pkg.deb");
    fs::write(&path, &bytes).unwrap();
    let sha = Digest::of(&bytes);

    // What a killed unpacking left is removed by the next one.
    let stale =
        kiln.path()
            .join("debian/unpacked")
            .join(format!(".tmp-{}-{}-1", sha.hex(), u32::MAX));
    fs::create_dir_all(stale.join("files")).unwrap();
    let first = deb::unpack_once(kiln.path(), &path, "pkg", &sha).unwrap();
    assert!(!stale.exists(), "the dead unpacking's directory is removed");
    assert!(
        first
            .dir
            .ends_with(Path::new("debian/unpacked").join(sha.hex()))
    );
    // The second time comes from the directory: the .deb is not read.
    fs::remove_file(&path).unwrap();
    let again = deb::unpack_once(kiln.path(), &path, "pkg", &sha).unwrap();
    assert_eq!(again.manifest, first.manifest);

    // Bytes that are not the ones named: refused, nothing left behind.
    let mut tampered = bytes.clone();
    let at = tampered.len() - 1100;
    tampered[at] ^= 1;
    fs::write(&path, &tampered).unwrap();
    let other = Digest::of(b"the lock's sha256");
    let err = deb::unpack_once(kiln.path(), &path, "pkg", &other).unwrap_err();
    assert!(matches!(err, ImageError::DebMismatch { .. }), "{err}");
    assert!(err.to_string().contains("pkg.deb") && err.to_string().contains("hint:"));
    let left: Vec<_> = fs::read_dir(kiln.path().join("debian/unpacked"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        left,
        [sha.hex().to_owned()],
        "no temporary directory is left"
    );

    // A .deb holding another package than the lock says is refused.
    fs::write(&path, &bytes).unwrap();
    let kiln2 = tempfile::tempdir().unwrap();
    let err = deb::unpack_once(kiln2.path(), &path, "other", &sha).unwrap_err();
    assert!(err.to_string().contains("holds package `pkg`"), "{err}");
}
