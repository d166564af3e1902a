//! The machine's apt sources, and the signed `InRelease` files that vouch
//! for their `Packages` indexes.
//!
//! kiln does not take apt's word that the lists it downloaded are genuine:
//! each `InRelease` is checked with `gpgv` against the keyring its source
//! names (`Signed-By`, else apt's trusted keyrings), only the signed text is
//! read, and every `Packages` index kiln parses must hash to the SHA256 that
//! text gives for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ct_codecs::{Base64, Decoder};

use super::control;
use crate::digest::HashingReader;
use crate::error::ImageError;

/// One `deb` line (or one URI × suite of a deb822 `.sources` paragraph).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
    /// Keyrings the `InRelease` must be signed by (binary or armored).
    pub keyrings: Vec<PathBuf>,
    /// The configuration file it came from, for messages.
    pub origin: PathBuf,
}

impl Source {
    /// apt's file name prefix for this source's files in `lists/`
    /// (`URItoFileName` of `URI/dists/SUITE/`).
    pub fn list_prefix(&self) -> String {
        let uri = self.uri.trim_end_matches('/');
        let uri = uri.split_once("://").map_or(uri, |(_, rest)| rest);
        // user:password@host: apt drops the credentials.
        let uri = match uri.split_once('/') {
            Some((host, path)) => match host.rsplit_once('@') {
                Some((_, h)) => format!("{h}/{path}"),
                None => uri.to_string(),
            },
            None => uri.rsplit_once('@').map_or(uri, |(_, h)| h).to_string(),
        };
        let mut quoted = String::new();
        for c in format!("{uri}/dists/{}", self.suite).chars() {
            if "\\|{}[]<>\"^~_=!@#$%^&*".contains(c) || c == ' ' {
                quoted.push_str(&format!("%{:02x}", c as u32));
            } else {
                quoted.push(c);
            }
        }
        quoted.replace('/', "_")
    }

    pub fn inrelease_path(&self, lists: &Path) -> PathBuf {
        lists.join(format!("{}_InRelease", self.list_prefix()))
    }

    /// `COMPONENT/binary-ARCH/Packages`: the key in `InRelease`.
    pub fn packages_key(component: &str, arch: &str) -> String {
        format!("{component}/binary-{arch}/Packages")
    }

    pub fn packages_path(&self, lists: &Path, component: &str, arch: &str) -> PathBuf {
        lists.join(format!(
            "{}_{}",
            self.list_prefix(),
            Source::packages_key(component, arch).replace('/', "_")
        ))
    }
}

/// apt's keyrings for sources without `Signed-By`.
fn default_keyrings(etc: &Path) -> Vec<PathBuf> {
    let mut keys = Vec::new();
    if etc.join("trusted.gpg").is_file() {
        keys.push(etc.join("trusted.gpg"));
    }
    keys.extend(sorted_files(&etc.join("trusted.gpg.d"), &["gpg", "asc"]));
    keys
}

fn sorted_files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    files.sort();
    files
}

/// The files apt reads its sources from, in apt's order: `sources.list`,
/// then `sources.list.d/*.list` and `*.sources` by name.
pub fn source_files(etc: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if etc.join("sources.list").is_file() {
        files.push(etc.join("sources.list"));
    }
    files.extend(sorted_files(
        &etc.join("sources.list.d"),
        &["list", "sources"],
    ));
    files
}

