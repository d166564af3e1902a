//! Leases: locks that record their owner and expire.
//!
//! A lease is held by whoever last acquired or renewed it before its expiry.
//! Acquiring a lease that another holder renewed in time fails with
//! [`LeaseHeld`], naming that holder; an expired lease is taken over. The
//! holder proves itself with the `token` it chose, so a holder whose lease
//! expired and was taken over cannot renew or release the new holder's.
//!
//! A **fence** is a lease held by something that outlives kiln's processes
//! (an instance that has an exclusive volume mounted): it never expires and
//! records no pid, so neither a timeout nor the death of the daemon that
//! took it frees it. Only [`Store::release_fence`] does, by its holder's
//! name; deciding that a holder is gone is the caller's job.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::Store;
use crate::error::{Result, db};

/// Who holds a lease, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseHolder {
    pub name: String,
    pub owner: String,
    /// The holder's process id and host, when it said.
    pub pid: Option<u32>,
    pub host: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    pub acquired_at: String,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// This host's name, as leases record it.
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

impl LeaseHolder {
    /// Whether the holder is a process of this host that no longer exists:
    /// its lease can be taken at once instead of waiting for the expiry.
    pub fn is_dead_local(&self) -> bool {
        match (self.pid, &self.host) {
            (Some(pid), Some(host)) if *host == host_name() => {
                let Some(pid) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                else {
                    return false;
                };
                matches!(
                    rustix::process::test_kill_process(pid),
                    Err(rustix::io::Errno::SRCH)
                ) || is_zombie(pid.as_raw_nonzero().get())
            }
            _ => false,
        }
    }

    /// How long until the lease expires (zero when it already has).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_ms.saturating_sub(now_ms()))
    }
}

/// A killed process whose parent has not reaped it yet still answers
/// `kill(pid, 0)`; it holds nothing any more (a container whose init never
/// reaps keeps such zombies for good).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// The lease is held by someone else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{}` is held by {} since {} (expires in {} s unless renewed)",
    .0.name, .0.owner, .0.acquired_at, .0.remaining().as_secs()
)]
pub struct LeaseHeld(pub LeaseHolder);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn expiry(ttl: Duration) -> i64 {
    let ms = now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes lease `name` for `ttl` if it is free, expired, already held
    /// with `token`, or held by a dead process of this host; otherwise
    /// returns who holds it. Records this process's pid and host.
    pub fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<std::result::Result<(), LeaseHeld>> {
        const OP: &str = "acquire lease";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(OP))?;
        let current: Option<(LeaseHolder, String)> = tx
            .query_row(
                "SELECT name, owner, acquired_at, expires_ms, pid, host, token FROM leases WHERE name = ?1",
                params![name],
                |row| Ok((holder(row)?, row.get(6)?)),
            )
            .optional()
            .map_err(db(OP))?;
        if let Some((holder, held_token)) = current
            && held_token != token
            && holder.expires_ms > now_ms()
            && !holder.is_dead_local()
        {
            return Ok(Err(LeaseHeld(holder)));
        }
        tx.execute(
            "INSERT INTO leases (name, owner, token, expires_ms, pid, host) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET owner = ?2, token = ?3, expires_ms = ?4, pid = ?5, host = ?6,
                 acquired_at = CASE WHEN leases.token = ?3 THEN leases.acquired_at
                                    ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END",
            params![name, owner, token, expiry(ttl), std::process::id(), host_name()],
        )
        .map_err(db(OP))?;
        tx.commit().map_err(db(OP))?;
        Ok(Ok(()))
    }

    /// Extends lease `name` held with `token` by `ttl` from now. Returns
    /// false when it is no longer held with that token (expired and taken).
    pub fn renew_lease(&self, name: &str, token: &str, ttl: Duration) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE leases SET expires_ms = ?3 WHERE name = ?1 AND token = ?2",
                params![name, token, expiry(ttl)],
            )
            .map_err(db("renew lease"))?;
        Ok(n == 1)
    }

    /// Gives lease `name` up if held with `token`.
    pub fn release_lease(&self, name: &str, token: &str) -> Result<()> {
        self.conn()
            .execute(
                "DELETE FROM leases WHERE name = ?1 AND token = ?2",
                params![name, token],
            )
            .map_err(db("release lease"))?;
        Ok(())
    }

    /// The current holder of lease `name`, if it is held and not expired.
    pub fn lease(&self, name: &str) -> Result<Option<LeaseHolder>> {
        let holder = self
            .conn()
            .query_row(
                "SELECT name, owner, acquired_at, expires_ms, pid, host FROM leases WHERE name = ?1",
                params![name],
                holder,
            )
            .optional()
            .map_err(db("read lease"))?;
        Ok(holder.filter(|h| h.expires_ms > now_ms() && !h.is_dead_local()))
    }
}

