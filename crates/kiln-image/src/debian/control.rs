//! deb822 control files (`Packages` indexes, `.sources` files, the body of
//! an `InRelease`) and the relation fields of a package (`Depends`,
//! `Pre-Depends`, `Provides`).
//!
//! Every byte here comes from the network or from a file anyone could have
//! written, so nothing panics and every refusal names its line
//! (`fuzz/fuzz_targets/debian_control.rs` keeps it that way).

use std::fmt;

use super::version::{self, Op};

/// Why a control file or a field was refused; `line` is 1-based.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlError {
    pub line: usize,
    pub why: String,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

/// One paragraph of a deb822 file: fields in file order, values as written
/// (continuation lines included, newlines kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stanza<'a> {
    /// The line of its first field.
    pub line: usize,
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Stanza<'a> {
    /// The value of `name` (field names are case-insensitive), trimmed.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    pub fn fields(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.fields.iter().copied()
    }
}

/// Splits `text` into stanzas. Blank lines separate them, `#` lines are
/// comments, lines starting with a space or a tab continue the field above.
pub fn parse(text: &str) -> Result<Vec<Stanza<'_>>, ControlError> {
    let mut out = Vec::new();
    let mut current: Option<Stanza<'_>> = None;
    // Byte offsets of the current field's value: (name, start, end).
    let mut open: Option<(&str, usize, usize)> = None;
    let mut offset = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            close(text, &mut current, &mut open);
            out.extend(current.take());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match open.as_mut() {
                Some((_, _, end)) => *end = start + line.len(),
                None => {
                    return Err(ControlError {
                        line: line_no,
                        why: "a continuation line (starting with a space) with no field above it"
                            .into(),
                    });
                }
            }
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Err(ControlError {
                line: line_no,
                why: format!("expected `Field: value`, found `{}`", shorten(line)),
            });
        };
        if name.is_empty()
            || name.starts_with('-')
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        {
            return Err(ControlError {
                line: line_no,
                why: format!("`{}` is not a field name", shorten(name)),
            });
        }
        close(text, &mut current, &mut open);
        let stanza = current.get_or_insert_with(|| Stanza {
            line: line_no,
            fields: Vec::new(),
        });
        if stanza
            .fields
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            return Err(ControlError {
                line: line_no,
                why: format!("field `{name}` appears twice in one paragraph"),
            });
        }
        open = Some((name, start + name.len() + 1, start + line.len()));
    }
    close(text, &mut current, &mut open);
    out.extend(current);
    Ok(out)
}

/// Ends the open field: its value is `text[start..end]`, which are char
/// boundaries (ends of lines, and just after an ASCII `:`).
fn close<'a>(
    text: &'a str,
    stanza: &mut Option<Stanza<'a>>,
    open: &mut Option<(&'a str, usize, usize)>,
) {
    if let (Some(s), Some((name, start, end))) = (stanza.as_mut(), open.take()) {
        s.fields.push((name, &text[start..end]));
    }
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// A binary package as a `Packages` index describes it: what kiln needs to
/// resolve, fetch and verify it. Relation fields stay text until the
/// resolver looks at them ([`parse_relations`]): an archive has 60,000
/// stanzas and a closure touches a few hundred.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageEntry {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub depends: String,
    pub pre_depends: String,
    pub provides: String,
    /// The pool path under the archive's URI.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    pub essential: bool,
    pub multi_arch: Option<String>,
}

/// Whether `name` is a valid Debian package name: `[a-z0-9][a-z0-9+.-]+`.
pub fn is_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(c))
}

/// Whether `s` is 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `path` is a pool path that stays under the archive root.
pub fn is_pool_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.ends_with(".deb")
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && path.bytes().all(|b| b.is_ascii_graphic())
}

