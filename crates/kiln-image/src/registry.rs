//! Push and pull images to and from an OCI registry (Distribution API v2),
//! byte for byte.
//!
//! Push uploads the layers and the config the registry lacks (HEAD first),
//! each streamed from the store through its verifying reader, then PUTs the
//! manifest bytes unchanged, so the registry names the image by the same
//! digest. Pull fetches the manifest (checked against the pinned digest, or
//! recorded when pulled by tag), then streams the config and every layer into
//! the store through [`Store::put_blob_from`] with the expected digest:
//! verified, atomic, nothing stored on a mismatch. A signature travels as a
//! cosign-style artifact tagged `sha256-<hex>.sig` (see [`crate::sign`]).
//!
//! HTTP for loopback registries (127.0.0.0/8, `::1`, `localhost`) and with
//! `insecure`; HTTPS with the embedded webpki roots otherwise, so nothing
//! has to be installed. Anonymous, Basic, and Bearer-token authentication.
//!
//! # Why `ureq` and not `oci-client`
//! `oci-client` 0.18 works (the evidence file has it pushing to Debian's
//! docker-registry), but measured on this machine it costs 144 crates and a
//! 128 s clean release build (tokio, hyper, reqwest) against 26 crates and
//! 30 s for `ureq` 3 with rustls + ring; its reqwest 0.13 TLS verifies with
//! the platform's CA store (needs `ca-certificates` at run time) where ureq
//! embeds webpki roots; its `Reference` defaults to docker.io, which kiln
//! refuses; and its API is async, which a blocking library would wrap in a
//! runtime. The endpoints kiln needs are seven (`registry/client.rs`).
//!
//! # Limits
//! Monolithic uploads only (one PUT per blob; no chunked PATCH), no
//! cross-repository mounts, credentials only as given (no docker
//! `config.json` or credential helpers), one signature per image.

mod auth;
mod client;
mod reference;
mod stream;

use std::fmt;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

pub use reference::{Reference, ReferenceError};

use crate::digest::Digest;
use crate::error::ImageError;
use crate::image::{Image, descriptor_digest};
use crate::sign::{self, SIGNATURE_CONFIG_MEDIA_TYPE, SIGNATURE_MEDIA_TYPE, SignError};
use crate::store::Store;
use client::Client;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The annotation on a pulled image's name in `index.json`: where it came
/// from, pinned (`registry/repo[:tag]@sha256:…`), also when pulled by tag.
pub const PULLED_FROM: &str = "io.kiln.image.pulled-from";

/// Errors of registry transfers; each names the registry and what was
/// asked of it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("cannot reach registry {registry} ({url}): {source}\n  hint: {hint}")]
    Connect {
        registry: String,
        url: String,
        source: Box<ureq::Error>,
        hint: &'static str,
    },
    #[error("cannot build a request for {url}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("registry {registry} refused to {op} (HTTP {status}): {detail}")]
    Refused {
        registry: String,
        op: String,
        status: u16,
        detail: String,
    },
    #[error("registry {registry} denied access to {op}: {detail}\n  hint: {}", if *had_credentials { "check the username and password, and that they may access this repository" } else { "give credentials (username and password) for this registry" })]
    Unauthorized {
        registry: String,
        op: String,
        detail: String,
        had_credentials: bool,
    },
    #[error("cannot get a token for registry {registry} from {realm}: {detail}")]
    Token {
        registry: String,
        realm: String,
        detail: String,
    },
    #[error(
        "{reference}: no such manifest in the registry\n  hint: check the repository and the tag or digest"
    )]
    ManifestNotFound { reference: String },
    #[error(
        "refused {reference}: the registry served a manifest whose digest is {actual}, not {expected}; nothing was stored\n  hint: the registry's content was altered, or the reference names another image"
    )]
    ManifestDigestMismatch {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "refused blob {digest} from {registry}: its content hashes to {actual}; nothing was stored\n  hint: the registry's content was altered or damaged"
    )]
    BlobDigestMismatch {
        registry: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("refused blob {digest} from {registry}: the manifest says {expected} bytes, the registry sent {actual}{}", if actual > expected { " or more" } else { "" })]
    BlobSize {
        registry: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("{reference} is a {media_type}, not an image kiln can pull")]
    UnsupportedManifest {
        reference: String,
        media_type: String,
    },
    #[error(
        "{reference} is a multi-platform index with no image for {platform}\n  hint: pull the platform's manifest by its digest"
    )]
    NoPlatform { reference: String, platform: String },
    #[error("{reference}: the manifest is not valid: {detail}")]
    BadManifest { reference: String, detail: String },
    #[error("the {what} at {url} is larger than {limit} bytes; refused")]
    TooLarge {
        what: &'static str,
        url: String,
        limit: u64,
    },
    #[error("cannot read the answer from {url}: {source}")]
    Body { url: String, source: std::io::Error },
    #[error(
        "registry {registry} stored the manifest as {actual}, not {expected}: it changed the bytes; the image's digest would not survive the transfer"
    )]
    PushDigestChanged {
        registry: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{reference} pins {pinned}, but the image to push is {actual}")]
    PinMismatch {
        reference: String,
        pinned: Digest,
        actual: Digest,
    },
    #[error("the signature of {reference} in the registry is not valid: {detail}")]
    BadSignatureArtifact { reference: String, detail: String },
    #[error(transparent)]
    Signature(#[from] SignError),
    #[error(transparent)]
    Store(#[from] ImageError),
}

/// Basic credentials for a registry (also sent to its token realm).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What a blob is, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    Config,
    Layer,
    Signature,
}

/// What happened to a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The destination already had it; nothing was transferred.
    Exists,
    /// `done` of `total` bytes went over the wire so far.
    Transferring,
    /// Transferred and verified.
    Done,
}

