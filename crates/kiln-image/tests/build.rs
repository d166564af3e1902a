//! The builder end to end: reproducibility, the build cache, bases, errors,
//! the shared-library closure running under chroot, SBOMs, and other OCI
//! tools reading what kiln writes.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_image::build::{BuildOutcome, BuildRequest, Builder, build, build_all};
use kiln_image::progress::Quiet;
use kiln_image::{Digest, ImageError, Store, sbom};
use kiln_spec::Spec;

fn spec(text: &str) -> Spec {
    kiln_spec::parse(text, "kiln.toml").unwrap_or_else(|d| panic!("{d:?}"))
}

/// A small project: a "binary", a static tree with a symlink and a hard
/// link, a config file.
fn write_project(dir: &Path) {
    fs::create_dir_all(dir.join("target/release")).unwrap();
    fs::create_dir_all(dir.join("static/css")).unwrap();
    fs::write(dir.join("target/release/web"), vec![0x5a; 300_000]).unwrap();
    fs::set_permissions(
        dir.join("target/release/web"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::write(dir.join("static/index.html"), "<h1>hi</h1>\n").unwrap();
    fs::write(dir.join("static/css/site.css"), "body{}\n").unwrap();
    fs::hard_link(
        dir.join("static/index.html"),
        dir.join("static/default.html"),
    )
    .unwrap();
    std::os::unix::fs::symlink("index.html", dir.join("static/home.html")).unwrap();
    fs::write(dir.join("web.toml"), "port = 1\n").unwrap();
}

const SPEC: &str = r#"
[project]
name = "shop"

[image.web]
copy = [
  { src = "target/release/web", dst = "/app/web", mode = 0o755 },
  { src = "static", dst = "/app/static" },
  { src = "web.toml", dst = "/etc/web/" },
]
entrypoint = ["/app/web"]
env = { RUST_LOG = "info" }
workdir = "/app"
labels = { "org.opencontainers.image.source" = "https://example.invalid/shop" }
expose = [8080]
"#;

fn build_spec(
    store: &Store,
    text: &str,
    dir: &Path,
) -> Result<BTreeMap<String, BuildOutcome>, ImageError> {
    build_all(store, &spec(text), dir, 0, &mut Quiet)
}

fn open_store(dir: &Path) -> Store {
    Store::open(&dir.join(".kiln/images")).unwrap()
}

#[test]
fn same_inputs_give_the_same_digest_across_checkouts_and_runs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pa, pb) = (
        a.path().join("checkout-one"),
        b.path().join("deeper/checkout-two"),
    );
    write_project(&pa);
    write_project(&pb);
    // Different times on disk must not matter.
    let f = fs::File::options()
        .write(true)
        .open(pb.join("static/css/site.css"))
        .unwrap();
    f.set_modified(
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 365),
    )
    .unwrap();
    drop(f);
    let da = build_spec(&open_store(&pa), SPEC, &pa).unwrap()["web"].clone();
    let db = build_spec(&open_store(&pb), SPEC, &pb).unwrap()["web"].clone();
    assert_eq!(da.digest, db.digest);
    assert_eq!(da.recipe, db.recipe);
    assert!(!da.cached && !db.cached);

    // A second run: cached, same digest.
    let again = build_spec(&open_store(&pa), SPEC, &pa).unwrap()["web"].clone();
    assert!(again.cached);
    assert_eq!(again.digest, da.digest);

    // A run with the cache gone writes the same bytes again.
    fs::remove_dir_all(pa.join(".kiln/images/kiln/build-cache")).unwrap();
    let rebuilt = build_spec(&open_store(&pa), SPEC, &pa).unwrap()["web"].clone();
    assert!(!rebuilt.cached);
    assert_eq!(rebuilt.digest, da.digest);

    // A different epoch is a different image.
    let other = build_all(
        &open_store(&pa),
        &spec(SPEC),
        &pa,
        1_700_000_000,
        &mut Quiet,
    )
    .unwrap();
    assert_ne!(other["web"].digest, da.digest);
}

