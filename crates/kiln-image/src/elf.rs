//! The shared-library closure of ELF binaries: what a dynamically linked
//! program copied into an image needs from the host to run from `scratch`.
//!
//! Each copied ELF object is read for its interpreter (`PT_INTERP`) and its
//! dynamic section (`DT_NEEDED`, `DT_RPATH`, `DT_RUNPATH`); each needed name
//! is resolved the way glibc's ld.so does on Debian (x86_64):
//!
//! 1. a name with a `/` is a path;
//! 2. a name already loaded (by any object) is reused;
//! 3. if the requesting object has no `DT_RUNPATH`: the `DT_RPATH` of the
//!    requester, then of the object that loaded it, up to the executable
//!    (an object that has a `DT_RUNPATH` contributes no `DT_RPATH`);
//! 4. the requester's `DT_RUNPATH`;
//! 5. the directories of `/etc/ld.so.conf` (with its `include` globs), which
//!    is what `ld.so.cache` is built from;
//! 6. the default directories `/lib/x86_64-linux-gnu`,
//!    `/usr/lib/x86_64-linux-gnu`, `/lib64`, `/lib`, `/usr/lib`.
//!
//! `$ORIGIN` (the requester's directory), `$LIB` and `$PLATFORM` are
//! expanded. A candidate whose ELF class or machine differs from the
//! requester's is skipped, as ld.so skips it. `LD_LIBRARY_PATH` is not
//! consulted: the image must not depend on the builder's environment.
//!
//! **Where libraries go in the image.** The image has no `ld.so.cache`, so a
//! library must sit where the image's own loader will find it:
//! - found through an RPATH/RUNPATH: at the same place relative to the
//!   binary's place in the image (`$ORIGIN` is the image directory);
//! - found in a default directory: in that directory after resolving the
//!   host's symlinks, so on a usr-merged host (Debian 12: `/lib → usr/lib`)
//!   `libc.so.6` goes to `/usr/lib/x86_64-linux-gnu/libc.so.6`, a real
//!   directory in any image, never a `/lib` directory that would shadow a
//!   base image's `/lib → usr/lib` symlink;
//! - found only through `ld.so.conf` in a directory the image's loader does
//!   not search by default (`/usr/local/lib`): in
//!   `/usr/lib/x86_64-linux-gnu`.
//!
//! Each is stored under the name it was asked for (`libc.so.6`) with the
//! content of the host file it resolves to: no chains of version symlinks.
//! The one symlink kept is the interpreter's path, which the kernel opens
//! literally: `/lib64/ld-linux-x86-64.so.2` points at the interpreter's
//! content at its canonical path.
//!
//! Not handled: `glibc-hwcaps` subdirectories (Debian 12 ships none in the
//! default directories), `dlopen`ed libraries (they are not in the dynamic
//! section; copy them explicitly), `DT_AUXILIARY`/`DT_FILTER`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use object::elf;
use object::read::ReadCache;
use object::read::ReadRef;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};

use crate::error::ImageError;

/// What the dynamic loader needs to know about one ELF object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElfInfo {
    pub class64: bool,
    pub machine: u16,
    pub interp: Option<String>,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
}