impl PackageEntry {
    /// The entry of one `Packages` stanza, every field checked.
    pub fn from_stanza(s: &Stanza<'_>) -> Result<PackageEntry, ControlError> {
        let err = |why: String| ControlError { line: s.line, why };
        let need = |field: &str| {
            s.get(field).filter(|v| !v.is_empty()).ok_or_else(|| {
                err(format!(
                    "paragraph `{}` has no `{field}` field",
                    s.get("Package").unwrap_or("?")
                ))
            })
        };
        let name = need("Package")?;
        if !is_package_name(name) {
            return Err(err(format!("`{}` is not a package name", shorten(name))));
        }
        let version = need("Version")?;
        if !version::is_valid(version) {
            return Err(err(format!(
                "package `{name}`: `{}` is not a Debian version",
                shorten(version)
            )));
        }
        let arch = need("Architecture")?;
        if !arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(err(format!(
                "package `{name}`: bad Architecture `{}`",
                shorten(arch)
            )));
        }
        let filename = need("Filename")?;
        if !is_pool_path(filename) {
            return Err(err(format!(
                "package `{name}`: Filename `{}` is not a pool path ending in .deb",
                shorten(filename)
            )));
        }
        let size = need("Size")?
            .parse::<u64>()
            .map_err(|_| err(format!("package `{name}`: Size is not a number")))?;
        let sha256 = need("SHA256")?;
        if !is_sha256(sha256) {
            return Err(err(format!(
                "package `{name}`: SHA256 is not 64 lowercase hex digits"
            )));
        }
        let field = |f: &str| s.get(f).unwrap_or("").to_string();
        Ok(PackageEntry {
            name: name.to_string(),
            version: version.to_string(),
            arch: arch.to_string(),
            depends: field("Depends"),
            pre_depends: field("Pre-Depends"),
            provides: field("Provides"),
            filename: filename.to_string(),
            size,
            sha256: sha256.to_string(),
            essential: s.get("Essential") == Some("yes"),
            multi_arch: s.get("Multi-Arch").map(str::to_string),
        })
    }
}

/// Every package of a `Packages` index, in file order.
pub fn parse_packages(text: &str) -> Result<Vec<PackageEntry>, ControlError> {
    parse(text)?.iter().map(PackageEntry::from_stanza).collect()
}

/// One alternative of a relation: `name[:arch] [(op version)]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dep {
    pub name: String,
    /// `any`, `native` or an architecture; kiln resolves one architecture,
    /// so it only matters to the printed form.
    pub arch: Option<String>,
    pub constraint: Option<(Op, String)>,
}

impl fmt::Display for Dep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(a) = &self.arch {
            write!(f, ":{a}")?;
        }
        if let Some((op, v)) = &self.constraint {
            write!(f, " ({} {v})", op.as_str())?;
        }
        Ok(())
    }
}

/// A relation field: a list of groups that must all hold, each group a list
/// of alternatives (`a | b`) of which one must.
pub type Relations = Vec<Vec<Dep>>;

