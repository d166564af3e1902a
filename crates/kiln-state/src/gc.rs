//! Retention: the one sanctioned way to delete history.

use rusqlite::{TransactionBehavior, params};

use crate::Store;
use crate::error::{Result, db};
use crate::generations::LATEST_STATUS;

impl Store {
    /// Retention: deletes every generation except the newest `keep` (at
    /// least one is always kept) and any whose current status is `active`,
    /// together with their status logs and journal entries. Returns the
    /// deleted numbers, oldest first, and records a `generations.gc` event
    /// when it deleted any.
    pub fn gc_generations(&self, keep: u32) -> Result<Vec<u64>> {
        const OP: &str = "garbage-collect generations";
        let keep = keep.max(1);
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(OP))?;
        let doomed: Vec<u64> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT number FROM generations g \
                     WHERE number NOT IN \
                         (SELECT number FROM generations ORDER BY number DESC LIMIT ?1) \
                       AND {LATEST_STATUS} IS NOT 'active' \
                     ORDER BY number"
                ))
                .map_err(db(OP))?;
            let rows = stmt.query_map([keep], |row| row.get(0)).map_err(db(OP))?;
            rows.collect::<rusqlite::Result<_>>().map_err(db(OP))?
        };
        if doomed.is_empty() {
            return Ok(doomed);
        }
        // The permit opens the delete triggers for this transaction only: it
        // is removed again before commit, and a rollback removes it too.
        tx.execute("INSERT INTO gc_permit (id) VALUES (1)", [])
            .map_err(db(OP))?;
        for &number in &doomed {
            // The generation first: its "never the active one" trigger reads
            // the status log, whose rows go next (the FK is deferred).
            for sql in [
                "DELETE FROM generations WHERE number = ?1",
                "DELETE FROM generation_status WHERE generation = ?1",
                "DELETE FROM journal WHERE generation = ?1",
            ] {
                tx.execute(sql, [number]).map_err(db(OP))?;
            }
        }
        tx.execute("DELETE FROM gc_permit", []).map_err(db(OP))?;
        let data = serde_json::json!({ "deleted": doomed, "keep": keep });
        tx.execute(
            "INSERT INTO events (kind, subject, message, data) \
             VALUES ('generations.gc', 'generations', ?1, ?2)",
            params![
                format!("retention deleted {} generation(s)", doomed.len()),
                data.to_string()
            ],
        )
        .map_err(db(OP))?;
        tx.commit().map_err(db(OP))?;
        Ok(doomed)
    }
}

#[cfg(test)]
mod tests {
    use crate::{GenerationStatus, StateError};

    use crate::generations::tests::{new_gen, numbers, store_with};

    #[test]
    fn gc_keeps_the_newest_and_the_active() {
        let store = store_with(6);
        store
            .set_generation_status(2, GenerationStatus::Active, "")
            .unwrap();
        let deleted = store.gc_generations(2).unwrap();
        assert_eq!(deleted, [1, 3, 4]);
        assert_eq!(numbers(&store), [2, 5, 6]);
        assert_eq!(store.get_generation(1).unwrap(), None);
        assert_eq!(store.generation_status(1).unwrap(), None);
        assert_eq!(store.active_generation().unwrap().unwrap().number, 2);
        // Nothing more to collect: a second run is a no-op.
        assert!(store.gc_generations(2).unwrap().is_empty());
        // The permit did not outlive the gc transaction.
        for sql in [
            "DELETE FROM generations WHERE number = 5",
            "DELETE FROM generation_status WHERE generation = 5",
        ] {
            assert!(
                matches!(store.raw_execute(sql), Err(StateError::AppendOnly { .. })),
                "{sql}"
            );
        }
        // Numbers continue after the newest, never reusing collected ones.
        assert_eq!(store.append_generation(new_gen(7)).unwrap().number, 7);
        // The deletion is on record.
        let events = store.list_events(&Default::default()).unwrap();
        assert_eq!(events.last().unwrap().kind, "generations.gc");
        assert_eq!(
            events.last().unwrap().data["deleted"],
            serde_json::json!([1, 3, 4])
        );
    }

    #[test]
    fn gc_with_keep_zero_still_keeps_the_newest() {
        let store = store_with(3);
        assert_eq!(store.gc_generations(0).unwrap(), [1, 2]);
        assert_eq!(numbers(&store), [3]);
        assert!(store.gc_generations(0).unwrap().is_empty());
    }

    #[test]
    fn even_with_a_permit_the_triggers_keep_newest_and_active() {
        let store = store_with(3);
        store
            .set_generation_status(1, GenerationStatus::Active, "")
            .unwrap();
        store
            .raw_execute("INSERT INTO gc_permit (id) VALUES (1)")
            .unwrap();
        for sql in [
            "DELETE FROM generations WHERE number = 3",
            "DELETE FROM generations WHERE number = 1",
            "UPDATE generations SET message = 'edited' WHERE number = 2",
        ] {
            assert!(
                matches!(store.raw_execute(sql), Err(StateError::AppendOnly { .. })),
                "{sql}"
            );
        }
        store.raw_execute("DELETE FROM gc_permit").unwrap();
    }
}
