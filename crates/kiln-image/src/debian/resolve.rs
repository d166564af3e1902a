//! The dependency closure of an image's requested packages: pure, over an
//! [`Index`] of `Packages` entries, no I/O.
//!
//! Rules (what kiln promises, documented in docs/spec.md):
//! - `Pre-Depends` and `Depends` are followed; `Recommends`, `Suggests`,
//!   `Breaks` and `Conflicts` are not looked at.
//! - One architecture (the host's) plus `all`; `:any` / `:native`
//!   qualifiers therefore name the same package.
//! - A group `a | b` is satisfied if any alternative already is; otherwise
//!   the first alternative that can be satisfied is chosen.
//! - A virtual package is satisfied by a chosen provider if there is one,
//!   else by the lexically first provider (versioned `Provides` for a
//!   versioned relation).
//! - Of several versions of a package (bookworm, bookworm-updates,
//!   bookworm-security), the highest one that satisfies the relation wins;
//!   a package is chosen once, so a later relation its version does not meet
//!   is an error, not a second version.
//! - Packages are visited breadth-first from the roots in the order given,
//!   so the result depends only on the index and the (sorted) request.

use std::collections::{BTreeMap, VecDeque};

use super::control::{self, Dep, PackageEntry, Relations};
use crate::error::ImageError;

/// Every package version the sources offer for one architecture.
#[derive(Debug, Default)]
pub struct Index {
    arch: String,
    entries: Vec<PackageEntry>,
    /// Name → entries, highest version first.
    by_name: BTreeMap<String, Vec<usize>>,
    /// Virtual name → (providing entry, provided version).
    providers: BTreeMap<String, Vec<(usize, Option<String>)>>,
}

impl Index {
    pub fn new(arch: &str) -> Index {
        Index {
            arch: arch.to_string(),
            ..Index::default()
        }
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds the entries of one `Packages` index. Other architectures are
    /// skipped; a version already known (the same package in two suites)
    /// keeps its first entry.
    pub fn add(&mut self, entries: Vec<PackageEntry>) -> Result<(), String> {
        for e in entries {
            if e.arch != self.arch && e.arch != "all" {
                continue;
            }
            let versions = self.by_name.entry(e.name.clone()).or_default();
            if versions
                .iter()
                .any(|&i| self.entries[i].version == e.version)
            {
                continue;
            }
            let provides = control::parse_relations(&e.provides)
                .map_err(|why| format!("package `{}` {}: Provides: {why}", e.name, e.version))?;
            let idx = self.entries.len();
            for group in provides {
                for dep in group {
                    let version = match dep.constraint {
                        Some((super::version::Op::Eq, v)) => Some(v),
                        _ => None,
                    };
                    self.providers
                        .entry(dep.name)
                        .or_default()
                        .push((idx, version));
                }
            }
            versions.push(idx);
            self.entries.push(e);
        }
        for versions in self.by_name.values_mut() {
            versions.sort_by(|&a, &b| {
                super::version::compare(&self.entries[b].version, &self.entries[a].version)
            });
        }
        for provs in self.providers.values_mut() {
            provs.sort_by(|a, b| {
                let (ea, eb) = (&self.entries[a.0], &self.entries[b.0]);
                ea.name
                    .cmp(&eb.name)
                    .then_with(|| super::version::compare(&eb.version, &ea.version))
            });
        }
        Ok(())
    }

    /// Every version of `name`, highest first.
    pub fn versions(&self, name: &str) -> impl Iterator<Item = &PackageEntry> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &self.entries[i])
    }

    /// The closure of `roots` for `image`, sorted by package name.
    pub fn resolve(&self, image: &str, roots: &[String]) -> Result<Vec<&PackageEntry>, ImageError> {
        let mut r = Resolver {
            index: self,
            image,
            chosen: BTreeMap::new(),
            parent: BTreeMap::new(),
            queue: VecDeque::new(),
        };
        for root in roots {
            let dep = Dep {
                name: root.clone(),
                arch: None,
                constraint: None,
            };
            if !control::is_package_name(root) {
                return Err(ImageError::DebianUnknownPackage {
                    image: image.to_string(),
                    package: root.clone(),
                    required_by: None,
                });
            }
            r.satisfy_group(&[dep], None)?;
        }
        while let Some(idx) = r.queue.pop_front() {
            let e = &self.entries[idx];
            for field in [&e.pre_depends, &e.depends] {
                let groups: Relations =
                    control::parse_relations(field).map_err(|why| ImageError::DebianUnsatisfiable {
                        image: image.to_string(),
                        package: format!("{} {}", e.name, e.version),
                        relation: field.clone(),
                        why: format!("the relation does not parse ({why}); the archive's metadata is malformed, report it to the repository's maintainers"),
                    })?;
                for group in &groups {
                    r.satisfy_group(group, Some(idx))?;
                }
            }
        }
        Ok(r.chosen.values().map(|&i| &self.entries[i]).collect())
    }
}