/// Prints relations back in canonical form (`a (>= 1) | b, c`).
pub fn format_relations(r: &Relations) -> String {
    r.iter()
        .map(|g| g.iter().map(Dep::to_string).collect::<Vec<_>>().join(" | "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `Depends`-style text. Architecture restrictions (`[amd64]`) and
/// build profiles (`<nocheck>`) belong to source packages and are refused.
pub fn parse_relations(text: &str) -> Result<Relations, String> {
    let mut groups = Vec::new();
    if text.trim().is_empty() {
        return Ok(groups);
    }
    for group in text.split(',') {
        let mut alts = Vec::new();
        for alt in group.split('|') {
            alts.push(parse_dep(alt)?);
        }
        groups.push(alts);
    }
    Ok(groups)
}

fn parse_dep(text: &str) -> Result<Dep, String> {
    let text = text.trim();
    let (head, constraint) = match text.split_once('(') {
        Some((head, rest)) => {
            let inner = rest.strip_suffix(')').ok_or_else(|| {
                format!("`{}`: `(` without a closing `)` at the end", shorten(text))
            })?;
            let inner = inner.trim();
            let split = inner
                .find(|c: char| !matches!(c, '<' | '>' | '='))
                .unwrap_or(inner.len());
            let (op, ver) = inner.split_at(split);
            let op = Op::parse(op.trim()).ok_or_else(|| {
                format!("`{}`: unknown operator `{}`", shorten(text), shorten(op))
            })?;
            let ver = ver.trim();
            if !version::is_valid(ver) {
                return Err(format!(
                    "`{}`: `{}` is not a Debian version",
                    shorten(text),
                    shorten(ver)
                ));
            }
            (head.trim(), Some((op, ver.to_string())))
        }
        None => (text, None),
    };
    let (name, arch) = match head.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (head, None),
    };
    if !is_package_name(name) {
        return Err(format!("`{}` is not a package name", shorten(name)));
    }
    if let Some(a) = arch
        && (a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(format!("`{}`: bad architecture qualifier", shorten(head)));
    }
    Ok(Dep {
        name: name.to_string(),
        arch: arch.map(str::to_string),
        constraint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: &str = "Package: libpq5\nSource: postgresql-15\nVersion: 15.10-0+deb12u1\nInstalled-Size: 906\nMaintainer: Debian PostgreSQL Maintainers <team+postgresql@tracker.debian.org>\nArchitecture: amd64\nMulti-Arch: same\nDepends: libc6 (>= 2.34), libgssapi-krb5-2 (>= 1.17), libldap-2.5-0 (>= 2.5.4), libssl3 (>= 3.0.0)\nDescription: PostgreSQL C client library\n libpq is a C library that enables user programs to communicate with\n the PostgreSQL database server.\n .\n More.\nSection: libs\nPriority: optional\nFilename: pool/main/p/postgresql-15/libpq5_15.10-0+deb12u1_amd64.deb\nSize: 190140\nSHA256: 2b1d5d34bf1b1e2fbc1da7c6ab8f1cbd72e8b8c4d1b6cb8f7c0f03d1e5e6d3a1\n\nPackage: tzdata\nVersion: 2025b-0+deb12u1\nArchitecture: all\nProvides: tzdata-bookworm\nDepends: debconf (>= 0.5) | debconf-2.0\nFilename: pool/main/t/tzdata/tzdata_2025b-0+deb12u1_all.deb\nSize: 299756\nSHA256: 0000000000000000000000000000000000000000000000000000000000000000\n";

    #[test]
    fn packages_parse() {
        let p = parse_packages(PG).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "libpq5");
        assert_eq!(p[0].size, 190140);
        assert_eq!(p[0].multi_arch.as_deref(), Some("same"));
        assert_eq!(p[1].arch, "all");
        let deps = parse_relations(&p[1].depends).unwrap();
        assert_eq!(deps.len(), 1);
        assert_eq!(deps[0].len(), 2);
        assert_eq!(deps[0][0].constraint, Some((Op::Ge, "0.5".into())));
        assert_eq!(format_relations(&deps), "debconf (>= 0.5) | debconf-2.0");
    }

    #[test]
    fn folded_fields_and_crlf() {
        let text = "Package: a1\r\nVersion: 1\r\nArchitecture: all\r\nDepends: b1,\r\n c1 (>= 2)\r\nFilename: pool/a.deb\r\nSize: 1\r\nSHA256: 0000000000000000000000000000000000000000000000000000000000000000\r\n";
        let p = parse_packages(text).unwrap();
        let deps = parse_relations(&p[0].depends).unwrap();
        assert_eq!(format_relations(&deps), "b1, c1 (>= 2)");
    }

    #[test]
    fn refusals_name_the_line() {
        let e = parse("Package: a\n continued\nno colon here\n").unwrap_err();
        assert_eq!(e.line, 3);
        let e = parse(" starts indented\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse("A: 1\na: 2\n").unwrap_err();
        assert!(e.why.contains("twice"), "{e}");
        let e = parse_packages("Package: a1\nVersion: 1\n\nPackage: b1\nVersion: 1\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.why.contains("Architecture"), "{e}");
        let bad_path = PG.replace("pool/main/t/tzdata/", "../../etc/");
        let e = parse_packages(&bad_path).unwrap_err();
        assert!(e.why.contains("pool path"), "{e}");
        assert_eq!(e.line, 20);
    }

    #[test]
    fn relations() {
        let r = parse_relations("libc6:any (>= 2.34) | musl, perl:native , x-y.z+1 (<< 1:2~rc)")
            .unwrap();
        assert_eq!(
            format_relations(&r),
            "libc6:any (>= 2.34) | musl, perl:native, x-y.z+1 (<< 1:2~rc)"
        );
        assert_eq!(parse_relations(" ").unwrap(), Vec::<Vec<Dep>>::new());
        assert!(parse_relations("a1 (>= 1").is_err());
        assert!(parse_relations("a1 (=> 1)").is_err());
        assert!(parse_relations("a1 [amd64]").is_err());
        assert!(parse_relations("A1").is_err());
        assert!(parse_relations("a1,").is_err());
        assert!(parse_relations("a1 (>= )").is_err());
    }
}
