//! The few Distribution API v2 endpoints kiln needs, over blocking `ureq`,
//! with the registry's authentication handshake: anonymous, Basic, and
//! Bearer tokens from the realm a `WWW-Authenticate` challenge names.

use std::io::Read;
use std::time::Duration;

use ureq::http::{self, Method, Response, StatusCode};
use ureq::{Agent, Body, SendBody};

use super::auth::{Challenge, percent_encode};
use super::reference::Reference;
use super::stream::{DownloadReader, UploadReader};
use super::{BlobKind, Credentials, Event, Progress, RegistryError};
use crate::digest::Digest;
use crate::error::ImageError;
use crate::store::Store;

/// distribution refuses manifests above 4 MiB; so does kiln.
pub(super) const MAX_MANIFEST_LEN: u64 = 4 << 20;
const MAX_SMALL_BODY: u64 = 1 << 20;

/// Every manifest type kiln can read, for content negotiation.
pub(super) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// What a request carries.
pub(super) enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A blob streamed from the store, verified as it is read; reopened if
    /// the request has to be sent again after authenticating.
    Blob {
        store: &'a Store,
        digest: &'a Digest,
        size: u64,
        kind: BlobKind,
    },
}

/// A session with one repository of one registry.
pub(super) struct Client<'p> {
    agent: Agent,
    base: String,
    reference: Reference,
    credentials: Option<Credentials>,
    /// The `Authorization` value that the last challenge led to.
    authorization: Option<String>,
    /// Plain HTTP is allowed (loopback registry or `--insecure`): then a
    /// token realm may be plain HTTP too.
    plain_http: bool,
    push: bool,
    progress: Option<&'p mut dyn FnMut(&Progress<'_>)>,
}

