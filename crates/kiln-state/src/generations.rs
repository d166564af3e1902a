//! Generations, their status log, and retention gc.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{OptionalExtension, Row, ToSql, Transaction, TransactionBehavior, params};
use serde::Serialize;

use crate::Store;
use crate::error::{Result, StateError, db};

/// How a generation came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// `kiln apply` of a spec.
    Apply,
    /// `kiln rollback`: a new generation equal in content to an older one.
    Rollback,
}

/// A generation's lifecycle state. The store records any sequence of these;
/// which transitions are legal is the engine's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenerationStatus {
    /// Recorded, not yet rolled out.
    Pending,
    /// Instances are being replaced.
    RollingOut,
    /// Fully rolled out; what the reconciler keeps the world equal to.
    Active,
    /// The rollout failed (and was reverted).
    Failed,
    /// Was active, then undone by a rollback.
    RolledBack,
    /// Was active, then replaced by a newer generation.
    Superseded,
}

/// The error of parsing an [`Origin`] or [`GenerationStatus`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}` (expected one of: {})", expected.join(", "))]
pub struct ParseValueError {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

macro_rules! text_enum {
    ($ty:ident, $what:literal, $( $variant:ident => $text:literal ),+ $(,)?) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The stored (and displayed) form.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = ParseValueError;

            fn from_str(s: &str) -> Result<$ty, ParseValueError> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(ParseValueError {
                        what: $what,
                        value: s.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<$ty> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

text_enum!(Origin, "generation origin", Apply => "apply", Rollback => "rollback");
text_enum!(
    GenerationStatus, "generation status",
    Pending => "pending",
    RollingOut => "rolling-out",
    Active => "active",
    Failed => "failed",
    RolledBack => "rolled-back",
    Superseded => "superseded",
);

/// A generation to record. The store assigns its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGeneration {
    /// Content hash of `body`, `sha256:<hex>`.
    pub hash: String,
    /// The generation this one was applied on top of.
    pub parent: Option<u64>,
    pub origin: Origin,
    /// For [`Origin::Rollback`] (and only then): the generation whose
    /// content this one restores.
    pub rollback_of: Option<u64>,
    pub message: Option<String>,
    /// The canonical JSON of the generation, stored byte for byte.
    pub body: String,
}

/// A recorded generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerationRecord {
    pub number: u64,
    pub hash: String,
    pub parent: Option<u64>,
    pub origin: Origin,
    pub rollback_of: Option<u64>,
    pub message: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    /// The canonical JSON, as text (serialised as a JSON string).
    pub body: String,
}

/// A generation without its body, with its current status: one line of
/// `kiln history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerationSummary {
    pub number: u64,
    pub hash: String,
    pub parent: Option<u64>,
    pub origin: Origin,
    pub rollback_of: Option<u64>,
    pub message: Option<String>,
    pub created_at: String,
    /// The latest status; `None` only for rows written outside this store.
    pub status: Option<GenerationStatus>,
}

/// One row of a generation's status log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusEntry {
    pub seq: u64,
    pub generation: u64,
    pub status: GenerationStatus,
    pub reason: String,
    pub at: String,
}

const RECORD_COLUMNS: &str = "number, hash, parent, origin, rollback_of, message, created_at, body";

/// The latest status of generation `g.number`, as a scalar subquery.
pub(crate) const LATEST_STATUS: &str = "(SELECT s.status FROM generation_status s \
     WHERE s.generation = g.number ORDER BY s.seq DESC LIMIT 1)";

fn record(row: &Row<'_>) -> rusqlite::Result<GenerationRecord> {
    Ok(GenerationRecord {
        number: row.get(0)?,
        hash: row.get(1)?,
        parent: row.get(2)?,
        origin: row.get(3)?,
        rollback_of: row.get(4)?,
        message: row.get(5)?,
        created_at: row.get(6)?,
        body: row.get(7)?,
    })
}

fn status_entry(row: &Row<'_>) -> rusqlite::Result<StatusEntry> {
    Ok(StatusEntry {
        seq: row.get(0)?,
        generation: row.get(1)?,
        status: row.get(2)?,
        reason: row.get(3)?,
        at: row.get(4)?,
    })
}

