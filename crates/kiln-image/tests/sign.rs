//! Signatures: minisign's format both ways with Debian's `minisign`, the
//! signature travelling through a registry, and each kind of refusal.

mod common_registry;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common_registry::{Registry, require_tool, test_image};
use kiln_image::registry::{self, TransferOptions};
use kiln_image::sign::{self, SignError};
use kiln_image::{Image, Store};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn keys(dir: &Path, name: &str) -> sign::KeyPair {
    sign::generate_keypair(dir, name, None).unwrap()
}

/// Runs Debian's minisign; returns whether it succeeded, printing its output.
fn minisign(args: &[&dyn AsRef<std::ffi::OsStr>]) -> bool {
    let output = Command::new("minisign")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "minisign {:?}: {}\n{}{}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.status.success()
}

fn export_manifest(image: &Image, dir: &Path) -> PathBuf {
    let path = dir.join("manifest.json");
    fs::write(&path, &image.manifest_bytes).unwrap();
    path
}

#[test]
fn a_signed_image_verifies_with_its_public_key() {
    let (_s, store) = store();
    let keydir = tempfile::tempdir().unwrap();
    let pair = keys(keydir.path(), "release");
    let image = test_image(&store, "web", "hello");
    let signature = sign::sign(&store, &image, &pair.secret_key, None).unwrap();
    assert_eq!(signature.key_id, pair.key_id);
    assert_eq!(signature.path, sign::signature_path(&store, &image.digest));
    assert!(
        signature
            .trusted_comment
            .contains(&image.digest.to_string())
    );
    let by = sign::verify(&store, &image, std::slice::from_ref(&pair.public_key)).unwrap();
    assert_eq!(
        (by.key_id.as_str(), by.key_path.as_path()),
        (pair.key_id.as_str(), pair.public_key.as_path())
    );
    assert_eq!(by.trusted_comment, signature.trusted_comment);
}

#[test]
fn password_protected_keys_sign_with_their_password() {
    let (_s, store) = store();
    let keydir = tempfile::tempdir().unwrap();
    let pair = sign::generate_keypair(keydir.path(), "release", Some("correct horse")).unwrap();
    let image = test_image(&store, "web", "hello");
    let err = sign::sign(&store, &image, &pair.secret_key, None).unwrap_err();
    assert!(matches!(err, SignError::NeedPassword { .. }), "{err}");
    let err = sign::sign(&store, &image, &pair.secret_key, Some("wrong")).unwrap_err();
    assert!(matches!(err, SignError::WrongPassword { .. }), "{err}");
    assert!(!sign::signature_path(&store, &image.digest).exists());
    sign::sign(&store, &image, &pair.secret_key, Some("correct horse")).unwrap();
    sign::verify(&store, &image, &[pair.public_key]).unwrap();
}

