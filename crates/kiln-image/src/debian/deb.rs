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
//! renamed into place, so it is complete or absent. The bytes read while
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

use crate::digest::{Digest, HashingReader};
use crate::error::ImageError;
use crate::layer::{EntryKind, FileSource, Layer, LayerEntry, normalize};

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

/// A package unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `KILN_DIR/debian/unpacked/<hex>`.
    pub dir: PathBuf,
    /// The `.deb`'s sha256.
    pub sha256: Digest,
    pub manifest: DebManifest,
}

impl Unpacked {
    /// Where the content of a file entry is.
    pub fn blob_path(&self, blob: u64) -> PathBuf {
        self.dir.join("files").join(blob.to_string())
    }
}

/// The unpacked directory of the `.deb` whose sha256 is `sha256`, in
/// `kiln_dir`, if it is there and complete.
pub fn cached(kiln_dir: &Path, sha256: &Digest) -> Option<Unpacked> {
    let dir = unpacked_root(kiln_dir).join(sha256.hex());
    let bytes = fs::read(dir.join("manifest.json")).ok()?;
    let manifest: DebManifest = serde_json::from_slice(&bytes).ok()?;
    (manifest.format == UNPACKED_FORMAT).then(|| Unpacked {
        dir,
        sha256: sha256.clone(),
        manifest,
    })
}

fn unpacked_root(kiln_dir: &Path) -> PathBuf {
    kiln_dir.join("debian").join("unpacked")
}