impl<'p> Client<'p> {
    pub(super) fn new(
        reference: &Reference,
        insecure: bool,
        credentials: Option<Credentials>,
        push: bool,
        progress: Option<&'p mut dyn FnMut(&Progress<'_>)>,
    ) -> Client<'p> {
        let plain_http = insecure || reference.is_loopback();
        let scheme = if plain_http { "http" } else { "https" };
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            agent,
            base: format!("{scheme}://{}", reference.registry),
            reference: reference.clone(),
            credentials,
            authorization: None,
            plain_http,
            push,
            progress,
        }
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.reference.repository)
    }

    pub(super) fn report(
        &mut self,
        kind: BlobKind,
        digest: &Digest,
        event: Event,
        done: u64,
        total: u64,
    ) {
        if let Some(progress) = self.progress.as_mut() {
            progress(&Progress {
                kind,
                digest,
                event,
                done,
                total,
            });
        }
    }

    /// Sends a request; on a 401, answers the challenge once and sends it
    /// again.
    fn send(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        payload: &Payload<'_>,
    ) -> Result<Response<Body>, RegistryError> {
        let mut authenticated = false;
        loop {
            let mut request = http::Request::builder().method(method.clone()).uri(url);
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(auth) = &self.authorization {
                request = request.header("Authorization", auth);
            }
            let response = match payload {
                Payload::Empty => self.agent.run(
                    request
                        .body(SendBody::none())
                        .map_err(|e| bad_request(url, e))?,
                ),
                Payload::Bytes(bytes) => self
                    .agent
                    .run(request.body(*bytes).map_err(|e| bad_request(url, e))?),
                Payload::Blob {
                    store,
                    digest,
                    size,
                    kind,
                } => {
                    let mut reader = UploadReader {
                        inner: store.open_blob(digest)?,
                        remaining: *size,
                        size: *size,
                        failure: None,
                        progress: self.progress.as_deref_mut(),
                        kind: *kind,
                        digest,
                    };
                    let request = request
                        .header("Content-Length", size.to_string())
                        .header("Content-Type", "application/octet-stream")
                        .body(SendBody::from_reader(&mut reader))
                        .map_err(|e| bad_request(url, e))?;
                    let result = self.agent.run(request);
                    if let Some(failure) = reader.failure.take() {
                        return Err(failure.into());
                    }
                    result
                }
            }
            .map_err(|source| self.connect_error(url, source))?;
            if response.status() == StatusCode::UNAUTHORIZED && !authenticated {
                authenticated = true;
                if self.authenticate(&response)? {
                    continue;
                }
            }
            return Ok(response);
        }
    }

    fn connect_error(&self, url: &str, source: ureq::Error) -> RegistryError {
        let hint = if self.plain_http {
            "is the registry running, and does it serve plain HTTP at this address?"
        } else {
            "is the registry reachable? For a registry that serves plain HTTP, pass --insecure"
        };
        RegistryError::Connect {
            registry: self.reference.registry.clone(),
            url: url.to_owned(),
            source: Box::new(source),
            hint,
        }
    }

    /// Answers a 401 challenge; returns whether a retry may succeed.
    fn authenticate(&mut self, response: &Response<Body>) -> Result<bool, RegistryError> {
        let challenges: Vec<Challenge> = response
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(Challenge::parse)
            .collect();
        let bearer = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"));
        let basic = challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"));
        if let Some(bearer) = bearer {
            let token = self.fetch_token(bearer)?;
            let auth = format!("Bearer {token}");
            let changed = self.authorization.as_deref() != Some(auth.as_str());
            self.authorization = Some(auth);
            return Ok(changed);
        }
        if basic && let Some(c) = &self.credentials {
            let auth = format!(
                "Basic {}",
                crate::sign::base64(format!("{}:{}", c.username, c.password).as_bytes())
            );
            let changed = self.authorization.as_deref() != Some(auth.as_str());
            self.authorization = Some(auth);
            return Ok(changed);
        }
        Ok(false)
    }

    /// The token flow of distribution's `token` auth: GET the realm with the
    /// service and scope (Basic credentials if any), read `token` or
    /// `access_token`.
    fn fetch_token(&mut self, challenge: &Challenge) -> Result<String, RegistryError> {
        let realm = challenge.param("realm").unwrap_or_default().to_owned();
        let token_error = |detail: String| RegistryError::Token {
            registry: self.reference.registry.clone(),
            realm: realm.clone(),
            detail,
        };
        if !(realm.starts_with("https://") || (self.plain_http && realm.starts_with("http://"))) {
            return Err(token_error(
                "the realm is not an https URL; kiln sends credentials only over TLS (or to a local or --insecure registry)".to_owned(),
            ));
        }
        let actions = if self.push { "pull,push" } else { "pull" };
        let default_scope = format!("repository:{}:{actions}", self.reference.repository);
        let scope = challenge.param("scope").unwrap_or(&default_scope);
        let mut query = vec![format!("scope={}", percent_encode(scope))];
        if let Some(service) = challenge.param("service") {
            query.push(format!("service={}", percent_encode(service)));
        }
        let separator = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{separator}{}", query.join("&"));
        let mut request = self.agent.get(&url);
        if let Some(c) = &self.credentials {
            let basic = crate::sign::base64(format!("{}:{}", c.username, c.password).as_bytes());
            request = request.header("Authorization", format!("Basic {basic}"));
        }
        let mut response = request.call().map_err(|e| token_error(e.to_string()))?;
        if response.status() == StatusCode::UNAUTHORIZED
            || response.status() == StatusCode::FORBIDDEN
        {
            return Err(RegistryError::Unauthorized {
                registry: self.reference.registry.clone(),
                op: format!("get a token for {scope}"),
                detail: error_detail(&mut response),
                had_credentials: self.credentials.is_some(),
            });
        }
        if !response.status().is_success() {
            let detail = format!(
                "HTTP {}: {}",
                response.status().as_u16(),
                error_detail(&mut response)
            );
            return Err(token_error(detail));
        }
        let body = read_limited(&mut response, MAX_SMALL_BODY, &url, "token response")?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("the token response is not JSON: {e}")))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| token_error("the token response has no usable token".to_owned()))
    }

    /// Maps a non-success response to an error.
    fn refused(&self, op: String, mut response: Response<Body>) -> RegistryError {
        let detail = error_detail(&mut response);
        if response.status() == StatusCode::UNAUTHORIZED
            || response.status() == StatusCode::FORBIDDEN
        {
            return RegistryError::Unauthorized {
                registry: self.reference.registry.clone(),
                op,
                detail,
                had_credentials: self.credentials.is_some(),
            };
        }
        RegistryError::Refused {
            registry: self.reference.registry.clone(),
            op,
            status: response.status().as_u16(),
            detail,
        }
    }

    /// Fetches a manifest by tag or digest: its exact bytes, its media type
    /// and the digest the registry claims for it.
    pub(super) fn get_manifest(
        &mut self,
        reference: &str,
    ) -> Result<Option<Manifest>, RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let mut response = self.send(
            Method::GET,
            &url,
            &[("Accept", MANIFEST_ACCEPT.to_owned())],
            &Payload::Empty,
        )?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(self.refused(format!("get manifest {reference}"), response));
        }
        let media_type = header(&response, "content-type")
            .map(|m| m.split(';').next().unwrap_or("").trim().to_owned());
        let claimed =
            header(&response, "docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
        let bytes = read_limited(&mut response, MAX_MANIFEST_LEN, &url, "manifest")?;
        Ok(Some(Manifest {
            bytes,
            media_type,
            claimed,
        }))
    }

    /// Whether the registry has blob `digest` (HEAD).
    pub(super) fn has_blob(&mut self, digest: &Digest) -> Result<bool, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let response = self.send(Method::HEAD, &url, &[], &Payload::Empty)?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refused(format!("check blob {digest}"), response)),
        }
    }

    /// Streams blob `digest` from the registry into the store: verified
    /// against its digest and size, atomically (nothing is stored on a
    /// mismatch).
    pub(super) fn pull_blob(
        &mut self,
        store: &Store,
        digest: &Digest,
        size: u64,
        kind: BlobKind,
    ) -> Result<(), RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let response = self.send(Method::GET, &url, &[], &Payload::Empty)?;
        if !response.status().is_success() {
            return Err(self.refused(format!("get blob {digest}"), response));
        }
        let mut reader = DownloadReader {
            inner: response.into_body().into_reader(),
            read: 0,
            limit: size,
            failure: None,
            progress: self.progress.as_deref_mut(),
            kind,
            digest,
        };
        let outcome = store.put_blob_from(&mut reader, Some(digest));
        let (read, failure) = (reader.read, reader.failure.take());
        if let Some(source) = failure {
            return Err(RegistryError::Body { url, source });
        }
        let size_error = || RegistryError::BlobSize {
            registry: self.reference.registry.clone(),
            digest: digest.clone(),
            expected: size,
            actual: read,
        };
        match outcome {
            _ if read != size => Err(size_error()),
            Ok(_) => {
                self.report(kind, digest, Event::Done, size, size);
                Ok(())
            }
            Err(ImageError::DigestMismatch { actual, .. }) => {
                Err(RegistryError::BlobDigestMismatch {
                    registry: self.reference.registry.clone(),
                    digest: digest.clone(),
                    actual,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Fetches a small blob into memory, verified against its digest and size.
    pub(super) fn get_small_blob(
        &mut self,
        digest: &Digest,
        size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let mut response = self.send(Method::GET, &url, &[], &Payload::Empty)?;
        if !response.status().is_success() {
            return Err(self.refused(format!("get blob {digest}"), response));
        }
        let bytes = read_limited(&mut response, size.min(MAX_SMALL_BODY), &url, "blob")?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(RegistryError::BlobDigestMismatch {
                registry: self.reference.registry.clone(),
                digest: digest.clone(),
                actual,
            });
        }
        if bytes.len() as u64 != size {
            return Err(RegistryError::BlobSize {
                registry: self.reference.registry.clone(),
                digest: digest.clone(),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Uploads a blob from the store unless the registry has it; returns
    /// whether it was uploaded. Monolithic upload: POST, then PUT
    /// `?digest=` with the whole body (the registry checks the digest too).
    pub(super) fn push_blob(
        &mut self,
        store: &Store,
        digest: &Digest,
        size: u64,
        kind: BlobKind,
    ) -> Result<bool, RegistryError> {
        if self.has_blob(digest)? {
            self.report(kind, digest, Event::Exists, size, size);
            return Ok(false);
        }
        let location = self.start_upload(digest)?;
        let payload = Payload::Blob {
            store,
            digest,
            size,
            kind,
        };
        self.finish_upload(&location, digest, &payload)?;
        self.report(kind, digest, Event::Done, size, size);
        Ok(true)
    }

    /// Uploads small in-memory content (a signature and its config) unless
    /// the registry has it.
    pub(super) fn push_bytes(&mut self, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        if !self.has_blob(&digest)? {
            let location = self.start_upload(&digest)?;
            self.finish_upload(&location, &digest, &Payload::Bytes(bytes))?;
        }
        Ok(digest)
    }

    fn start_upload(&mut self, digest: &Digest) -> Result<String, RegistryError> {
        let url = self.url("blobs/uploads/");
        let response = self.send(
            Method::POST,
            &url,
            &[("Content-Length", "0".to_owned())],
            &Payload::Empty,
        )?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.refused(format!("start the upload of {digest}"), response));
        }
        let location = header(&response, "location").ok_or_else(|| RegistryError::Refused {
            registry: self.reference.registry.clone(),
            op: format!("start the upload of {digest}"),
            status: response.status().as_u16(),
            detail: "no Location header in the answer".to_owned(),
        })?;
        Ok(self.absolute(&location))
    }

    fn finish_upload(
        &mut self,
        location: &str,
        digest: &Digest,
        payload: &Payload<'_>,
    ) -> Result<(), RegistryError> {
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!(
            "{location}{separator}digest={}",
            percent_encode(&digest.to_string())
        );
        let response = self.send(Method::PUT, &url, &[], payload)?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refused(format!("upload blob {digest}"), response));
        }
        Ok(())
    }

    /// PUTs manifest bytes unchanged under `reference` (a tag or digest);
    /// returns the digest the registry reports for them.
    pub(super) fn put_manifest(
        &mut self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Option<Digest>, RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let response = self.send(
            Method::PUT,
            &url,
            &[("Content-Type", media_type.to_owned())],
            &Payload::Bytes(bytes),
        )?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refused(format!("put manifest {reference}"), response));
        }
        Ok(header(&response, "docker-content-digest").and_then(|d| d.parse().ok()))
    }

    /// Resolves a `Location` header against the registry's base URL.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            format!("{}/{location}", self.base)
        }
    }
}

