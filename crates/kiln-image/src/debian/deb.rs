//! Reading `.deb` files, which are untrusted input, and unpacking each one
//! once into a content-addressed directory that later builds read from.
//!
//! **Format.** A `.deb` is an `ar` archive (`!<arch>\n`, 60-byte member
//! headers, members 2-byte aligned) of exactly, in this order:
//! `debian-binary` (`2.x`), `control.tar[.gz|.xz|.zst]` and
//! `data.tar[.gz|.xz|.zst]`. Members whose name starts with `_` (dpkg's
//! convention for signatures and other additions) are skipped, as dpkg skips
//! them; anything else — a BSD or GNU long name, a symbol table, another
//! member, a member larger than the file, a compression kiln does not read
//! (`bzip2`, `lzma`) — is refused with what was found.
//!
//! **Entries.** From `data.tar`: directories, regular files, symbolic links
//! (target kept verbatim) and hard links to an *earlier regular file of the
//! same package*. Paths are normalised (`./usr/bin` → `usr/bin`); an
//! absolute path, a `..` component, a path that is not UTF-8, a path that
//! appears twice or that sits under a non-directory is refused. Device
//! nodes and FIFOs are skipped with a note (an image gets them from the
//! runtime). Modes are kept as the package has them, setuid and setgid
//! included, and so are numeric owners. From `control.tar`: `control`
//! (one stanza with `Package`, `Version`, `Architecture`) and `md5sums`.
//!
//! **Bounds.** Decompressed control data is capped at [`MAX_CONTROL`],
//! decompressed data at [`MAX_DATA`], entries at [`MAX_ENTRIES`], and the xz
//! decoder's memory at [`XZ_MEMLIMIT`]: a decompression bomb is refused, not
//! unpacked until the disk is full.
//!
//! **The unpacked cache.** [`unpack_once`] unpacks a verified `.deb` into
//! `KILN_DIR/debian/unpacked/<sha256 of the .deb>/`: `manifest.json` (the
//! control stanza, md5sums and every entry with its mode, owner, content
//! digest or link target) and `files/<n>`, the content of the n-th entry.
//! Contents are stored under numbers, never under the package's paths, so
//! unpacking writes nothing but plain files in that directory, whatever the
//! archive says; the modes live in the manifest only (no setuid file ever
//! appears on the host). The directory is made under a temporary name and
//! renamed into place, so it is complete or absent (what a killed
//! unpacking leaves is removed by the next unpacking of that package). The bytes read while
//! unpacking are hashed and must equal the sha256 the directory is named
//! after: a `.deb` changed between its verification and its unpacking is
//! refused. Every build checks each file's digest again while it writes the
//! layer.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::layer::normalize;

mod cache;
mod install;
mod source;

use cache::unpacked_root;
pub use cache::{Unpacked, cached, unpack_once};
pub use install::{add_packages, link_shared_blobs, packaged_files, status_stanza};
pub use source::{DebSource, LocalDebs, LockedApt, PinnedDeb};

/// Most bytes of decompressed `control.tar` (scripts, md5sums, control).
pub const MAX_CONTROL: u64 = 64 << 20;
/// Most bytes of decompressed `data.tar`.
pub const MAX_DATA: u64 = 8 << 30;
/// Most entries of `data.tar`.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Most memory the xz decoder may use (Debian's `xz -6` needs 9 MiB).
pub const XZ_MEMLIMIT: u64 = 256 << 20;
/// Version of the unpacked directory's layout; another one is unpacked again.
pub const UNPACKED_FORMAT: u32 = 1;

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
const AR_HEADER: usize = 60;

/// Why a `.deb` was refused.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("{0}")]
    Malformed(String),
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn bad(why: impl Into<String>) -> DebError {
    DebError::Malformed(why.into())
}

