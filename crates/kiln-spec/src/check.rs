//! Small syntactic checks shared by the sections: names, paths, environment
//! variable names, `${VAR}` references, image references.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::diag::Diagnostic;
use crate::model::ImageSource;
use crate::read::{Ctx, suggest};

/// Names of images, services, routes, volumes and ports end up in instance
/// ids, container names and file names: keep them DNS-label-like.
pub(crate) fn name(ctx: &mut Ctx, kind: &str, name: &str, span: Range<usize>) -> bool {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        let fixed: String = name
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        ctx.push(
            Diagnostic::new(span, format!("invalid {kind} name `{name}`"))
                .label("not a valid name")
                .hint(format!(
                    "use lowercase letters, digits and `-`, starting with a letter or digit, at most 63 characters (e.g. `{}`)",
                    match fixed.trim_matches('-') {
                        "" => "my-name",
                        f => f,
                    }
                )),
        );
    }
    ok
}

/// An absolute path inside an instance or image.
pub(crate) fn container_path(ctx: &mut Ctx, what: &str, path: &str, span: Range<usize>) -> bool {
    let problem = if !path.starts_with('/') {
        Some("must be absolute")
    } else if path == "/" {
        Some("cannot be the root directory")
    } else if path.split('/').any(|c| c == ".." || c == ".") {
        Some("cannot contain `.` or `..` components")
    } else if path.contains('\0') {
        Some("cannot contain NUL")
    } else {
        None
    };
    if let Some(problem) = problem {
        ctx.push(
            Diagnostic::new(span, format!("{what} `{path}` {problem}"))
                .label("invalid path")
                .hint("write an absolute, normalised path inside the instance, like \"/etc/app/config.toml\""),
        );
    }
    problem.is_none()
}

/// A path on the host, relative to the spec's directory, that stays inside
/// it (so the same project gives the same generation on every checkout).
pub(crate) fn host_path(ctx: &mut Ctx, what: &str, path: &str, span: Range<usize>) -> bool {
    let problem = if path.is_empty() {
        Some("cannot be empty")
    } else if path.starts_with('/') {
        Some("must be relative to the directory of kiln.toml")
    } else if path.split('/').any(|c| c == "..") {
        Some("cannot leave the directory of kiln.toml (`..`)")
    } else {
        None
    };
    if let Some(problem) = problem {
        ctx.push(
            Diagnostic::new(span, format!("{what} `{path}` {problem}"))
                .label("invalid path")
                .hint("keep inputs inside the project directory and name them relative to kiln.toml, like \"config/web.toml\""),
        );
    }
    problem.is_none()
}

pub(crate) fn env_name(ctx: &mut Ctx, what: &str, name: &str, span: Range<usize>) -> bool {
    let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        ctx.push(
            Diagnostic::new(span, format!("invalid {what} name `{name}`"))
                .label("not a valid variable name")
                .hint(
                    "use letters, digits and `_`, not starting with a digit (e.g. `DATABASE_URL`)",
                ),
        );
    }
    ok
}

/// The variable a port is passed in: `PORT_HTTP` for port `http`.
pub fn port_var(port: &str) -> String {
    format!("PORT_{}", port.to_ascii_uppercase().replace('-', "_"))
}

/// Checks every `${NAME}` in `text` against `known`; `$$` is a literal `$`.
pub(crate) fn references(ctx: &mut Ctx, text: &str, span: Range<usize>, known: &BTreeSet<String>) {
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            ctx.push(
                Diagnostic::new(span.clone(), "unclosed `${` in a value")
                    .label("missing `}`")
                    .hint("write `${NAME}`, or `$$` for a literal `$`"),
            );
            return;
        };
        let var = &body[..end];
        if !known.contains(var) {
            let mut d = Diagnostic::new(
                span.clone(),
                format!("`${{{var}}}` refers to nothing kiln sets"),
            )
            .label("unknown variable");
            d = match suggest(var, known.iter().map(String::as_str)) {
                Some(k) => d.hint(format!("did you mean `${{{k}}}`?")),
                None if known.is_empty() => {
                    d.hint("declare it in `env` or `secrets`, or a port in `ports`")
                }
                None => d.hint(format!(
                    "known here: {}",
                    known
                        .iter()
                        .map(|k| format!("${{{k}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            ctx.push(d);
        }
        rest = &body[end + 1..];
    }
}

fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Parses an image reference: `scratch`, `sha256:…`, `oci-layout:DIR`,
/// `REF@sha256:…`, or the name of an `[image.NAME]` of this file.
pub(crate) fn image_source(
    ctx: &mut Ctx,
    text: &str,
    span: Range<usize>,
    local: &BTreeSet<String>,
    allow_scratch: bool,
) -> Option<ImageSource> {
    let bad = |ctx: &mut Ctx, msg: String, hint: &str| {
        ctx.push(
            Diagnostic::new(span.clone(), msg)
                .label("invalid image reference")
                .hint(hint.to_owned()),
        );
        None
    };
    if text == "scratch" {
        if allow_scratch {
            return Some(ImageSource::Scratch);
        }
        return bad(
            ctx,
            "a service cannot run the empty `scratch` image".into(),
            "declare an [image.NAME] that starts from scratch and copies your program in, and use its name",
        );
    }
    if text.starts_with("sha256:") {
        if is_sha256(text) {
            return Some(ImageSource::Digest(text.to_owned()));
        }
        return bad(
            ctx,
            format!("`{text}` is not a valid digest"),
            "a digest is `sha256:` followed by 64 lowercase hex digits; `kiln image ls` lists them",
        );
    }
    if let Some(dir) = text.strip_prefix("oci-layout:") {
        if dir.is_empty() || dir.starts_with('/') || dir.split('/').any(|c| c == "..") {
            return bad(
                ctx,
                format!("`{text}` must name a directory inside the project"),
                "write `oci-layout:DIR` with DIR relative to kiln.toml",
            );
        }
        return Some(ImageSource::OciLayout(dir.to_owned()));
    }
    if let Some((name, digest)) = text.split_once('@') {
        if name.is_empty() || !is_sha256(digest) {
            return bad(
                ctx,
                format!("`{text}` is not a valid pinned reference"),
                "write `registry/repository@sha256:<64 hex digits>`",
            );
        }
        return Some(ImageSource::Registry {
            name: name.to_owned(),
            digest: digest.to_owned(),
        });
    }
    if local.contains(text) {
        return Some(ImageSource::Local(text.to_owned()));
    }
    if text.contains('/') || text.contains(':') {
        return bad(
            ctx,
            format!("registry image `{text}` is not pinned by digest"),
            "images are immutable in kiln: write `REF@sha256:…` (see `skopeo inspect docker://REF`) or import it with `kiln image import`",
        );
    }
    let mut d = Diagnostic::new(
        span.clone(),
        format!("no image named `{text}` in this file"),
    )
    .label("unknown image");
    d = match suggest(text, local.iter().map(String::as_str)) {
        Some(k) => d.hint(format!("did you mean `{k}`?")),
        None => d.hint(format!(
            "declare it as [image.{text}], or use a `sha256:…` digest"
        )),
    };
    ctx.push(d);
    None
}