/// A manifest as the registry served it.
pub(super) struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: Option<String>,
    pub claimed: Option<Digest>,
}

fn bad_request(url: &str, e: http::Error) -> RegistryError {
    RegistryError::BadUrl {
        url: url.to_owned(),
        detail: e.to_string(),
    }
}

fn header(response: &Response<Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)?
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// Reads a whole body, refusing more than `limit` bytes.
fn read_limited(
    response: &mut Response<Body>,
    limit: u64,
    url: &str,
    what: &'static str,
) -> Result<Vec<u8>, RegistryError> {
    let mut bytes = Vec::new();
    response
        .body_mut()
        .as_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| RegistryError::Body {
            url: url.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(RegistryError::TooLarge {
            what,
            url: url.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// The registry's explanation of an error: distribution's
/// `{"errors":[{"code","message"}]}`, else the start of the body.
fn error_detail(response: &mut Response<Body>) -> String {
    let mut bytes = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(64 * 1024)
        .read_to_end(&mut bytes);
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(&bytes)
        && !parsed.errors.is_empty()
    {
        return parsed
            .errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.code.as_deref().unwrap_or("ERROR"),
                    e.message.as_deref().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(&bytes);
    let text: String = text.trim().chars().take(200).collect();
    if text.is_empty() {
        response
            .status()
            .canonical_reason()
            .unwrap_or("no explanation")
            .to_owned()
    } else {
        text
    }
}
