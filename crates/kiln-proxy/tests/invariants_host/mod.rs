//! What the `host_match` fuzz target checks, shared with the stable replay
//! of its seeds (`tests/host_fuzz_corpus.rs`).
//!
//! Input: the first line is a request's host (raw bytes, as a client sent
//! it); every further line is one route's space-separated host patterns (an
//! empty line: a route without `hosts`). Checks: building the router never
//! panics; when it is built, routing the host agrees with a plain reference
//! reading of the rules (exact name, else the longest matching wildcard,
//! else the default, else nothing), and is the same for the host in
//! uppercase, with a port, or with a trailing dot.

use kiln_proxy::host::{HostRouter, is_dns_name, normalize};

pub fn host_match(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let host = lines.next().unwrap_or_default();
    let rules: Vec<Vec<String>> = lines
        .take(16)
        .map(|l| {
            String::from_utf8_lossy(l)
                .split(' ')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect();
    let router = match HostRouter::new(rules.iter().enumerate().map(|(i, r)| (r.as_slice(), i))) {
        Ok(r) => r,
        Err(_) => {
            assert!(!valid(&rules), "valid rules refused: {rules:?}");
            return;
        }
    };
    assert!(valid(&rules), "invalid rules accepted: {rules:?}");
    let got = router.route(Some(host)).copied();
    assert_eq!(
        got,
        reference(&rules, host),
        "host {:?}, rules {rules:?}",
        String::from_utf8_lossy(host)
    );
    if let Some(n) = normalize(host) {
        let n = n.into_owned();
        for variant in [n.to_ascii_uppercase(), format!("{n}:8080"), format!("{n}.")] {
            assert_eq!(
                router.route(Some(variant.as_bytes())).copied(),
                got,
                "variant {variant:?}"
            );
        }
    }
    assert_eq!(
        router.route(None).copied(),
        rules.iter().position(Vec::is_empty)
    );
}

/// The rules as the spec states them: at most one default, patterns DNS
/// names with an optional `*.`, none claimed twice.
fn valid(rules: &[Vec<String>]) -> bool {
    let mut seen = std::collections::BTreeSet::new();
    rules.iter().filter(|r| r.is_empty()).count() <= 1
        && rules
            .iter()
            .flatten()
            .all(|p| is_dns_name(p.strip_prefix("*.").unwrap_or(p)) && seen.insert(p.clone()))
}

fn reference(rules: &[Vec<String>], raw: &[u8]) -> Option<usize> {
    let default = rules.iter().position(Vec::is_empty);
    let Some(host) = normalize(raw) else {
        return default;
    };
    if let Some(i) = rules.iter().position(|r| r.iter().any(|p| *p == *host)) {
        return Some(i);
    }
    let mut best: Option<(usize, usize)> = None;
    for (i, r) in rules.iter().enumerate() {
        for p in r {
            if let Some(name) = p.strip_prefix("*.") {
                let suffix = format!(".{name}");
                if host.len() > suffix.len()
                    && host.ends_with(&suffix)
                    && best.is_none_or(|(len, _)| suffix.len() > len)
                {
                    best = Some((suffix.len(), i));
                }
            }
        }
    }
    best.map(|(_, i)| i).or(default)
}
