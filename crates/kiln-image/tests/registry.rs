//! Push and pull against Debian's docker-registry (started per test on a
//! free port), and the token flow against an in-process fake registry.

mod common_registry;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common_registry::{PASSWORD, Registry, USER, assert_all_blobs_verify, flip_byte, test_image};
use kiln_image::registry::{self, BlobKind, Credentials, Event, RegistryError, TransferOptions};
use kiln_image::{Digest, ImageError, Store};

fn empty_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn opts() -> TransferOptions<'static> {
    TransferOptions::default()
}

#[test]
fn push_then_pull_into_an_empty_store_keeps_the_digest() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    let target = registry.reference("team/web:v1");

    let mut events = Vec::new();
    let mut record = |p: &registry::Progress<'_>| {
        events.push((p.kind, p.digest.clone(), p.event, p.done, p.total))
    };
    let report = registry::push(
        &source,
        &image,
        &target,
        TransferOptions {
            progress: Some(&mut record),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(report.reference.digest.as_ref(), Some(&image.digest));
    assert_eq!((report.blobs_uploaded, report.blobs_existing), (3, 0));
    assert_eq!(
        report.signature, None,
        "an unsigned image pushes no signature"
    );
    let done: Vec<_> = events.iter().filter(|e| e.2 == Event::Done).collect();
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|e| e.3 == e.4));
    assert_eq!(done.iter().filter(|e| e.0 == BlobKind::Config).count(), 1);
    assert_eq!(report.bytes_uploaded, done.iter().map(|e| e.4).sum::<u64>());

    // Everything is there already: HEAD says so, nothing is uploaded.
    let again = registry::push(&source, &image, &target, opts()).unwrap();
    assert_eq!((again.blobs_uploaded, again.blobs_existing), (0, 3));

    let (_b, dest) = empty_store();
    let pulled = registry::pull(&dest, &target, None, opts()).unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(pulled.manifest_bytes, image.manifest_bytes);
    assert_all_blobs_verify(&dest, &pulled);
    assert_eq!(dest.blobs().unwrap(), {
        let mut all = image.blobs().unwrap();
        all.sort();
        all
    });
    assert_eq!(
        dest.image(&target.to_string()).unwrap().digest,
        image.digest
    );
    // Pulled by tag, the name records the digest it resolved to.
    let names = dest.names().unwrap();
    let annotations = names[0].1.annotations().clone().unwrap();
    assert_eq!(
        annotations[registry::PULLED_FROM],
        target.with_digest(&image.digest).to_string()
    );
}

#[test]
fn pull_by_digest_and_by_tag() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_a, source) = empty_store();
    let v1 = test_image(&source, "v1", "one");
    let v2 = test_image(&source, "v2", "two");
    registry::push(&source, &v1, &registry.reference("web:v1"), opts()).unwrap();
    registry::push(&source, &v2, &registry.reference("web:v2"), opts()).unwrap();

    let (_b, dest) = empty_store();
    let pinned = registry.reference(&format!("web@{}", v1.digest));
    let image = registry::pull(&dest, &pinned, Some("web-one"), opts()).unwrap();
    assert_eq!(image.digest, v1.digest);
    assert_eq!(dest.image("web-one").unwrap().digest, v1.digest);

    // The base layer is shared: the second pull fetches only what is new.
    let mut fetched = Vec::new();
    let mut record = |p: &registry::Progress<'_>| {
        if p.event != Event::Transferring {
            fetched.push((p.kind, p.event));
        }
    };
    let image = registry::pull(
        &dest,
        &registry.reference("web:v2"),
        Some("web-two"),
        TransferOptions {
            progress: Some(&mut record),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(image.digest, v2.digest);
    assert_eq!(
        fetched.iter().filter(|f| f.1 == Event::Exists).count(),
        1,
        "{fetched:?}"
    );
    assert_eq!(
        fetched.iter().filter(|f| f.1 == Event::Done).count(),
        2,
        "{fetched:?}"
    );
    assert_all_blobs_verify(&dest, &image);

    // Tag and digest together: the digest decides.
    let both = registry.reference(&format!("web:v2@{}", v1.digest));
    assert_eq!(
        registry::pull(&dest, &both, Some("x"), opts())
            .unwrap()
            .digest,
        v1.digest
    );
}

#[test]
fn a_pinned_digest_the_registry_does_not_serve_is_refused() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    registry::push(&source, &image, &registry.reference("web:v1"), opts()).unwrap();

    let (_b, dest) = empty_store();
    let unknown = Digest::of(b"no such manifest");
    let err = registry::pull(
        &dest,
        &registry.reference(&format!("web@{unknown}")),
        None,
        opts(),
    )
    .unwrap_err();
    assert!(
        matches!(err, RegistryError::ManifestNotFound { .. }),
        "{err}"
    );

    // The registry's copy of the manifest is replaced on disk by another
    // (valid) manifest: asked for the pinned digest, it serves other bytes.
    // kiln refuses them.
    let other = test_image(&source, "other", "other");
    registry::push(&source, &other, &registry.reference("other:v1"), opts()).unwrap();
    std::fs::write(registry.blob_file(&image.digest), &other.manifest_bytes).unwrap();
    let err = registry::pull(
        &dest,
        &registry.reference(&format!("web@{}", image.digest)),
        None,
        opts(),
    )
    .unwrap_err();
    match &err {
        RegistryError::ManifestDigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &image.digest);
            assert_eq!(actual, &other.digest);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&image.digest.to_string()));
    // By tag, the registry still claims the original digest for what it
    // serves: refused as well.
    let err = registry::pull(&dest, &registry.reference("web:v1"), None, opts()).unwrap_err();
    assert!(
        matches!(err, RegistryError::ManifestDigestMismatch { .. }),
        "{err}"
    );
    assert!(dest.blobs().unwrap().is_empty(), "nothing is stored");
    assert!(dest.names().unwrap().is_empty());

    // A pinned push of another image is refused before anything is sent.
    let err = registry::push(
        &source,
        &other,
        &registry.reference(&format!("web@{}", image.digest)),
        opts(),
    )
    .unwrap_err();
    assert!(matches!(err, RegistryError::PinMismatch { .. }), "{err}");
}