fn exists(tx: &Transaction<'_>, number: u64, op: &'static str) -> Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM generations WHERE number = ?1)",
        [number],
        |row| row.get(0),
    )
    .map_err(db(op))
}

fn insert_status(
    tx: &Transaction<'_>,
    number: u64,
    status: GenerationStatus,
    reason: &str,
    op: &'static str,
) -> Result<StatusEntry> {
    tx.query_row(
        "INSERT INTO generation_status (generation, status, reason) VALUES (?1, ?2, ?3) \
         RETURNING seq, generation, status, reason, at",
        params![number, status, reason],
        status_entry,
    )
    .map_err(db(op))
}

impl Store {
    /// Records a new generation, numbered one past the newest, with the
    /// status `pending`.
    pub fn append_generation(&self, new: NewGeneration) -> Result<GenerationRecord> {
        const OP: &str = "append generation";
        if (new.origin == Origin::Rollback) != new.rollback_of.is_some() {
            return Err(StateError::InvalidArgument {
                op: OP,
                reason: "`rollback_of` must be set for a rollback and only for a rollback"
                    .to_owned(),
            });
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(OP))?;
        for (what, referenced) in [
            ("parent generation", new.parent),
            ("generation to roll back to", new.rollback_of),
        ] {
            let Some(n) = referenced else { continue };
            if !exists(&tx, n, OP)? {
                return Err(StateError::NotFound {
                    what,
                    id: n.to_string(),
                });
            }
        }
        let number: u64 = tx
            .query_row(
                "SELECT coalesce(max(number), 0) + 1 FROM generations",
                [],
                |row| row.get(0),
            )
            .map_err(db(OP))?;
        let record = tx
            .query_row(
                &format!(
                    "INSERT INTO generations \
                     (number, hash, parent, origin, rollback_of, message, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING {RECORD_COLUMNS}"
                ),
                params![
                    number,
                    new.hash,
                    new.parent,
                    new.origin,
                    new.rollback_of,
                    new.message,
                    new.body
                ],
                record,
            )
            .map_err(db(OP))?;
        insert_status(&tx, number, GenerationStatus::Pending, "", OP)?;
        tx.commit().map_err(db(OP))?;
        Ok(record)
    }

