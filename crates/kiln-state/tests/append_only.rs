//! The append-only guarantee is the database's, not the `Store`'s: another
//! connection to the same file (a second kiln, the `sqlite3` shell) is held
//! to it too.

use kiln_state::{DB_FILE, GenerationStatus, NewEvent, NewGeneration, Origin, Store};
use rusqlite::{Connection, ErrorCode};

fn assert_refused(conn: &Connection, sql: &str) {
    match conn.execute(sql, []) {
        Err(rusqlite::Error::SqliteFailure(err, Some(message))) => {
            assert_eq!(err.code, ErrorCode::ConstraintViolation, "{sql}");
            assert!(message.contains("append-only"), "{sql}: {message}");
        }
        other => panic!("{sql}: expected a trigger to refuse it, got {other:?}"),
    }
}

#[test]
fn another_connection_cannot_rewrite_history() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    for i in 1..=2 {
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
        .set_generation_status(1, GenerationStatus::Active, "")
        .unwrap();
    store
        .append_event(&NewEvent::new("generation.applied", "generation/1", ""))
        .unwrap();

    let conn = Connection::open(tmp.path().join(DB_FILE)).unwrap();
    for sql in [
        "UPDATE generations SET hash = 'x'",
        "DELETE FROM generations",
        "UPDATE generation_status SET reason = 'x'",
        "DELETE FROM generation_status",
        "UPDATE events SET kind = 'x'",
        "DELETE FROM events",
    ] {
        assert_refused(&conn, sql);
    }
    drop(conn);

    assert_eq!(store.list_generations().unwrap().len(), 2);
    assert_eq!(store.latest_generation().unwrap().unwrap().hash, "sha256:2");
    assert_eq!(store.status_history(1).unwrap().len(), 2);
}