/// A read error of the archive itself (as opposed to the unpacked files).
fn read_err(what: &str) -> impl Fn(io::Error) -> DebError + '_ {
    move |e| bad(format!("{what}: {e}"))
}

/// The package's `control` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebControl {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// `Multi-Arch: same` packages have `<pkg>:<arch>` dpkg info files.
    pub multi_arch_same: bool,
    /// The stanza as the package has it, trailing newlines trimmed.
    pub stanza: String,
}

impl DebControl {
    /// The name dpkg files the package's `info/` files under.
    pub fn info_name(&self) -> String {
        if self.multi_arch_same {
            format!("{}:{}", self.package, self.architecture)
        } else {
            self.package.clone()
        }
    }
}

/// What an entry of `data.tar` is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DebEntryKind {
    Dir,
    /// Content in `files/<blob>` of the unpacked directory.
    File {
        size: u64,
        sha256: Digest,
        blob: u64,
    },
    Symlink {
        target: String,
    },
    /// A hard link to an earlier regular file of the same package.
    HardLink {
        target: String,
    },
}

/// One entry of `data.tar`, its path normalised (`usr/bin/x`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebEntry {
    pub path: String,
    #[serde(flatten)]
    pub kind: DebEntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// An entry that was not unpacked, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub why: String,
}

/// Everything kiln keeps of a package: `manifest.json` of its unpacked
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebManifest {
    pub format: u32,
    pub control: DebControl,
    /// The `md5sums` control file, if the package has one.
    pub md5sums: Option<String>,
    /// In archive order.
    pub entries: Vec<DebEntry>,
    pub skipped: Vec<Skipped>,
}

/// Reads a `.deb` from `input`, writing each regular file's content to
/// `files/<n>` under `dir` (which must exist and be empty). Reads `input`
/// to its end, so a caller hashing it sees every byte.
pub fn unpack<R: Read>(input: R, dir: &Path) -> Result<DebManifest, DebError> {
    let mut ar = ArReader::new(input)?;
    let files = dir.join("files");
    fs::create_dir(&files).map_err(|source| DebError::Io {
        op: "create",
        path: files.clone(),
        source,
    })?;

    let first = ar
        .next_member()?
        .ok_or_else(|| bad("the ar archive is empty"))?;
    if first.name != "debian-binary" {
        return Err(bad(format!(
            "the first member is `{}`, not `debian-binary`",
            first.name
        )));
    }
    if first.size > 64 {
        return Err(bad(format!(
            "`debian-binary` is {} bytes; it holds a format version",
            first.size
        )));
    }
    let mut version = Vec::new();
    ar.member()
        .read_to_end(&mut version)
        .map_err(read_err("debian-binary"))?;
    ar.finish_member(&first)?;
    let version = String::from_utf8_lossy(&version);
    let version = version.trim_end();
    if !version.starts_with("2.") || version.contains('\n') {
        return Err(bad(format!(
            "format version `{}` (debian-binary); kiln reads 2.x",
            version.escape_debug()
        )));
    }

    let mut control = None;
    let mut data = None;
    while let Some(member) = ar.next_member()? {
        if member.name.starts_with('_') {
            ar.finish_member(&member)?;
            continue;
        }
        let (kind, compression) = member_kind(&member.name)?;
        match kind {
            "control.tar" => {
                if control.is_some() || data.is_some() {
                    return Err(bad(format!("`{}` is out of place", member.name)));
                }
                let reader = decompress(ar.member(), compression, &member.name)?;
                control = Some(read_control(reader, &member.name)?);
            }
            _ => {
                if control.is_none() || data.is_some() {
                    return Err(bad(format!(
                        "`{}` is out of place (control.tar must come first, once)",
                        member.name
                    )));
                }
                let reader = decompress(ar.member(), compression, &member.name)?;
                data = Some(read_data(reader, &member.name, &files)?);
            }
        }
        ar.finish_member(&member)?;
    }
    let (control, md5sums) = control.ok_or_else(|| bad("there is no control.tar member"))?;
    let (entries, skipped) = data.ok_or_else(|| bad("there is no data.tar member"))?;
    ar.drain()?;
    Ok(DebManifest {
        format: UNPACKED_FORMAT,
        control,
        md5sums,
        entries,
        skipped,
    })
}