/// Every enabled binary (`deb`) source of the apt configuration in `etc`
/// (normally `/etc/apt`). Inline `Signed-By` keys are written to `keys`.
pub fn read_sources(etc: &Path, keys: &Path) -> Result<Vec<Source>, ImageError> {
    let mut out = Vec::new();
    for file in source_files(etc) {
        let text = std::fs::read_to_string(&file).map_err(|source| ImageError::Io {
            op: "read apt source file",
            path: file.clone(),
            source,
        })?;
        let bad = |line: usize, why: String| ImageError::DebianMetadata {
            path: file.clone(),
            why: format!("line {line}: {why}"),
            hint: "fix the apt source file (`apt-get update` reports the same problem)".into(),
        };
        if file.extension().is_some_and(|e| e == "sources") {
            let stanzas = control::parse(&text).map_err(|e| bad(e.line, e.why))?;
            for s in stanzas {
                if s.get("Enabled")
                    .is_some_and(|v| v.eq_ignore_ascii_case("no"))
                    || !s
                        .get("Types")
                        .unwrap_or("")
                        .split_whitespace()
                        .any(|t| t == "deb")
                {
                    continue;
                }
                let keyrings = match s.get("Signed-By") {
                    None => default_keyrings(etc),
                    Some(v) if v.contains("BEGIN PGP") => {
                        let key = dearmor(v).map_err(|why| bad(s.line, why))?;
                        let path = keys.join(format!(
                            "inline-{}.gpg",
                            crate::digest::Digest::of(&key).hex()
                        ));
                        write_atomic(&path, &key)?;
                        vec![path]
                    }
                    Some(v) => v.split_whitespace().map(PathBuf::from).collect(),
                };
                let components: Vec<String> = s
                    .get("Components")
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                for uri in s.get("URIs").unwrap_or("").split_whitespace() {
                    for suite in s.get("Suites").unwrap_or("").split_whitespace() {
                        if suite.ends_with('/') {
                            return Err(bad(
                                s.line,
                                format!("flat repository `{uri} {suite}` is not supported by kiln"),
                            ));
                        }
                        out.push(Source {
                            uri: uri.to_string(),
                            suite: suite.to_string(),
                            components: components.clone(),
                            keyrings: keyrings.clone(),
                            origin: file.clone(),
                        });
                    }
                }
            }
        } else {
            for (i, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                let mut words = line.split_whitespace();
                if words.next() != Some("deb") {
                    continue;
                }
                let mut rest: Vec<&str> = words.collect();
                let mut keyrings = None;
                if rest.first().is_some_and(|w| w.starts_with('[')) {
                    let end = rest
                        .iter()
                        .position(|w| w.ends_with(']'))
                        .ok_or_else(|| bad(i + 1, "`[` options without `]`".into()))?;
                    let options = rest[..=end].join(" ");
                    for opt in options
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .split_whitespace()
                    {
                        if let Some(v) = opt.strip_prefix("signed-by=") {
                            keyrings = Some(v.split(',').map(PathBuf::from).collect());
                        }
                    }
                    rest.drain(..=end);
                }
                let [uri, suite, components @ ..] = rest.as_slice() else {
                    return Err(bad(i + 1, "expected `deb URI SUITE COMPONENT…`".into()));
                };
                out.push(Source {
                    uri: uri.to_string(),
                    suite: suite.to_string(),
                    components: components.iter().map(|c| c.to_string()).collect(),
                    keyrings: keyrings.unwrap_or_else(|| default_keyrings(etc)),
                    origin: file.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// `PID.N`: a name no other writer (process or thread) uses at the same
/// time, for temporary files.
pub(crate) fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{n}", std::process::id())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| ImageError::Io {
            op,
            path: p,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", unique()));
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

/// The binary key material of an ASCII-armored OpenPGP block (or several):
/// `gpgv` only reads binary keyrings.
pub fn dearmor(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    let mut blocks = 0;
    while let Some(line) = lines.next() {
        if !line.starts_with("-----BEGIN PGP") {
            continue;
        }
        // Armor headers end at the first empty line (`.` in deb822 fields).
        let mut body = String::new();
        let mut in_headers = true;
        for line in lines.by_ref() {
            if line.starts_with("-----END PGP") {
                break;
            }
            if in_headers {
                if line.is_empty() || line == "." {
                    in_headers = false;
                } else if !line.contains(':') {
                    in_headers = false;
                    body.push_str(line);
                }
                continue;
            }
            if line.starts_with('=') {
                continue; // the CRC24 line; gpgv checks the signatures
            }
            body.push_str(line);
        }
        out.extend(
            Base64::decode_to_vec(body.as_bytes(), None)
                .map_err(|_| "the armored key block is not valid base64".to_string())?,
        );
        blocks += 1;
    }
    if blocks == 0 {
        return Err("no `-----BEGIN PGP` block".into());
    }
    Ok(out)
}

/// The digests an `InRelease` vouches for: its `SHA256` section, path →
/// (sha256, size).
pub type ReleaseDigests = BTreeMap<String, (String, u64)>;

/// Checks `inrelease` with `gpgv` against `keyrings` and returns the
/// digests its signed text lists. `scratch` holds dearmored keys and the
/// signed text.
pub fn verify_inrelease(
    inrelease: &Path,
    keyrings: &[PathBuf],
    scratch: &Path,
) -> Result<ReleaseDigests, ImageError> {
    let refuse = |why: String, hint: &str| ImageError::DebianMetadata {
        path: inrelease.to_path_buf(),
        why,
        hint: hint.to_string(),
    };
    std::fs::create_dir_all(scratch).map_err(|source| ImageError::Io {
        op: "create directory",
        path: scratch.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new("gpgv");
    cmd.arg("--homedir").arg(scratch);
    let mut usable = 0;
    for key in keyrings {
        let Ok(bytes) = std::fs::read(key) else {
            continue; // apt also tolerates a listed keyring that is absent
        };
        let binary = if bytes.starts_with(b"-----BEGIN") {
            let text = String::from_utf8_lossy(&bytes);
            let Ok(key_bytes) = dearmor(&text) else {
                continue;
            };
            let path = scratch.join(format!("{}.gpg", crate::digest::Digest::of(&bytes).hex()));
            write_atomic(&path, &key_bytes)?;
            path
        } else {
            key.clone()
        };
        cmd.arg("--keyring").arg(binary);
        usable += 1;
    }
    if usable == 0 {
        return Err(refuse(
            format!(
                "none of its keyrings can be read ({})",
                keyrings
                    .iter()
                    .map(|k| k.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "install the archive keyring (`debian-archive-keyring`) or fix `Signed-By` in the apt source",
        ));
    }
    let signed = scratch.join(format!("signed.{}", unique()));
    let _ = std::fs::remove_file(&signed);
    let out = cmd
        .arg("--output")
        .arg(&signed)
        .arg(inrelease)
        .output()
        .map_err(|e| {
            refuse(
                format!("cannot run gpgv: {e}"),
                "install gpgv (`apt-get install gpgv`)",
            )
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&signed);
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(refuse(
            format!(
                "its OpenPGP signature does not verify with {}: {}",
                keyrings
                    .iter()
                    .map(|k| k.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                stderr.trim().lines().last().unwrap_or("gpgv failed")
            ),
            "the file was altered or signed by an untrusted key; run `kiln lock --update` to download the lists again, and check the source's Signed-By",
        ));
    }
    let text = std::fs::read(&signed).map_err(|source| ImageError::Io {
        op: "read the signed text of",
        path: signed.clone(),
        source,
    });
    let _ = std::fs::remove_file(&signed);
    let text = String::from_utf8(text?).map_err(|_| {
        refuse(
            "its signed text is not UTF-8".into(),
            "run `kiln lock --update`",
        )
    })?;
    release_digests(&text).map_err(|why| refuse(why, "run `kiln lock --update`"))
}

/// The `SHA256` section of a Release text.
pub fn release_digests(text: &str) -> Result<ReleaseDigests, String> {
    let stanzas = control::parse(text).map_err(|e| e.to_string())?;
    let section = stanzas
        .first()
        .and_then(|s| s.get("SHA256"))
        .ok_or("it has no SHA256 section")?;
    let mut out = BTreeMap::new();
    for line in section.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut words = line.split_whitespace();
        let (Some(hash), Some(size), Some(path), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(format!("bad SHA256 line `{line}`"));
        };
        let size = size
            .parse::<u64>()
            .map_err(|_| format!("bad size in SHA256 line `{line}`"))?;
        if !control::is_sha256(hash) {
            return Err(format!("bad digest in SHA256 line `{line}`"));
        }
        out.insert(path.to_string(), (hash.to_string(), size));
    }
    Ok(out)
}

/// Hex sha256 and size of a file.
pub fn hash_file(path: &Path) -> Result<(String, u64), ImageError> {
    let file = std::fs::File::open(path).map_err(|source| ImageError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = HashingReader::new(std::io::BufReader::new(file));
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|source| ImageError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let (digest, size) = reader.finish();
    Ok((digest.hex().to_string(), size))
}

/// Refuses `path` unless it is exactly what `InRelease` lists under `key`.
pub fn check_index(
    path: &Path,
    key: &str,
    digests: &ReleaseDigests,
    inrelease: &Path,
) -> Result<(), ImageError> {
    let Some((want, want_size)) = digests.get(key) else {
        return Err(ImageError::DebianMetadata {
            path: path.to_path_buf(),
            why: format!("{} does not list `{key}`", inrelease.display()),
            hint: "run `kiln lock --update` to download the lists again".into(),
        });
    };
    let (have, size) = hash_file(path)?;
    if &have != want || size != *want_size {
        return Err(ImageError::DebianMetadata {
            path: path.to_path_buf(),
            why: format!(
                "sha256 {have} ({size} bytes) does not match the signed {} ({want}, {want_size} bytes)",
                inrelease.display()
            ),
            hint: "the index was altered or is out of date; run `kiln lock --update` to download the lists again".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_prefixes_match_apt() {
        let s = |uri: &str, suite: &str| Source {
            uri: uri.into(),
            suite: suite.into(),
            components: vec!["main".into()],
            keyrings: vec![],
            origin: PathBuf::new(),
        };
        assert_eq!(
            s("http://deb.debian.org/debian", "bookworm").list_prefix(),
            "deb.debian.org_debian_dists_bookworm"
        );
        assert_eq!(
            s(
                "http://deb.debian.org/debian-security/",
                "bookworm-security"
            )
            .list_prefix(),
            "deb.debian.org_debian-security_dists_bookworm-security"
        );
        assert_eq!(
            s("https://u:p@example.org:8080/a_b", "x").list_prefix(),
            "example.org:8080_a%5fb_dists_x"
        );
        assert_eq!(
            s("http://deb.debian.org/debian", "bookworm").packages_path(
                Path::new("/l"),
                "main",
                "amd64"
            ),
            Path::new("/l/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages")
        );
    }

    #[test]
    fn sources_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path();
        std::fs::create_dir_all(etc.join("sources.list.d")).unwrap();
        std::fs::write(
            etc.join("sources.list"),
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main contrib\ndeb-src http://a.example/debian bookworm main\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("sources.list.d/debian.sources"),
            "Types: deb deb-src\nURIs: http://b.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nEnabled: no\nURIs: http://c.example\nSuites: x\nComponents: main\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("sources.list.d/off.list.disabled"),
            "deb http://d/ x y\n",
        )
        .unwrap();
        let sources = read_sources(etc, &etc.join("keys")).unwrap();
        let got: Vec<(&str, &str, usize)> = sources
            .iter()
            .map(|s| (s.uri.as_str(), s.suite.as_str(), s.components.len()))
            .collect();
        assert_eq!(
            got,
            [
                ("http://a.example/debian", "bookworm", 2),
                ("http://b.example/debian", "bookworm", 1),
                ("http://b.example/debian", "bookworm-updates", 1)
            ]
        );
        assert_eq!(sources[0].keyrings, [PathBuf::from("/k.gpg")]);
    }

    #[test]
    fn release_sha256_section() {
        let text = "Origin: Debian\nSHA256:\n e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855        0 main/binary-amd64/Packages\n e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855       20 main/binary-amd64/Packages.gz\n";
        let d = release_digests(text).unwrap();
        assert_eq!(d["main/binary-amd64/Packages"].1, 0);
        assert_eq!(d.len(), 2);
        assert!(release_digests("Origin: x\n").is_err());
        assert!(release_digests("SHA256:\n zz 0 x\n").is_err());
    }

    #[test]
    fn dearmor_decodes_the_body() {
        let armored = "-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: x\n\naGVsbG8g\nd29ybGQ=\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(dearmor(armored).unwrap(), b"hello world");
        assert!(dearmor("nothing").is_err());
    }
}
