//! Image signatures in minisign's format, over the exact manifest bytes.
//!
//! A signature names one image: it is an Ed25519 signature (minisign's
//! prehashed `ED` form) of the manifest exactly as stored, whose digest is
//! the image's. Since the manifest names the config and every layer by
//! digest, and every read of a blob is verified, one signature covers the
//! whole image.
//!
//! The files are minisign's own (jedisct1.github.io/minisign): `NAME.key`
//! (secret, mode 0600, scrypt-encrypted when a password is given) and
//! `NAME.pub`, and one `.minisig` per image under
//! `kiln_dir()/signatures/<manifest hex>.minisig`. So `minisign -Vm
//! manifest.json -p NAME.pub -x <hex>.minisig` checks a kiln signature, and a
//! signature made with `minisign -S` over the manifest is accepted by kiln.
//! In a registry the signature travels as an OCI artifact tagged
//! `sha256-<hex>.sig` (see [`crate::registry`]).
//!
//! The `minisign` crate does the cryptography. It is not trusted with
//! untrusted input as is: 0.10 panics on a global signature shorter than 64
//! bytes, and prompts on the terminal for a missing password. So a signature
//! file is checked here first ([`parse_signature`]), and a secret key's
//! encryption is read before the crate sees it.

use std::fs::{self, OpenOptions};
use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ct_codecs::{Base64, Decoder, Encoder};
use minisign::{PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};

use crate::digest::Digest;
use crate::error::ImageError;
use crate::image::Image;
use crate::store::Store;

/// Media type of the layer that holds a `.minisig` in a registry.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.kiln.minisign.v1";
/// Media type of a signature artifact's config (and its artifact type).
pub const SIGNATURE_CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.signature.v1+json";
/// The largest signature file accepted (a minisig is ~300 bytes; the rest
/// is room for a long trusted comment).
pub const MAX_SIGNATURE_LEN: usize = 64 * 1024;

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";

/// Errors of key handling, signing and verification.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; kiln does not overwrite keys\n  hint: choose another name or move the old key away", path.display())]
    KeyExists { path: PathBuf },
    #[error("`{name}` is not a key name (letters, digits, `.`, `_`, `-`)")]
    BadKeyName { name: String },
    #[error("{} is not a minisign key: {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("secret key {} is protected by a password and none was given\n  hint: pass the key's password", path.display())]
    NeedPassword { path: PathBuf },
    #[error("wrong password for secret key {}", path.display())]
    WrongPassword { path: PathBuf },
    #[error("cannot {op}: {detail}")]
    Crypto { op: &'static str, detail: String },
    #[error(
        "no trusted keys to verify image {digest} with\n  hint: list public keys in [policy] trusted_keys"
    )]
    NoTrustedKeys { digest: Digest },
    #[error("image {digest} is not signed (no signature at {})\n  hint: `kiln image sign {}` signs it; `kiln image pull` brings a registry's signature along", path.display(), digest.short())]
    Unsigned { digest: Digest, path: PathBuf },
    #[error("image {digest} is signed by key {key_id}, which is not trusted (trusted: {})\n  hint: if you trust that key, add its public key to [policy] trusted_keys", trusted.join(", "))]
    UntrustedKey {
        digest: Digest,
        key_id: String,
        trusted: Vec<String>,
    },
    #[error(
        "the signature of image {digest} by key {key_id} does not match: the manifest or the signature was altered; the image is refused\n  hint: pull the image and its signature again from a trusted source, or sign it again"
    )]
    BadSignature { digest: Digest, key_id: String },
    #[error("the signature of image {digest} is not a minisign signature: {detail}")]
    Malformed { digest: Digest, detail: String },
    #[error(transparent)]
    Store(#[from] ImageError),
}

/// The two files of a generated key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub key_id: String,
    pub secret_key: PathBuf,
    pub public_key: PathBuf,
}

/// A signature kiln made and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub image: Digest,
    pub key_id: String,
    pub path: PathBuf,
    pub trusted_comment: String,
}

/// Who vouched for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBy {
    pub key_id: String,
    /// The trusted public key file that verified it.
    pub key_path: PathBuf,
    /// The signed comment (kiln writes `timestamp:…` and `image:…`).
    pub trusted_comment: String,
}

/// A public key that signatures are checked against.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub key_id: String,
    pub path: PathBuf,
    key: PublicKey,
}

/// The parts of a `.minisig` file, checked for form (not for validity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSignature {
    pub key_id: String,
    /// `ED` (the BLAKE2b-512 prehash of the data is signed) or legacy `Ed`.
    pub prehashed: bool,
    pub untrusted_comment: String,
    pub trusted_comment: String,
    keynum: [u8; 8],
}