struct Resolver<'a> {
    index: &'a Index,
    image: &'a str,
    chosen: BTreeMap<&'a str, usize>,
    parent: BTreeMap<&'a str, usize>,
    queue: VecDeque<usize>,
}

impl<'a> Resolver<'a> {
    fn entry(&self, i: usize) -> &'a PackageEntry {
        &self.index.entries[i]
    }

    fn version_ok(dep: &Dep, version: Option<&str>) -> bool {
        match (&dep.constraint, version) {
            (None, _) => true,
            (Some((op, want)), Some(have)) => op.holds(have, want),
            (Some(_), None) => false,
        }
    }

    /// Whether a package already chosen satisfies `dep`.
    fn already(&self, dep: &Dep) -> bool {
        if let Some(&i) = self.chosen.get(dep.name.as_str())
            && Self::version_ok(dep, Some(&self.entry(i).version))
        {
            return true;
        }
        self.index
            .providers
            .get(&dep.name)
            .into_iter()
            .flatten()
            .any(|(i, v)| {
                self.chosen.get(self.entry(*i).name.as_str()) == Some(i)
                    && Self::version_ok(dep, v.as_deref())
            })
    }

    /// The entry to choose for `dep`, if it can be satisfied without a
    /// second version of a chosen package.
    fn candidate(&self, dep: &Dep) -> Option<usize> {
        if !self.chosen.contains_key(dep.name.as_str())
            && let Some(&i) = self.index.by_name.get(&dep.name).and_then(|vs| {
                vs.iter()
                    .find(|&&i| Self::version_ok(dep, Some(&self.entry(i).version)))
            })
        {
            return Some(i);
        }
        self.index
            .providers
            .get(&dep.name)
            .into_iter()
            .flatten()
            .find(|(i, v)| {
                !self.chosen.contains_key(self.entry(*i).name.as_str())
                    && Self::version_ok(dep, v.as_deref())
            })
            .map(|(i, _)| *i)
    }

    fn satisfy_group(&mut self, group: &[Dep], from: Option<usize>) -> Result<(), ImageError> {
        if group.iter().any(|d| self.already(d)) {
            return Ok(());
        }
        for dep in group {
            if let Some(i) = self.candidate(dep) {
                let e = self.entry(i);
                self.chosen.insert(&e.name, i);
                if let Some(p) = from {
                    self.parent.insert(&e.name, p);
                }
                self.queue.push_back(i);
                return Ok(());
            }
        }
        Err(self.failure(group, from))
    }

    /// `postgresql-15 → libpq5 → libssl3`: how `from` came to be needed.
    fn chain(&self, from: usize) -> String {
        let mut names = vec![self.entry(from).name.as_str()];
        let mut at = names[0];
        while let Some(&p) = self.parent.get(at) {
            at = &self.entry(p).name;
            if names.contains(&at) {
                break;
            }
            names.push(at);
        }
        names.reverse();
        names.join(" → ")
    }

    fn failure(&self, group: &[Dep], from: Option<usize>) -> ImageError {
        let known = |d: &Dep| {
            self.index.by_name.contains_key(&d.name) || self.index.providers.contains_key(&d.name)
        };
        if group.len() == 1 && !known(&group[0]) {
            return ImageError::DebianUnknownPackage {
                image: self.image.to_string(),
                package: group[0].name.clone(),
                required_by: from.map(|f| self.chain(f)),
            };
        }
        let mut why = Vec::new();
        for d in group {
            if !known(d) {
                why.push(format!("no package `{}`", d.name));
            } else if let Some(&i) = self.chosen.get(d.name.as_str()) {
                why.push(format!(
                    "`{}` {} is already chosen (needed by {})",
                    d.name,
                    self.entry(i).version,
                    self.parent
                        .get(d.name.as_str())
                        .map_or_else(|| "the image".to_string(), |&p| self.chain(p))
                ));
            } else {
                let versions: Vec<&str> = self
                    .index
                    .versions(&d.name)
                    .map(|e| e.version.as_str())
                    .collect();
                why.push(format!(
                    "`{}` is available only as {}",
                    d.name,
                    if versions.is_empty() {
                        "a virtual package with no matching provider".to_string()
                    } else {
                        versions.join(", ")
                    }
                ));
            }
        }
        ImageError::DebianUnsatisfiable {
            image: self.image.to_string(),
            package: from.map_or_else(|| "the image".to_string(), |f| self.chain(f)),
            relation: group
                .iter()
                .map(Dep::to_string)
                .collect::<Vec<_>>()
                .join(" | "),
            why: why.join("; "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(name: &str, version: &str, arch: &str, extra: &str) -> String {
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: {arch}\n{extra}Filename: pool/main/{name}_{version}_{arch}.deb\nSize: 10\nSHA256: {}\n\n",
            "a".repeat(64)
        )
    }

    fn index(stanzas: &[String]) -> Index {
        let mut idx = Index::new("amd64");
        idx.add(control::parse_packages(&stanzas.concat()).unwrap())
            .unwrap();
        idx
    }

    fn names(idx: &Index, roots: &[&str]) -> Vec<String> {
        let roots: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
        idx.resolve("db", &roots)
            .unwrap()
            .iter()
            .map(|e| format!("{}={}", e.name, e.version))
            .collect()
    }

    #[test]
    fn closure_follows_depends_and_pre_depends_only() {
        let idx = index(&[
            stanza(
                "app",
                "1",
                "amd64",
                "Pre-Depends: pre\nDepends: lib1 (>= 2), data\nRecommends: big\nSuggests: bigger\n",
            ),
            stanza("pre", "1", "amd64", ""),
            stanza("lib1", "1", "amd64", ""),
            stanza("lib1", "3", "amd64", "Depends: libc\n"),
            stanza("lib1", "2", "amd64", ""),
            stanza("libc", "2.36", "amd64", ""),
            stanza("data", "1", "all", ""),
            stanza("big", "1", "amd64", ""),
            stanza("bigger", "1", "amd64", ""),
            stanza("other-arch", "1", "arm64", ""),
        ]);
        assert_eq!(
            names(&idx, &["app"]),
            ["app=1", "data=1", "lib1=3", "libc=2.36", "pre=1"]
        );
        assert!(idx.resolve("db", &["other-arch".into()]).is_err());
    }

    #[test]
    fn highest_satisfying_version_and_constraints() {
        let idx = index(&[
            stanza("app", "1", "amd64", "Depends: lib1 (<< 3)\n"),
            stanza("lib1", "1:1.0", "amd64", ""),
            stanza("lib1", "2.9", "amd64", ""),
            stanza("lib1", "3~rc1", "amd64", ""),
            stanza("lib1", "3", "amd64", ""),
        ]);
        // 1:1.0 has an epoch: it is the highest, and not << 3.
        assert_eq!(names(&idx, &["app"]), ["app=1", "lib1=3~rc1"]);
    }

    #[test]
    fn alternatives_prefer_chosen_then_first_satisfiable() {
        let idx = index(&[
            stanza("app", "1", "amd64", "Depends: missing | bb, cc | bb\n"),
            stanza("bb", "1", "amd64", ""),
            stanza("cc", "1", "amd64", ""),
        ]);
        assert_eq!(names(&idx, &["app"]), ["app=1", "bb=1"]);
        let idx = index(&[
            stanza("app", "1", "amd64", "Depends: cc (>= 2) | bb\n"),
            stanza("bb", "1", "amd64", ""),
            stanza("cc", "1", "amd64", ""),
        ]);
        assert_eq!(names(&idx, &["app"]), ["app=1", "bb=1"]);
    }

    #[test]
    fn virtual_packages() {
        let idx = index(&[
            stanza("app", "1", "amd64", "Depends: mail-agent, awk (>= 1)\n"),
            stanza("zmail", "1", "amd64", "Provides: mail-agent\n"),
            stanza("amail", "1", "amd64", "Provides: mail-agent\n"),
            stanza("mawk", "1", "amd64", "Provides: awk\n"),
            stanza("gawk", "5", "amd64", "Provides: awk (= 5)\n"),
        ]);
        // Lexically first provider; versioned relation needs a versioned Provides.
        assert_eq!(names(&idx, &["app"]), ["amail=1", "app=1", "gawk=5"]);
        // A provider already chosen wins over the lexically first.
        assert_eq!(
            names(&idx, &["zmail", "app"]),
            ["app=1", "gawk=5", "zmail=1"]
        );
    }

    #[test]
    fn cycles_terminate() {
        let idx = index(&[
            stanza("a1", "1", "amd64", "Depends: b1\n"),
            stanza("b1", "1", "amd64", "Depends: a1 (>= 1)\n"),
        ]);
        assert_eq!(names(&idx, &["a1"]), ["a1=1", "b1=1"]);
    }

    #[test]
    fn missing_packages_name_image_package_and_chain() {
        let idx = index(&[
            stanza("app", "1", "amd64", "Depends: lib1\n"),
            stanza("lib1", "1", "amd64", "Depends: gone\n"),
        ]);
        let e = idx.resolve("db", &["app".into()]).unwrap_err().to_string();
        assert!(e.contains("image `db`"), "{e}");
        assert!(e.contains("`gone`"), "{e}");
        assert!(e.contains("app → lib1"), "{e}");
        assert!(e.contains("apt-cache search gone"), "{e}");
        let e = idx.resolve("db", &["nope".into()]).unwrap_err().to_string();
        assert!(
            e.contains("`nope`") && e.contains("apt-cache search"),
            "{e}"
        );
    }

    #[test]
    fn conflicting_versions_are_an_error() {
        let idx = index(&[
            stanza("app", "1", "amd64", "Depends: lib1 (>= 2), tool\n"),
            stanza("tool", "1", "amd64", "Depends: lib1 (<< 2)\n"),
            stanza("lib1", "1", "amd64", ""),
            stanza("lib1", "2", "amd64", ""),
        ]);
        let e = idx.resolve("db", &["app".into()]).unwrap_err().to_string();
        assert!(
            e.contains("lib1 (<< 2)") && e.contains("already chosen"),
            "{e}"
        );
    }

    /// Whether the chosen set satisfies `dep` (a real package or a provider).
    fn holds(chosen: &[&PackageEntry], dep: &Dep) -> bool {
        chosen.iter().any(|e| {
            let ok = |v: Option<&str>| match (&dep.constraint, v) {
                (None, _) => true,
                (Some((op, want)), Some(have)) => op.holds(have, want),
                (Some(_), None) => false,
            };
            (e.name == dep.name && ok(Some(&e.version)))
                || control::parse_relations(&e.provides)
                    .unwrap()
                    .iter()
                    .flatten()
                    .any(|p| {
                        p.name == dep.name
                            && ok(match &p.constraint {
                                Some((super::super::version::Op::Eq, v)) => Some(v),
                                _ => None,
                            })
                    })
        })
    }

    fn arb_relation() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let dep = (0..6u8, proptest::option::of((0..5usize, 1..4u8))).prop_map(|(n, c)| {
            let ops = [">=", "<<", "=", ">>", "<="];
            match c {
                Some((op, v)) => format!("p{n} ({} {v})", ops[op]),
                None => format!("p{n}"),
            }
        });
        proptest::collection::vec(proptest::collection::vec(dep, 1..3), 0..3).prop_map(|groups| {
            groups
                .iter()
                .map(|g| g.join(" | "))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    proptest::proptest! {
        /// Whatever the index, an accepted closure is sound: it holds every
        /// root, one version per name, and every Depends / Pre-Depends
        /// group of every package in it is satisfied inside it.
        #[test]
        fn an_accepted_closure_satisfies_every_relation_in_it(
            extra in proptest::collection::vec(
                (0..6u8, 1..4u8, arb_relation(), arb_relation(), proptest::option::of((0..6u8, proptest::option::of(1..4u8)))),
                6..14,
            ),
            root in 0..6u8,
        ) {
            // Every name p0..p5 exists (the first six entries are renamed
            // to them), so most closures resolve and the check has work.
            let pkgs = extra.iter().enumerate().map(|(i, (n, v, dep, pre, prov))| {
                let n = if i < 6 { i as u8 } else { *n };
                (n, *v, dep.clone(), pre.clone(), *prov)
            });
            let stanzas: Vec<String> = pkgs
                .map(|(n, v, dep, pre, prov)| {
                    let provides = match prov {
                        Some((p, Some(pv))) => format!("Provides: v{p} (= {pv})\n"),
                        Some((p, None)) => format!("Provides: v{p}\n"),
                        None => String::new(),
                    };
                    // Relations name real packages (p0..p3) and virtual
                    // ones (v4, v5) that some packages may provide.
                    let dep = dep.replace("p5", "v5").replace("p4", "v4");
                    stanza(&format!("p{n}"), &v.to_string(), "amd64", &format!("Depends: {dep}\nPre-Depends: {pre}\n{provides}"))
                })
                .collect();
            let idx = index(&stanzas);
            let roots = vec![format!("p{root}")];
            if let Ok(chosen) = idx.resolve("db", &roots) {
                let mut names: Vec<&str> = chosen.iter().map(|e| e.name.as_str()).collect();
                names.dedup();
                proptest::prop_assert_eq!(names.len(), chosen.len(), "one version per name");
                proptest::prop_assert!(chosen.iter().any(|e| e.name == roots[0]));
                for e in &chosen {
                    for field in [&e.pre_depends, &e.depends] {
                        for group in control::parse_relations(field).unwrap() {
                            proptest::prop_assert!(
                                group.iter().any(|d| holds(&chosen, d)),
                                "{} {}: `{}` unsatisfied in {:?}", e.name, e.version,
                                control::format_relations(&vec![group.clone()]), names
                            );
                        }
                    }
                }
                proptest::prop_assert_eq!(idx.resolve("db", &roots).unwrap(), chosen);
            }
        }
    }

    #[test]
    fn output_is_sorted_and_independent_of_index_order() {
        let mut stanzas = vec![
            stanza("z1", "1", "amd64", "Depends: y1, x1\n"),
            stanza("y1", "1", "amd64", ""),
            stanza("x1", "1", "all", ""),
            stanza("x1", "2", "all", ""),
        ];
        let a = names(&index(&stanzas), &["z1"]);
        stanzas.reverse();
        assert_eq!(a, names(&index(&stanzas), &["z1"]));
        assert_eq!(a, ["x1=2", "y1=1", "z1=1"]);
    }
}