#[test]
fn a_tampered_layer_in_the_registry_is_refused_and_nothing_is_stored() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    registry::push(&source, &image, &registry.reference("web:v1"), opts()).unwrap();
    let layer = Digest::try_from(image.layers()[1].digest()).unwrap();
    flip_byte(&registry.blob_file(&layer), 20);

    let (dir, dest) = empty_store();
    let err = registry::pull(&dest, &registry.reference("web:v1"), None, opts()).unwrap_err();
    match &err {
        RegistryError::BlobDigestMismatch { digest, .. } => assert_eq!(digest, &layer),
        other => panic!("expected a blob digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert!(!dest.has_blob(&layer));
    assert!(
        !dest.has_blob(&image.digest),
        "the manifest is stored only after every blob"
    );
    assert!(dest.names().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "no staging file is left"
    );
}

#[test]
fn a_corrupt_local_blob_is_not_pushed() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    let layer = Digest::try_from(image.layers()[0].digest()).unwrap();
    flip_byte(&source.blob_path(&layer), 30);
    let err = registry::push(&source, &image, &registry.reference("web:v1"), opts()).unwrap_err();
    match &err {
        RegistryError::Store(ImageError::Corrupt { digest, .. }) => assert_eq!(digest, &layer),
        other => panic!("expected the corrupt blob to be named, got {other}"),
    }
    let (_b, dest) = empty_store();
    let err = registry::pull(&dest, &registry.reference("web:v1"), None, opts()).unwrap_err();
    assert!(
        matches!(err, RegistryError::ManifestNotFound { .. }),
        "{err}"
    );
}

#[test]
fn basic_auth_is_required_and_accepted() {
    let Some(registry) = Registry::start_with_auth() else {
        return;
    };
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    let target = registry.reference("web:v1");
    let err = registry::push(&source, &image, &target, opts()).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Unauthorized {
                had_credentials: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("hint: give credentials"), "{err}");

    let creds = |password: &str| TransferOptions {
        credentials: Some(Credentials {
            username: USER.to_owned(),
            password: password.to_owned(),
        }),
        ..opts()
    };
    let err = registry::push(&source, &image, &target, creds("wrong")).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Unauthorized {
                had_credentials: true,
                ..
            }
        ),
        "{err}"
    );
    registry::push(&source, &image, &target, creds(PASSWORD)).unwrap();
    let (_b, dest) = empty_store();
    assert_eq!(
        registry::pull(&dest, &target, None, creds(PASSWORD))
            .unwrap()
            .digest,
        image.digest
    );
}

