//! Versioned schema migrations.
//!
//! The schema version lives in SQLite's `PRAGMA user_version` (part of the
//! database header, so it changes atomically with the migration's
//! transaction). Migrations are only ever appended to [`MIGRATIONS`]; a
//! shipped migration is never edited, because databases in the field already
//! ran it.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{Result, StateError};

/// The schema version this build of kiln writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Every migration, in order: `(version, sql)`. Versions start at 1 and
/// increase by one.
pub(crate) const MIGRATIONS: &[(u32, &str)] = &[(1, V1), (2, V2)];

/// Brings the database at `path` up to [`SCHEMA_VERSION`]. Returns the
/// versions it applied (empty when the schema was already current).
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<Vec<u32>> {
    let found = user_version(conn, path, 0)?;
    check_not_too_new(path, found)?;
    let mut applied = Vec::new();
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        let failed = |source| StateError::Migrate {
            path: path.to_owned(),
            version,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        // Why read again: another process may have opened the same database
        // and migrated it between our first read and taking the write lock.
        let current = user_version(&tx, path, version)?;
        check_not_too_new(path, current)?;
        if current >= version {
            continue;
        }
        tx.execute_batch(sql).map_err(failed)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
        applied.push(version);
    }
    Ok(applied)
}

fn user_version(conn: &Connection, path: &Path, version: u32) -> Result<u32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|source| StateError::Migrate {
            path: path.to_owned(),
            version,
            source,
        })
}

fn check_not_too_new(path: &Path, found: u32) -> Result<()> {
    if found > SCHEMA_VERSION {
        return Err(StateError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Version 2: leases. A lease names a resource (`daemon`, `rollout`), who
/// holds it (free text: pid, host, command; and the holder's pid and host)
/// and when it expires, in milliseconds since the Unix epoch. A holder that
/// dies stops renewing and its lease simply expires, or is taken over at
/// once by a process on the same host that sees the holder's pid is gone:
/// there is no stuck lock to clear by hand.
const V2: &str = r#"
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    token       TEXT NOT NULL,
    pid         INTEGER,
    host        TEXT,
    acquired_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    expires_ms  INTEGER NOT NULL
);
"#;

/// Version 1: the whole initial schema.
///
/// History (generations, their status log, events, the journal) is
/// append-only and the triggers below enforce it for every writer of the
/// file, not only for this crate. The single exception is retention garbage
/// collection, which may delete generations (and their status log and
/// journal) only while a row exists in `gc_permit`; the store inserts that
/// row and removes it again inside the gc transaction, so it is never
/// committed.
const V1: &str = r#"
CREATE TABLE gc_permit (
    id INTEGER PRIMARY KEY CHECK (id = 1)
);

CREATE TABLE generations (
    number      INTEGER PRIMARY KEY CHECK (number >= 1),
    hash        TEXT NOT NULL CHECK (length(hash) > 0),
    parent      INTEGER CHECK (parent IS NULL OR parent < number),
    origin      TEXT NOT NULL CHECK (origin IN ('apply', 'rollback')),
    rollback_of INTEGER CHECK (rollback_of IS NULL OR rollback_of < number),
    message     TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    body        TEXT NOT NULL CHECK (json_valid(body)),
    CHECK ((origin = 'rollback') = (rollback_of IS NOT NULL))
);

-- Numbers continue the sequence: no inserting into the past, and a number
-- freed by gc is never handed out again (gc never deletes the newest).
CREATE TRIGGER generations_insert_in_order BEFORE INSERT ON generations
WHEN NEW.number IS NOT coalesce((SELECT max(number) FROM generations), 0) + 1
BEGIN
    SELECT RAISE(ABORT, 'generations are append-only: a new generation must be numbered max + 1');
END;

CREATE TRIGGER generations_no_update BEFORE UPDATE ON generations
BEGIN
    SELECT RAISE(ABORT, 'generations are append-only: a generation is never edited');
END;

CREATE TRIGGER generations_no_delete BEFORE DELETE ON generations
WHEN NOT EXISTS (SELECT 1 FROM gc_permit)
BEGIN
    SELECT RAISE(ABORT, 'generations are append-only: only retention gc deletes generations');
END;

CREATE TRIGGER generations_gc_keeps_newest BEFORE DELETE ON generations
WHEN OLD.number = (SELECT max(number) FROM generations)
BEGIN
    SELECT RAISE(ABORT, 'generations are append-only: the newest generation is never deleted');
END;

CREATE TRIGGER generations_gc_keeps_active BEFORE DELETE ON generations
WHEN (SELECT status FROM generation_status WHERE generation = OLD.number
      ORDER BY seq DESC LIMIT 1) = 'active'
BEGIN
    SELECT RAISE(ABORT, 'generations are append-only: the active generation is never deleted');
END;

-- The foreign key is deferred so that gc can delete a generation before its
-- status rows: the "keeps active" trigger above needs to see them.
CREATE TABLE generation_status (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    generation INTEGER NOT NULL
               REFERENCES generations (number) DEFERRABLE INITIALLY DEFERRED,
    status     TEXT NOT NULL CHECK (length(status) > 0),
    reason     TEXT NOT NULL DEFAULT '',
    at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX generation_status_by_generation ON generation_status (generation, seq);

CREATE TRIGGER generation_status_no_update BEFORE UPDATE ON generation_status
BEGIN
    SELECT RAISE(ABORT, 'generation_status is append-only: a status change is never edited');
END;

CREATE TRIGGER generation_status_no_delete BEFORE DELETE ON generation_status
WHEN NOT EXISTS (SELECT 1 FROM gc_permit)
BEGIN
    SELECT RAISE(ABORT, 'generation_status is append-only: only retention gc deletes status rows');
END;

CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    service     TEXT NOT NULL,
    identity    TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    spec        TEXT NOT NULL CHECK (json_valid(spec)),
    status      TEXT NOT NULL,
    in_rotation INTEGER NOT NULL CHECK (in_rotation IN (0, 1)),
    data        TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(data)),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
CREATE INDEX instances_by_service ON instances (service, id);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    kind       TEXT NOT NULL CHECK (length(kind) > 0),
    subject    TEXT NOT NULL,
    generation INTEGER,
    message    TEXT NOT NULL DEFAULT '',
    data       TEXT NOT NULL DEFAULT 'null' CHECK (json_valid(data))
);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: an event is never edited');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: an event is never deleted');
END;

CREATE TABLE journal (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    generation INTEGER NOT NULL
               REFERENCES generations (number) DEFERRABLE INITIALLY DEFERRED,
    step_index INTEGER NOT NULL CHECK (step_index >= 0),
    phase      TEXT NOT NULL CHECK (phase IN ('begin', 'end', 'failed')),
    step       TEXT NOT NULL CHECK (json_valid(step)),
    message    TEXT,
    at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX journal_by_generation ON journal (generation, seq);

CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
BEGIN
    SELECT RAISE(ABORT, 'journal is append-only: a journal entry is never edited');
END;

CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
WHEN NOT EXISTS (SELECT 1 FROM gc_permit)
BEGIN
    SELECT RAISE(ABORT, 'journal is append-only: only retention gc deletes journal entries');
END;
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_start_at_one_and_increase_by_one() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
        }
    }

    #[test]
    fn fresh_database_is_migrated_once() {
        let path = Path::new(":memory:");
        let mut conn = Connection::open_in_memory().unwrap();
        let applied = migrate(&mut conn, path).unwrap();
        assert_eq!(applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(migrate(&mut conn, path).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        let err = migrate(&mut conn, Path::new("x/state.db")).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::SchemaTooNew {
                    found: 999,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