/// The unpacked directory of `deb` (package `package`, for errors), whose
/// bytes must hash to `sha256`: from the cache, or unpacked now.
pub fn unpack_once(
    kiln_dir: &Path,
    deb: &Path,
    package: &str,
    sha256: &Digest,
) -> Result<Unpacked, ImageError> {
    if let Some(done) = cached(kiln_dir, sha256) {
        return Ok(done);
    }
    let root = unpacked_root(kiln_dir);
    let io_err = |op, path: &Path, source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(&root).map_err(|e| io_err("create", &root, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = root.join(format!(
        ".tmp-{}-{}-{nanos}",
        sha256.hex(),
        std::process::id()
    ));
    fs::create_dir(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    let result = unpack_into(deb, package, sha256, &tmp);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let dir = root.join(sha256.hex());
    if let Err(e) = fs::rename(&tmp, &dir) {
        let _ = fs::remove_dir_all(&tmp);
        // Another build unpacked it meanwhile: use theirs.
        return cached(kiln_dir, sha256).ok_or_else(|| io_err("rename into place", &dir, e));
    }
    Ok(Unpacked {
        dir,
        sha256: sha256.clone(),
        manifest,
    })
}

fn unpack_into(
    deb: &Path,
    package: &str,
    sha256: &Digest,
    tmp: &Path,
) -> Result<DebManifest, ImageError> {
    let file = File::open(deb).map_err(|source| ImageError::Io {
        op: "open package file",
        path: deb.to_path_buf(),
        source,
    })?;
    let mut hashing = HashingReader::new(BufReader::with_capacity(256 * 1024, file));
    let unpacked = unpack(&mut hashing, tmp);
    // Hash whatever the reader left (an error stops it early) so the
    // check below says "changed" rather than the parse error when both.
    let _ = io::copy(&mut hashing, &mut io::sink());
    let (actual, _) = hashing.finish();
    if &actual != sha256 {
        return Err(ImageError::DebMismatch {
            package: package.to_owned(),
            deb: deb.to_path_buf(),
            expected: sha256.clone(),
            actual,
        });
    }
    let manifest = unpacked.map_err(|source| ImageError::BadDeb {
        package: package.to_owned(),
        deb: deb.to_path_buf(),
        source,
    })?;
    if manifest.control.package != package {
        return Err(ImageError::BadDeb {
            package: package.to_owned(),
            deb: deb.to_path_buf(),
            source: bad(format!("it holds package `{}`", manifest.control.package)),
        });
    }
    let path = tmp.join("manifest.json");
    let mut out = File::create_new(&path).map_err(|source| ImageError::Io {
        op: "create",
        path: path.clone(),
        source,
    })?;
    out.write_all(&serde_json::to_vec(&manifest).expect("a manifest serialises"))
        .and_then(|()| out.sync_all())
        .map_err(|source| ImageError::Io {
            op: "write",
            path: path.clone(),
            source,
        })?;
    Ok(manifest)
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

/// A package pinned by the lock: what the builder needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinnedDeb {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Of the `.deb` file.
    pub sha256: Digest,
}

impl PinnedDeb {
    /// Its line in the build's recipe.
    pub fn recipe_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.name, self.version, self.arch, self.sha256
        )
    }
}

/// Where an image's Debian packages come from: the lock, and a cache of
/// verified `.deb` files.
pub trait DebSource {
    /// The packages of image `image` — the dependency closure of
    /// `requested`, as pinned by the lock (resolved and pinned now if the
    /// lock lacks them) — sorted by name.
    fn packages(&mut self, image: &str, requested: &[String])
    -> Result<Vec<PinnedDeb>, ImageError>;

    /// The `.deb` of `pkg`, verified against `pkg.sha256` (downloaded when
    /// the cache does not have it).
    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError>;

    /// Writes what the source learnt (the lock), once the builds are done.
    fn save(&mut self) -> Result<(), ImageError> {
        Ok(())
    }
}

/// A [`DebSource`] of the `.deb` files of one directory, each named by the
/// package it holds; no dependency resolution: an image gets exactly the
/// packages it names. For tests, and for offline builds from a directory of
/// packages one trusts.
#[derive(Debug, Clone, Default)]
pub struct LocalDebs {
    /// By package name: the pin and the file.
    pub debs: BTreeMap<String, (PinnedDeb, PathBuf)>,
}

impl LocalDebs {
    /// Reads the control file and hashes every `*.deb` of `dir`.
    pub fn open(dir: &Path) -> Result<LocalDebs, ImageError> {
        let io_err = |path: &Path, source| ImageError::Io {
            op: "read package directory",
            path: path.to_path_buf(),
            source,
        };
        let mut debs = BTreeMap::new();
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        paths.sort();
        for path in paths {
            let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
            let control =
                read_control_of(bytes.as_slice()).map_err(|source| ImageError::BadDeb {
                    package: path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    deb: path.clone(),
                    source,
                })?;
            let pin = PinnedDeb {
                name: control.package.clone(),
                version: control.version,
                arch: control.architecture,
                sha256: Digest::of(&bytes),
            };
            debs.insert(control.package, (pin, path));
        }
        Ok(LocalDebs { debs })
    }
}

impl DebSource for LocalDebs {
    fn packages(
        &mut self,
        image: &str,
        requested: &[String],
    ) -> Result<Vec<PinnedDeb>, ImageError> {
        let mut names: Vec<&String> = requested.iter().collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                self.debs.get(name).map(|(pin, _)| pin.clone()).ok_or_else(|| {
                    ImageError::Invalid(format!(
                        "image `{image}`: no .deb of package `{name}` in the package directory\n  hint: put {name}_*.deb there"
                    ))
                })
            })
            .collect()
    }

    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError> {
        let (_, path) = &self.debs[&pkg.name];
        let bytes = fs::read(path).map_err(|source| ImageError::Io {
            op: "read package file",
            path: path.clone(),
            source,
        })?;
        let actual = Digest::of(&bytes);
        if actual != pkg.sha256 {
            return Err(ImageError::DebMismatch {
                package: pkg.name.clone(),
                deb: path.clone(),
                expected: pkg.sha256.clone(),
                actual,
            });
        }
        Ok(path.clone())
    }
}