#[test]
fn the_image_has_the_declared_config_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_project(p);
    let store = open_store(p);
    let out = build_spec(&store, SPEC, p).unwrap()["web"].clone();
    assert_eq!(out.layers, 1);
    let image = store.image("web").unwrap();
    assert_eq!(image.digest, out.digest);
    let cfg: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&image.config_digest).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "amd64");
    assert_eq!(cfg["os"], "linux");
    assert_eq!(cfg["created"], "1970-01-01T00:00:00Z");
    let c = &cfg["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/app/web"]));
    assert_eq!(
        c["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "RUST_LOG=info"
        ])
    );
    assert_eq!(c["WorkingDir"], "/app");
    assert_eq!(c["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
    assert_eq!(
        c["Labels"]["org.opencontainers.image.source"],
        "https://example.invalid/shop"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&image.manifest_bytes).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    let files = layer_listing(&store, &image);
    for (path, kind) in [
        ("app/", 'd'),
        ("app/web", '-'),
        ("app/static/default.html", '-'),
        ("app/static/index.html", 'h'),
        ("app/static/home.html", 'l'),
        ("etc/web/web.toml", '-'),
    ] {
        assert_eq!(files.get(path), Some(&kind), "{path} in {files:?}");
    }
}

/// path → 'd' dir, '-' file, 'l' symlink, 'h' hard link, over all layers.
fn layer_listing(store: &Store, image: &kiln_image::Image) -> BTreeMap<String, char> {
    let mut out = BTreeMap::new();
    for layer in image.layers() {
        let digest: Digest = layer.digest().to_string().parse().unwrap();
        let bytes = store.read_blob(&digest).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let kind = match e.header().entry_type() {
                tar::EntryType::Directory => 'd',
                tar::EntryType::Symlink => 'l',
                tar::EntryType::Link => 'h',
                _ => '-',
            };
            out.insert(String::from_utf8_lossy(&e.path_bytes()).into_owned(), kind);
        }
    }
    out
}

