//! A metadata snapshot of an image root, for `verify`: every entry's type,
//! mode, size, mtime, ctime and link target. ctime cannot be set from user
//! space, so any write, chmod or replacement through the host shows up,
//! without hashing the whole root on every check.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Relative path → one line of metadata.
pub type Snapshot = BTreeMap<String, String>;

pub fn take(root: &Path) -> io::Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}/{name}");
            let meta = entry.metadata()?;
            let link = if meta.file_type().is_symlink() {
                fs::read_link(entry.path())?.display().to_string()
            } else {
                String::new()
            };
            let size = if meta.is_dir() { 0 } else { meta.size() };
            let line = format!(
                "{:o} {} {}.{} {}.{} {}:{} {}",
                meta.mode(),
                size,
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
                meta.uid(),
                meta.gid(),
                link
            );
            if meta.is_dir() {
                stack.push((entry.path(), path.clone()));
            }
            out.insert(path, line);
        }
    }
    Ok(out)
}

pub fn encode(s: &Snapshot) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Snapshot {
    serde_json::from_slice(bytes).unwrap_or_default()
}

/// (path, "added" | "removed" | "changed"), in path order. A directory
/// whose only change is its own times (an entry added or removed inside) is
/// reported through that entry, not itself.
pub fn diff(before: &Snapshot, now: &Snapshot) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for (path, line) in before {
        match now.get(path) {
            None => out.push((path.clone(), "removed")),
            Some(l) if l != line && !dir_times_only(line, l) => out.push((path.clone(), "changed")),
            _ => {}
        }
    }
    for path in now.keys().filter(|p| !before.contains_key(*p)) {
        out.push((path.clone(), "added"));
    }
    out.sort();
    out
}

fn dir_times_only(a: &str, b: &str) -> bool {
    let fields = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    let (a, b) = (fields(a), fields(b));
    let is_dir = a
        .first()
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .is_some_and(|m| m & 0o170000 == 0o040000);
    is_dir && a.len() == b.len() && a[0] == b[0] && a[1] == b[1] && a[4..] == b[4..]
}