/// Adds the files of `packages` (in lock order) to `layer`, then dpkg's
/// database of them (`/var/lib/dpkg/status`, `info/<pkg>.list` and
/// `info/<pkg>.md5sums`) so that the SBOM and scanners see them.
///
/// A path in two packages must be the same in both (directories always
/// are; files by content, links by target), or the build fails naming both
/// packages, as dpkg would. A directory keeps the first package's mode and
/// owner; a file or link the last one's. Hard links are stored as files
/// here, and linked again by [`link_shared_blobs`] once the layer is final.
pub fn add_packages(
    layer: &mut Layer,
    image: &str,
    packages: &[Unpacked],
) -> Result<(), ImageError> {
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for (i, pkg) in packages.iter().enumerate() {
        let files: BTreeMap<&str, &DebEntry> = pkg
            .manifest
            .entries
            .iter()
            .filter(|e| matches!(e.kind, DebEntryKind::File { .. }))
            .map(|e| (e.path.as_str(), e))
            .collect();
        for e in &pkg.manifest.entries {
            let kind = match &e.kind {
                DebEntryKind::Dir => EntryKind::Dir,
                DebEntryKind::File { size, sha256, blob } => EntryKind::File {
                    source: FileSource::Host(pkg.blob_path(*blob)),
                    size: *size,
                    digest: Some(sha256.clone()),
                },
                DebEntryKind::Symlink { target } => EntryKind::Symlink(target.clone()),
                DebEntryKind::HardLink { target } => match files.get(target.as_str()) {
                    Some(DebEntry {
                        kind: DebEntryKind::File { size, sha256, blob },
                        ..
                    }) => EntryKind::File {
                        source: FileSource::Host(pkg.blob_path(*blob)),
                        size: *size,
                        digest: Some(sha256.clone()),
                    },
                    _ => {
                        return Err(ImageError::Invalid(format!(
                            "package `{}`: hard link /{} has no target in {}\n  hint: delete that directory so that the package is unpacked again",
                            pkg.manifest.control.package,
                            e.path,
                            pkg.dir.display()
                        )));
                    }
                },
            };
            let entry = LayerEntry {
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
            };
            if let Some(old) = layer.get(&e.path) {
                let why = match (&old.kind, &entry.kind) {
                    (EntryKind::Dir, EntryKind::Dir) => continue,
                    (EntryKind::File { digest: a, .. }, EntryKind::File { digest: b, .. })
                        if a == b =>
                    {
                        None
                    }
                    (EntryKind::Symlink(a), EntryKind::Symlink(b)) if a == b => None,
                    (EntryKind::File { .. }, EntryKind::File { .. }) => {
                        Some("different contents".to_owned())
                    }
                    (EntryKind::Symlink(a), EntryKind::Symlink(b)) => {
                        Some(format!("links to `{a}` and to `{b}`"))
                    }
                    (a, b) => Some(format!("a {} and a {}", kind_name(a), kind_name(b))),
                };
                if let Some(why) = why {
                    let first = owners
                        .get(&e.path)
                        .map(|&o| packages[o].manifest.control.package.clone())
                        .unwrap_or_default();
                    return Err(ImageError::PackageConflict {
                        image: image.to_owned(),
                        path: e.path.clone(),
                        packages: Box::new((first, pkg.manifest.control.package.clone())),
                        why,
                    });
                }
            }
            owners.insert(e.path.clone(), i);
            layer.insert(&e.path, entry).map_err(ImageError::Invalid)?;
        }
    }
    if !packages.is_empty() {
        add_dpkg_database(layer, packages)?;
    }
    layer.check().map_err(|why| {
        ImageError::Invalid(format!(
            "image `{image}`: the packages do not fit together: {why}\n  hint: drop one of them from `debian`"
        ))
    })
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::Dir => "directory",
        EntryKind::File { .. } => "file",
        EntryKind::Symlink(_) => "symbolic link",
        EntryKind::HardLink(_) => "hard link",
    }
}

/// dpkg's `status` stanza of a package: its control stanza with the
/// `Status` line dpkg adds after `Package`.
pub fn status_stanza(control: &DebControl) -> String {
    let mut out = String::new();
    let mut added = false;
    for line in control.stanza.lines() {
        out.push_str(line);
        out.push('\n');
        if !added && line.starts_with("Package:") {
            out.push_str("Status: install ok installed\n");
            added = true;
        }
    }
    out
}

fn add_dpkg_database(layer: &mut Layer, packages: &[Unpacked]) -> Result<(), ImageError> {
    let mut status = String::new();
    for pkg in packages {
        let control = &pkg.manifest.control;
        if !status.is_empty() {
            status.push('\n');
        }
        status.push_str(&status_stanza(control));
        let mut list = String::from("/.\n");
        for e in &pkg.manifest.entries {
            list.push('/');
            list.push_str(&e.path);
            list.push('\n');
        }
        let info = format!("/var/lib/dpkg/info/{}", control.info_name());
        layer
            .insert(&format!("{info}.list"), LayerEntry::bytes(list, 0o644))
            .map_err(ImageError::Invalid)?;
        if let Some(md5sums) = &pkg.manifest.md5sums {
            layer
                .insert(
                    &format!("{info}.md5sums"),
                    LayerEntry::bytes(md5sums.clone(), 0o644),
                )
                .map_err(ImageError::Invalid)?;
        }
    }
    layer
        .insert("/var/lib/dpkg/status", LayerEntry::bytes(status, 0o644))
        .map_err(ImageError::Invalid)
}