/// minisign's key id: the 8-byte key number as a little-endian u64, in hex.
fn key_id(keynum: &[u8]) -> String {
    let mut n = [0u8; 8];
    n.copy_from_slice(&keynum[..8]);
    format!("{:016X}", u64::from_le_bytes(n))
}

/// Writes `DIR/NAME.key` (mode 0600) and `DIR/NAME.pub`. With a password the
/// secret key is encrypted as minisign does (scrypt); without, it is stored
/// in the clear like `minisign -G -W`.
pub fn generate_keypair(
    dir: &Path,
    name: &str,
    password: Option<&str>,
) -> Result<KeyPair, SignError> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(SignError::BadKeyName {
            name: name.to_owned(),
        });
    }
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return Err(SignError::KeyExists { path: path.clone() });
        }
    }
    let crypto = |detail: minisign::PError| SignError::Crypto {
        op: "generate a key pair",
        detail: detail.to_string(),
    };
    let pair = match password {
        Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p.to_owned())),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(crypto)?;
    let id = key_id(pair.pk.keynum());
    let comment = match password {
        Some(_) => "minisign encrypted secret key".to_owned(),
        None => format!("minisign secret key {id} (not encrypted)"),
    };
    let secret = pair.sk.to_box(Some(&comment)).map_err(crypto)?.to_bytes();
    let public = pair.pk.to_box().map_err(crypto)?.to_bytes();
    fs::create_dir_all(dir).map_err(|source| SignError::Io {
        op: "create key directory",
        path: dir.to_path_buf(),
        source,
    })?;
    write_new(&secret_path, &secret, 0o600)?;
    if let Err(e) = write_new(&public_path, &public, 0o644) {
        let _ = fs::remove_file(&secret_path);
        return Err(e);
    }
    Ok(KeyPair {
        key_id: id,
        secret_key: secret_path,
        public_key: public_path,
    })
}

/// Creates `path` (never replacing a file) with `mode` from the start, so a
/// secret is never readable by others, even briefly.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SignError> {
    let io = |op, source| SignError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SignError::KeyExists {
                path: path.to_path_buf(),
            },
            _ => io("create key file", e),
        })?;
    f.write_all(bytes).map_err(|e| io("write key file", e))?;
    f.sync_all().map_err(|e| io("fsync key file", e))
}