/// One header of the ar archive.
#[derive(Debug)]
struct Member {
    name: String,
    size: u64,
}

struct ArReader<R> {
    inner: R,
    /// Bytes of the current member not read yet.
    left: u64,
    /// Whether the current member is followed by a padding byte.
    pad: bool,
}

/// The current member's bytes.
struct MemberRead<'a, R> {
    ar: &'a mut ArReader<R>,
}

impl<R: Read> Read for MemberRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf
            .len()
            .min(usize::try_from(self.ar.left).unwrap_or(usize::MAX));
        if max == 0 {
            return Ok(0);
        }
        let n = self.ar.inner.read(&mut buf[..max])?;
        self.ar.left -= n as u64;
        Ok(n)
    }
}

impl<R: Read> ArReader<R> {
    fn new(mut inner: R) -> Result<Self, DebError> {
        let mut magic = [0u8; 8];
        let n = read_full(&mut inner, &mut magic).map_err(read_err("the ar magic"))?;
        if n != 8 || &magic != AR_MAGIC {
            return Err(bad(format!(
                "not a .deb: it does not start with `!<arch>` (found {:?})",
                String::from_utf8_lossy(&magic[..n])
            )));
        }
        Ok(ArReader {
            inner,
            left: 0,
            pad: false,
        })
    }

    fn next_member(&mut self) -> Result<Option<Member>, DebError> {
        let mut h = [0u8; AR_HEADER];
        let n = read_full(&mut self.inner, &mut h).map_err(read_err("an ar header"))?;
        if n == 0 {
            return Ok(None);
        }
        if n < AR_HEADER {
            return Err(bad(format!(
                "truncated: an ar header has {n} of its 60 bytes"
            )));
        }
        if &h[58..60] != b"`\n" {
            return Err(bad("an ar header does not end with \"`\\n\""));
        }
        let raw_name = std::str::from_utf8(&h[..16])
            .map_err(|_| bad("an ar member name is not ASCII"))?
            .trim_end_matches(' ');
        // dpkg-deb writes `debian-binary`; GNU ar writes `debian-binary/`.
        let name = raw_name.strip_suffix('/').unwrap_or(raw_name);
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        {
            return Err(bad(format!(
                "ar member name `{}` (a symbol table, a long name or an odd one; a .deb has none)",
                raw_name.escape_debug()
            )));
        }
        let size_field = std::str::from_utf8(&h[48..58])
            .map_err(|_| bad("an ar member size is not ASCII"))?
            .trim_end_matches(' ');
        let size: u64 = size_field
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| size_field.parse().ok())
            .flatten()
            .ok_or_else(|| {
                bad(format!(
                    "ar member `{name}` has size `{}`",
                    size_field.escape_debug()
                ))
            })?;
        self.left = size;
        self.pad = size % 2 == 1;
        Ok(Some(Member {
            name: name.to_owned(),
            size,
        }))
    }

    /// The current member's bytes (what the caller leaves is skipped by
    /// [`Self::finish_member`]).
    fn member(&mut self) -> MemberRead<'_, R> {
        MemberRead { ar: self }
    }

    /// Skips what is left of the current member, checking it is there,
    /// and its padding byte.
    fn finish_member(&mut self, member: &Member) -> Result<(), DebError> {
        io::copy(&mut self.member(), &mut io::sink())
            .map_err(read_err(&format!("ar member `{}`", member.name)))?;
        if self.left > 0 {
            return Err(bad(format!(
                "truncated: ar member `{}` says {} bytes and {} are missing",
                member.name, member.size, self.left
            )));
        }
        if self.pad {
            // The last member's padding may be missing (dpkg accepts that).
            let mut byte = [0u8; 1];
            read_full(&mut self.inner, &mut byte).map_err(read_err("ar padding"))?;
            self.pad = false;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), DebError> {
        io::copy(&mut self.inner, &mut io::sink()).map_err(read_err("the end of the archive"))?;
        Ok(())
    }
}