#[test]
fn the_cache_hits_on_no_change_and_misses_on_every_kind_of_change() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_project(p);
    let store = open_store(p);
    let first = build_spec(&store, SPEC, p).unwrap()["web"].clone();
    let same = build_spec(&store, SPEC, p).unwrap()["web"].clone();
    assert!(same.cached, "no change must be a hit");
    assert_eq!(same.digest, first.digest);

    let mut seen = vec![first.digest.clone()];
    let mut expect_new = |what: &str, text: &str| {
        let out = build_spec(&store, text, p).unwrap()["web"].clone();
        assert!(!out.cached, "{what}: must be a miss");
        assert!(!seen.contains(&out.digest), "{what}: must be a new image");
        seen.push(out.digest.clone());
        assert!(
            build_spec(&store, text, p).unwrap()["web"].cached,
            "{what}: the rebuild must hit"
        );
    };

    // One byte of a file, same size.
    fs::write(p.join("static/css/site.css"), "body{]\n").unwrap();
    expect_new("changed byte", SPEC);
    // A mode.
    fs::set_permissions(
        p.join("static/css/site.css"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    expect_new("changed mode", SPEC);
    // An added file.
    fs::write(p.join("static/new.txt"), "new").unwrap();
    expect_new("added file", SPEC);
    // A changed env.
    expect_new(
        "changed env",
        &SPEC.replace("RUST_LOG = \"info\"", "RUST_LOG = \"debug\""),
    );
    // A removed blob makes the cached entry unusable: rebuilt, same digest.
    let image = store.image("web").unwrap();
    let layer: Digest = image.layers()[0].digest().to_string().parse().unwrap();
    fs::remove_file(store.blob_path(&layer)).unwrap();
    let text = SPEC.replace("RUST_LOG = \"info\"", "RUST_LOG = \"debug\"");
    let out = build_spec(&store, &text, p).unwrap()["web"].clone();
    // Rebuilt (the layer is written again, whether or not the stat cache
    // still vouches for the inputs), to the same digest.
    assert_eq!(out.digest, image.digest);
    assert!(store.has_blob(&layer));
}

#[test]
fn an_image_builds_on_another_image_of_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_project(p);
    let text = r#"
[project]
name = "shop"
[image.web]
from = "base"
copy = [{ src = "target/release/web", dst = "/app/web" }]
env = { B = "web" }
cmd = ["--serve"]
[image.base]
copy = [{ src = "static", dst = "/srv" }]
env = { A = "base", B = "base", PATH = "/bin" }
entrypoint = ["/bin/sh"]
cmd = ["-c", "true"]
labels = { from = "base" }
expose = [80]
"#;
    let store = open_store(p);
    let outs = build_spec(&store, text, p).unwrap();
    let (base, web) = (&outs["base"], &outs["web"]);
    assert_eq!((base.layers, web.layers), (1, 2));
    let base_img = store.image("base").unwrap();
    let web_img = store.image("web").unwrap();
    assert_eq!(web_img.layers()[0], base_img.layers()[0]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&web_img.config_digest).unwrap()).unwrap();
    let c = &cfg["config"];
    assert_eq!(
        c["Env"],
        serde_json::json!(["A=base", "B=web", "PATH=/bin"])
    );
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh"]));
    assert_eq!(c["Cmd"], serde_json::json!(["--serve"]));
    assert_eq!(c["Labels"], serde_json::json!({"from": "base"}));
    assert_eq!(c["ExposedPorts"], serde_json::json!({"80/tcp": {}}));
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    assert_eq!(cfg["history"].as_array().unwrap().len(), 2);

    // A change in the base rebuilds both; the web image's own inputs did
    // not change, but its base digest did.
    fs::write(p.join("static/index.html"), "changed").unwrap();
    let outs2 = build_spec(&store, text, p).unwrap();
    assert!(!outs2["base"].cached && !outs2["web"].cached);
    assert_ne!(outs2["web"].digest, web.digest);

    // The same base by digest and through an OCI layout gives the same web image.
    let base_digest = outs2["base"].digest.to_string();
    let by_digest = build_spec(
        &store,
        &text.replace("from = \"base\"", &format!("from = \"{base_digest}\"")),
        p,
    )
    .unwrap();
    assert_eq!(by_digest["web"].digest, outs2["web"].digest);
    let layout = p.join("layouts/base");
    write_layout(&store, &outs2["base"].digest, &layout);
    let fresh = open_store(&p.join("other"));
    let via_layout = build_spec(
        &fresh,
        &text.replace("from = \"base\"", "from = \"oci-layout:layouts/base\""),
        p,
    )
    .unwrap();
    assert_eq!(via_layout["web"].digest, outs2["web"].digest);
}

/// A one-image OCI layout of `digest`, written by hand.
fn write_layout(store: &Store, digest: &Digest, dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let image = store.load_image(digest).unwrap();
    for blob in image.blobs().unwrap() {
        fs::copy(
            store.blob_path(&blob),
            dir.join("blobs/sha256").join(blob.hex()),
        )
        .unwrap();
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest.to_string(),
            "size": image.manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "base"}
        }]
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