impl Store {
    /// Takes fence `name` for `holder` if it is free or already `holder`'s;
    /// otherwise returns who holds it. The fence never expires.
    pub fn acquire_fence(
        &self,
        name: &str,
        holder: &str,
    ) -> Result<std::result::Result<(), LeaseHeld>> {
        const OP: &str = "acquire fence";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(OP))?;
        let current: Option<(LeaseHolder, String)> = tx
            .query_row(
                "SELECT name, owner, acquired_at, expires_ms, pid, host, token FROM leases WHERE name = ?1",
                params![name],
                |row| Ok((self::holder(row)?, row.get(6)?)),
            )
            .optional()
            .map_err(db(OP))?;
        match current {
            Some((_, token)) if token == holder => return Ok(Ok(())),
            Some((held, _)) => return Ok(Err(LeaseHeld(held))),
            None => {}
        }
        tx.execute(
            "INSERT INTO leases (name, owner, token, expires_ms, pid, host) VALUES (?1, ?2, ?2, ?3, NULL, NULL)",
            params![name, holder, i64::MAX],
        )
        .map_err(db(OP))?;
        tx.commit().map_err(db(OP))?;
        Ok(Ok(()))
    }

    /// Gives fence `name` up if `holder` holds it.
    pub fn release_fence(&self, name: &str, holder: &str) -> Result<()> {
        self.release_lease(name, holder)
    }

    /// Every fence whose name starts with `prefix`, by name; `owner` is the
    /// holder.
    pub fn fences(&self, prefix: &str) -> Result<Vec<LeaseHolder>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT name, owner, acquired_at, expires_ms, pid, host FROM leases
                 WHERE substr(name, 1, length(?1)) = ?1 AND owner = token AND pid IS NULL
                 ORDER BY name",
            )
            .map_err(db("list fences"))?;
        let rows = stmt
            .query_map(params![prefix], holder)
            .map_err(db("list fences"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db("list fences"))
    }
}