/// Fills `buf` as far as the input goes; returns how much was read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn member_kind(name: &str) -> Result<(&'static str, &str), DebError> {
    for kind in ["control.tar", "data.tar"] {
        if let Some(rest) = name.strip_prefix(kind) {
            return match rest {
                "" | ".gz" | ".xz" | ".zst" => Ok((kind, rest)),
                other => Err(bad(format!(
                    "`{name}`: compression `{}` is not read by kiln (it reads none, gzip, xz and zstd, which is what dpkg-deb writes)",
                    other.trim_start_matches('.')
                ))),
            };
        }
    }
    Err(bad(format!(
        "unexpected ar member `{name}` (a .deb has debian-binary, control.tar.* and data.tar.*)"
    )))
}

/// A reader that fails, rather than stops, past `limit` bytes.
struct Capped<R> {
    inner: R,
    left: u64,
    what: String,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} decompresses to more than {} MiB; refused",
                    self.what,
                    self.limit >> 20
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn decompress<'r, R: Read + 'r>(
    raw: R,
    compression: &str,
    name: &str,
) -> Result<Box<dyn Read + 'r>, DebError> {
    let reader: Box<dyn Read + 'r> = match compression {
        "" => Box::new(raw),
        ".gz" => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        ".xz" => {
            let stream = liblzma::stream::Stream::new_stream_decoder(
                XZ_MEMLIMIT,
                liblzma::stream::CONCATENATED,
            )
            .map_err(|e| bad(format!("`{name}`: cannot start the xz decoder: {e}")))?;
            Box::new(liblzma::read::XzDecoder::new_stream(
                BufReader::new(raw),
                stream,
            ))
        }
        ".zst" => Box::new(
            ruzstd::decoding::StreamingDecoder::new(raw)
                .map_err(|e| bad(format!("`{name}` is not valid zstd: {e}")))?,
        ),
        other => return Err(bad(format!("`{name}`: compression `{other}`"))),
    };
    Ok(reader)
}

fn read_control(
    reader: Box<dyn Read + '_>,
    member: &str,
) -> Result<(DebControl, Option<String>), DebError> {
    let capped = Capped {
        inner: reader,
        left: MAX_CONTROL,
        what: member.to_owned(),
        limit: MAX_CONTROL,
    };
    let mut archive = tar::Archive::new(capped);
    let mut control_text = None;
    let mut md5sums = None;
    for entry in archive.entries().map_err(read_err(member))? {
        let mut entry = entry.map_err(read_err(member))?;
        let path = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&path);
        let name = name.trim_start_matches("./");
        let slot = match name {
            "control" => &mut control_text,
            "md5sums" => &mut md5sums,
            _ => continue,
        };
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!("{member}: `{name}` is not a regular file")));
        }
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .map_err(read_err(&format!("{member}: `{name}`")))?;
        *slot = Some(text);
    }
    let text = control_text.ok_or_else(|| bad(format!("{member} has no `control` file")))?;
    Ok((parse_control(&text)?, md5sums))
}