/// A progress report, passed to [`TransferOptions::progress`].
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub kind: BlobKind,
    pub digest: &'a Digest,
    pub event: Event,
    pub done: u64,
    pub total: u64,
}

/// How to talk to the registry.
#[derive(Default)]
pub struct TransferOptions<'a> {
    /// Plain HTTP to a registry that is not on this machine.
    pub insecure: bool,
    pub credentials: Option<Credentials>,
    /// Called as blobs move (often: once per read).
    pub progress: Option<&'a mut dyn FnMut(&Progress<'_>)>,
}

impl fmt::Debug for TransferOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferOptions")
            .field("insecure", &self.insecure)
            .field("credentials", &self.credentials)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The pushed image, pinned: `registry/repo[:tag]@sha256:…`.
    pub reference: Reference,
    pub blobs_uploaded: usize,
    pub blobs_existing: usize,
    pub bytes_uploaded: u64,
    /// Where the signature went, if the image had one.
    pub signature: Option<Reference>,
}

/// The tag that carries the signature of image `digest` (cosign's scheme).
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

/// Pushes `image` from `store` to `target` (a tag, a digest, or both), then
/// its signature if it has one. The registry ends up with the manifest bytes
/// unchanged: same digest.
pub fn push(
    store: &Store,
    image: &Image,
    target: &Reference,
    opts: TransferOptions<'_>,
) -> Result<PushReport, RegistryError> {
    if let Some(pinned) = &target.digest
        && *pinned != image.digest
    {
        return Err(RegistryError::PinMismatch {
            reference: target.to_string(),
            pinned: pinned.clone(),
            actual: image.digest.clone(),
        });
    }
    let mut client = Client::new(target, opts.insecure, opts.credentials, true, opts.progress);
    let mut blobs = Vec::with_capacity(image.layers().len() + 1);
    for layer in image.layers() {
        blobs.push((descriptor_digest(layer)?, layer.size(), BlobKind::Layer));
    }
    blobs.push((
        image.config_digest.clone(),
        image.manifest.config().size(),
        BlobKind::Config,
    ));
    let (mut uploaded, mut existing, mut bytes) = (0, 0, 0);
    for (digest, size, kind) in &blobs {
        if client.push_blob(store, digest, *size, *kind)? {
            uploaded += 1;
            bytes += size;
        } else {
            existing += 1;
        }
    }
    let media_type = image
        .manifest
        .media_type()
        .as_ref()
        .map_or_else(|| OCI_MANIFEST.to_owned(), ToString::to_string);
    let put_at = target
        .tag
        .clone()
        .unwrap_or_else(|| image.digest.to_string());
    let stored_as = client.put_manifest(&put_at, &media_type, &image.manifest_bytes)?;
    check_stored_as(target, &image.digest, stored_as)?;

    let signature = match sign::read_signature(store, &image.digest)? {
        Some(minisig) => {
            let subject = (&image.digest, &media_type[..], image.manifest_bytes.len());
            Some(push_signature(&mut client, target, subject, &minisig)?)
        }
        None => None,
    };
    Ok(PushReport {
        reference: target.with_digest(&image.digest),
        blobs_uploaded: uploaded,
        blobs_existing: existing,
        bytes_uploaded: bytes,
        signature,
    })
}