/// Whether `bytes` (the start of a file) is an ELF header.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// Reads the loader-relevant parts of an ELF file; `None` if it is not ELF.
/// Only the headers and the dynamic string table are read, not the file.
pub fn read_elf(path: &Path) -> Result<Option<ElfInfo>, ImageError> {
    let io_err = |source| ImageError::Io {
        op: "read ELF file",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut ident = [0u8; 6];
    if file.read(&mut ident).map_err(io_err)? < ident.len() || !is_elf(&ident) {
        return Ok(None);
    }
    let cache = ReadCache::new(file);
    let bad = |why: String| ImageError::BadElf {
        path: path.to_path_buf(),
        why,
    };
    match elf::FileClass(ident[4]) {
        elf::ELFCLASS64 => parse::<elf::FileHeader64<object::Endianness>>(&cache),
        elf::ELFCLASS32 => parse::<elf::FileHeader32<object::Endianness>>(&cache),
        c => return Err(bad(format!("unknown ELF class {}", c.0))),
    }
    .map(Some)
    .map_err(bad)
}

fn parse<Elf: FileHeader<Endian = object::Endianness>>(
    data: &ReadCache<File>,
) -> Result<ElfInfo, String> {
    let e = |e: object::read::Error| e.to_string();
    let header = Elf::parse(data).map_err(e)?;
    let endian = header.endian().map_err(e)?;
    let phdrs = header.program_headers(endian, data).map_err(e)?;
    let mut info = ElfInfo {
        class64: header.is_class_64(),
        machine: header.e_machine(endian).0,
        ..ElfInfo::default()
    };
    let mut dynamic = None;
    for ph in phdrs {
        if let Some(interp) = ph.interpreter(endian, data).map_err(e)? {
            info.interp = Some(String::from_utf8_lossy(interp).into_owned());
        }
        if let Some(d) = ph.dynamic(endian, data).map_err(e)? {
            dynamic = Some(d);
        }
    }
    let Some(dynamic) = dynamic else {
        return Ok(info); // statically linked
    };
    let (mut strtab, mut strsz) = (None, None);
    for d in dynamic {
        match d.d_tag(endian) {
            elf::DT_NULL => break,
            elf::DT_STRTAB => strtab = Some(d.d_val(endian).into()),
            elf::DT_STRSZ => strsz = Some(d.d_val(endian).into()),
            _ => {}
        }
    }
    let (Some(addr), Some(size)) = (strtab, strsz) else {
        return Ok(info);
    };
    // DT_STRTAB is a virtual address: find the loaded segment that holds it.
    let offset = phdrs
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .find_map(|ph| {
            let (vaddr, filesz, off): (u64, u64, u64) = (
                ph.p_vaddr(endian).into(),
                ph.p_filesz(endian).into(),
                ph.p_offset(endian).into(),
            );
            let into = addr.checked_sub(vaddr)?;
            (into < filesz).then(|| into.checked_add(off)).flatten()
        })
        .ok_or("DT_STRTAB is outside every loaded segment")?;
    let strings = data
        .read_bytes_at(offset, size)
        .map_err(|()| "the dynamic string table is truncated")?;
    let string = |at: u64| -> Result<String, String> {
        let rest = strings
            .get(at as usize..)
            .ok_or("a dynamic string is out of bounds")?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    for d in dynamic {
        let tag = d.d_tag(endian);
        if tag == elf::DT_NULL {
            break;
        }
        let val: u64 = d.d_val(endian).into();
        match tag {
            elf::DT_NEEDED => info.needed.push(string(val)?),
            elf::DT_RPATH => info.rpath.extend(split_path(&string(val)?)),
            elf::DT_RUNPATH => info.runpath.extend(split_path(&string(val)?)),
            _ => {}
        }
    }
    Ok(info)
}

fn split_path(s: &str) -> Vec<String> {
    s.split(':')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The libraries (and interpreter) to add to an image, by image path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// Image path → the host file (canonical path) whose content goes there.
    pub files: BTreeMap<String, PathBuf>,
    /// Image path → symlink target (the interpreter's literal path).
    pub links: BTreeMap<String, String>,
}

impl Closure {
    /// The host files of the closure (for the SBOM), canonical, sorted.
    pub fn host_paths(&self) -> BTreeSet<PathBuf> {
        self.files.values().cloned().collect()
    }
}

/// The loader's search configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loader {
    /// Directories from `/etc/ld.so.conf`, in order.
    pub conf_dirs: Vec<PathBuf>,
    /// The loader's built-in directories, in order.
    pub default_dirs: Vec<PathBuf>,
    /// Where a library found only through `conf_dirs` goes in the image.
    pub image_lib_dir: String,
    /// `$LIB` and `$PLATFORM`.
    pub lib: String,
    pub platform: String,
}

impl Loader {
    /// This host's loader (x86_64 Debian layout), reading `/etc/ld.so.conf`.
    pub fn host() -> Loader {
        let mut conf_dirs = Vec::new();
        let mut seen = BTreeSet::new();
        read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut conf_dirs, &mut seen, 0);
        Loader {
            conf_dirs,
            default_dirs: [
                "/lib/x86_64-linux-gnu",
                "/usr/lib/x86_64-linux-gnu",
                "/lib64",
                "/lib",
                "/usr/lib",
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            image_lib_dir: "/usr/lib/x86_64-linux-gnu".into(),
            lib: "lib/x86_64-linux-gnu".into(),
            platform: std::env::consts::ARCH.into(),
        }
    }

    /// The closure of `roots`: ELF objects given as (host path, image path).
    /// Non-ELF files and static binaries add nothing. Image paths already in
    /// `provided` (copied files) are not added again, but their own needs are.
    pub fn closure(
        &self,
        roots: &[(PathBuf, String)],
        provided: &BTreeSet<String>,
    ) -> Result<Closure, ImageError> {
        let mut closure = Closure::default();
        // Needed name → (host path, image path) once loaded: ld.so reuses a
        // library loaded under the same name whoever asks for it.
        let mut loaded: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
        let mut done: BTreeSet<PathBuf> = BTreeSet::new();
        for (host, image) in roots {
            let Some(info) = read_elf(host)? else {
                continue;
            };
            if let Some(interp) = &info.interp {
                self.add_interpreter(interp, host, &mut closure, provided)?;
            }
            let root = Object {
                host: host.clone(),
                image: image.clone(),
                info,
            };
            self.walk(&[root], &mut loaded, &mut done, &mut closure, provided)?;
        }
        Ok(closure)
    }

    fn add_interpreter(
        &self,
        interp: &str,
        needed_by: &Path,
        closure: &mut Closure,
        provided: &BTreeSet<String>,
    ) -> Result<(), ImageError> {
        let canonical = fs::canonicalize(interp).map_err(|_| ImageError::LibraryNotFound {
            library: interp.to_owned(),
            needed_by: needed_by.to_path_buf(),
            searched: vec![PathBuf::from(interp)],
        })?;
        let canonical_s = canonical.to_string_lossy().into_owned();
        if !provided.contains(&canonical_s) {
            closure
                .files
                .entry(canonical_s.clone())
                .or_insert(canonical);
        }
        if interp != canonical_s && !provided.contains(interp) {
            closure.links.insert(interp.to_owned(), canonical_s);
        }
        Ok(())
    }

    /// Depth-first over the needs of the last object of `chain` (the chain
    /// is the loader path from a root, for RPATH inheritance).
    fn walk(
        &self,
        chain: &[Object],
        loaded: &mut BTreeMap<String, (PathBuf, String)>,
        done: &mut BTreeSet<PathBuf>,
        closure: &mut Closure,
        provided: &BTreeSet<String>,
    ) -> Result<(), ImageError> {
        let obj = chain.last().expect("a chain is never empty");
        if !done.insert(obj.host.clone()) {
            return Ok(());
        }
        for name in &obj.info.needed {
            if loaded.contains_key(name) {
                continue;
            }
            let (host, image, info) = self.find(name, chain)?;
            loaded.insert(name.clone(), (host.clone(), image.clone()));
            if !provided.contains(&image) {
                let canonical = fs::canonicalize(&host).map_err(|source| ImageError::Io {
                    op: "resolve library",
                    path: host.clone(),
                    source,
                })?;
                closure.files.entry(image.clone()).or_insert(canonical);
            }
            let mut next = chain.to_vec();
            next.push(Object { host, image, info });
            self.walk(&next, loaded, done, closure, provided)?;
        }
        Ok(())
    }

    /// Finds `name` for the last object of `chain`: (host path, image path).
    fn find(&self, name: &str, chain: &[Object]) -> Result<(PathBuf, String, ElfInfo), ImageError> {
        let obj = chain.last().expect("a chain is never empty");
        let mut searched = Vec::new();
        if name.contains('/') {
            let host = PathBuf::from(name);
            if let Some(info) = compatible(&host, &obj.info)? {
                return Ok((host, name.to_owned(), info));
            }
            searched.push(host);
        } else {
            // (host dir, image dir) candidates in ld.so's order.
            let mut dirs: Vec<(PathBuf, String)> = Vec::new();
            if obj.info.runpath.is_empty() {
                for o in chain.iter().rev() {
                    if o.info.runpath.is_empty() {
                        dirs.extend(o.info.rpath.iter().map(|d| self.expand(d, o)));
                    }
                }
            }
            dirs.extend(obj.info.runpath.iter().map(|d| self.expand(d, obj)));
            for d in self.conf_dirs.iter().chain(&self.default_dirs) {
                dirs.push((d.clone(), self.system_image_dir(d)));
            }
            for (host_dir, image_dir) in dirs {
                let host = host_dir.join(name);
                if let Some(info) = compatible(&host, &obj.info)? {
                    return Ok((
                        host,
                        format!("{}/{name}", image_dir.trim_end_matches('/')),
                        info,
                    ));
                }
                searched.push(host_dir);
            }
        }
        Err(ImageError::LibraryNotFound {
            library: name.to_owned(),
            needed_by: obj.host.clone(),
            searched,
        })
    }

    /// An RPATH/RUNPATH entry as a host directory and an image directory.
    fn expand(&self, entry: &str, obj: &Object) -> (PathBuf, String) {
        let host_origin = obj
            .host
            .parent()
            .unwrap_or(Path::new("/"))
            .to_string_lossy()
            .into_owned();
        let image_origin = Path::new(&obj.image)
            .parent()
            .unwrap_or(Path::new("/"))
            .to_string_lossy()
            .into_owned();
        let subst = |origin: &str| {
            let mut s = entry.to_owned();
            for (var, value) in [
                ("ORIGIN", origin),
                ("LIB", &self.lib),
                ("PLATFORM", &self.platform),
            ] {
                s = s
                    .replace(&format!("${{{var}}}"), value)
                    .replace(&format!("${var}"), value);
            }
            s
        };
        let host = PathBuf::from(subst(&host_origin));
        let image = if entry.contains("ORIGIN") {
            lexical_normalize(&subst(&image_origin))
        } else {
            // An absolute directory: where it really is on the host.
            canonical_dir(&host)
        };
        (host, image)
    }

    /// Where a library found in a system directory goes in the image.
    fn system_image_dir(&self, dir: &Path) -> String {
        let canonical = canonical_dir(dir);
        let searched_by_default = self
            .default_dirs
            .iter()
            .any(|d| canonical_dir(d) == canonical);
        if searched_by_default {
            canonical
        } else {
            self.image_lib_dir.clone()
        }
    }
}

#[derive(Debug, Clone)]
struct Object {
    host: PathBuf,
    image: String,
    info: ElfInfo,
}

/// `Some(info)` if `path` is an ELF object the requester can load.
fn compatible(path: &Path, requester: &ElfInfo) -> Result<Option<ElfInfo>, ImageError> {
    if !path.is_file() {
        return Ok(None);
    }
    Ok(read_elf(path)
        .ok()
        .flatten()
        .filter(|i| i.class64 == requester.class64 && i.machine == requester.machine))
}

fn canonical_dir(dir: &Path) -> String {
    fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// `/app/bin/../lib` → `/app/lib`, without touching the disk.
fn lexical_normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => out.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    format!("/{}", out.join("/"))
}

/// Appends the directories of an `ld.so.conf`-format file, following
/// `include` globs (relative to the file's directory). Unreadable files are
/// skipped, as `ldconfig` skips them.
fn read_ld_so_conf(path: &Path, out: &mut Vec<PathBuf>, seen: &mut BTreeSet<PathBuf>, depth: u32) {
    let key = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if depth > 8 || !seen.insert(key) {
        return;
    }
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let base = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("hwcap ") {
            continue;
        }
        if let Some(pattern) = line
            .strip_prefix("include")
            .filter(|r| r.starts_with([' ', '\t']))
        {
            for pat in pattern.split_whitespace() {
                for file in glob(&base.join(pat)) {
                    read_ld_so_conf(&file, out, seen, depth + 1);
                }
            }
        } else {
            for dir in line.split([':', ',', ' ', '\t']).filter(|d| !d.is_empty()) {
                let dir = PathBuf::from(dir);
                if !out.contains(&dir) {
                    out.push(dir);
                }
            }
        }
    }
}

