//! Resolving a validated spec into a generation: read every file, secret and
//! image reference it names and record their digests.
//!
//! This is the only place where the spec's references meet the disk. What it
//! produces ([`Resolved`]) is plain data, so everything downstream (hashing,
//! planning, diffing) stays pure.
//!
//! Images built by this file (`[image.NAME]`) are identified, until the
//! image store exists, by their *recipe digest*: the SHA-256 of the image's
//! definition, its base's digest, and the content, type and mode of every
//! copied input. Same inputs, same digest, on any machine and at any path;
//! change one byte of a copied file and the digest (and so every instance
//! using it) changes.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_plan::generation::secret_key;
use kiln_plan::{Digest, Generation, Resolved};
use kiln_spec::Spec;
use kiln_spec::model::{Image, ImageSource, SecretSource};
use serde::Serialize;

/// One reference that could not be resolved, with a fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}\n  hint: {hint}")]
pub struct ResolveProblem {
    pub what: String,
    pub why: String,
    pub hint: String,
}

/// Everything that failed to resolve, all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ResolveErrors(pub Vec<ResolveProblem>);

/// Where secrets given as `{ env = "VAR" }` are looked up; a function so
/// tests need not touch the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Resolves `spec` (whose relative paths are relative to `dir`).
pub fn resolve(spec: Spec, dir: &Path, env: EnvLookup<'_>) -> Result<Generation, ResolveErrors> {
    let mut problems = Vec::new();
    let mut resolved = Resolved::default();

    let mut recipes = BTreeMap::new();
    for name in spec.images.keys() {
        let mut visiting = Vec::new();
        match recipe_digest(&spec, name, dir, &mut recipes, &mut visiting) {
            Ok(d) => {
                resolved.images.insert(name.clone(), d);
            }
            Err(p) => problems.push(p),
        }
    }

    for (service_name, service) in &spec.services {
        let key = service.image.to_string();
        if let std::collections::btree_map::Entry::Vacant(slot) = resolved.images.entry(key) {
            match &service.image {
                ImageSource::Local(_) => {} // reported above
                other => match source_digest(other, dir) {
                    Ok(d) => {
                        slot.insert(d);
                    }
                    Err(why) => problems.push(ResolveProblem {
                        what: format!("service `{service_name}`: image `{other}`"),
                        why,
                        hint: "check the reference; `kiln image ls` lists the images kiln has"
                            .into(),
                    }),
                },
            }
        }
        for (dst, src) in &service.files {
            match fs::read(dir.join(src)) {
                Ok(bytes) => {
                    resolved.files.insert(src.clone(), Digest::of(&bytes));
                }
                Err(e) => problems.push(ResolveProblem {
                    what: format!("service `{service_name}`: file `{src}` (mounted at {dst})"),
                    why: format!("cannot be read: {e}"),
                    hint: format!(
                        "create {} or fix the path in kiln.toml",
                        dir.join(src).display()
                    ),
                }),
            }
        }
        for (var, source) in &service.secrets {
            let value = match source {
                SecretSource::File(path) => fs::read(dir.join(path)).map_err(|e| {
                    (
                        format!("cannot be read: {e}"),
                        format!(
                            "put the value in {} (keep it out of version control)",
                            dir.join(path).display()
                        ),
                    )
                }),
                SecretSource::Env(name) => env(name).map(String::into_bytes).ok_or_else(|| {
                    (
                        format!("environment variable `{name}` is not set"),
                        format!("export {name}=… in the shell that runs kiln"),
                    )
                }),
            };
            match value {
                // Only the digest leaves this function: the value itself is
                // dropped here and never stored.
                Ok(bytes) => {
                    resolved
                        .secrets
                        .insert(secret_key(source), Digest::of(&bytes));
                }
                Err((why, hint)) => problems.push(ResolveProblem {
                    what: format!("service `{service_name}`: secret `{var}`"),
                    why,
                    hint,
                }),
            }
        }
    }
    if !problems.is_empty() {
        return Err(ResolveErrors(problems));
    }
    Generation::new(spec, resolved).map_err(|errs| {
        ResolveErrors(
            errs.into_iter()
                .map(|e| ResolveProblem {
                    what: "generation".into(),
                    why: e.to_string(),
                    hint: "this is a bug in kiln; please report it".into(),
                })
                .collect(),
        )
    })
}

