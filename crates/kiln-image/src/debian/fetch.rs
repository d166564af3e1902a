//! The private apt state and the content-addressed .deb cache.
//!
//! Layout under the cache directory the caller gives (normally
//! `<store>/kiln/debian`):
//!
//! | path | what |
//! |---|---|
//! | `etc/` | copies of the machine's `sources.list` and `sources.list.d/`; `apt.conf` turns the host's update hooks off |
//! | `state/lists/` | apt's lists, downloaded by `apt-get update` (uncompressed) |
//! | `state/status` | an empty dpkg status: nothing counts as installed |
//! | `cache/` | apt's own cache |
//! | `keys/` | dearmored keys for `gpgv` |
//! | `debs/<sha256>.deb` | verified packages, named by their digest |
//!
//! apt runs as the calling user with every `Dir::` option pointing here, so
//! neither root nor the host's apt state is involved. Only resolving touches
//! the network and apt: fetching a package the lock names needs just the
//! source URIs, and a cached package needs nothing but its digest.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::control;
use super::lock::LockedPackage;
use super::release::{self, Source};
use super::resolve::Index;
use crate::error::ImageError;

/// The private apt state (see the module docs).
#[derive(Debug)]
pub struct Apt {
    dir: PathBuf,
    etc: PathBuf,
    arch: String,
    sources: Vec<Source>,
    index: Option<Index>,
    updated: bool,
}

/// dpkg's name for the architecture kiln was built for.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { op, path, source }
}

impl Apt {
    /// The state under `cache_dir`, with the machine's apt sources
    /// (`/etc/apt`). Reads configuration only: no network, no apt.
    pub fn open(cache_dir: &Path) -> Result<Apt, ImageError> {
        Apt::open_with(cache_dir, Path::new("/etc/apt"))
    }