/// A glob whose wildcards (`*`, `?`) are in the last component only, which
/// is what ld.so.conf uses; matches sorted like glob(3).
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (
        pattern.parent(),
        pattern.file_name().and_then(|n| n.to_str()),
    ) else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return if pattern.exists() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| wildcard(name.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard(&pattern[1..], name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard(&pattern[1..], &name[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_dynamic_section_of_ls() {
        let info = read_elf(Path::new("/bin/ls"))
            .unwrap()
            .expect("/bin/ls is ELF");
        assert!(info.class64);
        assert_eq!(info.machine, elf::EM_X86_64.0);
        assert_eq!(info.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(info.needed.iter().any(|n| n == "libc.so.6"), "{info:?}");
    }

    #[test]
    fn non_elf_files_add_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("run.sh");
        fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(read_elf(&script).unwrap(), None);
        let closure = Loader::host()
            .closure(&[(script, "/run.sh".into())], &BTreeSet::new())
            .unwrap();
        assert_eq!(closure, Closure::default());
    }

    #[test]
    fn closure_of_ls_has_libc_and_the_interpreter() {
        let closure = Loader::host()
            .closure(&[("/bin/ls".into(), "/app/ls".into())], &BTreeSet::new())
            .unwrap();
        let libc = closure
            .files
            .get("/usr/lib/x86_64-linux-gnu/libc.so.6")
            .expect("libc in the closure");
        assert!(libc.ends_with("libc.so.6"), "{libc:?}");
        assert!(
            closure
                .files
                .contains_key("/usr/lib/x86_64-linux-gnu/libselinux.so.1"),
            "{closure:?}"
        );
        let interp = &closure.links["/lib64/ld-linux-x86-64.so.2"];
        assert!(closure.files.contains_key(interp), "{closure:?}");
        // Every host path is canonical, every image path absolute.
        for (image, host) in &closure.files {
            assert!(image.starts_with('/'));
            assert_eq!(&fs::canonicalize(host).unwrap(), host);
        }
        // A library the copy already provides is not added again.
        let provided = BTreeSet::from(["/usr/lib/x86_64-linux-gnu/libc.so.6".to_owned()]);
        let closure = Loader::host()
            .closure(&[("/bin/ls".into(), "/app/ls".into())], &provided)
            .unwrap();
        assert!(
            !closure
                .files
                .contains_key("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
    }

    #[test]
    fn a_missing_library_names_the_library_and_what_needs_it() {
        let mut loader = Loader::host();
        loader.conf_dirs.clear();
        loader.default_dirs = vec![PathBuf::from("/nonexistent")];
        let err = loader
            .closure(&[("/bin/ls".into(), "/ls".into())], &BTreeSet::new())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("libselinux.so.1") && text.contains("/bin/ls"),
            "{text}"
        );
    }

    #[test]
    fn rpath_origin_resolves_on_the_host_and_in_the_image() {
        let loader = Loader::host();
        let obj = Object {
            host: PathBuf::from("/src/tree/bin/app"),
            image: "/opt/app/bin/app".into(),
            info: ElfInfo::default(),
        };
        let (host, image) = loader.expand("$ORIGIN/../lib", &obj);
        assert_eq!(host, PathBuf::from("/src/tree/bin/../lib"));
        assert_eq!(image, "/opt/app/lib");
        let (_, image) = loader.expand("${ORIGIN}/x:", &obj);
        assert_eq!(image, "/opt/app/bin/x:");
        assert_eq!(
            loader.system_image_dir(Path::new("/lib/x86_64-linux-gnu")),
            "/usr/lib/x86_64-linux-gnu"
        );
        assert_eq!(
            loader.system_image_dir(Path::new("/usr/local/lib")),
            "/usr/lib/x86_64-linux-gnu"
        );
    }

    #[test]
    fn ld_so_conf_includes_are_followed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("conf.d")).unwrap();
        fs::write(
            dir.path().join("ld.so.conf"),
            "/first\ninclude conf.d/*.conf\n/last # comment\n",
        )
        .unwrap();
        fs::write(dir.path().join("conf.d/b.conf"), "/b1:/b2\n").unwrap();
        fs::write(
            dir.path().join("conf.d/a.conf"),
            "/a\ninclude ../ld.so.conf\n",
        )
        .unwrap();
        fs::write(dir.path().join("conf.d/skip.txt"), "/no\n").unwrap();
        let mut out = Vec::new();
        read_ld_so_conf(
            &dir.path().join("ld.so.conf"),
            &mut out,
            &mut BTreeSet::new(),
            0,
        );
        let out: Vec<_> = out
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(out, ["/first", "/a", "/b1", "/b2", "/last"]);
        assert!(
            wildcard(b"*.conf", b"x.conf")
                && !wildcard(b"*.conf", b"x.con")
                && wildcard(b"a?c", b"abc")
        );
    }

    #[test]
    fn the_host_loader_reads_debian_multiarch_dirs() {
        let loader = Loader::host();
        assert!(
            loader
                .conf_dirs
                .contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu")),
            "{loader:?}"
        );
    }
}
