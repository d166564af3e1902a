//! Instance records: the store's only mutable rows.

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, db};
use crate::{NOW, Store, json_column};

/// An instance as the engine wants it recorded. `status` is the engine's
/// lifecycle state as text; the store does not interpret it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceUpsert {
    /// Unique name, e.g. `web-ab12-0`.
    pub id: String,
    pub service: String,
    /// The instance's identity hash.
    pub identity: String,
    /// The generation that created (or last adopted) the instance.
    pub generation: u64,
    /// The instance spec, as JSON.
    pub spec: Value,
    pub status: String,
    /// Whether the instance receives traffic.
    pub in_rotation: bool,
    /// Driver-specific data (container id, pid, …).
    pub data: Value,
}

/// A recorded instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRecord {
    pub id: String,
    pub service: String,
    pub identity: String,
    pub generation: u64,
    pub spec: Value,
    pub status: String,
    pub in_rotation: bool,
    pub data: Value,
    /// When the id was first recorded (RFC 3339, UTC, milliseconds).
    pub created_at: String,
    /// When the record last changed.
    pub updated_at: String,
}

const COLUMNS: &str =
    "id, service, identity, generation, spec, status, in_rotation, data, created_at, updated_at";

fn instance_row(row: &Row<'_>) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: row.get(0)?,
        service: row.get(1)?,
        identity: row.get(2)?,
        generation: row.get(3)?,
        spec: json_column(row, 4)?,
        status: row.get(5)?,
        in_rotation: row.get(6)?,
        data: json_column(row, 7)?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
    })
}

impl Store {
    /// Inserts the instance, or replaces every field of the record with the
    /// same id (keeping its `created_at`). Returns the stored record.
    pub fn upsert_instance(&self, instance: &InstanceUpsert) -> Result<InstanceRecord> {
        self.conn()
            .query_row(
                &format!(
                    "INSERT INTO instances \
                     (id, service, identity, generation, spec, status, in_rotation, data) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (id) DO UPDATE SET \
                         service = excluded.service, identity = excluded.identity, \
                         generation = excluded.generation, spec = excluded.spec, \
                         status = excluded.status, in_rotation = excluded.in_rotation, \
                         data = excluded.data, updated_at = {NOW} \
                     RETURNING {COLUMNS}"
                ),
                params![
                    instance.id,
                    instance.service,
                    instance.identity,
                    instance.generation,
                    instance.spec.to_string(),
                    instance.status,
                    instance.in_rotation,
                    instance.data.to_string(),
                ],
                instance_row,
            )
            .map_err(db("upsert instance"))
    }

    /// The instance `id`, if recorded.
    pub fn get_instance(&self, id: &str) -> Result<Option<InstanceRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM instances WHERE id = ?1"),
                [id],
                instance_row,
            )
            .optional()
            .map_err(db("get instance"))
    }

    /// Every instance, or those of one service, ordered by service then id.
    pub fn list_instances(&self, service: Option<&str>) -> Result<Vec<InstanceRecord>> {
        const OP: &str = "list instances";
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM instances WHERE ?1 IS NULL OR service = ?1 \
                 ORDER BY service, id"
            ))
            .map_err(db(OP))?;
        let rows = stmt.query_map([service], instance_row).map_err(db(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(db(OP))
    }

    /// Forgets instance `id`. Returns whether it was recorded.
    pub fn remove_instance(&self, id: &str) -> Result<bool> {
        let removed = self
            .conn()
            .execute("DELETE FROM instances WHERE id = ?1", [id])
            .map_err(db("remove instance"))?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn web(i: u32) -> InstanceUpsert {
        InstanceUpsert {
            id: format!("web-ab12-{i}"),
            service: "web".into(),
            identity: "sha256:ab12".into(),
            generation: 1,
            spec: json!({ "image": "sha256:ff", "ports": [8080] }),
            status: "starting".into(),
            in_rotation: false,
            data: json!({}),
        }
    }

    #[test]
    fn upsert_get_list_remove() {
        let store = Store::open_in_memory().unwrap();
        let first = store.upsert_instance(&web(0)).unwrap();
        assert_eq!(first.spec, web(0).spec);
        assert!(!first.in_rotation);
        store.upsert_instance(&web(1)).unwrap();
        store
            .upsert_instance(&InstanceUpsert {
                id: "db-cd34-0".into(),
                service: "db".into(),
                ..web(0)
            })
            .unwrap();

        let updated = store
            .upsert_instance(&InstanceUpsert {
                status: "running".into(),
                in_rotation: true,
                data: json!({ "container": "c0ffee" }),
                ..web(0)
            })
            .unwrap();
        assert_eq!(updated.created_at, first.created_at);
        assert!(updated.updated_at >= first.updated_at);
        assert_eq!(updated.status, "running");
        assert!(updated.in_rotation);
        assert_eq!(store.get_instance("web-ab12-0").unwrap().unwrap(), updated);
        assert_eq!(updated.data["container"], "c0ffee");

        let ids = |service| -> Vec<String> {
            store
                .list_instances(service)
                .unwrap()
                .into_iter()
                .map(|i| i.id)
                .collect()
        };
        assert_eq!(ids(None), ["db-cd34-0", "web-ab12-0", "web-ab12-1"]);
        assert_eq!(ids(Some("web")), ["web-ab12-0", "web-ab12-1"]);
        assert!(ids(Some("cache")).is_empty());

        assert!(store.remove_instance("web-ab12-0").unwrap());
        assert!(!store.remove_instance("web-ab12-0").unwrap());
        assert_eq!(store.get_instance("web-ab12-0").unwrap(), None);
        assert_eq!(ids(Some("web")), ["web-ab12-1"]);
    }
}
