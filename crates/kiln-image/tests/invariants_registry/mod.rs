//! What must hold for every input of the registry reference parser and of
//! signature verification.
//!
//! One copy, used twice: by the cargo-fuzz targets `registry_reference` and
//! `minisig_parse` (`fuzz/fuzz_targets/`, through `#[path]`) and by
//! `tests/fuzz_corpus.rs`, which replays their seeds on stable.
//! Each check panics with a message naming the problem.

#![allow(dead_code)] // each user calls a subset

use std::path::Path;

use kiln_image::Digest;
use kiln_image::registry::Reference;
use kiln_image::sign::{self, SignError};

/// The manifest the fixed key signed (`fuzz/seeds/minisig_parse/valid`).
pub const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

/// A public key made with `minisign -G -W` for the seeds; its secret half
/// was thrown away.
pub const PUBLIC_KEY: &str = "untrusted comment: minisign public key 2BD12CEAC066C40C\nRWQMxGbA6izRKzU9/Rln8YYd0YFoXXbpdl9NQpuChU8SxBGtygO9I3CN\n";
pub const KEY_ID: &str = "2BD12CEAC066C40C";

/// `Reference::from_str`: never panics, is deterministic; what it accepts
/// prints back to itself, has a tag or a digest, and keeps its parts.
pub fn registry_reference(text: &str) {
    let first = text.parse::<Reference>();
    assert_eq!(
        first,
        text.parse::<Reference>(),
        "parse is not deterministic"
    );
    match first {
        Ok(r) => {
            assert!(
                r.tag.is_some() || r.digest.is_some(),
                "accepted without tag or digest: {text:?}"
            );
            assert!(!r.registry.is_empty() && !r.repository.is_empty());
            let printed = r.to_string();
            let again: Reference = printed.parse().unwrap_or_else(|e| {
                panic!("{text:?} printed as {printed:?}, which does not parse: {e}")
            });
            assert_eq!(again, r, "{text:?} does not round-trip");
            assert_eq!(printed, text, "an accepted reference prints as written");
            assert!(!r.manifest_ref().is_empty());
            let _ = r.is_loopback();
            let tagged = r.with_tag("t");
            assert_eq!(
                tagged.to_string().parse::<Reference>().as_ref(),
                Ok(&tagged)
            );
        }
        Err(e) => {
            assert_eq!(e.input, text);
            assert!(!e.reason.is_empty() && !e.hint.is_empty());
            let _ = e.to_string();
        }
    }
}

/// `sign::verify_bytes` over a fixed manifest with a fixed trusted key, and
/// `sign::parse_public_key`, on arbitrary bytes: no panic, deterministic,
/// and only a well-formed signature by that very key is accepted.
pub fn minisig_parse(data: &[u8]) {
    let key =
        sign::parse_public_key(PUBLIC_KEY, Path::new("fuzz.pub")).expect("the fixed key parses");
    let digest = Digest::of(MANIFEST);
    let first = sign::verify_bytes(MANIFEST, &digest, data, std::slice::from_ref(&key));
    let again = sign::verify_bytes(MANIFEST, &digest, data, std::slice::from_ref(&key));
    assert_eq!(
        format!("{first:?}"),
        format!("{again:?}"),
        "verification is not deterministic"
    );
    let parsed = sign::parse_signature(data);
    match &first {
        Ok(by) => {
            assert_eq!(by.key_id, KEY_ID);
            let parsed = parsed.expect("an accepted signature is well-formed");
            assert_eq!(parsed.key_id, KEY_ID);
            assert_eq!(parsed.trusted_comment, by.trusted_comment);
            // The same signature over other bytes is refused.
            let mut other = MANIFEST.to_vec();
            other.push(b' ');
            let err = sign::verify_bytes(&other, &digest, data, &[key]).unwrap_err();
            assert!(matches!(err, SignError::BadSignature { .. }), "{err}");
        }
        Err(SignError::Malformed { .. }) => assert!(
            parsed.is_err(),
            "the minisign crate refuses what parse_signature accepts"
        ),
        Err(SignError::UntrustedKey { key_id, .. }) => {
            assert_ne!(key_id, KEY_ID);
            assert!(parsed.is_ok());
        }
        Err(SignError::BadSignature { key_id, .. }) => {
            assert_eq!(key_id, KEY_ID);
            assert!(parsed.is_ok());
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
    if let Err(e) = &first {
        assert!(
            e.to_string().contains(&digest.to_string()),
            "the error names the image: {e}"
        );
    }
    let _ = sign::parse_public_key(&String::from_utf8_lossy(data), Path::new("fuzz.pub"));
}