/// Parses a package's `control` file.
pub fn parse_control(text: &str) -> Result<DebControl, DebError> {
    let stanzas = super::control::parse(text).map_err(|e| bad(format!("the control file, {e}")))?;
    let [stanza] = stanzas.as_slice() else {
        return Err(bad(format!(
            "the control file has {} stanzas, not one",
            stanzas.len()
        )));
    };
    let field = |name: &str| {
        stanza
            .get(name)
            .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace))
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("the control file has no valid `{name}` field")))
    };
    let package = field("Package")?;
    if !super::control::is_package_name(&package) {
        return Err(bad(format!("`{package}` is not a Debian package name")));
    }
    let version = field("Version")?;
    if !super::version::is_valid(&version) {
        return Err(bad(format!("`{version}` is not a Debian version")));
    }
    let architecture = field("Architecture")?;
    if !architecture
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(bad(format!("`{architecture}` is not an architecture")));
    }
    Ok(DebControl {
        package,
        version,
        architecture,
        multi_arch_same: stanza
            .get("Multi-Arch")
            .is_some_and(|v| v.eq_ignore_ascii_case("same")),
        stanza: text.trim_end_matches(['\n', '\r']).to_owned(),
    })
}

/// A `data.tar` path in the layer's form; `None` for the root itself.
fn entry_path(raw: &[u8], member: &str) -> Result<Option<String>, DebError> {
    let path = std::str::from_utf8(raw).map_err(|_| {
        bad(format!(
            "{member}: path `{}` is not UTF-8",
            String::from_utf8_lossy(raw)
        ))
    })?;
    if path.starts_with('/') {
        return Err(bad(format!("{member}: absolute path `{path}`")));
    }
    if path.contains('\0') {
        return Err(bad(format!(
            "{member}: path `{}` has a NUL",
            path.escape_debug()
        )));
    }
    normalize(path).map_err(|why| bad(format!("{member}: {why}")))
}

type DataEntries = (Vec<DebEntry>, Vec<Skipped>);

fn read_data(
    reader: Box<dyn Read + '_>,
    member: &str,
    files: &Path,
) -> Result<DataEntries, DebError> {
    let capped = Capped {
        inner: reader,
        left: MAX_DATA,
        what: member.to_owned(),
        limit: MAX_DATA,
    };
    let mut archive = tar::Archive::new(capped);
    let mut entries: Vec<DebEntry> = Vec::new();
    let mut skipped = Vec::new();
    // Path → index in `entries`.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for entry in archive.entries().map_err(read_err(member))? {
        let mut entry = entry.map_err(read_err(member))?;
        let Some(path) = entry_path(&entry.path_bytes(), member)? else {
            continue; // `./`: the root
        };
        let header = entry.header();
        let typ = header.entry_type();
        let field_err = |f: &str, e: io::Error| bad(format!("{member}: `{path}`: bad {f}: {e}"));
        let mode = header.mode().map_err(|e| field_err("mode", e))? & 0o7777;
        let uid = header.uid().map_err(|e| field_err("uid", e))?;
        let gid = header.gid().map_err(|e| field_err("gid", e))?;
        if typ.is_character_special() || typ.is_block_special() || typ.is_fifo() {
            skipped.push(Skipped {
                path: path.clone(),
                why: "device nodes and FIFOs are not put in images".into(),
            });
            continue;
        }
        if typ.is_pax_global_extensions() {
            continue;
        }
        if seen.contains_key(&path) {
            return Err(bad(format!("{member}: `{path}` appears twice")));
        }
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            if let Some(&i) = seen.get(p)
                && entries[i].kind != DebEntryKind::Dir
            {
                return Err(bad(format!(
                    "{member}: `{path}` is under `{p}`, which is not a directory"
                )));
            }
            parent = p;
        }
        if entries.len() >= MAX_ENTRIES {
            return Err(bad(format!("{member} has more than {MAX_ENTRIES} entries")));
        }
        let kind = if typ.is_dir() {
            DebEntryKind::Dir
        } else if typ.is_file() || typ == tar::EntryType::Continuous {
            let blob = entries.len() as u64;
            let (sha256, size) =
                write_blob(&mut entry, &files.join(blob.to_string()), member, &path)?;
            DebEntryKind::File { size, sha256, blob }
        } else if typ.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| bad(format!("{member}: symlink `{path}` has no target")))?;
            let target = std::str::from_utf8(&target)
                .map_err(|_| bad(format!("{member}: symlink `{path}` has a non-UTF-8 target")))?;
            if target.is_empty() || target.contains('\0') {
                return Err(bad(format!(
                    "{member}: symlink `{path}` has an empty target"
                )));
            }
            DebEntryKind::Symlink {
                target: target.to_owned(),
            }
        } else if typ.is_hard_link() {
            let raw = entry
                .link_name_bytes()
                .ok_or_else(|| bad(format!("{member}: hard link `{path}` has no target")))?;
            let target = entry_path(&raw, member)?
                .ok_or_else(|| bad(format!("{member}: hard link `{path}` points at the root")))?;
            match seen.get(&target).map(|&i| &entries[i].kind) {
                Some(DebEntryKind::File { .. }) => {}
                _ => {
                    return Err(bad(format!(
                        "{member}: hard link `{path}` points at `{target}`, which is not an earlier file of the package"
                    )));
                }
            }
            DebEntryKind::HardLink { target }
        } else {
            return Err(bad(format!(
                "{member}: `{path}` has tar entry type {:?}, which a .deb does not use",
                typ
            )));
        };
        seen.insert(path.clone(), entries.len());
        entries.push(DebEntry {
            path,
            kind,
            mode,
            uid,
            gid,
        });
    }
    Ok((entries, skipped))
}