/// Turns the files of the layer that share one unpacked blob (the hard
/// links of a package) back into hard links: the first path in layer order
/// stays a file, the others link to it. Files from elsewhere (copies) are
/// never linked, whatever their source.
pub fn link_shared_blobs(layer: &mut Layer, kiln_dir: &Path) {
    let root = unpacked_root(kiln_dir);
    let mut first: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut links = Vec::new();
    for (path, e) in layer.entries() {
        if let EntryKind::File {
            source: FileSource::Host(host),
            ..
        } = &e.kind
            && host.starts_with(&root)
        {
            match first.get(host) {
                Some(target) => links.push((path.clone(), target.clone(), e.clone())),
                None => {
                    first.insert(host.clone(), path.clone());
                }
            }
        }
    }
    for (path, target, e) in links {
        let entry = LayerEntry {
            kind: EntryKind::HardLink(target),
            ..e
        };
        layer.insert(&path, entry).expect("paths are normalised");
    }
}

/// The real [`DebSource`]: `kiln.lock` next to the spec and the private
/// apt state of [`super::fetch::Apt`]. Packages the lock pins come from it
/// without apt or network; an image the lock lacks (or whose `debian` list
/// changed) is resolved and recorded, and [`LockedApt::save`] writes the
/// lock back.
#[derive(Debug)]
pub struct LockedApt {
    pub lock: super::Lock,
    pub apt: super::Apt,
    pub lock_path: PathBuf,
    /// Whether the lock gained or changed an image since it was read.
    pub changed: bool,
    /// The locked packages handed out, to fetch them by pin.
    pinned: BTreeMap<(String, Digest), super::LockedPackage>,
}

impl LockedApt {
    /// Reads `<spec_dir>/kiln.lock` (an absent one is empty) and opens the
    /// apt state under `kiln_dir/debian` (no network).
    pub fn open(spec_dir: &Path, kiln_dir: &Path) -> Result<LockedApt, ImageError> {
        let lock_path = super::lock_path(spec_dir);
        let lock = super::Lock::read(&lock_path)?.unwrap_or_default();
        let apt = super::Apt::open(&kiln_dir.join("debian"))?;
        Ok(LockedApt {
            lock,
            apt,
            lock_path,
            changed: false,
            pinned: BTreeMap::new(),
        })
    }
}

impl DebSource for LockedApt {
    fn packages(
        &mut self,
        image: &str,
        requested: &[String],
    ) -> Result<Vec<PinnedDeb>, ImageError> {
        if !super::is_locked(&self.lock, image, requested) {
            self.changed = true;
        }
        let locked = super::locked_packages(&mut self.lock, &mut self.apt, image, requested)?;
        let mut out = Vec::with_capacity(locked.len());
        for p in locked {
            let sha256: Digest = format!("sha256:{}", p.sha256).parse().map_err(|e| {
                ImageError::Invalid(format!(
                    "{}: package `{}` has sha256 `{}`: {e}\n  hint: `kiln lock --update` writes it anew",
                    self.lock_path.display(),
                    p.name,
                    p.sha256
                ))
            })?;
            let pin = PinnedDeb {
                name: p.name.clone(),
                version: p.version.clone(),
                arch: p.arch.clone(),
                sha256: sha256.clone(),
            };
            self.pinned.insert((p.name.clone(), sha256), p);
            out.push(pin);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn fetch(&mut self, pkg: &PinnedDeb) -> Result<PathBuf, ImageError> {
        let locked = self
            .pinned
            .get(&(pkg.name.clone(), pkg.sha256.clone()))
            .ok_or_else(|| {
                ImageError::Invalid(format!(
                    "package `{}` {} was not handed out by the lock",
                    pkg.name, pkg.sha256
                ))
            })?;
        self.apt.fetch(locked)
    }

    /// Writes the lock if it changed.
    fn save(&mut self) -> Result<(), ImageError> {
        if self.changed {
            self.lock.write(&self.lock_path)?;
            self.changed = false;
        }
        Ok(())
    }
}
