//! `kiln.toml`: what users write, how it is checked, and the validated model.
//!
//! Design: the file is parsed into `toml`'s spanned document and walked by
//! hand ([`read`]), so that *every* problem is collected with its location
//! instead of stopping at the first like a serde derive would. The result is
//! the validated [`model::Spec`]: defaults filled in, names checked, every
//! cross-reference resolved. [`schema`] describes the same shape for editors
//! as a JSON Schema; a test keeps the two in step.
//!
//! Limits: validation is syntactic and referential. Whether a file named in
//! `files` exists, or a secret can be read, is checked when a generation is
//! resolved (by the engine), not here: this crate never reads anything but
//! the spec itself.

pub mod check;
pub mod diag;
pub mod model;
mod read;
pub mod schema;
mod service;
pub mod units;
mod validate;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Diagnostics};
pub use model::Spec;
pub use service::KILN_VARS;
pub use validate::parse;

/// Why a spec could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read spec {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Diagnostics>),
}

/// Reads and validates the spec at `path`. When `path` is a directory, its
/// `kiln.toml` is read.
pub fn load(path: &Path) -> Result<(PathBuf, Spec), LoadError> {
    let file = if path.is_dir() {
        path.join("kiln.toml")
    } else {
        path.to_path_buf()
    };
    let source = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
        path: file.clone(),
        source,
    })?;
    let spec =
        parse(&source, &file.display().to_string()).map_err(|d| LoadError::Invalid(Box::new(d)))?;
    Ok((file, spec))
}
