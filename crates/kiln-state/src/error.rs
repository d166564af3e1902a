//! The one error type of the state store.

use std::path::PathBuf;

use rusqlite::ErrorCode;

/// Everything that can go wrong in the state store. Each variant names the
/// operation and the resource it failed on.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error("cannot set `{setting}` on the state database {path}")]
    Configure {
        path: PathBuf,
        setting: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    /// SQLite refused to switch to write-ahead logging (for example on a
    /// file system without shared-memory support).
    #[error("the state database {path} cannot use WAL journaling (SQLite kept `{mode}`)")]
    WalUnavailable { path: PathBuf, mode: String },

    #[error("cannot migrate the state database {path} to schema version {version}")]
    Migrate {
        path: PathBuf,
        version: u32,
        #[source]
        source: rusqlite::Error,
    },

    #[error(
        "the state database {path} has schema version {found}, but this kiln knows only up to \
         {supported}; it was written by a newer kiln"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A trigger refused to change or delete a row of an append-only table.
    #[error("refused to modify `{table}`: {message}")]
    AppendOnly {
        table: &'static str,
        /// The trigger's message, which says what was refused.
        message: String,
    },

    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },

    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },

    #[error("state database query failed: {op}")]
    Query {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// Tables whose triggers raise an "append-only" error, longest name first so
/// that `generation_status` is not mistaken for `generations`.
const APPEND_ONLY_TABLES: &[&str] = &["generation_status", "generations", "events", "journal"];

impl StateError {
    /// Classifies a SQLite error raised while doing `op`: the append-only
    /// triggers become [`StateError::AppendOnly`], the rest [`StateError::Query`].
    pub(crate) fn sqlite(op: &'static str, source: rusqlite::Error) -> StateError {
        match append_only_violation(&source) {
            Some((table, message)) => StateError::AppendOnly { table, message },
            None => StateError::Query { op, source },
        }
    }
}

/// The table and message of an error raised by one of our append-only
/// triggers. `RAISE(ABORT, …)` surfaces as SQLITE_CONSTRAINT_TRIGGER with the
/// trigger's text, and every such text of ours starts with the table name and
/// says "append-only".
fn append_only_violation(source: &rusqlite::Error) -> Option<(&'static str, String)> {
    let rusqlite::Error::SqliteFailure(err, Some(message)) = source else {
        return None;
    };
    if err.code != ErrorCode::ConstraintViolation || !message.contains("append-only") {
        return None;
    }
    let table = APPEND_ONLY_TABLES
        .iter()
        .find(|t| message.starts_with(&format!("{t} ")))?;
    Some((table, message.clone()))
}

/// `map_err` adapter: `.map_err(db("list generations"))`.
pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
    move |source| StateError::sqlite(op, source)
}
