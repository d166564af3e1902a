//! The image root as the local drivers see it: resolving a program and a
//! mount target *inside* the root (symlinks never lead out of it), and the
//! digest manifest that `verify` compares against.
//!
//! The manifest is recorded once per image (`<state_dir>/manifests/<hex>.json`)
//! the first time an instance of it is created, so tampering that happened
//! before that first create is not seen: the engine materialises and
//! verifies the root from the image store just before. `verify` rehashes the
//! whole root (sha256): the cost grows with the image (~1.6 GB/s here).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::RuntimeError;
use crate::types::{Drift, Mount};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves `path` (absolute, inside the root) to a host path under `root`,
/// following symlinks as if `root` were `/`. `None` when a component is
/// missing.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut resolved: Vec<String> = vec![];
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let host = join(root, &resolved).join(&c);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            let target = target.to_string_lossy();
            if target.starts_with('/') {
                resolved.clear();
            }
            for t in components(&target).into_iter().rev() {
                pending.push(t);
            }
        } else {
            resolved.push(c);
        }
    }
    Some(join(root, &resolved))
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// The program to execute: `(path inside the root, host path)`.
pub fn resolve_program(
    id: &str,
    root: &Path,
    argv: &[String],
    env: &BTreeMap<String, String>,
    workdir: &str,
) -> Result<(String, PathBuf), RuntimeError> {
    let program = argv.first().ok_or_else(|| RuntimeError::Setup {
        id: id.to_string(),
        what: "the command is empty".into(),
        hint: "set `command` in the service or `entrypoint` in the image".into(),
    })?;
    let candidates: Vec<String> = if program.contains('/') {
        if program.starts_with('/') {
            vec![program.clone()]
        } else {
            vec![format!("{}/{program}", workdir.trim_end_matches('/'))]
        }
    } else {
        let path = env.get("PATH").map(String::as_str).unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{d}/{program}"))
            .collect()
    };
    for inside in &candidates {
        let Some(host) = resolve_in_root(root, inside) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(&host) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(RuntimeError::NotExecutable {
                id: id.to_string(),
                program: inside.clone(),
            });
        }
        return Ok((inside.clone(), host));
    }
    Err(RuntimeError::MissingProgram {
        id: id.to_string(),
        program: program.clone(),
        rootfs: root.to_path_buf(),
    })
}

/// A mount target must be absolute, not `/`, without `.`/`..` components;
/// returns its components.
pub fn check_target(id: &str, target: &str) -> Result<Vec<String>, RuntimeError> {
    let bad = || RuntimeError::BadMount {
        id: id.to_string(),
        target: target.to_string(),
    };
    if !target.starts_with('/') {
        return Err(bad());
    }
    let parts = components(target);
    if parts.is_empty()
        || Path::new(target)
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(bad());
    }
    if parts.iter().any(|p| p == "." || p == "..") {
        return Err(bad());
    }
    Ok(parts)
}

/// Checks every mount's target and source. Returns them sorted parents
/// first, so that a file mounted inside a volume lands on the volume.
pub fn check_mounts(
    id: &str,
    mounts: &[&Mount],
) -> Result<Vec<(Mount, Vec<String>)>, RuntimeError> {
    let mut out = vec![];
    for m in mounts {
        let parts = check_target(id, &m.target)?;
        if !m.source.exists() {
            return Err(RuntimeError::Setup {
                id: id.to_string(),
                what: format!("mount source {} does not exist", m.source.display()),
                hint: "create the volume directory or the file first".into(),
            });
        }
        out.push(((*m).clone(), parts));
    }
    out.sort_by_key(|(_, p)| p.len());
    Ok(out)
}

/// What a file in the root is: kind, mode and content digest or link target.
pub type Manifest = BTreeMap<String, String>;

pub fn manifest(root: &Path) -> std::io::Result<Manifest> {
    let mut out = Manifest::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Manifest) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let rel = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
        let mode = meta.mode() & 0o7777;
        let ft = meta.file_type();
        let desc = if ft.is_symlink() {
            format!("link {}", std::fs::read_link(&path)?.display())
        } else if ft.is_dir() {
            walk(root, &path, out)?;
            format!("dir {mode:o}")
        } else if ft.is_file() {
            let mut hasher = Sha256::new();
            let mut f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            format!("file {mode:o} sha256:{}", hex::encode(hasher.finalize()))
        } else {
            format!("special {mode:o}")
        };
        out.insert(rel, desc);
    }
    Ok(())
}

/// The manifest recorded for `digest`, recording it from `root` if missing.
pub fn recorded_manifest(state_dir: &Path, digest: &str, root: &Path) -> std::io::Result<Manifest> {
    let name: String = digest
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = state_dir.join("manifests");
    let path = dir.join(format!("{name}.json"));
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(m) = serde_json::from_slice(&bytes)
    {
        return Ok(m);
    }
    let m = manifest(root)?;
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(&m).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(m)
}

/// Differences between the recorded manifest and the root now.
pub fn diff(recorded: &Manifest, now: &Manifest) -> Vec<Drift> {
    let mut out = vec![];
    for (path, was) in recorded {
        match now.get(path) {
            None => out.push(Drift::RootChanged {
                path: path.clone(),
                change: "removed".into(),
            }),
            Some(is) if is != was => out.push(Drift::RootChanged {
                path: path.clone(),
                change: format!("changed: was {was}, is {is}"),
            }),
            Some(_) => {}
        }
    }
    for path in now.keys().filter(|p| !recorded.contains_key(*p)) {
        out.push(Drift::RootChanged {
            path: path.clone(),
            change: "added".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/busybox"), "x").unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("up")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/bin/sh"),
            Some(root.join("bin/busybox"))
        );
        // `..` stops at the root: the host's /etc is never reached.
        assert_eq!(resolve_in_root(root, "/up"), None);
    }

    #[test]
    fn targets_must_stay_inside() {
        for bad in ["relative", "/", "/a/../..", "/a/./b", ""] {
            assert!(check_target("i", bad).is_err(), "{bad}");
        }
        assert_eq!(check_target("i", "/data/x").unwrap(), vec!["data", "x"]);
    }
}
