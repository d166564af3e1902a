//! Image references for registries: `HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.
//!
//! The grammar is distribution's (`reference.go`), with one deliberate
//! difference: nothing is implied. docker's `alpine` means
//! `docker.io/library/alpine:latest`; kiln refuses it and asks for the host,
//! so the same words never reach a different registry on another machine.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::digest::Digest;

/// The longest repository path distribution accepts.
const MAX_REPOSITORY_LEN: usize = 255;
/// The longest tag distribution accepts.
const MAX_TAG_LEN: usize = 128;

/// A parsed registry reference. At least one of `tag` and `digest` is set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`, as written (IPv6 hosts keep their brackets).
    pub registry: String,
    /// The repository path, e.g. `team/web`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Why a string is not a registry reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a registry reference: {reason}\n  hint: {hint}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
    pub hint: &'static str,
}

const FORM: &str = "write HOST[:PORT]/REPOSITORY:TAG or HOST[:PORT]/REPOSITORY@sha256:DIGEST, e.g. 127.0.0.1:5000/web:v1";

impl Reference {
    /// What the manifest is fetched by: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => unreachable!("a parsed reference has a tag or a digest"),
        }
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_owned()),
            digest: None,
        }
    }

    /// The same repository pinned to `digest` (the tag is kept).
    pub fn with_digest(&self, digest: &Digest) -> Reference {
        Reference {
            digest: Some(digest.clone()),
            ..self.clone()
        }
    }

    /// Whether the registry is on this machine (plain HTTP is then allowed).
    pub fn is_loopback(&self) -> bool {
        let host = host_without_port(&self.registry);
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

fn host_without_port(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.find(']').map_or(registry, |end| &registry[..=end]);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Reference, ReferenceError> {
        let fail = |reason: String, hint: &'static str| ReferenceError {
            input: input.to_owned(),
            reason,
            hint,
        };
        let (name_tag, digest) = match input.split_once('@') {
            Some((name, d)) => {
                let digest = d.parse::<Digest>().map_err(|_| {
                    fail(
                        format!("`{d}` is not a sha256 digest"),
                        "a pinned digest is `@sha256:` followed by 64 lowercase hex digits",
                    )
                })?;
                (name, Some(digest))
            }
            None => (input, None),
        };
        let Some((registry, path_tag)) = name_tag
            .split_once('/')
            .filter(|(host, _)| looks_like_host(host))
        else {
            return Err(fail(
                "it names no registry host".to_owned(),
                "kiln never assumes docker.io: write the host, e.g. docker.io/library/alpine:3.20 or 127.0.0.1:5000/web:v1",
            ));
        };
        check_host(registry).map_err(|r| fail(r, FORM))?;
        let (repository, tag) = match path_tag.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (path_tag, None),
        };
        check_repository(repository).map_err(|r| fail(r, FORM))?;
        if let Some(tag) = tag {
            check_tag(tag).map_err(|r| fail(r, FORM))?;
        }
        if tag.is_none() && digest.is_none() {
            return Err(fail(
                "it has neither a tag nor a digest".to_owned(),
                "kiln never assumes `:latest`: add `:TAG` or `@sha256:DIGEST`",
            ));
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

/// distribution's rule: the first component is a host when it has a `.` or a
/// `:`, or is `localhost`.
fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

fn check_host(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("host `{registry}` has no closing `]`"))?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{ip}` is not an IPv6 address"));
        }
        match after {
            "" => (None, None),
            p => (
                None,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("unexpected `{p}` after `]`"))?,
                ),
            ),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let valid = !host.is_empty()
            && host.split('.').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !c.starts_with('-')
                    && !c.ends_with('-')
            });
        if !valid {
            return Err(format!("`{host}` is not a valid host name"));
        }
    }
    if let Some(port) = port
        && port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && !port.starts_with('0'))
            .is_none()
    {
        return Err(format!("`{port}` is not a port number"));
    }
    Ok(())
}

fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("the repository is empty".to_owned());
    }
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "the repository is longer than {MAX_REPOSITORY_LEN} characters"
        ));
    }
    for component in repository.split('/') {
        if !path_component_ok(component) {
            return Err(format!(
                "`{component}` is not a valid repository component (lowercase letters and digits, separated by `.`, `_`, `__` or dashes)"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && word(tag.as_bytes()[0])
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{tag}` is not a valid tag (up to {MAX_TAG_LEN} letters, digits, `_`, `.`, `-`, not starting with `.` or `-`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex() -> String {
        "ab".repeat(32)
    }

    #[test]
    fn parses_host_repository_tag_and_digest() {
        let r: Reference = "127.0.0.1:5000/team/web:v1".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/web", Some("v1"))
        );
        assert!(r.is_loopback());
        assert_eq!(r.manifest_ref(), "v1");
        let pinned = format!("registry.example.com/web:v1@sha256:{}", hex());
        let r: Reference = pinned.parse().unwrap();
        assert_eq!(r.digest.as_ref().unwrap().hex(), hex());
        assert_eq!(r.manifest_ref(), format!("sha256:{}", hex()));
        assert_eq!(r.to_string(), pinned);
        assert!(!r.is_loopback());
        let r: Reference = format!("localhost/a.b__c-d--e/f@sha256:{}", hex())
            .parse()
            .unwrap();
        assert_eq!(r.tag, None);
        assert!(r.is_loopback());
        assert!(
            "[::1]:5000/web:v1"
                .parse::<Reference>()
                .unwrap()
                .is_loopback()
        );
    }

    #[test]
    fn refuses_what_docker_would_default() {
        for input in ["alpine", "alpine:3.20", "library/alpine:3.20"] {
            let err = input.parse::<Reference>().unwrap_err();
            assert!(err.reason.contains("no registry host"), "{input}: {err}");
            assert!(err.to_string().contains("never assumes docker.io"));
        }
        let err = "docker.io/library/alpine".parse::<Reference>().unwrap_err();
        assert!(err.to_string().contains("`:latest`"), "{err}");
    }

    #[test]
    fn refuses_malformed_parts() {
        for input in [
            "127.0.0.1:5000/Web:v1",
            "127.0.0.1:5000/web:",
            "127.0.0.1:5000/web:.v1",
            "127.0.0.1:5000//web:v1",
            "127.0.0.1:5000/we..b:v1",
            "127.0.0.1:99999/web:v1",
            "127.0.0.1:/web:v1",
            "-bad.example/web:v1",
            "host.example/web@sha256:abc",
            "host.example/web@sha512:00",
            "[::1/web:v1",
            "host.example/:v1",
        ] {
            assert!(input.parse::<Reference>().is_err(), "{input} was accepted");
        }
        let long_tag = format!("host.example/web:{}", "t".repeat(129));
        assert!(long_tag.parse::<Reference>().is_err());
    }
}