#[test]
fn errors_name_the_image_and_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let store = open_store(p);
    let err = build_spec(&store, SPEC, p).unwrap_err().to_string();
    assert!(
        err.contains("image `web`") && err.contains("target/release/web") && err.contains("hint:"),
        "{err}"
    );

    let missing = format!("sha256:{}", "a".repeat(64));
    let err = build_spec(
        &store,
        &format!("[project]\nname = \"x\"\n[image.web]\nfrom = \"{missing}\"\n"),
        p,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("image `web`")
            && err.contains(&missing)
            && err.contains("not in the image store"),
        "{err}"
    );

    let registry = format!(
        "[project]\nname = \"x\"\n[image.web]\nfrom = \"registry.example/shop/base@{missing}\"\n"
    );
    let err = build_spec(&store, &registry, p).unwrap_err().to_string();
    assert!(
        err.contains("pull it first with `kiln image pull registry.example/shop/base@"),
        "{err}"
    );

    let layout = "[project]\nname = \"x\"\n[image.web]\nfrom = \"oci-layout:nowhere\"\n";
    let err = build_spec(&store, layout, p).unwrap_err().to_string();
    assert!(
        err.contains("oci-layout:nowhere") && err.contains("index.json"),
        "{err}"
    );

    // A base of the same file that was not built first (only `build` alone).
    let s = spec("[project]\nname = \"x\"\n[image.web]\nfrom = \"base\"\n[image.base]\n");
    let req = BuildRequest {
        name: "web",
        image: &s.images["web"],
        context: p,
        source_date_epoch: 0,
        locals: &BTreeMap::new(),
    };
    let err = build(&store, &req).unwrap_err().to_string();
    assert!(err.contains("has not been built yet"), "{err}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn strict() -> bool {
    std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true")
}

/// Unpacks every layer of `image` into `dest` (a plain extraction: enough
/// for a scratch image with one layer).
fn unpack(store: &Store, image: &kiln_image::Image, dest: &Path) {
    for layer in image.layers() {
        let digest: Digest = layer.digest().to_string().parse().unwrap();
        let bytes = store.read_blob(&digest).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        archive.set_preserve_permissions(true);
        archive.unpack(dest).unwrap();
    }
}

/// The program under test: the workspace's `hello` when it was built,
/// `/bin/ls` otherwise (both dynamically linked against glibc), with
/// arguments that make it exit at once and the text that proves it ran
/// (in stdout or stderr: `hello` rejects the argument with its usage).
fn dynamic_binary() -> (PathBuf, Vec<&'static str>, &'static str) {
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/hello");
    match kiln_image::elf::read_elf(&hello) {
        Ok(Some(info)) if info.interp.is_some() => (hello, vec!["--no-such-flag"], "usage: hello"),
        _ => (PathBuf::from("/bin/ls"), vec!["-d", "/app"], "/app"),
    }
}

#[test]
fn a_dynamically_linked_binary_runs_from_scratch_with_its_closure() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (binary, args, expected) = dynamic_binary();
    fs::create_dir_all(p.join("bin")).unwrap();
    fs::copy(&binary, p.join("bin/prog")).unwrap();
    let text = r#"