    /// [`Apt::open`] with the apt configuration read from `etc` instead.
    pub fn open_with(cache_dir: &Path, etc: &Path) -> Result<Apt, ImageError> {
        for sub in [
            "etc/sources.list.d",
            "state/lists/partial",
            "cache/archives/partial",
            "keys",
            "debs/tmp",
        ] {
            let d = cache_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io("create directory", &d))?;
        }
        // The host's update hooks (cache cleaners, appstream, packagekit)
        // act on the host's apt state, not on this one: they do not run here.
        let conf = cache_dir.join("etc/apt.conf");
        if !conf.exists() {
            let hooks = "#clear APT::Update::Pre-Invoke;\n#clear APT::Update::Post-Invoke;\n#clear APT::Update::Post-Invoke-Success;\n";
            std::fs::write(&conf, hooks).map_err(io("write", &conf))?;
        }
        let status = cache_dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, b"").map_err(io("write", &status))?;
        }
        let sources = release::read_sources(etc, &cache_dir.join("keys"))?;
        Ok(Apt {
            dir: cache_dir.to_path_buf(),
            etc: etc.to_path_buf(),
            arch: host_arch().to_string(),
            sources,
            index: None,
            updated: false,
        })
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn lists_dir(&self) -> PathBuf {
        self.dir.join("state/lists")
    }

    pub fn debs_dir(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// Where a package lives once fetched and verified.
    pub fn deb_path(&self, pkg: &LockedPackage) -> PathBuf {
        self.debs_dir().join(format!("{}.deb", pkg.sha256))
    }

    fn apt_options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut o = vec![
            format!("Dir::State={}", d("state")),
            format!("Dir::State::Lists={}", d("state/lists")),
            format!("Dir::State::status={}", d("state/status")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::Cache::archives={}", d("cache/archives")),
            format!("Dir::Etc::SourceList={}", d("etc/sources.list")),
            format!("Dir::Etc::SourceParts={}", d("etc/sources.list.d")),
            // kiln reads and hashes the lists itself: keep them plain.
            "Acquire::GzipIndexes=false".into(),
            "Acquire::Languages=none".into(),
            format!("APT::Architecture={}", self.arch),
        ];
        if is_root() {
            // apt would drop to `_apt`, who cannot write the caller's dir.
            o.push("APT::Sandbox::User=root".into());
        }
        let mut args = vec!["-c".to_string(), d("etc/apt.conf")];
        args.extend(o.into_iter().flat_map(|o| ["-o".to_string(), o]));
        args
    }

    /// Copies the machine's sources into the private state and runs
    /// `apt-get update` there, then verifies and loads the lists.
    pub fn update(&mut self) -> Result<(), ImageError> {
        let etc = self.dir.join("etc");
        let parts = etc.join("sources.list.d");
        let _ = std::fs::remove_dir_all(&parts);
        std::fs::create_dir_all(&parts).map_err(io("create directory", &parts))?;
        let _ = std::fs::remove_file(etc.join("sources.list"));
        for file in release::source_files(&self.etc) {
            let dst = if file.parent() == Some(self.etc.as_path()) {
                etc.join("sources.list")
            } else {
                parts.join(file.file_name().unwrap_or_default())
            };
            std::fs::copy(&file, &dst).map_err(io("copy apt source file", &file))?;
        }
        self.sources = release::read_sources(&self.etc, &self.dir.join("keys"))?;
        let mut cmd = Command::new("apt-get");
        cmd.arg("update").arg("-q").args(self.apt_options());
        let shown = format!(
            "apt-get update -o Dir::State={}/state …",
            self.dir.display()
        );
        let out = cmd.output().map_err(|e| ImageError::DebianApt {
            command: shown.clone(),
            why: format!("cannot run apt-get: {e}"),
            hint: "kiln needs apt-get (Debian or Ubuntu) to resolve Debian packages".into(),
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // apt-get update exits 0 even when a source failed (it prints `W:`/`E:`).
        let failed: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W: Failed to fetch"))
            .collect();
        if !out.status.success() || !failed.is_empty() {
            return Err(ImageError::DebianApt {
                command: shown,
                why: if failed.is_empty() {
                    format!("{}: {}", out.status, stderr.trim())
                } else {
                    failed.join("; ")
                },
                hint: "check the network and the apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/); `apt-get update` shows the same problem".into(),
            });
        }
        self.updated = true;
        self.index = None;
        self.load()?;
        Ok(())
    }

    /// Verifies the lists already in the state (signature of each
    /// `InRelease`, digest of each `Packages`) and loads them. No network.
    pub fn load(&mut self) -> Result<&Index, ImageError> {
        let lists = self.lists_dir();
        let mut index = Index::new(&self.arch);
        let scratch = self.dir.join("keys");
        for source in &self.sources {
            let inrelease = source.inrelease_path(&lists);
            if !inrelease.is_file() {
                return Err(ImageError::DebianMetadata {
                    path: inrelease,
                    why: format!(
                        "missing: the lists of `{} {}` ({}) were never downloaded",
                        source.uri,
                        source.suite,
                        source.origin.display()
                    ),
                    hint: "run `kiln lock --update` to download the package lists".into(),
                });
            }
            let digests = release::verify_inrelease(&inrelease, &source.keyrings, &scratch)?;
            for component in &source.components {
                for arch in [self.arch.as_str(), "all"] {
                    let key = Source::packages_key(component, arch);
                    let path = source.packages_path(&lists, component, arch);
                    // binary-all is only fetched by apt when the archive
                    // does not fold `all` into each architecture; an index
                    // the signed Release does not list (a component without
                    // this architecture) does not exist to be fetched.
                    if !path.is_file() && (arch == "all" || !digests.contains_key(&key)) {
                        continue;
                    }
                    release::check_index(&path, &key, &digests, &inrelease)?;
                    let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
                    let entries = control::parse_packages(&text).map_err(|e| {
                        ImageError::DebianMetadata {
                            path: path.clone(),
                            why: e.to_string(),
                            hint: "the signed index does not parse; report it to the repository's maintainers".into(),
                        }
                    })?;
                    index.add(entries).map_err(|why| ImageError::DebianMetadata {
                        path: path.clone(),
                        why,
                        hint: "the signed index does not parse; report it to the repository's maintainers".into(),
                    })?;
                }
            }
        }
        Ok(self.index.insert(index))
    }

    /// The dependency closure of `roots` for `image`, sorted by name. The
    /// lists are refreshed once per `Apt` (resolving from stale lists would
    /// pin versions the archive may already have dropped).
    pub fn resolve(
        &mut self,
        image: &str,
        roots: &[String],
    ) -> Result<Vec<LockedPackage>, ImageError> {
        if !self.updated {
            self.update()?;
        }
        let index = match &self.index {
            Some(index) => index,
            None => self.load()?,
        };
        Ok(index
            .resolve(image, roots)?
            .into_iter()
            .map(|e| LockedPackage {
                name: e.name.clone(),
                version: e.version.clone(),
                arch: e.arch.clone(),
                sha256: e.sha256.clone(),
                size: e.size,
                filename: e.filename.clone(),
            })
            .collect())
    }

    /// Resolves from the lists already present (verified), without
    /// `apt-get update`: for tests and offline use.
    pub fn resolve_offline(
        &mut self,
        image: &str,
        roots: &[String],
    ) -> Result<Vec<LockedPackage>, ImageError> {
        self.updated = true;
        self.resolve(image, roots)
    }

    /// The verified .deb of `pkg` in the content-addressed cache, fetched
    /// first if absent. A cached file is hashed on every call; one that does
    /// not match is refused ([`ImageError::DebianTampered`]).
    pub fn fetch(&self, pkg: &LockedPackage) -> Result<PathBuf, ImageError> {
        let path = self.deb_path(pkg);
        if path.exists() {
            verify_deb(&path, pkg)?;
            return Ok(path);
        }
        if !control::is_sha256(&pkg.sha256) || !control::is_pool_path(&pkg.filename) {
            return Err(ImageError::Invalid(format!(
                "package {} {}: sha256 `{}` or filename `{}` is malformed",
                pkg.name, pkg.version, pkg.sha256, pkg.filename
            )));
        }
        let tmp_dir = self.debs_dir().join("tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(io("create directory", &tmp_dir))?;
        let tmp = tmp_dir.join(format!("{}.{}.partial", pkg.sha256, release::unique()));
        let mut uris: Vec<&str> = self
            .sources
            .iter()
            .map(|s| s.uri.trim_end_matches('/'))
            .collect();
        uris.dedup();
        let mut errors = Vec::new();
        for uri in &uris {
            let _ = std::fs::remove_file(&tmp);
            let url = format!("{uri}/{}", pkg.filename);
            let out = Command::new("/usr/lib/apt/apt-helper")
                .args(self.apt_options())
                .arg("download-file")
                .arg(&url)
                .arg(&tmp)
                .arg(format!("SHA256:{}", pkg.sha256))
                .output();
            match out {
                Ok(o) if o.status.success() && tmp.is_file() => {
                    // apt-helper checked the hash too; kiln does not rely on it.
                    if let Err(e) = verify_deb(&tmp, pkg) {
                        let _ = std::fs::remove_file(&tmp);
                        errors.push(format!("{url}: {e}"));
                        continue;
                    }
                    std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
                    return Ok(path);
                }
                Ok(o) => {
                    let stderr = String::from_utf8_lossy(&o.stderr);
                    errors.push(format!(
                        "{url}: {}",
                        stderr
                            .lines()
                            .rfind(|l| !l.trim().is_empty())
                            .unwrap_or("failed")
                            .trim()
                    ));
                }
                Err(e) => errors.push(format!("cannot run /usr/lib/apt/apt-helper: {e}")),
            }
        }
        let _ = std::fs::remove_file(&tmp);
        Err(ImageError::DebianFetch {
            package: format!("{} {}", pkg.name, pkg.version),
            filename: pkg.filename.clone(),
            why: if errors.is_empty() {
                "no apt source is configured".into()
            } else {
                errors.join("; ")
            },
        })
    }
}

/// Refuses `path` unless its size and SHA256 are `pkg`'s.
pub fn verify_deb(path: &Path, pkg: &LockedPackage) -> Result<(), ImageError> {
    let meta = std::fs::metadata(path).map_err(io("stat", path))?;
    let tampered = |why: String| ImageError::DebianTampered {
        path: path.to_path_buf(),
        package: format!("{} {}", pkg.name, pkg.version),
        expected: format!("sha256 {}, {} bytes", pkg.sha256, pkg.size),
        why,
    };
    if meta.len() != pkg.size {
        return Err(tampered(format!("its size is {} bytes", meta.len())));
    }
    let (sha, _) = release::hash_file(path)?;
    if sha != pkg.sha256 {
        return Err(tampered(format!("its sha256 is {sha}")));
    }
    Ok(())
}

fn is_root() -> bool {
    // No libc dependency for one call: the effective uid of this process.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