    /// Generation `number`, if it exists (and was not garbage-collected).
    pub fn get_generation(&self, number: u64) -> Result<Option<GenerationRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {RECORD_COLUMNS} FROM generations WHERE number = ?1"),
                [number],
                record,
            )
            .optional()
            .map_err(db("get generation"))
    }

    /// The newest generation, whatever its status.
    pub fn latest_generation(&self) -> Result<Option<GenerationRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {RECORD_COLUMNS} FROM generations ORDER BY number DESC LIMIT 1"),
                [],
                record,
            )
            .optional()
            .map_err(db("get latest generation"))
    }

    /// The newest generation whose current status is `active`.
    pub fn active_generation(&self) -> Result<Option<GenerationRecord>> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM generations g \
                     WHERE {LATEST_STATUS} = 'active' ORDER BY number DESC LIMIT 1"
                ),
                [],
                record,
            )
            .optional()
            .map_err(db("get active generation"))
    }

    /// Every generation still stored, oldest first, with its current status.
    pub fn list_generations(&self) -> Result<Vec<GenerationSummary>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT number, hash, parent, origin, rollback_of, message, created_at, \
                 {LATEST_STATUS} FROM generations g ORDER BY number"
            ))
            .map_err(db("list generations"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok(GenerationSummary {
                    number: row.get(0)?,
                    hash: row.get(1)?,
                    parent: row.get(2)?,
                    origin: row.get(3)?,
                    rollback_of: row.get(4)?,
                    message: row.get(5)?,
                    created_at: row.get(6)?,
                    status: row.get(7)?,
                })
            })
            .map_err(db("list generations"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(db("list generations"))
    }

    /// Appends a status change to generation `number`'s log.
    pub fn set_generation_status(
        &self,
        number: u64,
        status: GenerationStatus,
        reason: &str,
    ) -> Result<StatusEntry> {
        const OP: &str = "set generation status";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(OP))?;
        if !exists(&tx, number, OP)? {
            return Err(StateError::NotFound {
                what: "generation",
                id: number.to_string(),
            });
        }
        let entry = insert_status(&tx, number, status, reason, OP)?;
        tx.commit().map_err(db(OP))?;
        Ok(entry)
    }

    /// The current (latest) status of generation `number`; `None` if the
    /// generation is unknown.
    pub fn generation_status(&self, number: u64) -> Result<Option<StatusEntry>> {
        self.conn()
            .query_row(
                "SELECT seq, generation, status, reason, at FROM generation_status \
                 WHERE generation = ?1 ORDER BY seq DESC LIMIT 1",
                [number],
                status_entry,
            )
            .optional()
            .map_err(db("get generation status"))
    }

    /// Every status change of generation `number`, oldest first.
    pub fn status_history(&self, number: u64) -> Result<Vec<StatusEntry>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT seq, generation, status, reason, at FROM generation_status \
                 WHERE generation = ?1 ORDER BY seq",
            )
            .map_err(db("list generation status"))?;
        let rows = stmt
            .query_map([number], status_entry)
            .map_err(db("list generation status"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(db("list generation status"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn new_gen(i: u64) -> NewGeneration {
        NewGeneration {
            hash: format!("sha256:{i:064x}"),
            parent: i.checked_sub(1).filter(|p| *p > 0),
            origin: Origin::Apply,
            rollback_of: None,
            message: Some(format!("apply {i}")),
            body: format!(r#"{{"n":{i}}}"#),
        }
    }

    pub(crate) fn store_with(n: u64) -> Store {
        let store = Store::open_in_memory().unwrap();
        for i in 1..=n {
            store.append_generation(new_gen(i)).unwrap();
        }
        store
    }

    pub(crate) fn numbers(store: &Store) -> Vec<u64> {
        store
            .list_generations()
            .unwrap()
            .iter()
            .map(|g| g.number)
            .collect()
    }

    #[test]
    fn enums_round_trip_through_text() {
        for s in GenerationStatus::ALL {
            assert_eq!(s.as_str().parse::<GenerationStatus>().unwrap(), *s);
        }
        for o in Origin::ALL {
            assert_eq!(o.as_str().parse::<Origin>().unwrap(), *o);
        }
        let err = "done".parse::<GenerationStatus>().unwrap_err();
        assert!(err.to_string().contains("rolling-out"), "{err}");
        assert_eq!(
            serde_json::to_string(&GenerationStatus::RolledBack).unwrap(),
            r#""rolled-back""#
        );
    }

    #[test]
    fn append_get_list_latest() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.latest_generation().unwrap(), None);
        assert!(store.list_generations().unwrap().is_empty());
        let records: Vec<_> = (1..=3)
            .map(|i| store.append_generation(new_gen(i)).unwrap())
            .collect();
        assert_eq!(
            records.iter().map(|r| r.number).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let second = store.get_generation(2).unwrap().unwrap();
        assert_eq!(second, records[1]);
        assert_eq!(second.hash, format!("sha256:{:064x}", 2));
        assert_eq!(second.parent, Some(1));
        assert_eq!(second.body, r#"{"n":2}"#);
        assert_eq!(second.message.as_deref(), Some("apply 2"));
        // RFC 3339, UTC, milliseconds: 2025-01-02T03:04:05.678Z
        assert_eq!(second.created_at.len(), 24, "{}", second.created_at);
        assert!(second.created_at.ends_with('Z'));
        assert_eq!(store.get_generation(4).unwrap(), None);
        assert_eq!(store.latest_generation().unwrap().unwrap().number, 3);
        let list = store.list_generations().unwrap();
        assert_eq!(numbers(&store), [1, 2, 3]);
        assert!(
            list.iter()
                .all(|g| g.status == Some(GenerationStatus::Pending))
        );
    }

    #[test]
    fn body_is_stored_byte_for_byte() {
        let store = Store::open_in_memory().unwrap();
        let body = r#"{"z":1,  "a":[true,null]}"#.to_owned();
        let mut g = new_gen(1);
        g.body = body.clone();
        let rec = store.append_generation(g).unwrap();
        assert_eq!(
            store.get_generation(rec.number).unwrap().unwrap().body,
            body
        );
    }

    #[test]
    fn body_must_be_json() {
        let store = Store::open_in_memory().unwrap();
        let mut g = new_gen(1);
        g.body = "not json".into();
        let err = store.append_generation(g).unwrap_err();
        assert!(matches!(err, StateError::Query { .. }), "{err:?}");
        assert_eq!(store.latest_generation().unwrap(), None);
    }

    #[test]
    fn rollback_generation_references_an_existing_one() {
        let store = store_with(2);
        let rb = NewGeneration {
            origin: Origin::Rollback,
            rollback_of: Some(1),
            parent: Some(2),
            ..new_gen(3)
        };
        let rec = store.append_generation(rb.clone()).unwrap();
        assert_eq!(rec.origin, Origin::Rollback);
        assert_eq!(rec.rollback_of, Some(1));

        let missing = NewGeneration {
            rollback_of: Some(42),
            ..rb.clone()
        };
        assert!(matches!(
            store.append_generation(missing).unwrap_err(),
            StateError::NotFound { .. }
        ));
        let inconsistent = NewGeneration {
            origin: Origin::Apply,
            ..rb
        };
        assert!(matches!(
            store.append_generation(inconsistent).unwrap_err(),
            StateError::InvalidArgument { .. }
        ));
    }

    #[test]
    fn status_log_and_active_generation() {
        let store = store_with(3);
        assert_eq!(store.active_generation().unwrap(), None);
        store
            .set_generation_status(1, GenerationStatus::RollingOut, "")
            .unwrap();
        store
            .set_generation_status(1, GenerationStatus::Active, "healthy")
            .unwrap();
        store
            .set_generation_status(2, GenerationStatus::Active, "")
            .unwrap();
        store
            .set_generation_status(2, GenerationStatus::Failed, "health check timed out")
            .unwrap();
        assert_eq!(store.active_generation().unwrap().unwrap().number, 1);
        let latest = store.generation_status(2).unwrap().unwrap();
        assert_eq!(latest.status, GenerationStatus::Failed);
        assert_eq!(latest.reason, "health check timed out");
        let history: Vec<_> = store
            .status_history(1)
            .unwrap()
            .into_iter()
            .map(|s| s.status)
            .collect();
        assert_eq!(
            history,
            [
                GenerationStatus::Pending,
                GenerationStatus::RollingOut,
                GenerationStatus::Active
            ]
        );
        assert_eq!(store.generation_status(9).unwrap(), None);
        assert!(matches!(
            store
                .set_generation_status(9, GenerationStatus::Active, "")
                .unwrap_err(),
            StateError::NotFound {
                what: "generation",
                ..
            }
        ));
        let list = store.list_generations().unwrap();
        assert_eq!(list[1].status, Some(GenerationStatus::Failed));
    }

    #[test]
    fn raw_update_and_delete_are_refused() {
        let store = store_with(2);
        store
            .set_generation_status(1, GenerationStatus::Active, "")
            .unwrap();
        for (sql, table) in [
            ("UPDATE generations SET hash = 'x'", "generations"),
            ("DELETE FROM generations", "generations"),
            ("DELETE FROM generations WHERE number = 1", "generations"),
            (
                "UPDATE generation_status SET status = 'failed'",
                "generation_status",
            ),
            ("DELETE FROM generation_status", "generation_status"),
            (
                "INSERT INTO generations (number, hash, origin, body) VALUES (1, 'h', 'apply', '{}')",
                "generations",
            ),
            (
                "INSERT INTO generations (number, hash, origin, body) VALUES (7, 'h', 'apply', '{}')",
                "generations",
            ),
        ] {
            match store.raw_execute(sql) {
                Err(StateError::AppendOnly { table: t, message }) => {
                    assert_eq!(t, table, "{sql}: {message}");
                    assert!(message.contains("append-only"));
                }
                other => panic!("{sql}: expected AppendOnly, got {other:?}"),
            }
        }
        assert_eq!(numbers(&store), [1, 2]);
        assert_eq!(store.status_history(1).unwrap().len(), 2);
    }

    #[test]
    fn generations_persist_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open(tmp.path()).unwrap();
            store.append_generation(new_gen(1)).unwrap();
            let second = store.append_generation(new_gen(2)).unwrap();
            store
                .set_generation_status(2, GenerationStatus::Active, "ok")
                .unwrap();
            second
        };
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(numbers(&store), [1, 2]);
        assert_eq!(store.active_generation().unwrap().unwrap(), first);
        assert_eq!(store.append_generation(new_gen(3)).unwrap().number, 3);
    }
}