/// The digest a non-local image reference stands for.
fn source_digest(source: &ImageSource, dir: &Path) -> Result<Digest, String> {
    match source {
        ImageSource::Digest(d) => Ok(Digest(d.clone())),
        ImageSource::Registry { digest, .. } => Ok(Digest(digest.clone())),
        ImageSource::OciLayout(layout) => oci_layout_digest(&dir.join(layout)),
        ImageSource::Scratch => Ok(Digest::of(b"scratch")),
        ImageSource::Local(name) => Err(format!("`{name}` is not an image of this file")),
    }
}

/// The manifest digest of the single image in an OCI image layout.
fn oci_layout_digest(layout: &Path) -> Result<Digest, String> {
    let index_path = layout.join("index.json");
    let text = fs::read_to_string(&index_path)
        .map_err(|e| format!("cannot read {}: {e}", index_path.display()))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not valid JSON: {e}", index_path.display()))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    match manifests.as_slice() {
        [one] => one["digest"]
            .as_str()
            .filter(|d| d.starts_with("sha256:"))
            .map(|d| Digest(d.to_owned()))
            .ok_or_else(|| {
                format!(
                    "{} has a manifest without a sha256 digest",
                    index_path.display()
                )
            }),
        [] => Err(format!("{} lists no image", index_path.display())),
        many => Err(format!(
            "{} lists {} images; kiln needs exactly one",
            index_path.display(),
            many.len()
        )),
    }
}

#[derive(Serialize)]
struct Recipe<'a> {
    kind: &'static str,
    base: Digest,
    image: &'a Image,
    inputs: Vec<(String, Digest)>,
}

fn recipe_digest(
    spec: &Spec,
    name: &str,
    dir: &Path,
    done: &mut BTreeMap<String, Digest>,
    visiting: &mut Vec<String>,
) -> Result<Digest, ResolveProblem> {
    if let Some(d) = done.get(name) {
        return Ok(d.clone());
    }
    let image = &spec.images[name];
    if visiting.iter().any(|v| v == name) {
        return Err(ResolveProblem {
            what: format!("image `{name}`"),
            why: "is built from itself".into(),
            hint: "one image of the chain must start from scratch or a digest".into(),
        });
    }
    visiting.push(name.to_owned());
    let base = match &image.from {
        ImageSource::Local(base) => recipe_digest(spec, base, dir, done, visiting)?,
        other => source_digest(other, dir).map_err(|why| ResolveProblem {
            what: format!("image `{name}`: base `{other}`"),
            why,
            hint: "check `from`; `kiln image ls` lists the images kiln has".into(),
        })?,
    };
    let mut inputs = Vec::new();
    for copy in &image.copy {
        let src = dir.join(&copy.src);
        let digest = tree_digest(&src).map_err(|why| ResolveProblem {
            what: format!("image `{name}`: copy source `{}`", copy.src),
            why,
            hint: format!(
                "create {} (build it first?) or fix `copy` in kiln.toml",
                src.display()
            ),
        })?;
        inputs.push((copy.src.clone(), digest));
    }
    let recipe = Recipe {
        kind: "kiln-recipe-v1",
        base,
        image,
        inputs,
    };
    let digest = Digest::of(
        serde_json::to_string(&recipe)
            .expect("serialises")
            .as_bytes(),
    );
    visiting.pop();
    done.insert(name.to_owned(), digest.clone());
    Ok(digest)
}