fn holder(row: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseHolder> {
    Ok(LeaseHolder {
        name: row.get(0)?,
        owner: row.get(1)?,
        acquired_at: row.get(2)?,
        expires_ms: row.get::<_, i64>(3)?.max(0) as u64,
        pid: row.get(4)?,
        host: row.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn second_holder_is_refused_and_named() {
        let store = Store::open_in_memory().unwrap();
        store
            .acquire_lease("rollout", "kiln apply (pid 1)", "a", TTL)
            .unwrap()
            .unwrap();
        let held = store
            .acquire_lease("rollout", "kiln apply (pid 2)", "b", TTL)
            .unwrap()
            .unwrap_err();
        assert_eq!(held.0.owner, "kiln apply (pid 1)");
        assert!(
            held.to_string().contains("held by kiln apply (pid 1)"),
            "{held}"
        );
        // The holder itself may take it again (renewal by acquire).
        store
            .acquire_lease("rollout", "kiln apply (pid 1)", "a", TTL)
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_dead_local_holder_loses_its_lease_at_once() {
        let store = Store::open_in_memory().unwrap();
        store
            .acquire_lease("daemon", "gone", "a", TTL)
            .unwrap()
            .unwrap();
        // A pid that cannot exist (beyond pid_max) on this host.
        store
            .raw_execute("UPDATE leases SET pid = 2147483646")
            .unwrap();
        assert_eq!(store.lease("daemon").unwrap(), None);
        store
            .acquire_lease("daemon", "new", "b", TTL)
            .unwrap()
            .unwrap();
        assert_eq!(store.lease("daemon").unwrap().unwrap().owner, "new");
        // A live holder (this process) keeps it.
        let held = store
            .acquire_lease("daemon", "other", "c", TTL)
            .unwrap()
            .unwrap_err();
        assert_eq!(held.0.pid, Some(std::process::id()));
    }

    #[test]
    fn a_fence_outlives_its_taker_until_its_holder_releases_it() {
        let store = Store::open_in_memory().unwrap();
        store
            .acquire_fence("volume:p/data", "db-1")
            .unwrap()
            .unwrap();
        // The same holder again: fine; another: refused, naming the holder.
        store
            .acquire_fence("volume:p/data", "db-1")
            .unwrap()
            .unwrap();
        let held = store
            .acquire_fence("volume:p/data", "db-2")
            .unwrap()
            .unwrap_err();
        assert_eq!(held.0.owner, "db-1");
        // No pid: the death of the process that took it frees nothing, and
        // it never expires; a lease holder cannot take it either.
        assert_eq!(held.0.pid, None);
        assert!(!held.0.is_dead_local());
        assert!(
            store
                .acquire_lease("volume:p/data", "x", "x", TTL)
                .unwrap()
                .is_err()
        );
        assert_eq!(store.lease("volume:p/data").unwrap().unwrap().owner, "db-1");
        store
            .acquire_fence("volume:p/logs", "db-1")
            .unwrap()
            .unwrap();
        store
            .acquire_lease("rollout", "r", "r", TTL)
            .unwrap()
            .unwrap();
        let names: Vec<String> = store
            .fences("volume:")
            .unwrap()
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["volume:p/data", "volume:p/logs"]);
        // Only its holder releases it.
        store.release_fence("volume:p/data", "db-2").unwrap();
        assert_eq!(store.lease("volume:p/data").unwrap().unwrap().owner, "db-1");
        store.release_fence("volume:p/data", "db-1").unwrap();
        assert_eq!(store.lease("volume:p/data").unwrap(), None);
        store
            .acquire_fence("volume:p/data", "db-2")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_zombie_holder_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it exited.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !is_zombie(pid as i32) {
            assert!(std::time::Instant::now() < deadline, "never a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        let store = Store::open_in_memory().unwrap();
        store
            .acquire_lease("daemon", "zombie", "a", TTL)
            .unwrap()
            .unwrap();
        store
            .raw_execute(&format!("UPDATE leases SET pid = {pid}"))
            .unwrap();
        assert_eq!(store.lease("daemon").unwrap(), None);
        child.wait().unwrap();
        assert!(!is_zombie(std::process::id() as i32));
    }

    #[test]
    fn expired_lease_is_taken_over_and_old_token_loses_it() {
        let store = Store::open_in_memory().unwrap();
        store
            .acquire_lease("rollout", "dead", "a", Duration::ZERO)
            .unwrap()
            .unwrap();
        assert_eq!(
            store.lease("rollout").unwrap(),
            None,
            "expired leases are not reported"
        );
        store
            .acquire_lease("rollout", "alive", "b", TTL)
            .unwrap()
            .unwrap();
        assert!(!store.renew_lease("rollout", "a", TTL).unwrap());
        store.release_lease("rollout", "a").unwrap();
        assert_eq!(store.lease("rollout").unwrap().unwrap().owner, "alive");
        assert!(store.renew_lease("rollout", "b", TTL).unwrap());
        store.release_lease("rollout", "b").unwrap();
        assert_eq!(store.lease("rollout").unwrap(), None);
    }
}
