//! Resolving a validated spec into a generation: read every file, secret and
//! image reference it names and record their digests.
//!
//! This is the only place where the spec's references meet the disk. What it
//! produces ([`Resolved`]) is plain data, so everything downstream (hashing,
//! planning, diffing) stays pure.
//!
//! Images of the file (`[image.NAME]`) are built through an
//! [`ImageResolver`] (reproducible and cached, so an unchanged project
//! resolves in milliseconds); every other image reference must already be in
//! the image store. With `[policy] require_signed`, every image a service
//! runs must carry a valid signature by a trusted key, checked here, before
//! anything runs.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_plan::generation::secret_key;
use kiln_plan::{Digest, Generation, Resolved};
use kiln_spec::Spec;
use kiln_spec::model::{ImageSource, SecretSource};

use crate::images::ImageResolver;

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
pub fn resolve(
    spec: Spec,
    dir: &Path,
    env: EnvLookup<'_>,
    images: &mut dyn ImageResolver,
) -> Result<Generation, ResolveErrors> {
    let mut problems = Vec::new();
    let mut resolved = Resolved::default();

    if !spec.images.is_empty() {
        match images.build_all(&spec, dir) {
            Ok(built) => resolved.images.extend(built),
            Err(p) => problems.push(p),
        }
    }

    for (service_name, service) in &spec.services {
        let key = service.image.to_string();
        if let std::collections::btree_map::Entry::Vacant(slot) = resolved.images.entry(key) {
            match &service.image {
                ImageSource::Local(_) => {} // its build failed, reported above
                other => match images.source(other, dir) {
                    Ok(d) => {
                        slot.insert(d);
                    }
                    Err(why) => problems.push(ResolveProblem {
                        what: format!("service `{service_name}`: image `{other}`"),
                        why,
                        hint: "`kiln image ls` lists the images kiln has".into(),
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
    for (route_name, route) in &spec.routes {
        for (status, src) in &route.error_pages {
            match fs::read(dir.join(src)) {
                Ok(bytes) => {
                    resolved.files.insert(src.clone(), Digest::of(&bytes));
                }
                Err(e) => problems.push(ResolveProblem {
                    what: format!("route `{route_name}`: error page {status} `{src}`"),
                    why: format!("cannot be read: {e}"),
                    hint: format!(
                        "create {} or fix the path in kiln.toml",
                        dir.join(src).display()
                    ),
                }),
            }
        }
    }
    if problems.is_empty() && spec.policy.require_signed {
        let keys: Vec<PathBuf> = spec
            .policy
            .trusted_keys
            .iter()
            .map(|k| dir.join(k))
            .collect();
        for (service_name, service) in &spec.services {
            let Some(digest) = resolved.images.get(&service.image.to_string()) else {
                continue;
            };
            if let Err(why) = images.check_signed(digest, &keys) {
                problems.push(ResolveProblem {
                    what: format!("service `{service_name}`: image {digest}"),
                    why: format!("refused by [policy] require_signed: {why}"),
                    hint: "sign it with `kiln image sign IMAGE --key KEY` using a key whose .pub is in trusted_keys".into(),
                });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves with a fresh image store of its own.
    fn resolve_in(spec: Spec, dir: &Path, env: EnvLookup<'_>) -> Result<Generation, ResolveErrors> {
        let store_dir = tempfile::tempdir().unwrap();
        let store = kiln_image::Store::open(store_dir.path()).unwrap();
        let mut quiet = kiln_image::progress::Quiet;
        let mut images = crate::images::StoreImages {
            store: &store,
            source_date_epoch: 0,
            progress: &mut quiet,
        };
        resolve(spec, dir, env, &mut images)
    }

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
        let ga = resolve_in(spec(SPEC), a.path(), &env).unwrap();
        let gb = resolve_in(spec(SPEC), b.path(), &env).unwrap();
        assert_eq!(ga.content_hash(), gb.content_hash());
    }

    #[test]
    fn secret_values_are_never_in_the_generation_but_change_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        write_project(dir.path(), "s3cret-value");
        let g1 = resolve_in(spec(SPEC), dir.path(), &env).unwrap();
        assert!(!g1.canonical_json().contains("s3cret-value"));
        fs::write(dir.path().join("token"), "rotated").unwrap();
        let g2 = resolve_in(spec(SPEC), dir.path(), &env).unwrap();
        assert_ne!(
            g1.instance_spec("web").identity(),
            g2.instance_spec("web").identity()
        );
    }

    #[test]
    fn a_changed_copied_byte_changes_the_image() {
        let dir = tempfile::tempdir().unwrap();
        write_project(dir.path(), "t");
        let g1 = resolve_in(spec(SPEC), dir.path(), &env).unwrap();
        fs::write(dir.path().join("bin/run"), "#!/bin/sh\necho\n").unwrap();
        let g2 = resolve_in(spec(SPEC), dir.path(), &env).unwrap();
        assert_ne!(g1.resolved.images["app"], g2.resolved.images["app"]);
    }

    #[test]
    fn error_pages_are_digested_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_project(dir.path(), "t");
        let with_page = format!(
            "{SPEC}[route.web]\nlisten = \"127.0.0.1:80\"\nservice = \"web\"\nport = \"http\"\nerror_pages = {{ \"503\" = \"pages/503.html\" }}\n"
        );
        let err = resolve_in(
            spec(&with_page.replace("[service.web]", "[service.web]\nports = { http = {} }")),
            dir.path(),
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("route `web`: error page 503 `pages/503.html`"),
            "{err}"
        );

        fs::create_dir_all(dir.path().join("pages")).unwrap();
        fs::write(dir.path().join("pages/503.html"), "<h1>soon</h1>").unwrap();
        let g = resolve_in(
            spec(&with_page.replace("[service.web]", "[service.web]\nports = { http = {} }")),
            dir.path(),
            &env,
        )
        .unwrap();
        assert_eq!(g.route_pages("web")[&503], Digest::of(b"<h1>soon</h1>"));
    }

    #[test]
    fn every_missing_input_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_in(spec(SPEC), dir.path(), &|_| None).unwrap_err();
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
