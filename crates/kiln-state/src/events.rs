//! The append-only event log.

use rusqlite::{Row, params};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, db};
use crate::{Store, json_column};

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Dotted kind, e.g. `instance.started`, `generation.applied`.
    pub kind: String,
    /// What it is about: `service/web`, `instance/web-ab12-0`, `generation/3`.
    pub subject: String,
    pub generation: Option<u64>,
    pub message: String,
    /// Structured details; `null` when there are none.
    pub data: Value,
}

impl NewEvent {
    /// An event with no generation and no data.
    pub fn new(
        kind: impl Into<String>,
        subject: impl Into<String>,
        message: impl Into<String>,
    ) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            subject: subject.into(),
            generation: None,
            message: message.into(),
            data: Value::Null,
        }
    }

    pub fn with_generation(mut self, generation: u64) -> NewEvent {
        self.generation = Some(generation);
        self
    }

    pub fn with_data(mut self, data: Value) -> NewEvent {
        self.data = data;
        self
    }
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub at: String,
    pub kind: String,
    pub subject: String,
    pub generation: Option<u64>,
    pub message: String,
    pub data: Value,
}

/// Which events [`Store::list_events`] returns: oldest first, those after
/// `since_seq` whose subject starts with `subject_prefix`, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events with `seq > since_seq` (for following the log).
    pub since_seq: Option<u64>,
    pub limit: Option<u32>,
    /// e.g. `service/web` or `instance/web-`.
    pub subject_prefix: Option<String>,
}

fn event(row: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        seq: row.get(0)?,
        at: row.get(1)?,
        kind: row.get(2)?,
        subject: row.get(3)?,
        generation: row.get(4)?,
        message: row.get(5)?,
        data: json_column(row, 6)?,
    })
}

impl Store {
    /// Appends an event and returns its sequence number.
    pub fn append_event(&self, new: &NewEvent) -> Result<u64> {
        self.conn()
            .query_row(
                "INSERT INTO events (kind, subject, generation, message, data) \
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
                params![
                    new.kind,
                    new.subject,
                    new.generation,
                    new.message,
                    new.data.to_string()
                ],
                |row| row.get(0),
            )
            .map_err(db("append event"))
    }

    /// Events matching `filter`, oldest first.
    pub fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        const OP: &str = "list events";
        let conn = self.conn();
        // substr instead of LIKE: subjects may contain `%` and `_`.
        let mut stmt = conn
            .prepare(
                "SELECT seq, at, kind, subject, generation, message, data FROM events \
                 WHERE seq > ?1 \
                   AND (?2 IS NULL OR substr(subject, 1, length(?2)) = ?2) \
                 ORDER BY seq LIMIT ?3",
            )
            .map_err(db(OP))?;
        let limit = filter.limit.map_or(-1, i64::from);
        let rows = stmt
            .query_map(
                params![filter.since_seq.unwrap_or(0), filter.subject_prefix, limit],
                event,
            )
            .map_err(db(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(db(OP))
    }

    /// The sequence number of the newest event; 0 when there is none.
    pub fn last_event_seq(&self) -> Result<u64> {
        self.conn()
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |row| {
                row.get(0)
            })
            .map_err(db("read last event seq"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::StateError;

    fn seed(store: &Store) -> Vec<u64> {
        [
            NewEvent::new("generation.applied", "generation/1", "applied").with_generation(1),
            NewEvent::new("instance.started", "instance/web-ab12-0", "started")
                .with_data(json!({ "container": "c0ffee" })),
            NewEvent::new("instance.started", "instance/web-ab12-1", "started"),
            NewEvent::new("service.healthy", "service/web", "all healthy"),
            NewEvent::new("instance.started", "instance/db_1%", "started"),
        ]
        .iter()
        .map(|e| store.append_event(e).unwrap())
        .collect()
    }

    #[test]
    fn append_and_filter() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.last_event_seq().unwrap(), 0);
        let seqs = seed(&store);
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(store.last_event_seq().unwrap(), 5);

        let all = store.list_events(&EventFilter::default()).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].generation, Some(1));
        assert_eq!(all[0].data, Value::Null);
        assert_eq!(all[1].data["container"], "c0ffee");

        let seqs_of = |filter: EventFilter| -> Vec<u64> {
            store
                .list_events(&filter)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        let since = |s| EventFilter {
            since_seq: Some(s),
            ..Default::default()
        };
        assert_eq!(seqs_of(since(2)), [3, 4, 5]);
        assert_eq!(seqs_of(since(5)), Vec::<u64>::new());
        assert_eq!(
            seqs_of(EventFilter {
                limit: Some(2),
                ..since(1)
            }),
            [2, 3]
        );
        let prefix = |p: &str| EventFilter {
            subject_prefix: Some(p.into()),
            ..Default::default()
        };
        assert_eq!(seqs_of(prefix("instance/web-")), [2, 3]);
        assert_eq!(seqs_of(prefix("instance/")), [2, 3, 5]);
        // No LIKE wildcards: `_` and `%` match only themselves.
        assert_eq!(seqs_of(prefix("instance/db_1%")), [5]);
        assert_eq!(seqs_of(prefix("instance/db%")), Vec::<u64>::new());
    }

    #[test]
    fn events_are_append_only() {
        let store = Store::open_in_memory().unwrap();
        seed(&store);
        for sql in [
            "UPDATE events SET message = 'edited'",
            "DELETE FROM events WHERE seq = 1",
        ] {
            match store.raw_execute(sql) {
                Err(StateError::AppendOnly { table, .. }) => assert_eq!(table, "events"),
                other => panic!("{sql}: expected AppendOnly, got {other:?}"),
            }
        }
        // Not even gc's permit opens the event log.
        store
            .raw_execute("INSERT INTO gc_permit (id) VALUES (1)")
            .unwrap();
        assert!(matches!(
            store.raw_execute("DELETE FROM events"),
            Err(StateError::AppendOnly { .. })
        ));
        assert_eq!(store.list_events(&EventFilter::default()).unwrap().len(), 5);
    }
}
