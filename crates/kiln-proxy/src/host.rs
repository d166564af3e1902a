//! Which route of a shared listener a request goes to, by its host.
//!
//! Several http routes may listen on one address, each claiming host names
//! (`[route.X] hosts`): `shop.example.com` (exact) or `*.example.com` (every
//! name under it, at any depth, not the name itself). A request's host — the
//! `Host` header of HTTP/1.1 or the `:authority` of HTTP/2, untrusted bytes —
//! is normalised (port removed, ASCII lowercased, one trailing dot dropped)
//! and matched: an exact name first, then the longest matching wildcard,
//! then the address's default route (the one without `hosts`), else none
//! (the proxy answers 404). Matching allocates only for a host with
//! uppercase letters, and costs one hash lookup plus one per wildcard.

use std::borrow::Cow;
use std::collections::HashMap;

/// The routes of one listener by host.
#[derive(Debug, Clone)]
pub struct HostRouter<T> {
    exact: HashMap<Box<str>, T>,
    /// `(".example.com", route)`, longest suffix first.
    wildcards: Vec<(Box<str>, T)>,
    default: Option<T>,
}

impl<T> Default for HostRouter<T> {
    fn default() -> Self {
        HostRouter {
            exact: HashMap::new(),
            wildcards: Vec::new(),
            default: None,
        }
    }
}

impl<T: Clone> HostRouter<T> {
    /// `rules`: each route's host patterns (empty: the default route) and
    /// the route. Refuses what the spec refuses too: a pattern that is not a
    /// lowercase DNS name (optionally `*.`), one claimed twice, two
    /// defaults.
    pub fn new<'a>(
        rules: impl IntoIterator<Item = (&'a [String], T)>,
    ) -> Result<HostRouter<T>, String> {
        let mut router = HostRouter::default();
        for (hosts, route) in rules {
            if hosts.is_empty() {
                if router.default.is_some() {
                    return Err("two routes of one address have no `hosts`".into());
                }
                router.default = Some(route);
                continue;
            }
            for pattern in hosts {
                let (name, wildcard) = match pattern.strip_prefix("*.") {
                    Some(rest) => (rest, true),
                    None => (pattern.as_str(), false),
                };
                if !is_dns_name(name) {
                    return Err(format!("`{pattern}` is not a host name to match"));
                }
                let taken = if wildcard {
                    let suffix: Box<str> = format!(".{name}").into();
                    let taken = router.wildcards.iter().any(|(s, _)| *s == suffix);
                    router.wildcards.push((suffix, route.clone()));
                    taken
                } else {
                    router.exact.insert(name.into(), route.clone()).is_some()
                };
                if taken {
                    return Err(format!("host `{pattern}` is claimed twice"));
                }
            }
        }
        router
            .wildcards
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(router)
    }

    /// Whether every request goes to one route whatever its host.
    pub fn is_trivial(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty()
    }

    /// The route for a request whose host is `raw` (`None`: no host given).
    pub fn route(&self, raw: Option<&[u8]>) -> Option<&T> {
        if self.is_trivial() {
            return self.default.as_ref();
        }
        let Some(host) = raw.and_then(normalize) else {
            return self.default.as_ref();
        };
        if let Some(route) = self.exact.get(&*host) {
            return Some(route);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(&**suffix))
            .map(|(_, route)| route)
            .or(self.default.as_ref())
    }
}

/// A request's host as the routes name it: without its port, lowercase,
/// without one trailing dot; `None` for something that is no host name
/// (empty, an empty label, bytes outside `[A-Za-z0-9.-]`, an IP-literal in
/// brackets, which no route can name).
pub fn normalize(raw: &[u8]) -> Option<Cow<'_, str>> {
    let host = match raw.iter().rposition(|&b| b == b':') {
        Some(i) if raw[i + 1..].iter().all(u8::is_ascii_digit) => &raw[..i],
        Some(_) => return None,
        None => raw,
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty()
        || host.len() > 253
        || host.starts_with(b".")
        || host.ends_with(b".")
        || host.windows(2).any(|w| w == b"..")
        || !host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
    {
        return None;
    }
    let text = std::str::from_utf8(host).ok()?;
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(text.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(text))
    }
}

/// A lowercase DNS name: labels of 1–63 letters, digits and inner hyphens.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> HostRouter<&'static str> {
        let shop = vec![
            "shop.example.com".to_owned(),
            "*.shop.example.com".to_owned(),
        ];
        let any = vec!["*.example.com".to_owned()];
        let api = vec!["api.example.com".to_owned()];
        HostRouter::new([
            (shop.as_slice(), "shop"),
            (any.as_slice(), "any"),
            (api.as_slice(), "api"),
            (&[][..], "default"),
        ])
        .unwrap()
    }

    #[test]
    fn exact_beats_the_longest_wildcard_which_beats_the_default() {
        let r = router();
        let cases: &[(&[u8], &str)] = &[
            (b"shop.example.com", "shop"),
            (b"SHOP.Example.COM:8080", "shop"),
            (b"shop.example.com.", "shop"),
            (b"a.shop.example.com", "shop"),
            (b"a.b.shop.example.com", "shop"),
            (b"api.example.com", "api"),
            (b"x.example.com", "any"),
            (b"example.com", "default"),
            (b"xshop.example.com", "any"),
            (b"other.org", "default"),
            (b"", "default"),
            (b"[::1]:80", "default"),
            (b"127.0.0.1:80", "default"),
            (b"shop.example.com:http", "default"),
            (b"shop example.com", "default"),
        ];
        for (host, want) in cases {
            assert_eq!(
                r.route(Some(host)),
                Some(want),
                "{}",
                String::from_utf8_lossy(host)
            );
        }
        assert_eq!(r.route(None), Some(&"default"));
    }

    #[test]
    fn without_a_default_an_unclaimed_host_has_no_route() {
        let api = vec!["api.example.com".to_owned()];
        let r = HostRouter::new([(api.as_slice(), 1)]).unwrap();
        assert_eq!(r.route(Some(b"api.example.com")), Some(&1));
        assert_eq!(r.route(Some(b"www.example.com")), None);
        assert_eq!(r.route(None), None);
    }

    #[test]
    fn bad_rules_are_refused() {
        let dup = vec!["a.example".to_owned()];
        assert!(HostRouter::new([(dup.as_slice(), 1), (dup.as_slice(), 2)]).is_err());
        assert!(HostRouter::new([(&[][..], 1), (&[][..], 2)]).is_err());
        for bad in [
            "",
            "*",
            "*.",
            "A.example",
            "a..b",
            "-a.b",
            "a.b:80",
            "*.*.a",
        ] {
            let hosts = vec![bad.to_owned()];
            assert!(HostRouter::new([(hosts.as_slice(), 1)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalize_strips_the_port_case_and_one_trailing_dot() {
        assert_eq!(normalize(b"A.B:1").as_deref(), Some("a.b"));
        assert_eq!(normalize(b"a.b.").as_deref(), Some("a.b"));
        assert_eq!(normalize(b"a.b.."), None);
        assert_eq!(normalize(b"a..b"), None);
        assert_eq!(normalize(b".a.b"), None);
        assert_eq!(normalize(b"a.b:"), Some(Cow::Borrowed("a.b")));
        assert_eq!(normalize(b":80"), None);
        assert_eq!(normalize(b"a:b:80"), None);
        assert_eq!(normalize("é.b".as_bytes()), None);
    }
}
