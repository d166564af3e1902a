//! Errors of the image crate: each names the operation and the resource.

use std::path::PathBuf;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {digest} is corrupted: {} does not hash to its name; it was refused and not used\n  hint: `kiln image verify` checks the whole store; re-import or rebuild the image", path.display())]
    Corrupt { digest: Digest, path: PathBuf },
    #[error("blob {digest} is missing from the store ({})\n  hint: re-import or rebuild the image; `kiln image verify` lists what else is missing", path.display())]
    BlobMissing { digest: Digest, path: PathBuf },
    #[error("content does not match its digest: expected {expected}, got {actual} ({})", path.display())]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        path: PathBuf,
    },
    #[error("{what} {digest} is not valid JSON: {source}")]
    BadJson {
        what: &'static str,
        digest: Digest,
        source: serde_json::Error,
    },
    #[error("{} is not a valid OCI index: {source}", path.display())]
    BadIndex {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no image `{reference}` in {}\n  hint: `kiln image ls` lists the images; `kiln build` makes the project's", store.display())]
    UnknownImage { reference: String, store: PathBuf },
    #[error("{0}")]
    Invalid(String),
    #[error("image `{image}`: copy source `{src}` does not exist ({})\n  hint: create it (build it first?) or fix `copy` in kiln.toml", path.display())]
    CopySourceMissing {
        image: String,
        src: String,
        path: PathBuf,
    },
    #[error("image `{image}`: {why}\n  hint: {hint}")]
    BadCopy {
        image: String,
        why: String,
        hint: String,
    },
    #[error("package `{package}`: {} is not a valid .deb: {source}; it was refused and nothing of it was used\n  hint: delete the file so that it is downloaded again; if it comes back the same, the package is broken (report it)", deb.display())]
    BadDeb {
        package: String,
        deb: PathBuf,
        source: crate::debian::deb::DebError,
    },
    #[error("package `{package}`: {} hashes to {actual}, not to {expected} (kiln.lock); it was refused and nothing of it was used\n  hint: delete the file so that it is downloaded and verified again; `kiln lock --update` if the lock is what is wrong", deb.display())]
    DebMismatch {
        package: String,
        deb: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error("image `{image}`: /{path} is in both package `{}` and package `{}`, differently ({why}); dpkg would refuse to install both\n  hint: drop one of the packages from `debian`, or override the path with a `copy`", packages.0, packages.1)]
    PackageConflict {
        image: String,
        path: String,
        /// The first package that has it, and the one that has it otherwise.
        packages: Box<(String, String)>,
        why: String,
    },
    #[error("{} (unpacked package `{package}`) changed since it was unpacked (expected {expected}, read {actual}); nothing was built from it\n  hint: delete {} so that the package is unpacked again from its verified .deb", path.display(), path.parent().and_then(std::path::Path::parent).unwrap_or(path).display())]
    UnpackedChanged {
        package: String,
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error("image `{image}`: base `{base}` {why}\n  hint: {hint}")]
    BaseUnavailable {
        image: String,
        base: String,
        why: String,
        hint: String,
    },
    #[error("cannot read ELF file {}: {why}", path.display())]
    BadElf { path: PathBuf, why: String },
    #[error("shared library `{library}` needed by {} was not found (searched: {})\n  hint: install the package that provides it, or copy it into the image and set `closure = false`", needed_by.display(), searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    LibraryNotFound {
        library: String,
        needed_by: PathBuf,
        searched: Vec<PathBuf>,
    },
    #[error("{} changed while the image was being built (expected {expected}, read {actual})\n  hint: run the build again once the file is no longer being written", path.display())]
    InputChanged {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "layer {layer}: entry `{entry}` refused: {why}; nothing was written outside the image root"
    )]
    UnsafeEntry {
        layer: String,
        entry: String,
        why: String,
    },
    #[error("cannot read {what}: {source}")]
    BadArchive {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    // Resolving, fetching and locking Debian packages (debian/).
    #[error("image `{image}`: Debian package `{package}` is in none of the apt sources{}\n  hint: check the name with `apt-cache search {package}`; the sources are /etc/apt/sources.list and /etc/apt/sources.list.d/", required_by.as_ref().map(|r| format!(" (needed by {r})")).unwrap_or_default())]
    DebianUnknownPackage {
        image: String,
        package: String,
        required_by: Option<String>,
    },
    #[error(
        "image `{image}`: cannot satisfy `{relation}` of {package}: {why}\n  hint: refresh the package lists with `kiln lock --update`; if it persists, these packages cannot be installed together from the machine's apt sources"
    )]
    DebianUnsatisfiable {
        image: String,
        package: String,
        relation: String,
        why: String,
    },
    #[error("apt metadata {} refused: {why}; nothing was resolved from it\n  hint: {hint}", path.display())]
    DebianMetadata {
        path: PathBuf,
        why: String,
        hint: String,
    },
    #[error("cached package {} refused: {why}, but kiln.lock says {package} is {expected}; it was not used\n  hint: delete it (`rm {}`) and build again: kiln downloads and verifies it anew", path.display(), path.display())]
    DebianTampered {
        path: PathBuf,
        /// `name version`
        package: String,
        /// `sha256 HEX, N bytes`
        expected: String,
        why: String,
    },
    #[error(
        "cannot download Debian package {package} ({filename}): {why}\n  hint: check the network and the apt sources; if the archive dropped this version, `kiln lock --update` moves to the current one"
    )]
    DebianFetch {
        /// `name version`
        package: String,
        filename: String,
        why: String,
    },
    #[error("`{command}` failed: {why}\n  hint: {hint}")]
    DebianApt {
        command: String,
        why: String,
        hint: String,
    },
    #[error("{}:{line}: {why}\n  hint: fix that line, or delete {} and run `kiln lock --update` to write it anew", path.display(), path.display())]
    LockInvalid {
        path: PathBuf,
        line: usize,
        why: String,
    },
}