[project]
name = "t"
[image.prog]
copy = [{ src = "bin/prog", dst = "/app/prog" }]
closure = true
entrypoint = ["/app/prog"]
"#;
    let store = open_store(p);
    let out = build_spec(&store, text, p).unwrap()["prog"].clone();
    let image = store.image("prog").unwrap();
    let files = layer_listing(&store, &image);
    assert_eq!(
        files.get("usr/lib/x86_64-linux-gnu/libc.so.6"),
        Some(&'-'),
        "{files:?}"
    );
    assert_eq!(
        files.get("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        Some(&'-'),
        "{files:?}"
    );
    assert_eq!(
        files.get("lib64/ld-linux-x86-64.so.2"),
        Some(&'l'),
        "{files:?}"
    );
    assert!(
        !files.contains_key("lib/"),
        "no /lib directory that would shadow a usr-merged base: {files:?}"
    );

    // The SBOM lists every file and names libc6 as the owner of libc.so.6.
    let doc = sbom::read_sbom(&store, &out.digest)
        .unwrap()
        .expect("the build wrote an SBOM");
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    assert_eq!(
        doc["documentNamespace"],
        format!("https://kiln.invalid/spdx/sha256/{}", out.digest.hex())
    );
    let names: Vec<&str> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fileName"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"./app/prog") && names.contains(&"./usr/lib/x86_64-linux-gnu/libc.so.6"),
        "{names:?}"
    );
    let libc6 = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "libc6")
        .expect("libc6 in the SBOM");
    assert!(
        libc6["externalRefs"][0]["referenceLocator"]
            .as_str()
            .unwrap()
            .starts_with("pkg:deb/debian/libc6@")
    );
    // Deterministic: regenerated, it is the same document.
    let closure = kiln_image::elf::Loader::host()
        .closure(
            &[(p.join("bin/prog"), "/app/prog".into())],
            &Default::default(),
        )
        .unwrap();
    let owners = sbom::closure_owners(&closure, Path::new("/var/lib/dpkg"));
    assert_eq!(sbom::sbom(&store, &image, &owners).unwrap(), doc);

    // It runs: unpack and chroot into it.
    if !is_root() {
        assert!(
            !strict(),
            "KILN_STRICT_TESTS=true but not root: cannot chroot"
        );
        eprintln!(
            "!!! SKIPPED the chroot run of the closure image: not root (set KILN_STRICT_TESTS=true to fail instead) !!!"
        );
        return;
    }
    let root = p.join("rootfs");
    fs::create_dir_all(&root).unwrap();
    unpack(&store, &image, &root);
    let run = Command::new("chroot")
        .arg(&root)
        .arg("/app/prog")
        .args(&args)
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    // A loader failure exits 127 with "No such file or directory" or
    // "error while loading shared libraries".
    assert!(
        output.contains(expected) && run.status.code() != Some(127),
        "{} in the chroot: {}\n{output}",
        binary.display(),
        run.status
    );

    // The control: the same binary without its closure does not start.
    let bare = text.replace("closure = true", "closure = false");
    build_spec(&store, &bare, p).unwrap();
    let bare_root = p.join("bare-rootfs");
    fs::create_dir_all(&bare_root).unwrap();
    unpack(&store, &store.image("prog").unwrap(), &bare_root);
    let run = Command::new("chroot")
        .arg(&bare_root)
        .arg("/app/prog")
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(127),
        "without the closure the loader is missing"
    );
}

#[test]
fn the_builder_hashes_nothing_on_a_no_op_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_project(p);
    // Make the inputs old enough to be remembered by the stat cache.
    for f in [
        "target/release/web",
        "static/index.html",
        "static/css/site.css",
        "web.toml",
    ] {
        let file = fs::File::options().write(true).open(p.join(f)).unwrap();
        file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1100)); // ctime must settle too
    let store = open_store(p);
    let s = spec(SPEC);
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store, &mut quiet);
    builder.build_all(&s, p, 0).unwrap();
    assert!(builder.files_hashed() > 0);
    builder.finish().unwrap();
    let mut quiet = Quiet;
    let mut builder = Builder::new(&store, &mut quiet);
    assert!(builder.build_all(&s, p, 0).unwrap()["web"].cached);
    assert_eq!(
        builder.files_hashed(),
        0,
        "a no-op rebuild reads no file content"
    );
}

#[test]
fn other_oci_tools_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_project(p);
    let store = open_store(p);
    build_spec(&store, SPEC, p).unwrap();
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for tool in ["umoci", "skopeo"] {
        if !have(tool) {
            assert!(
                !strict(),
                "KILN_STRICT_TESTS=true but {tool} is not installed"
            );
            eprintln!("!!! SKIPPED the {tool} check: {tool} is not installed !!!");
            continue;
        }
        let layout = format!("oci:{}:web", store.root().display());
        let out = if tool == "skopeo" {
            Command::new("skopeo")
                .args(["inspect", &layout])
                .output()
                .unwrap()
        } else {
            let bundle = p.join("bundle");
            Command::new("umoci")
                .args(["unpack", "--rootless", "--image"])
                .arg(format!("{}:web", store.root().display()))
                .arg(&bundle)
                .output()
                .unwrap()
        };
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tool == "umoci" {
            assert_eq!(
                fs::read(p.join("bundle/rootfs/etc/web/web.toml")).unwrap(),
                b"port = 1\n"
            );
            assert!(
                fs::symlink_metadata(p.join("bundle/rootfs/app/static/home.html"))
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
        }
    }
}