fn check_stored_as(
    target: &Reference,
    expected: &Digest,
    stored_as: Option<Digest>,
) -> Result<(), RegistryError> {
    match stored_as {
        Some(actual) if actual != *expected => Err(RegistryError::PushDigestChanged {
            registry: target.registry.clone(),
            expected: expected.clone(),
            actual,
        }),
        _ => Ok(()),
    }
}

/// The signature as an OCI artifact: the `.minisig` as its one layer, a
/// small config naming what it signs, `subject` pointing at the image (for
/// registries with the referrers API), tagged `sha256-<hex>.sig`.
fn signature_manifest(
    (image, image_type, image_size): (&Digest, &str, usize),
    config: (&Digest, usize),
    minisig: (&Digest, usize),
) -> Vec<u8> {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE_CONFIG_MEDIA_TYPE,
        "config": {
            "mediaType": SIGNATURE_CONFIG_MEDIA_TYPE,
            "digest": config.0.to_string(),
            "size": config.1,
        },
        "layers": [{
            "mediaType": SIGNATURE_MEDIA_TYPE,
            "digest": minisig.0.to_string(),
            "size": minisig.1,
        }],
        "subject": {
            "mediaType": image_type,
            "digest": image.to_string(),
            "size": image_size,
        },
    });
    serde_json::to_vec(&manifest).expect("JSON serialises")
}

fn signature_config(image: &Digest) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "format": "minisign", "signed": image.to_string() }))
        .expect("JSON serialises")
}

fn push_signature(
    client: &mut Client<'_>,
    target: &Reference,
    subject: (&Digest, &str, usize),
    minisig: &[u8],
) -> Result<Reference, RegistryError> {
    let image_digest = subject.0;
    let config = signature_config(image_digest);
    let config_digest = client.push_bytes(&config)?;
    let minisig_digest = client.push_bytes(minisig)?;
    let manifest = signature_manifest(
        subject,
        (&config_digest, config.len()),
        (&minisig_digest, minisig.len()),
    );
    let tag = signature_tag(image_digest);
    let stored_as = client.put_manifest(&tag, OCI_MANIFEST, &manifest)?;
    let manifest_digest = Digest::of(&manifest);
    check_stored_as(target, &manifest_digest, stored_as)?;
    Ok(target.with_tag(&tag).with_digest(&manifest_digest))
}

/// Pulls `source` into `store` and names it `local_name` (default: the
/// reference as written). A pinned digest is checked against the manifest
/// the registry serves; by tag, the digest of what was served is what gets
/// stored and named. A multi-platform index resolves to this machine's
/// platform. The image's signature comes along if the registry has one.
pub fn pull(
    store: &Store,
    source: &Reference,
    local_name: Option<&str>,
    opts: TransferOptions<'_>,
) -> Result<Image, RegistryError> {
    let mut client = Client::new(
        source,
        opts.insecure,
        opts.credentials,
        false,
        opts.progress,
    );
    let (mut digest, mut bytes, media_type) = fetch_manifest(
        &mut client,
        source,
        &source.manifest_ref(),
        source.digest.as_ref(),
    )?;
    if is_index(&media_type, &bytes) {
        let chosen = choose_platform(source, &digest, &bytes)?;
        let pinned = descriptor_digest(&chosen)?;
        (digest, bytes, _) =
            fetch_manifest(&mut client, source, &pinned.to_string(), Some(&pinned))?;
    }
    let reference = source.to_string();
    let manifest: ImageManifest =
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadManifest {
            reference: reference.clone(),
            detail: e.to_string(),
        })?;
    // A manifest may omit its mediaType (OCI allows it); its config's type
    // then tells an image from an artifact such as a signature.
    let declared = manifest.media_type().as_ref().map(ToString::to_string);
    if let Some(kind) = declared.filter(|k| k != OCI_MANIFEST && k != DOCKER_MANIFEST) {
        return Err(RegistryError::UnsupportedManifest {
            reference,
            media_type: kind,
        });
    }
    let config_type = manifest.config().media_type().to_string();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(RegistryError::UnsupportedManifest {
            reference,
            media_type: config_type,
        });
    }
    let mut blobs = vec![(manifest.config().clone(), BlobKind::Config)];
    blobs.extend(
        manifest
            .layers()
            .iter()
            .map(|l| (l.clone(), BlobKind::Layer)),
    );
    for (descriptor, kind) in &blobs {
        let blob = descriptor_digest(descriptor)?;
        if store.has_blob(&blob) {
            client.report(
                *kind,
                &blob,
                Event::Exists,
                descriptor.size(),
                descriptor.size(),
            );
            continue;
        }
        client.pull_blob(store, &blob, descriptor.size(), *kind)?;
    }
    // The signature before the manifest: a pull that fails leaves no name
    // and no manifest, only blobs for gc.
    pull_signature(&mut client, store, source, &digest)?;
    store.put_blob_from(&bytes[..], Some(&digest))?;
    let image = store.load_image(&digest)?;
    let mut descriptor = image.descriptor();
    descriptor.set_annotations(Some(
        [(
            PULLED_FROM.to_owned(),
            source.with_digest(&digest).to_string(),
        )]
        .into(),
    ));
    store.tag(local_name.unwrap_or(&reference), &descriptor)?;
    Ok(image)
}

