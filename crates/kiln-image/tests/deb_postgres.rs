//! End to end against the real archive: an image of `postgresql-15` from
//! Debian's packages, resolved, locked, fetched and verified with the
//! machine's apt configuration. Same lock and .deb cache, fresh stores:
//! same digest. A warm rebuild is a cache hit. A tampered cached .deb is
//! refused.
//!
//! Needs `apt-get`, `gpgv` and the network to the apt sources (CI has
//! them); without them it is skipped loudly, or fails when
//! `KILN_STRICT_TESTS=true`.

mod common;
mod deb_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use kiln_image::build::Builder;
use kiln_image::debian::deb::LockedApt;
use kiln_image::progress::Quiet;
use kiln_image::{ImageError, Store};

const SPEC: &str = r#"
[project]
name = "shop"

[image.postgres]
debian = ["postgresql-15", "dash"]
users = [{ name = "postgres", uid = 999, home = "/var/lib/postgresql", shell = "/bin/bash" }]
dirs = [{ path = "/var/lib/postgresql", mode = 0o755, owner = "postgres" }]
entrypoint = ["/usr/lib/postgresql/15/bin/postgres"]
user = "999:999"
"#;

#[test]
fn postgresql_from_debian_packages_is_reproducible_and_verified() {
    if !common::require("apt-get", "Debian packages are resolved with apt")
        || !common::require("gpgv", "InRelease signatures are checked with gpgv")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    fs::create_dir_all(&project).unwrap();
    fs::write(project.join("kiln.toml"), SPEC).unwrap();
    let spec = kiln_spec::parse(SPEC, "kiln.toml").unwrap();

    // First build: resolves, writes kiln.lock, downloads, unpacks.
    let store_a = Store::open(&tmp.path().join("a")).unwrap();
    let started = Instant::now();
    let first = match kiln_image::build::build_all(&store_a, &spec, &project, 0, &mut Quiet) {
        Ok(out) => out,
        Err(e @ (ImageError::DebianApt { .. } | ImageError::DebianFetch { .. })) => {
            common::skip_or_fail(&format!("the apt sources are unreachable: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    eprintln!("cold build: {:?}", started.elapsed());
    let lock = fs::read_to_string(project.join("kiln.lock")).expect("kiln.lock is written");
    assert!(lock.contains("postgresql-15"), "{lock}");

    let image = store_a.load_image(&first["postgres"].digest).unwrap();
    let files = deb_common::listing(&store_a, &image);
    let postgres = &files["usr/lib/postgresql/15/bin/postgres"];
    assert_eq!(postgres.0, '-');
    assert_eq!(&postgres.4[..4], b"\x7fELF");
    let status = String::from_utf8(files["var/lib/dpkg/status"].4.clone()).unwrap();
    assert!(status.contains("Package: postgresql-15\nStatus: install ok installed\n"));
    assert!(status.contains("Package: libc6\n"), "the closure is in it");
    assert!(String::from_utf8_lossy(&files["etc/passwd"].4).contains("postgres:x:999:999:"));
    assert_eq!(files["var/lib/postgresql"].2, 999);

    // It runs: unpacked and chrooted into, the server prints its version.
    if is_root() {
        let root = tmp.path().join("rootfs");
        fs::create_dir_all(&root).unwrap();
        for layer in image.layers() {
            let digest: kiln_image::Digest = layer.digest().to_string().parse().unwrap();
            let bytes = store_a.read_blob(&digest).unwrap();
            let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
            archive.set_preserve_permissions(true);
            archive.set_preserve_ownerships(true);
            archive.unpack(&root).unwrap();
        }
        let run = std::process::Command::new("chroot")
            .arg(&root)
            .args(["/usr/lib/postgresql/15/bin/postgres", "--version"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success() && out.contains("PostgreSQL) 15"),
            "postgres --version in the image: {}\n{out}{}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
        // initdb runs the server through /bin/sh (from `dash`) with
        // output to /dev/null, which a runtime provides.
        fs::create_dir_all(root.join("dev")).unwrap();
        let null = std::process::Command::new("mknod")
            .arg(root.join("dev/null"))
            .args(["c", "1", "3"])
            .status()
            .unwrap();
        assert!(null.success());
        fs::set_permissions(root.join("dev/null"), fs::Permissions::from_mode(0o666)).unwrap();
        let initdb = std::process::Command::new("chroot")
            .args(["--userspec=999:999"])
            .arg(&root)
            .args([
                "/usr/lib/postgresql/15/bin/initdb",
                "-D",
                "/var/lib/postgresql/data",
            ])
            .output()
            .unwrap();
        assert!(
            initdb.status.success(),
            "initdb in the image: {}\n{}{}",
            initdb.status,
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
        assert!(root.join("var/lib/postgresql/data/PG_VERSION").is_file());
    } else {
        common::skip_or_fail("not root: cannot chroot into the image to run postgres");
    }

    // Warm: same store, same lock → a cache hit, quickly.
    let started = Instant::now();
    let warm = kiln_image::build::build_all(&store_a, &spec, &project, 0, &mut Quiet).unwrap();
    let took = started.elapsed();
    eprintln!("warm rebuild: {took:?}");
    assert!(warm["postgres"].cached);
    assert_eq!(warm["postgres"].digest, first["postgres"].digest);

    // A fresh store from the same lock and .deb cache: same digest.
    let store_b = Store::open(&tmp.path().join("b")).unwrap();
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store_b, &mut quiet);
    builder.debian = Some(Box::new(
        LockedApt::open(&project, &store_a.kiln_dir()).unwrap(),
    ));
    let second = builder.build_all(&spec, &project, 0).unwrap();
    builder.finish().unwrap();
    assert_eq!(second["postgres"].digest, first["postgres"].digest);
    assert_eq!(second["postgres"].recipe, first["postgres"].recipe);

    // A tampered .deb of the cache is refused, never unpacked.
    let debs = store_a.kiln_dir().join("debian/debs");
    let deb = fs::read_dir(&debs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the .deb cache has files");
    let mut bytes = fs::read(&deb).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&deb, &bytes).unwrap();
    let store_c = Store::open(&tmp.path().join("c")).unwrap();
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store_c, &mut quiet);
    builder.debian = Some(Box::new(
        LockedApt::open(&project, &store_a.kiln_dir()).unwrap(),
    ));
    let err = builder.build_all(&spec, &project, 0).unwrap_err();
    assert!(
        matches!(err, ImageError::DebianTampered { .. }),
        "expected a refusal of {}: {err}",
        deb.display()
    );
    assert!(store_c.resolve("postgres").is_err());
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
