//! The state store: what kiln has applied and what it is running, kept in one
//! SQLite file under a project's `.kiln/` directory (`.kiln/state.db`).
//!
//! It holds:
//!
//! - **generations** — every applied desired state, numbered 1, 2, 3…, with
//!   its content hash and canonical JSON body. Append-only.
//! - **generation status** — an append-only log of each generation's
//!   lifecycle (`pending`, `rolling-out`, `active`, …); the latest row is the
//!   current status.
//! - **instances** — one mutable record per running (or starting, or failed)
//!   instance. These are the only rows that are updated and deleted.
//! - **events** — an append-only log of what happened, for `kiln events`.
//! - **journal** — an append-only log of rollout steps (`begin` / `end` /
//!   `failed`), so that a crashed rollout can be resumed or reverted.
//!
//! # Design
//!
//! *Append-only in the database, not only in this crate.* `UPDATE` and
//! `DELETE` on the history tables are refused by SQLite triggers, so the
//! guarantee holds for every writer of the file: a future daemon, a bug in an
//! engine, or a person with the `sqlite3` shell. The one sanctioned exception
//! is retention ([`Store::gc_generations`]): deletes of generations pass
//! only while a row exists in the `gc_permit` table, and gc inserts and
//! removes that row inside its own transaction. Even then the triggers refuse
//! to delete the newest generation or one whose status is `active`.
//!
//! *WAL with `synchronous=FULL`.* WAL lets `kiln status` read while an apply
//! writes; `FULL` makes every commit durable before it returns, because a
//! generation recorded as active must still be there after a power cut. Every
//! write that reads before it writes runs in an `IMMEDIATE` transaction, so
//! two kiln processes never deadlock on a lock upgrade, and a busy timeout
//! of five seconds absorbs short contention.
//!
//! *Opaque payloads.* Generation bodies, instance specs, driver data, event
//! data and journal steps are JSON this crate stores but never interprets; it
//! depends on no other kiln crate. Generation bodies are kept as text, byte
//! for byte, because their hash is computed over that text.
//!
//! *Migrations* are versioned in `PRAGMA user_version`; each runs in its own
//! transaction. A database written by a newer kiln is refused rather than
//! guessed at ([`StateError::SchemaTooNew`]).
//!
//! # Limits
//!
//! - One host. Several hosts sharing state is the etcd backend's job.
//! - The triggers stop mistakes, not an adversary: whoever can write the file
//!   can drop a trigger or insert a gc permit.
//! - The store does not police lifecycles: which status may follow which is
//!   decided by the engine.
//! - Events are never deleted; their retention is future work.

mod error;
mod events;
mod gc;
mod generations;
mod instances;
mod journal;
mod leases;
mod migrations;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

pub use error::{Result, StateError};
pub use events::{Event, EventFilter, NewEvent};
pub use generations::{
    GenerationRecord, GenerationStatus, GenerationSummary, NewGeneration, Origin, ParseValueError,
    StatusEntry,
};
pub use instances::{InstanceRecord, InstanceUpsert};
pub use journal::{JournalEntry, JournalPhase, NewJournalEntry};
pub use leases::{LeaseHeld, LeaseHolder, host_name};
pub use migrations::SCHEMA_VERSION;

/// The database's file name inside the state directory.
pub const DB_FILE: &str = "state.db";

/// How long a statement waits for another process's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQL expression for "now" in every timestamp column: RFC 3339, UTC,
/// milliseconds.
pub(crate) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// An open state database.
///
/// `Store` is `Send + Sync`; calls are serialised on one connection. Other
/// processes may open the same file at the same time.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) `dir/state.db`, creating `dir` too, and
    /// migrates it to the current schema.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| StateError::Open {
            path: path.clone(),
            source,
        })?;
        Store::init(conn, path, true)
    }

    /// A private, empty store in memory (for tests). No WAL: SQLite keeps
    /// in-memory databases in its `memory` journal mode.
    pub fn open_in_memory() -> Result<Store> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| StateError::Open {
            path: path.clone(),
            source,
        })?;
        Store::init(conn, path, false)
    }

    fn init(mut conn: Connection, path: PathBuf, wal: bool) -> Result<Store> {
        let configure = |setting: &'static str| {
            let path = path.clone();
            move |source| StateError::Configure {
                path,
                setting,
                source,
            }
        };
        // Busy timeout first, so that switching to WAL waits for a writer.
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(configure("busy_timeout"))?;
        if wal {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(configure("journal_mode"))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StateError::WalUnavailable { path, mode });
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(configure("synchronous"))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(configure("foreign_keys"))?;
        migrations::migrate(&mut conn, &path)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file (`:memory:` for an in-memory store).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32> {
        self.conn()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(error::db("read schema version"))
    }

    /// SQLite's journal mode: `wal` for a store opened with [`Store::open`].
    pub fn journal_mode(&self) -> Result<String> {
        self.conn()
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .map_err(error::db("read journal mode"))
    }

    /// Runs one SQL statement as is, bypassing the store's API. For tests
    /// that prove the database itself enforces the invariants.
    #[doc(hidden)]
    pub fn raw_execute(&self, sql: &str) -> Result<usize> {
        self.conn()
            .execute(sql, [])
            .map_err(error::db("raw statement"))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held leaves nothing half-done: an open
        // transaction is rolled back when it is dropped during unwinding.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads a JSON text column into a [`serde_json::Value`].
pub(crate) fn json_column(
    row: &rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<serde_json::Value> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn open_creates_the_directory_and_uses_wal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("project/.kiln");
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.path(), dir.join(DB_FILE));
        assert!(dir.join(DB_FILE).is_file());
        assert_eq!(store.journal_mode().unwrap(), "wal");
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let sync: i64 = store
            .conn()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: bool = store
            .conn()
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert!(fk);
    }

    #[test]
    fn reopen_applies_no_migration() {
        let tmp = tempfile::tempdir().unwrap();
        drop(Store::open(tmp.path()).unwrap());
        let mut conn = Connection::open(tmp.path().join(DB_FILE)).unwrap();
        let applied = migrations::migrate(&mut conn, tmp.path()).unwrap();
        assert!(applied.is_empty());
        drop(conn);
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn database_from_a_newer_kiln_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(Store::open(tmp.path()).unwrap());
        let conn = Connection::open(tmp.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let err = Store::open(tmp.path()).unwrap_err();
        match err {
            StateError::SchemaTooNew {
                path,
                found,
                supported,
            } => {
                assert_eq!(path, tmp.path().join(DB_FILE));
                assert_eq!(found, 999);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(DB_FILE), b"not sqlite at all, not at all").unwrap();
        let err = Store::open(tmp.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&tmp.path().join(DB_FILE).display().to_string()),
            "{err}"
        );
    }
}