/// Reads a secret key without ever prompting: an encrypted key needs
/// `password`.
fn load_secret_key(path: &Path, password: Option<&str>) -> Result<SecretKey, SignError> {
    let text = fs::read_to_string(path).map_err(|source| SignError::Io {
        op: "read secret key",
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |detail: String| SignError::BadKey {
        path: path.to_path_buf(),
        detail,
    };
    let encoded = text
        .lines()
        .nth(1)
        .ok_or_else(|| bad("no key line".to_owned()))?;
    let raw = Base64::decode_to_vec(encoded.trim(), None)
        .map_err(|_| bad("the key line is not base64".to_owned()))?;
    // sig_alg (2) kdf_alg (2) …: kdf_alg 0,0 means not encrypted.
    if raw.len() < 4 || &raw[..2] != b"Ed" {
        return Err(bad("not an Ed25519 secret key".to_owned()));
    }
    let encrypted = raw[2..4] != [0, 0];
    let key_box = SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
    let key =
        match (encrypted, password) {
            (false, _) => key_box
                .into_unencrypted_secret_key()
                .map_err(|e| bad(e.to_string()))?,
            (true, None) => {
                return Err(SignError::NeedPassword {
                    path: path.to_path_buf(),
                });
            }
            (true, Some(p)) => key_box
                .into_secret_key(Some(p.to_owned()))
                .map_err(|e| match e.kind() {
                    minisign::ErrorKind::Verify => SignError::WrongPassword {
                        path: path.to_path_buf(),
                    },
                    _ => bad(e.to_string()),
                })?,
        };
    Ok(key)
}

/// Reads a public key file: minisign's two-line `.pub`, or the bare base64
/// line `minisign -P` takes.
pub fn load_public_key(path: &Path) -> Result<TrustedKey, SignError> {
    let text = fs::read_to_string(path).map_err(|source| SignError::Io {
        op: "read public key",
        path: path.to_path_buf(),
        source,
    })?;
    parse_public_key(&text, path)
}

/// Parses a public key (see [`load_public_key`]); `path` is for messages.
pub fn parse_public_key(text: &str, path: &Path) -> Result<TrustedKey, SignError> {
    let parsed = if text.starts_with(UNTRUSTED_PREFIX) {
        PublicKeyBox::from_string(text).and_then(PublicKeyBox::into_public_key)
    } else {
        PublicKey::from_base64(text.trim())
    };
    let key = parsed.map_err(|e| SignError::BadKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(TrustedKey {
        key_id: key_id(key.keynum()),
        path: path.to_path_buf(),
        key,
    })
}

/// Where the signature of image `digest` is kept.
pub fn signature_path(store: &Store, digest: &Digest) -> PathBuf {
    store
        .kiln_dir()
        .join("signatures")
        .join(format!("{}.minisig", digest.hex()))
}

/// The stored signature of image `digest`, if there is one.
pub fn read_signature(store: &Store, digest: &Digest) -> Result<Option<Vec<u8>>, SignError> {
    let path = signature_path(store, digest);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SignError::Io {
            op: "read signature",
            path,
            source,
        }),
    }
}

/// Stores `bytes` as the signature of image `digest` (atomically), after
/// checking that they are a minisign signature. Whether it verifies is
/// decided by [`verify`], against the trusted keys.
pub fn store_signature(store: &Store, digest: &Digest, bytes: &[u8]) -> Result<PathBuf, SignError> {
    parse_signature(bytes).map_err(|detail| SignError::Malformed {
        digest: digest.clone(),
        detail,
    })?;
    let path = signature_path(store, digest);
    let dir = path.parent().expect("a signature path has a parent");
    fs::create_dir_all(dir).map_err(|source| SignError::Io {
        op: "create signature directory",
        path: dir.to_path_buf(),
        source,
    })?;
    store.write_atomic(&path, bytes)?;
    Ok(path)
}

/// Signs the exact manifest bytes of `image` and stores the signature,
/// replacing an earlier one.
pub fn sign(
    store: &Store,
    image: &Image,
    secret_key: &Path,
    password: Option<&str>,
) -> Result<Signature, SignError> {
    let actual = Digest::of(&image.manifest_bytes);
    if actual != image.digest {
        // Only what the digest names is ever signed.
        return Err(ImageError::DigestMismatch {
            expected: image.digest.clone(),
            actual,
            path: store.blob_path(&image.digest),
        }
        .into());
    }
    let sk = load_secret_key(secret_key, password)?;
    let pk = PublicKey::from_secret_key(&sk).map_err(|e| SignError::BadKey {
        path: secret_key.to_path_buf(),
        detail: e.to_string(),
    })?;
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let trusted_comment = format!("timestamp:{timestamp}\timage:{}", image.digest);
    let untrusted_comment = format!("signature from kiln, image {}", image.digest);
    let signature = minisign::sign(
        Some(&pk),
        &sk,
        Cursor::new(&image.manifest_bytes),
        Some(&trusted_comment),
        Some(&untrusted_comment),
    )
    .map_err(|e| SignError::Crypto {
        op: "sign",
        detail: e.to_string(),
    })?;
    let path = store_signature(store, &image.digest, &signature.to_bytes())?;
    Ok(Signature {
        image: image.digest.clone(),
        key_id: key_id(sk.keynum()),
        path,
        trusted_comment,
    })
}

/// Checks that `image` carries a valid signature by one of `trusted_keys`
/// (public key files).
pub fn verify(
    store: &Store,
    image: &Image,
    trusted_keys: &[PathBuf],
) -> Result<VerifiedBy, SignError> {
    let keys = trusted_keys
        .iter()
        .map(|p| load_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(signature) = read_signature(store, &image.digest)? else {
        if keys.is_empty() {
            return Err(SignError::NoTrustedKeys {
                digest: image.digest.clone(),
            });
        }
        return Err(SignError::Unsigned {
            digest: image.digest.clone(),
            path: signature_path(store, &image.digest),
        });
    };
    verify_bytes(&image.manifest_bytes, &image.digest, &signature, &keys)
}

/// The pure core of [`verify`]: `signature` (a `.minisig` file's bytes) over
/// `manifest` (the bytes of image `digest`), by one of `keys`.
pub fn verify_bytes(
    manifest: &[u8],
    digest: &Digest,
    signature: &[u8],
    keys: &[TrustedKey],
) -> Result<VerifiedBy, SignError> {
    if keys.is_empty() {
        return Err(SignError::NoTrustedKeys {
            digest: digest.clone(),
        });
    }
    let malformed = |detail: String| SignError::Malformed {
        digest: digest.clone(),
        detail,
    };
    let parsed = parse_signature(signature).map_err(malformed)?;
    let text = std::str::from_utf8(signature).expect("parse_signature checked UTF-8");
    let sig_box = SignatureBox::from_string(text).map_err(|e| malformed(e.to_string()))?;
    let candidates: Vec<&TrustedKey> = keys
        .iter()
        .filter(|k| k.key.keynum() == parsed.keynum)
        .collect();
    if candidates.is_empty() {
        return Err(SignError::UntrustedKey {
            digest: digest.clone(),
            key_id: parsed.key_id,
            trusted: keys
                .iter()
                .map(|k| format!("{} ({})", k.key_id, k.path.display()))
                .collect(),
        });
    }
    // Two trusted keys may share a key number; any of them may vouch.
    for key in candidates {
        if minisign::verify(&key.key, &sig_box, Cursor::new(manifest), true, false, true).is_ok() {
            return Ok(VerifiedBy {
                key_id: key.key_id.clone(),
                key_path: key.path.clone(),
                trusted_comment: parsed.trusted_comment,
            });
        }
    }
    Err(SignError::BadSignature {
        digest: digest.clone(),
        key_id: parsed.key_id,
    })
}

/// Checks the form of a `.minisig` file: four lines (untrusted comment,
/// base64 of `Ed`/`ED` + key number + signature, trusted comment, base64 of
/// the 64-byte global signature). Errors say what is wrong.
pub fn parse_signature(bytes: &[u8]) -> Result<ParsedSignature, String> {
    if bytes.len() > MAX_SIGNATURE_LEN {
        return Err(format!("it is larger than {MAX_SIGNATURE_LEN} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_owned())?;
    let mut lines = text.lines();
    let mut line = |what: &str| {
        lines
            .next()
            .ok_or_else(|| format!("the {what} line is missing"))
    };
    let untrusted = line("untrusted comment")?;
    let signature = line("signature")?;
    let trusted = line("trusted comment")?;
    let global = line("global signature")?;
    let untrusted_comment = untrusted
        .strip_prefix(UNTRUSTED_PREFIX)
        .ok_or_else(|| format!("the first line does not start with `{UNTRUSTED_PREFIX}`"))?;
    let trusted_comment = trusted
        .strip_prefix(TRUSTED_PREFIX)
        .ok_or_else(|| format!("the third line does not start with `{TRUSTED_PREFIX}`"))?;
    let sig = Base64::decode_to_vec(signature.trim(), None)
        .map_err(|_| "the signature line is not base64".to_owned())?;
    if sig.len() != 2 + 8 + 64 {
        return Err(format!("the signature is {} bytes, not 74", sig.len()));
    }
    let prehashed = match &sig[..2] {
        b"ED" => true,
        b"Ed" => false,
        _ => return Err("the signature algorithm is neither `ED` nor `Ed`".to_owned()),
    };
    let global = Base64::decode_to_vec(global.trim(), None)
        .map_err(|_| "the global signature line is not base64".to_owned())?;
    if global.len() != 64 {
        return Err(format!(
            "the global signature is {} bytes, not 64",
            global.len()
        ));
    }
    let mut keynum = [0u8; 8];
    keynum.copy_from_slice(&sig[2..10]);
    Ok(ParsedSignature {
        key_id: key_id(&keynum),
        prehashed,
        untrusted_comment: untrusted_comment.to_owned(),
        trusted_comment: trusted_comment.trim().to_owned(),
        keynum,
    })
}

/// Encodes bytes as minisign does (standard base64, padded).
pub(crate) fn base64(bytes: &[u8]) -> String {
    Base64::encode_to_string(bytes).expect("base64 of a small buffer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_short_global_signatures_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let pair = generate_keypair(dir.path(), "k", None).unwrap();
        let key = load_public_key(&pair.public_key).unwrap();
        let manifest = b"{}";
        let digest = Digest::of(manifest);
        let sk = load_secret_key(&pair.secret_key, None).unwrap();
        let good = minisign::sign(None, &sk, Cursor::new(manifest), Some("t"), None)
            .unwrap()
            .to_string();
        assert_eq!(
            verify_bytes(
                manifest,
                &digest,
                good.as_bytes(),
                std::slice::from_ref(&key)
            )
            .unwrap()
            .key_id,
            pair.key_id
        );
        let mut lines: Vec<&str> = good.lines().collect();
        lines[3] = "AAAA";
        let short = lines.join("\n");
        let err = verify_bytes(manifest, &digest, short.as_bytes(), &[key]).unwrap_err();
        assert!(matches!(err, SignError::Malformed { .. }), "{err}");
        assert!(
            err.to_string().contains("global signature is 3 bytes"),
            "{err}"
        );
    }

    #[test]
    fn secret_keys_are_private_and_passwords_never_prompt() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pair = generate_keypair(dir.path(), "release", Some("pw")).unwrap();
        let mode = fs::metadata(&pair.secret_key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            load_secret_key(&pair.secret_key, None).unwrap_err(),
            SignError::NeedPassword { .. }
        ));
        assert!(matches!(
            load_secret_key(&pair.secret_key, Some("nope")).unwrap_err(),
            SignError::WrongPassword { .. }
        ));
        let sk = load_secret_key(&pair.secret_key, Some("pw")).unwrap();
        assert_eq!(key_id(sk.keynum()), pair.key_id);
        assert!(matches!(
            generate_keypair(dir.path(), "release", None).unwrap_err(),
            SignError::KeyExists { .. }
        ));
        assert!(matches!(
            generate_keypair(dir.path(), "../x", None).unwrap_err(),
            SignError::BadKeyName { .. }
        ));
    }
}
