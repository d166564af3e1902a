//! Checks of an instance config against its image root, before anything is
//! created: a bad config fails with an error naming the instance and the
//! cause, and leaves nothing behind. Shared by the `oci` and `docker`
//! drivers (both are given the image's unpacked root).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::RuntimeError;
use crate::types::InstanceConfig;

/// Below this, neither runc's init nor Docker (6 MB minimum) starts.
pub const MIN_MEMORY_BYTES: u64 = 8 << 20;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the `oci` driver mounts tmpfs; a mount point under them needs no
/// directory in the image.
const TMPFS: [&str; 3] = ["/tmp", "/run", "/dev"];

/// Checks the id, the mounts, the program and the limits. `mount_points`:
/// also require every mount point below a top-level directory to exist in
/// the image (the `oci` driver must not create them in the shared root).
pub fn check(config: &InstanceConfig, mount_points: bool) -> Result<(), RuntimeError> {
    let id = config.id.as_str();
    let setup = |what: String, hint: &str| RuntimeError::Setup {
        id: id.into(),
        what,
        hint: hint.into(),
    };
    let valid_id = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if !valid_id {
        return Err(setup(
            format!("invalid instance id {id:?}"),
            "use letters, digits, `-`, `_` and `.`",
        ));
    }
    let root = &config.image.rootfs;
    if !root.is_dir() {
        return Err(setup(
            format!("image root {} does not exist", root.display()),
            "the image must be unpacked before an instance is created",
        ));
    }
    for m in config.volumes.iter().chain(&config.files) {
        if !clean_absolute(&m.target) {
            return Err(RuntimeError::BadMount {
                id: id.into(),
                target: m.target.clone(),
            });
        }
        if !m.source.exists() {
            return Err(setup(
                format!(
                    "mount source {} for {} does not exist",
                    m.source.display(),
                    m.target
                ),
                "create the volume directory (or file) first",
            ));
        }
    }
    if let Some(memory) = config.resources.memory_bytes
        && memory < MIN_MEMORY_BYTES
    {
        return Err(setup(
            format!(
                "memory limit {memory} bytes is below the minimum of {MIN_MEMORY_BYTES} bytes needed to start"
            ),
            "raise `resources.memory` to at least 8MiB",
        ));
    }
    if config.resources.pids == Some(0) || config.resources.millicpus == Some(0) {
        return Err(setup(
            "a limit of 0 pids or 0 cpus cannot start".into(),
            "remove the limit or raise it",
        ));
    }
    check_program(config)?;
    if mount_points {
        let volume_targets: Vec<&str> = config.volumes.iter().map(|m| m.target.as_str()).collect();
        for m in config.volumes.iter().chain(&config.files) {
            let target = m.target.as_str();
            // A top-level mount point is made in the instance's own skeleton.
            let top_level = !target[1..].contains('/');
            let on_tmpfs = TMPFS.iter().any(|t| is_under(target, t));
            let on_volume = volume_targets.iter().any(|v| is_under(target, v));
            if !top_level
                && !on_tmpfs
                && !on_volume
                && resolve(root, target).is_none_or(|p| !p.exists())
            {
                return Err(setup(
                    format!(
                        "mount point {target} does not exist in the image ({})",
                        root.display()
                    ),
                    "the image root is shared and read-only: add the directory (or file) to the image",
                ));
            }
        }
    }
    Ok(())
}

fn is_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// Absolute, not `/`, no `.`/`..`/empty components.
fn clean_absolute(target: &str) -> bool {
    target.starts_with('/')
        && target != "/"
        && !target.contains('\0')
        && target[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn check_program(config: &InstanceConfig) -> Result<(), RuntimeError> {
    let id = config.id.as_str();
    let root = &config.image.rootfs;
    let Some(program) = config.argv.first() else {
        return Err(RuntimeError::Setup {
            id: id.into(),
            what: "the command is empty".into(),
            hint: "set the service's `command` or the image's `entrypoint`".into(),
        });
    };
    let missing = || RuntimeError::MissingProgram {
        id: id.into(),
        program: program.clone(),
        rootfs: root.clone(),
    };
    let candidates: Vec<String> = if program.contains('/') {
        let base = config.workdir.as_deref().unwrap_or("/");
        vec![if program.starts_with('/') {
            program.clone()
        } else {
            format!("{base}/{program}")
        }]
    } else {
        let path = config
            .env
            .get("PATH")
            .map(String::as_str)
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{d}/{program}"))
            .collect()
    };
    let mut found_not_executable = false;
    for candidate in candidates {
        let Some(host) = resolve(root, &candidate) else {
            continue;
        };
        let Ok(meta) = fs::metadata(&host) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            return Ok(());
        }
        found_not_executable |= meta.is_file();
    }
    if found_not_executable {
        return Err(RuntimeError::NotExecutable {
            id: id.into(),
            program: program.clone(),
        });
    }
    Err(missing())
}

/// The host path of `path` inside `root`, following symlinks as the
/// instance would see them (absolute links resolve inside `root`, `..`
/// stops at `root`). `None` on a loop.
pub fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let mut pending: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut inside: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                inside.pop();
                continue;
            }
            _ => {}
        }
        let host: PathBuf = root.join(inside.iter().collect::<PathBuf>()).join(&part);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return None;
                }
                let target = fs::read_link(&host).ok()?;
                if target.is_absolute() {
                    inside.clear();
                }
                let parts = target.components().filter_map(|c| match c {
                    Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    Component::ParentDir => Some("..".into()),
                    _ => None,
                });
                let parts: Vec<String> = parts.collect();
                pending.extend(parts.into_iter().rev());
            }
            _ => inside.push(part),
        }
    }
    Some(root.join(inside.iter().collect::<PathBuf>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_targets_must_be_clean_and_absolute() {
        assert!(clean_absolute("/data"));
        assert!(clean_absolute("/var/lib/x"));
        for bad in ["data", "/", "/data/../etc", "/./x", "//x", "/x/"] {
            assert!(!clean_absolute(bad), "{bad}");
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/busybox"), b"").unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("bin/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve(root, "/bin/sh").unwrap(), root.join("bin/busybox"));
        assert_eq!(
            resolve(root, "/bin/up/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(resolve(root, "/loop"), None);
    }
}
