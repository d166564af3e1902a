//! The rollout journal: which step of which generation's rollout began,
//! ended or failed, written before and after each step so that a rollout
//! interrupted by a crash can be resumed or reverted.

use rusqlite::{Row, params};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, StateError, db};
use crate::{Store, json_column};

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalPhase {
    Begin,
    End,
    Failed,
}

impl JournalPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            JournalPhase::Begin => "begin",
            JournalPhase::End => "end",
            JournalPhase::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<JournalPhase> {
        match s {
            "begin" => Some(JournalPhase::Begin),
            "end" => Some(JournalPhase::End),
            "failed" => Some(JournalPhase::Failed),
            _ => None,
        }
    }
}

/// A journal entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJournalEntry {
    pub generation: u64,
    /// The step's position in the generation's plan.
    pub step_index: u32,
    pub phase: JournalPhase,
    /// The step, as JSON.
    pub step: Value,
    /// Why it failed, for [`JournalPhase::Failed`].
    pub message: Option<String>,
}

/// A recorded journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    pub seq: u64,
    pub generation: u64,
    pub step_index: u32,
    pub phase: JournalPhase,
    pub step: Value,
    pub message: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    pub at: String,
}

fn entry(row: &Row<'_>) -> rusqlite::Result<JournalEntry> {
    let phase: String = row.get(3)?;
    Ok(JournalEntry {
        seq: row.get(0)?,
        generation: row.get(1)?,
        step_index: row.get(2)?,
        phase: JournalPhase::parse(&phase).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown journal phase `{phase}`").into(),
            )
        })?,
        step: json_column(row, 4)?,
        message: row.get(5)?,
        at: row.get(6)?,
    })
}

impl Store {
    /// Appends a journal entry and returns its sequence number. The
    /// generation must exist.
    pub fn journal_append(&self, new: &NewJournalEntry) -> Result<u64> {
        const OP: &str = "append journal entry";
        let conn = self.conn();
        let known: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM generations WHERE number = ?1)",
                [new.generation],
                |row| row.get(0),
            )
            .map_err(db(OP))?;
        if !known {
            return Err(StateError::NotFound {
                what: "generation",
                id: new.generation.to_string(),
            });
        }
        // The foreign key backs the check above should gc race with us.
        conn.query_row(
            "INSERT INTO journal (generation, step_index, phase, step, message) \
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
            params![
                new.generation,
                new.step_index,
                new.phase.as_str(),
                new.step.to_string(),
                new.message
            ],
            |row| row.get(0),
        )
        .map_err(db(OP))
    }

    /// Every journal entry of `generation`, in the order written.
    pub fn journal_for(&self, generation: u64) -> Result<Vec<JournalEntry>> {
        const OP: &str = "read journal";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT seq, generation, step_index, phase, step, message, at FROM journal \
                 WHERE generation = ?1 ORDER BY seq",
            )
            .map_err(db(OP))?;
        let rows = stmt.query_map([generation], entry).map_err(db(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(db(OP))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{GenerationStatus, NewGeneration, Origin};

    fn store_with_generations(n: u64) -> Store {
        let store = Store::open_in_memory().unwrap();
        for i in 1..=n {
            store
                .append_generation(NewGeneration {
                    hash: format!("sha256:{i}"),
                    parent: None,
                    origin: Origin::Apply,
                    rollback_of: None,
                    message: None,
                    body: "{}".into(),
                })
                .unwrap();
        }
        store
    }

    fn step(generation: u64, step_index: u32, phase: JournalPhase) -> NewJournalEntry {
        NewJournalEntry {
            generation,
            step_index,
            phase,
            step: json!({ "start": format!("web-{step_index}") }),
            message: None,
        }
    }

    #[test]
    fn append_and_read_back() {
        let store = store_with_generations(2);
        store
            .journal_append(&step(1, 0, JournalPhase::Begin))
            .unwrap();
        store
            .journal_append(&step(2, 0, JournalPhase::Begin))
            .unwrap();
        store
            .journal_append(&step(1, 0, JournalPhase::End))
            .unwrap();
        store
            .journal_append(&NewJournalEntry {
                message: Some("image pull failed".into()),
                ..step(1, 1, JournalPhase::Failed)
            })
            .unwrap();
        let entries = store.journal_for(1).unwrap();
        let phases: Vec<_> = entries.iter().map(|e| (e.step_index, e.phase)).collect();
        assert_eq!(
            phases,
            [
                (0, JournalPhase::Begin),
                (0, JournalPhase::End),
                (1, JournalPhase::Failed)
            ]
        );
        assert_eq!(entries[0].step["start"], "web-0");
        assert_eq!(entries[2].message.as_deref(), Some("image pull failed"));
        assert_eq!(store.journal_for(2).unwrap().len(), 1);
        assert!(store.journal_for(3).unwrap().is_empty());
    }

    #[test]
    fn unknown_generation_is_refused() {
        let store = store_with_generations(1);
        assert!(matches!(
            store.journal_append(&step(5, 0, JournalPhase::Begin)),
            Err(StateError::NotFound { .. })
        ));
    }

    #[test]
    fn journal_is_append_only_and_collected_with_its_generation() {
        let store = store_with_generations(3);
        store
            .journal_append(&step(1, 0, JournalPhase::Begin))
            .unwrap();
        store
            .journal_append(&step(3, 0, JournalPhase::Begin))
            .unwrap();
        for sql in ["UPDATE journal SET phase = 'end'", "DELETE FROM journal"] {
            match store.raw_execute(sql) {
                Err(StateError::AppendOnly { table, .. }) => assert_eq!(table, "journal"),
                other => panic!("{sql}: expected AppendOnly, got {other:?}"),
            }
        }
        store
            .set_generation_status(3, GenerationStatus::Active, "")
            .unwrap();
        assert_eq!(store.gc_generations(1).unwrap(), [1, 2]);
        assert!(store.journal_for(1).unwrap().is_empty());
        assert_eq!(store.journal_for(3).unwrap().len(), 1);
    }
}