/// Fetches a manifest and checks its digest: against `pinned`, or against
/// what the registry claims in `Docker-Content-Digest`.
fn fetch_manifest(
    client: &mut Client<'_>,
    source: &Reference,
    by: &str,
    pinned: Option<&Digest>,
) -> Result<(Digest, Vec<u8>, Option<String>), RegistryError> {
    let shown = || match pinned {
        Some(d) => source.with_digest(d).to_string(),
        None => source.to_string(),
    };
    let manifest = client
        .get_manifest(by)?
        .ok_or_else(|| RegistryError::ManifestNotFound { reference: shown() })?;
    let actual = Digest::of(&manifest.bytes);
    if let Some(expected) = pinned.or(manifest.claimed.as_ref())
        && *expected != actual
    {
        return Err(RegistryError::ManifestDigestMismatch {
            reference: shown(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok((actual, manifest.bytes, manifest.media_type))
}

fn is_index(media_type: &Option<String>, bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Option<Probe> = serde_json::from_slice(bytes).ok();
    let declared = probe.as_ref().and_then(|p| p.media_type.clone());
    let kind = declared.or_else(|| media_type.clone()).unwrap_or_default();
    kind == OCI_INDEX || kind == DOCKER_LIST || probe.is_some_and(|p| p.manifests.is_some())
}

/// This machine's platform in OCI's words.
fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

fn choose_platform(
    source: &Reference,
    digest: &Digest,
    bytes: &[u8],
) -> Result<Descriptor, RegistryError> {
    let reference = source.with_digest(digest).to_string();
    let index: ImageIndex =
        serde_json::from_slice(bytes).map_err(|e| RegistryError::BadManifest {
            reference: reference.clone(),
            detail: e.to_string(),
        })?;
    let (os, arch) = host_platform();
    index
        .manifests()
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
        })
        .cloned()
        .ok_or_else(|| RegistryError::NoPlatform {
            reference,
            platform: format!("{os}/{arch}"),
        })
}

/// Fetches the signature artifact of image `digest`, if the registry has
/// one, and stores its `.minisig`. A local signature is kept: it was made or
/// fetched deliberately, and [`sign::verify`] decides what counts.
fn pull_signature(
    client: &mut Client<'_>,
    store: &Store,
    source: &Reference,
    digest: &Digest,
) -> Result<(), RegistryError> {
    if sign::read_signature(store, digest)?.is_some() {
        return Ok(());
    }
    let tag = signature_tag(digest);
    let reference = source.with_tag(&tag).to_string();
    let Some(manifest) = client.get_manifest(&tag)? else {
        return Ok(());
    };
    let bad = |detail: String| RegistryError::BadSignatureArtifact {
        reference: reference.clone(),
        detail,
    };
    let artifact: ImageManifest =
        serde_json::from_slice(&manifest.bytes).map_err(|e| bad(e.to_string()))?;
    let layer = artifact
        .layers()
        .iter()
        .find(|l| l.media_type().to_string() == SIGNATURE_MEDIA_TYPE)
        .ok_or_else(|| bad(format!("it has no {SIGNATURE_MEDIA_TYPE} layer")))?;
    if layer.size() > sign::MAX_SIGNATURE_LEN as u64 {
        return Err(bad(format!("its signature is {} bytes", layer.size())));
    }
    let minisig = client.get_small_blob(&descriptor_digest(layer)?, layer.size())?;
    sign::store_signature(store, digest, &minisig)?;
    Ok(())
}