fn write_blob<R: Read>(
    entry: &mut R,
    blob: &Path,
    member: &str,
    path: &str,
) -> Result<(Digest, u64), DebError> {
    let io_err = |op, source| DebError::Io {
        op,
        path: blob.to_path_buf(),
        source,
    };
    let mut out = File::create_new(blob).map_err(|e| io_err("create", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut size = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad(format!("{member}: `{path}`: {e}"))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| io_err("write", e))?;
        size += n as u64;
    }
    Ok((Digest::from_sha256(&hasher.finalize()), size))
}

/// Reads only the `control` file of a `.deb` (stops after `control.tar`).
pub fn read_control_of<R: Read>(input: R) -> Result<DebControl, DebError> {
    let mut ar = ArReader::new(input)?;
    let first = ar
        .next_member()?
        .ok_or_else(|| bad("the ar archive is empty"))?;
    if first.name != "debian-binary" {
        return Err(bad(format!(
            "the first member is `{}`, not `debian-binary`",
            first.name
        )));
    }
    ar.finish_member(&first)?;
    while let Some(member) = ar.next_member()? {
        if member.name.starts_with('_') {
            ar.finish_member(&member)?;
            continue;
        }
        let (kind, compression) = member_kind(&member.name)?;
        if kind != "control.tar" {
            break;
        }
        let reader = decompress(ar.member(), compression, &member.name)?;
        return Ok(read_control(reader, &member.name)?.0);
    }
    Err(bad("there is no control.tar member"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decompression_bomb_is_refused_not_truncated() {
        // 1 MiB of zeros gzips to about 1 KiB; capped at 64 KiB it is an
        // error, never a silently shortened member.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 1 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 4096);
        let reader = decompress(&bomb[..], ".gz", "data.tar.gz").unwrap();
        let mut capped = Capped {
            inner: reader,
            left: 64 << 10,
            what: "data.tar.gz".into(),
            limit: 64 << 10,
        };
        let err = io::copy(&mut capped, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn the_status_stanza_has_dpkgs_status_after_package() {
        let control = parse_control(
            "Package: libc6\nVersion: 2.36-9\nArchitecture: amd64\nMulti-Arch: same\nDescription: x\n y\n",
        )
        .unwrap();
        assert_eq!(control.info_name(), "libc6:amd64");
        assert_eq!(
            status_stanza(&control),
            "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9\nArchitecture: amd64\nMulti-Arch: same\nDescription: x\n y\n"
        );
    }
}
