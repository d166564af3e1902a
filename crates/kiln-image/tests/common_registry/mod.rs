//! Shared by the registry and signing tests: a tiny deterministic image
//! (its own tar + gzip, independent of the builder), Debian's
//! docker-registry started on a free port, and the rule for missing tools.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use kiln_image::store::manifest_descriptor;
use kiln_image::{Digest, Image, Store};

/// Finds `tool` on this machine. Missing: a failure under
/// `KILN_STRICT_TESTS=true` (CI), else a loud skip (`None`).
pub fn require_tool(tool: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file());
    if found.is_none() {
        let message = format!(
            "`{tool}` is not installed (Debian package `{package}`; scripts/test installs it)"
        );
        if std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        // Straight to stderr: libtest captures `eprintln!` of passing tests,
        // and a skip must not go unseen.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n"
        );
    }
    found
}

fn tar_gz(files: &[(&str, &[u8])]) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        tar.append(&header, *content).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = Digest::of(&tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// Stores a two-layer image whose content depends only on `text`, names it
/// `name`, and returns it.
pub fn test_image(store: &Store, name: &str, text: &str) -> Image {
    let (base, base_diff) = tar_gz(&[("etc/os-release", b"ID=kiln-test\n")]);
    let (app, app_diff) = tar_gz(&[("app/hello.txt", text.as_bytes())]);
    let base_digest = store.put_blob(&base).unwrap();
    let app_digest = store.put_blob(&app).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": ["/app/hello"] },
        "rootfs": { "type": "layers", "diff_ids": [base_diff.to_string(), app_diff.to_string()] },
    }))
    .unwrap();
    let config_digest = store.put_blob(&config).unwrap();
    let layer = |d: &Digest, size: usize| serde_json::json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": size });
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len() },
        "layers": [layer(&base_digest, base.len()), layer(&app_digest, app.len())],
    }))
    .unwrap();
    let digest = store.put_blob(&manifest).unwrap();
    store
        .tag(name, &manifest_descriptor(&digest, manifest.len() as u64))
        .unwrap();
    store.load_image(&digest).unwrap()
}

/// Debian's docker-registry on 127.0.0.1, stopped on drop.
pub struct Registry {
    child: Child,
    pub host: String,
    pub dir: tempfile::TempDir,
}

/// A bcrypt hash of `s3cret` for user `kiln` (htpasswd format).
pub const HTPASSWD: &str = "kiln:$2b$04$QUYZqDCtq/me20O5qsrRHeXl4CZWSQOYxwiYKnMyusiPREF3J05mq\n";
pub const USER: &str = "kiln";
pub const PASSWORD: &str = "s3cret";

impl Registry {
    /// Starts a registry, or `None` (after a loud skip) without the binary.
    pub fn start() -> Option<Registry> {
        Registry::start_with(false)
    }

    /// The same, requiring Basic authentication (`USER` / `PASSWORD`).
    pub fn start_with_auth() -> Option<Registry> {
        Registry::start_with(true)
    }

    fn start_with(auth: bool) -> Option<Registry> {
        let binary = require_tool("docker-registry", "docker-registry")?;
        let mut dir = tempfile::tempdir().unwrap();
        let mut auth_config = String::new();
        if auth {
            fs::write(dir.path().join("htpasswd"), HTPASSWD).unwrap();
            auth_config = format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        // The port is free when asked; another process may take it before
        // the registry binds it, so a start that dies early is retried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_config}",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut registry = Registry {
                child,
                host: format!("127.0.0.1:{port}"),
                dir,
            };
            if registry.wait_ready(Duration::from_secs(20)) {
                return Some(registry);
            }
            dir = registry.take_dir();
        }
        panic!("docker-registry did not start; see its log above");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Polls `GET /v2/` until it answers (200, or 401 with auth), the
    /// process exits, or the deadline passes.
    fn wait_ready(&mut self, deadline: Duration) -> bool {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let url = format!("http://{}/v2/", self.host);
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!(
                    "docker-registry exited with {status}:\n{}",
                    fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
                );
                return false;
            }
            if let Ok(response) = agent.get(&url).call()
                && (response.status() == 200 || response.status() == 401)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        eprintln!(
            "docker-registry did not answer within {deadline:?}:\n{}",
            fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        );
        false
    }

    /// A reference into this registry, e.g. `r.reference("web:v1")`.
    pub fn reference(&self, rest: &str) -> kiln_image::registry::Reference {
        format!("{}/{rest}", self.host).parse().unwrap()
    }

    /// Where the registry keeps blob `digest` on disk (to tamper with it).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&digest.hex()[..2])
            .join(digest.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flips one byte of a file in place (same length: only the content lies).
pub fn flip_byte(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

/// Every blob of `image` reads back verified from `store`.
pub fn assert_all_blobs_verify(store: &Store, image: &Image) {
    for digest in image.blobs().unwrap() {
        store
            .read_blob(&digest)
            .unwrap_or_else(|e| panic!("blob {digest}: {e}"));
    }
}
