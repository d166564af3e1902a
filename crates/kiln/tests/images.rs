//! The image commands end to end: build (cached), list, verify, export and
//! import, sign and the signature policy, gc with generations as roots.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("KILN_HOME")
        .env_remove("KILN_STATE_DIR")
        .env_remove("KILN_IMAGE_STORE")
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("kiln runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn project(policy: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    fs::create_dir_all(p.join("app")).unwrap();
    fs::write(p.join("app/run.sh"), "#!/bin/sh\necho hello\n").unwrap();
    fs::write(p.join("app/data.txt"), "some data\n").unwrap();
    fs::write(
        p.join("kiln.toml"),
        format!(
            r#"
[project]
name = "imgtest"

[image.app]
copy = [{{ src = "app/", dst = "/app/" }}]
entrypoint = ["/app/run.sh"]
env = {{ MODE = "test" }}

[service.web]
image = "app"

{policy}
"#
        ),
    )
    .unwrap();
    dir
}

fn image_digest(dir: &Path) -> String {
    let out = ok(&kiln(dir, &["image", "ls", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let app = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "app")
        .expect("app is listed");
    app["digest"].as_str().unwrap().to_owned()
}

#[test]
fn build_is_cached_listed_and_verifiable() {
    let dir = project("");
    let first = ok(&kiln(dir.path(), &["build"]));
    assert!(first.contains("built"), "{first}");
    let second = ok(&kiln(dir.path(), &["build"]));
    assert!(second.contains("cached"), "{second}");
    let digest = image_digest(dir.path());
    assert!(first.contains(&digest));
    let inspect = ok(&kiln(dir.path(), &["image", "inspect", "app", "--json"]));
    let doc: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(doc["digest"], digest.as_str());
    assert_eq!(doc["config"]["config"]["Entrypoint"][0], "/app/run.sh");
    ok(&kiln(dir.path(), &["image", "verify"]));
    ok(&kiln(dir.path(), &["image", "verify", "app"]));

    // A flipped byte in a blob is found and named.
    let store = dir.path().join(".kiln/images/blobs/sha256");
    let layer = fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&layer, bytes).unwrap();
    let out = kiln(dir.path(), &["image", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let name = layer.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&name),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = kiln(dir.path(), &["image", "verify", "app"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));
}

#[test]
fn the_same_project_builds_the_same_digest_anywhere() {
    let (a, b) = (project(""), project(""));
    ok(&kiln(a.path(), &["build"]));
    ok(&kiln(b.path(), &["build"]));
    assert_eq!(image_digest(a.path()), image_digest(b.path()));
}

#[test]
fn export_then_import_keeps_the_digest() {
    let dir = project("");
    ok(&kiln(dir.path(), &["build"]));
    let digest = image_digest(dir.path());
    let layout = dir.path().join("exported");
    ok(&kiln(
        dir.path(),
        &[
            "image",
            "export",
            "app",
            "--output",
            layout.to_str().unwrap(),
        ],
    ));
    let archive = dir.path().join("app.tar");
    ok(&kiln(
        dir.path(),
        &[
            "image",
            "export",
            "app",
            "--format",
            "docker",
            "--tag",
            "app:1",
            "--output",
            archive.to_str().unwrap(),
        ],
    ));
    for (source, name) in [(layout, "from-layout"), (archive, "from-archive")] {
        let other = tempfile::tempdir().unwrap();
        let store = other.path().join("store");
        let out = ok(&kiln(
            other.path(),
            &[
                "image",
                "import",
                source.to_str().unwrap(),
                "--name",
                name,
                "--store",
                store.to_str().unwrap(),
            ],
        ));
        if name == "from-layout" {
            assert!(out.contains(&digest), "{out}");
        }
        let listed = ok(&kiln(
            other.path(),
            &["image", "ls", "--store", store.to_str().unwrap()],
        ));
        assert!(listed.contains(name), "{listed}");
    }
}

#[test]
fn the_signature_policy_refuses_unsigned_images_before_anything_runs() {
    let dir = project("[policy]\nrequire_signed = true\ntrusted_keys = [\"keys/release.pub\"]\n");
    ok(&kiln(dir.path(), &["key", "generate", "release"]));
    assert!(dir.path().join("keys/release.key").is_file());
    let out = kiln(dir.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("refused by [policy] require_signed"), "{err}");
    assert!(err.contains("kiln image sign"), "{err}");

    // Signed by an untrusted key: still refused.
    ok(&kiln(dir.path(), &["key", "generate", "other"]));
    ok(&kiln(
        dir.path(),
        &["image", "sign", "app", "--key", "keys/other.key"],
    ));
    let out = kiln(
        dir.path(),
        &["image", "verify", "app", "--key", "keys/release.pub"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // Re-signed by the trusted key: accepted.
    fs::remove_file(dir.path().join(format!(
        ".kiln/images/kiln/signatures/{}.minisig",
        image_digest(dir.path()).trim_start_matches("sha256:")
    )))
    .unwrap();
    ok(&kiln(
        dir.path(),
        &["image", "sign", "app", "--key", "keys/release.key"],
    ));
    ok(&kiln(
        dir.path(),
        &["image", "verify", "app", "--key", "keys/release.pub"],
    ));
    let plan = ok(&kiln(dir.path(), &["plan"]));
    assert!(plan.contains("will be created"), "{plan}");
    let listed = ok(&kiln(dir.path(), &["image", "ls"]));
    assert!(listed.contains("yes"), "{listed}");
}

#[test]
fn gc_removes_only_what_nothing_needs() {
    let dir = project("");
    ok(&kiln(dir.path(), &["build"]));
    let blobs = || {
        fs::read_dir(dir.path().join(".kiln/images/blobs/sha256"))
            .unwrap()
            .count()
    };
    let before = blobs();
    assert!(before >= 3);
    // Named: nothing goes.
    ok(&kiln(dir.path(), &["image", "gc", "--grace", "0s"]));
    assert_eq!(blobs(), before);
    // Unnamed and in no generation: everything goes (dry run first).
    ok(&kiln(dir.path(), &["image", "rm", "app"]));
    ok(&kiln(
        dir.path(),
        &["image", "gc", "--grace", "0s", "--dry-run"],
    ));
    assert_eq!(blobs(), before);
    let removed = ok(&kiln(dir.path(), &["image", "gc", "--grace", "0s"]));
    assert_eq!(removed.lines().count(), before, "{removed}");
    assert_eq!(blobs(), 0);
    // The SBOM and the build-cache entry of the removed image go with it.
    let left = |sub: &str| -> Vec<String> {
        fs::read_dir(dir.path().join(".kiln/images/kiln").join(sub))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(left("sbom").is_empty(), "{:?}", left("sbom"));
    assert!(
        left("build-cache").iter().all(|n| n == "stat.json"),
        "{:?}",
        left("build-cache")
    );
    // A rebuild after gc works (the cache does not point at deleted blobs).
    let rebuilt = ok(&kiln(dir.path(), &["build"]));
    assert!(rebuilt.contains("built"), "{rebuilt}");
    let out = kiln(dir.path(), &["image", "rm", "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn sbom_lists_every_file_with_its_digest() {
    let dir = project("");
    ok(&kiln(dir.path(), &["build"]));
    let out = ok(&kiln(dir.path(), &["image", "sbom", "app"]));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    let names: Vec<&str> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["fileName"].as_str())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("app/run.sh")), "{names:?}");
    assert!(
        names.iter().any(|n| n.ends_with("app/data.txt")),
        "{names:?}"
    );
}

#[test]
fn gc_keeps_the_images_of_retained_generations() {
    let dir = project("");
    // Record the project's generation in its state store, as apply does.
    let project = kiln_engine::Project::load(dir.path()).unwrap();
    let generation = project.generation().unwrap();
    let state = kiln_state::Store::open(&project.state_dir()).unwrap();
    state
        .append_generation(kiln_state::NewGeneration {
            hash: generation.content_hash().0,
            parent: None,
            origin: kiln_state::Origin::Apply,
            rollback_of: None,
            message: None,
            body: generation.canonical_json(),
        })
        .unwrap();
    let blobs = || {
        fs::read_dir(dir.path().join(".kiln/images/blobs/sha256"))
            .unwrap()
            .count()
    };
    let before = blobs();
    ok(&kiln(dir.path(), &["image", "rm", "app"]));
    ok(&kiln(dir.path(), &["image", "gc", "--grace", "0s"]));
    assert_eq!(
        blobs(),
        before,
        "a retained generation's image must survive gc"
    );
}

#[test]
fn the_checkouts_umask_does_not_change_the_digest() {
    use std::os::unix::fs::PermissionsExt;
    let (a, b) = (project(""), project(""));
    for (dir, file_mode, dir_mode) in [(a.path(), 0o644, 0o755), (b.path(), 0o664, 0o775)] {
        fs::set_permissions(dir.join("app"), fs::Permissions::from_mode(dir_mode)).unwrap();
        fs::set_permissions(
            dir.join("app/data.txt"),
            fs::Permissions::from_mode(file_mode),
        )
        .unwrap();
        fs::set_permissions(dir.join("app/run.sh"), fs::Permissions::from_mode(dir_mode)).unwrap();
        ok(&kiln(dir, &["build"]));
    }
    assert_eq!(image_digest(a.path()), image_digest(b.path()));
}