#[test]
fn an_unsigned_image_is_refused_naming_it() {
    let (_s, store) = store();
    let keydir = tempfile::tempdir().unwrap();
    let pair = keys(keydir.path(), "release");
    let image = test_image(&store, "web", "hello");
    let err = sign::verify(&store, &image, &[pair.public_key]).unwrap_err();
    assert!(matches!(err, SignError::Unsigned { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&image.digest.to_string()), "{text}");
    assert!(text.contains("hint: `kiln image sign"), "{text}");
}

#[test]
fn a_signature_by_another_key_is_refused_naming_both_keys() {
    let (_s, store) = store();
    let keydir = tempfile::tempdir().unwrap();
    let trusted = keys(keydir.path(), "trusted");
    let stranger = keys(keydir.path(), "stranger");
    let image = test_image(&store, "web", "hello");
    sign::sign(&store, &image, &stranger.secret_key, None).unwrap();
    let err = sign::verify(&store, &image, std::slice::from_ref(&trusted.public_key)).unwrap_err();
    match &err {
        SignError::UntrustedKey {
            key_id,
            trusted: list,
            ..
        } => {
            assert_eq!(key_id, &stranger.key_id);
            assert!(list[0].contains(&trusted.key_id), "{list:?}");
        }
        other => panic!("expected an untrusted key, got {other}"),
    }
    assert!(err.to_string().contains(&stranger.key_id));
    assert!(err.to_string().contains(&trusted.key_id));

    // The stranger claims to be the trusted key (its key number copied into
    // the signature): the cryptography refuses it.
    let forged = with_keynum_of(
        &sign::read_signature(&store, &image.digest)
            .unwrap()
            .unwrap(),
        &trusted.public_key,
    );
    sign::store_signature(&store, &image.digest, &forged).unwrap();
    let err = sign::verify(&store, &image, std::slice::from_ref(&trusted.public_key)).unwrap_err();
    assert!(matches!(err, SignError::BadSignature { .. }), "{err}");
}

/// Rewrites the key number inside a signature to the one of `public_key`.
fn with_keynum_of(minisig: &[u8], public_key: &Path) -> Vec<u8> {
    use ct_codecs::{Base64, Decoder, Encoder};
    let text = String::from_utf8(minisig.to_vec()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let pk = fs::read_to_string(public_key).unwrap();
    let pk = Base64::decode_to_vec(pk.lines().nth(1).unwrap(), None).unwrap();
    let mut sig = Base64::decode_to_vec(&lines[1], None).unwrap();
    sig[2..10].copy_from_slice(&pk[2..10]);
    lines[1] = Base64::encode_to_string(&sig).unwrap();
    (lines.join("\n") + "\n").into_bytes()
}

#[test]
fn a_changed_manifest_or_a_moved_signature_is_refused() {
    let (_s, store) = store();
    let keydir = tempfile::tempdir().unwrap();
    let pair = keys(keydir.path(), "release");
    let image = test_image(&store, "web", "hello");
    sign::sign(&store, &image, &pair.secret_key, None).unwrap();
    let trusted = std::slice::from_ref(&pair.public_key);

    // One byte of the manifest changed (the digest it claims kept).
    let mut changed = image.clone();
    changed.manifest_bytes[10] ^= 1;
    let err = sign::verify(&store, &changed, trusted).unwrap_err();
    assert!(matches!(err, SignError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains(&image.digest.to_string()));
    assert!(err.to_string().contains("altered"));
    // …and such bytes are never signed under the digest they do not have.
    let err = sign::sign(&store, &changed, &pair.secret_key, None).unwrap_err();
    assert!(
        matches!(
            err,
            SignError::Store(kiln_image::ImageError::DigestMismatch { .. })
        ),
        "{err}"
    );

    // The signature of one image presented as another's.
    let other = test_image(&store, "other", "other");
    let minisig = sign::read_signature(&store, &image.digest)
        .unwrap()
        .unwrap();
    sign::store_signature(&store, &other.digest, &minisig).unwrap();
    let err = sign::verify(&store, &other, trusted).unwrap_err();
    assert!(matches!(err, SignError::BadSignature { .. }), "{err}");

    // Garbage is not stored as a signature, and is refused if found.
    let err = sign::store_signature(&store, &other.digest, b"not a signature").unwrap_err();
    assert!(matches!(err, SignError::Malformed { .. }), "{err}");
    fs::write(
        sign::signature_path(&store, &other.digest),
        "untrusted comment: x\nAAAA\n",
    )
    .unwrap();
    let err = sign::verify(&store, &other, trusted).unwrap_err();
    assert!(matches!(err, SignError::Malformed { .. }), "{err}");

    // A store blob changed on disk never gets as far as the signature.
    common_registry::flip_byte(&store.blob_path(&image.digest), 10);
    assert!(store.load_image(&image.digest).is_err());
}

#[test]
fn debian_minisign_verifies_kiln_signatures_and_kiln_verifies_minisigns() {
    if require_tool("minisign", "minisign").is_none() {
        return;
    }
    let (_s, store) = store();
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(&store, "web", "hello");
    let manifest = export_manifest(&image, dir.path());

    // kiln signs; minisign verifies the exported manifest bytes.
    let kiln = keys(dir.path(), "kiln");
    sign::sign(&store, &image, &kiln.secret_key, None).unwrap();
    let sig = sign::signature_path(&store, &image.digest);
    assert!(minisign(&[
        &"-V",
        &"-m",
        &manifest,
        &"-p",
        &kiln.public_key,
        &"-x",
        &sig
    ]));
    // …and refuses them over changed bytes, like kiln.
    let changed = dir.path().join("changed.json");
    let mut bytes = image.manifest_bytes.clone();
    bytes[10] ^= 1;
    fs::write(&changed, bytes).unwrap();
    assert!(!minisign(&[
        &"-V",
        &"-m",
        &changed,
        &"-p",
        &kiln.public_key,
        &"-x",
        &sig
    ]));

    // A password-protected kiln key signs too; minisign verifies that.
    let locked = sign::generate_keypair(dir.path(), "locked", Some("pw")).unwrap();
    sign::sign(&store, &image, &locked.secret_key, Some("pw")).unwrap();
    assert!(minisign(&[
        &"-V",
        &"-m",
        &manifest,
        &"-p",
        &locked.public_key,
        &"-x",
        &sig
    ]));

    // minisign makes a key (no password) and signs; kiln verifies.
    let theirs_pub = dir.path().join("theirs.pub");
    let theirs_key = dir.path().join("theirs.key");
    assert!(minisign(&[
        &"-G",
        &"-W",
        &"-p",
        &theirs_pub,
        &"-s",
        &theirs_key
    ]));
    let their_sig = dir.path().join("manifest.json.minisig");
    assert!(minisign(&[
        &"-S",
        &"-s",
        &theirs_key,
        &"-m",
        &manifest,
        &"-x",
        &their_sig
    ]));
    sign::store_signature(&store, &image.digest, &fs::read(&their_sig).unwrap()).unwrap();
    let by = sign::verify(
        &store,
        &image,
        &[kiln.public_key.clone(), theirs_pub.clone()],
    )
    .unwrap();
    assert_eq!(by.key_path, theirs_pub);
    let pub_text = fs::read_to_string(&theirs_pub).unwrap();
    // minisign prints the key id without leading zeros (`{:X}` of a u64);
    // kiln writes all 16 digits: compare the numbers.
    let printed = pub_text
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .trim();
    assert_eq!(
        u64::from_str_radix(printed, 16).ok(),
        u64::from_str_radix(&by.key_id, 16).ok(),
        "{pub_text} vs {}",
        by.key_id
    );
    // Their signature, our key only: untrusted.
    let err = sign::verify(&store, &image, std::slice::from_ref(&kiln.public_key)).unwrap_err();
    assert!(matches!(err, SignError::UntrustedKey { .. }), "{err}");

    // minisign signs with kiln's (unencrypted) secret key file as well.
    let with_kiln_key = dir.path().join("kiln-made-by-minisign.minisig");
    assert!(minisign(&[
        &"-S",
        &"-s",
        &kiln.secret_key,
        &"-m",
        &manifest,
        &"-x",
        &with_kiln_key
    ]));
    sign::store_signature(&store, &image.digest, &fs::read(&with_kiln_key).unwrap()).unwrap();
    assert_eq!(
        sign::verify(&store, &image, &[kiln.public_key])
            .unwrap()
            .key_id,
        kiln.key_id
    );
}

#[test]
fn the_signature_travels_with_the_image_through_a_registry() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_s, source) = store();
    let keydir = tempfile::tempdir().unwrap();
    let pair = keys(keydir.path(), "release");
    let image = test_image(&source, "web", "hello");
    sign::sign(&source, &image, &pair.secret_key, None).unwrap();
    let target = registry.reference("team/web:v1");
    let report = registry::push(&source, &image, &target, TransferOptions::default()).unwrap();
    let sig_ref = report.signature.expect("the signature was pushed");
    assert_eq!(
        sig_ref.tag.as_deref(),
        Some(registry::signature_tag(&image.digest).as_str())
    );

    let (_d, dest) = store();
    let pulled = registry::pull(&dest, &target, None, TransferOptions::default()).unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(
        sign::read_signature(&dest, &pulled.digest).unwrap(),
        sign::read_signature(&source, &image.digest).unwrap()
    );
    let by = sign::verify(&dest, &pulled, std::slice::from_ref(&pair.public_key)).unwrap();
    assert_eq!(by.key_id, pair.key_id);

    // The signature artifact itself is not an image.
    let err = registry::pull(&dest, &sig_ref, None, TransferOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains(sign::SIGNATURE_CONFIG_MEDIA_TYPE),
        "{err}"
    );

    // An unsigned image pulled from the same registry has no signature.
    let unsigned = test_image(&source, "plain", "plain");
    registry::push(
        &source,
        &unsigned,
        &registry.reference("team/web:plain"),
        TransferOptions::default(),
    )
    .unwrap();
    let pulled = registry::pull(
        &dest,
        &registry.reference("team/web:plain"),
        None,
        TransferOptions::default(),
    )
    .unwrap();
    let err = sign::verify(&dest, &pulled, &[pair.public_key]).unwrap_err();
    assert!(matches!(err, SignError::Unsigned { .. }), "{err}");
}