/// Digest of a file or directory tree: relative paths (sorted), types,
/// permission bits and contents; never times, owners or the absolute path.
pub fn tree_digest(path: &Path) -> Result<Digest, String> {
    let mut entries: Vec<(String, String)> = Vec::new();
    collect(path, PathBuf::new(), &mut entries)?;
    entries.sort();
    let text: String = entries.iter().map(|(p, e)| format!("{p}\0{e}\n")).collect();
    Ok(Digest::of(text.as_bytes()))
}

fn collect(path: &Path, rel: PathBuf, out: &mut Vec<(String, String)>) -> Result<(), String> {
    let meta = fs::symlink_metadata(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mode = meta.permissions().mode() & 0o7777;
    let rel_s = rel.to_string_lossy().into_owned();
    if meta.file_type().is_symlink() {
        let target =
            fs::read_link(path).map_err(|e| format!("cannot read link {}: {e}", path.display()))?;
        out.push((rel_s, format!("link {}", target.display())));
    } else if meta.is_dir() {
        out.push((rel_s, format!("dir {mode:o}")));
        let mut children: Vec<_> = fs::read_dir(path)
            .map_err(|e| format!("cannot list {}: {e}", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot list {}: {e}", path.display()))?;
        children.sort();
        for child in children {
            collect(&path.join(&child), rel.join(&child), out)?;
        }
    } else if meta.is_file() {
        let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.push((rel_s, format!("file {mode:o} {}", Digest::of(&bytes))));
    } else {
        return Err(format!(
            "{} is not a file, directory or symlink",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Spec {
        kiln_spec::parse(text, "kiln.toml").unwrap()
    }

    const SPEC: &str = r#"
[project]
name = "t"
[image.app]
copy = [{ src = "bin", dst = "/app" }]
[service.web]
image = "app"
files = { "/etc/app.toml" = "app.toml" }
secrets = { TOKEN = { file = "token" }, KEY = { env = "T_KEY" } }
"#;

    fn write_project(dir: &Path, token: &str) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/run"), "#!/bin/sh\n").unwrap();
        fs::write(dir.join("app.toml"), "x = 1\n").unwrap();
        fs::write(dir.join("token"), token).unwrap();
    }

    fn env(name: &str) -> Option<String> {
        (name == "T_KEY").then(|| "k".to_owned())
    }

    #[test]
    fn same_inputs_at_different_paths_give_the_same_generation() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_project(a.path(), "s3cret");
        write_project(b.path(), "s3cret");
        let ga = resolve(spec(SPEC), a.path(), &env).unwrap();
        let gb = resolve(spec(SPEC), b.path(), &env).unwrap();
        assert_eq!(ga.content_hash(), gb.content_hash());
    }

    #[test]
    fn secret_values_are_never_in_the_generation_but_change_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        write_project(dir.path(), "s3cret-value");
        let g1 = resolve(spec(SPEC), dir.path(), &env).unwrap();
        assert!(!g1.canonical_json().contains("s3cret-value"));
        fs::write(dir.path().join("token"), "rotated").unwrap();
        let g2 = resolve(spec(SPEC), dir.path(), &env).unwrap();
        assert_ne!(
            g1.instance_spec("web").identity(),
            g2.instance_spec("web").identity()
        );
    }

    #[test]
    fn a_changed_copied_byte_changes_the_image() {
        let dir = tempfile::tempdir().unwrap();
        write_project(dir.path(), "t");
        let g1 = resolve(spec(SPEC), dir.path(), &env).unwrap();
        fs::write(dir.path().join("bin/run"), "#!/bin/sh\necho\n").unwrap();
        let g2 = resolve(spec(SPEC), dir.path(), &env).unwrap();
        assert_ne!(g1.resolved.images["app"], g2.resolved.images["app"]);
    }

    #[test]
    fn every_missing_input_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(spec(SPEC), dir.path(), &|_| None).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 4, "{text}");
        for needle in [
            "copy source `bin`",
            "file `app.toml`",
            "secret `TOKEN`",
            "T_KEY",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }
}