#[test]
fn an_index_resolves_to_this_machines_platform() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    let other = test_image(&source, "other", "other");
    registry::push(&source, &image, &registry.reference("web:v1"), opts()).unwrap();
    registry::push(&source, &other, &registry.reference("web:other"), opts()).unwrap();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.digest.to_string(), "size": other.manifest_bytes.len(), "platform": { "os": "plan9", "architecture": arch } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image.digest.to_string(), "size": image.manifest_bytes.len(), "platform": { "os": "linux", "architecture": arch } },
        ],
    }))
    .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let response = agent
        .put(format!("http://{}/v2/web/manifests/multi", registry.host))
        .header("Content-Type", "application/vnd.oci.image.index.v1+json")
        .send(&index[..])
        .unwrap();
    assert_eq!(response.status(), 201);
    let (_b, dest) = empty_store();
    let pulled = registry::pull(&dest, &registry.reference("web:multi"), None, opts()).unwrap();
    assert_eq!(pulled.digest, image.digest);
}

/// What the fake registry saw: the request target and its Authorization.
type Request = (String, Option<String>);

/// A registry that wants a Bearer token from its realm, which wants Basic
/// credentials: the flow of Docker Hub, GHCR, Harbor.
#[test]
fn bearer_tokens_are_fetched_from_the_realm_with_the_credentials() {
    let (_a, source) = empty_store();
    let image = test_image(&source, "web", "hello");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    let log = Arc::clone(&seen);
    let store = source.clone();
    let manifest = image.manifest_bytes.clone();
    let server = std::thread::spawn(move || {
        let basic = format!("Basic {}", b64(&format!("{USER}:{PASSWORD}")));
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let target = line.split(' ').nth(1).unwrap_or("").to_owned();
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let auth = headers.get("authorization").cloned();
            log.lock().unwrap().push((target.clone(), auth.clone()));
            let (status, extra, body): (&str, String, Vec<u8>) = if target == "/quit" {
                break;
            } else if let Some(query) = target.strip_prefix("/token?") {
                let wants = query.contains("scope=repository%3Aweb%3Apull")
                    && query.contains("service=fake");
                if auth.as_deref() == Some(basic.as_str()) && wants {
                    ("200 OK", String::new(), br#"{"token":"tok-123"}"#.to_vec())
                } else {
                    ("401 Unauthorized", String::new(), Vec::new())
                }
            } else if auth.as_deref() != Some("Bearer tok-123") {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:web:pull\"\r\n"
                );
                (
                    "401 Unauthorized",
                    challenge,
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#.to_vec(),
                )
            } else if target == "/v2/web/manifests/v1" {
                (
                    "200 OK",
                    "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n".to_owned(),
                    manifest.clone(),
                )
            } else if let Some(d) = target.strip_prefix("/v2/web/blobs/") {
                match d
                    .parse::<Digest>()
                    .ok()
                    .and_then(|d| store.read_blob(&d).ok())
                {
                    Some(bytes) => ("200 OK", String::new(), bytes),
                    None => ("404 Not Found", String::new(), Vec::new()),
                }
            } else {
                ("404 Not Found", String::new(), Vec::new())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body).unwrap();
        }
    });

    let reference: registry::Reference = format!("127.0.0.1:{port}/web:v1").parse().unwrap();
    let (_b, dest) = empty_store();
    let with = |password: &str| TransferOptions {
        credentials: Some(Credentials {
            username: USER.to_owned(),
            password: password.to_owned(),
        }),
        ..opts()
    };
    let err = registry::pull(&dest, &reference, None, with("wrong")).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Unauthorized {
                had_credentials: true,
                ..
            }
        ),
        "{err}"
    );
    let pulled = registry::pull(&dest, &reference, None, with(PASSWORD)).unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_all_blobs_verify(&dest, &pulled);

    let _ = ureq::get(format!("http://127.0.0.1:{port}/quit")).call();
    server.join().unwrap();
    let seen = seen.lock().unwrap();
    for (target, auth) in seen.iter() {
        if target.starts_with("/v2/") {
            assert!(
                auth.as_deref().is_none_or(|a| a.starts_with("Bearer ")),
                "the password went to the registry itself: {target}"
            );
        }
    }
    assert!(seen.iter().any(|(t, _)| t.starts_with("/token?")));
}

fn b64(s: &str) -> String {
    use ct_codecs::{Base64, Encoder};
    Base64::encode_to_string(s).unwrap()
}

#[test]
fn references_without_a_registry_host_are_refused() {
    let err = "web:v1".parse::<registry::Reference>().unwrap_err();
    assert!(err.to_string().contains("never assumes docker.io"), "{err}");
}
