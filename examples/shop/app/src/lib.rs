//! What the shop's web service and worker share: the database connection
//! (settings from the environment kiln gives the instances), the schema, and
//! reconnecting through a database replacement.
//!
//! The database is replaced like any other instance (strategy `recreate`:
//! the old PostgreSQL stops before the new one starts on the same volume),
//! so for a few seconds there is none. Every database call here retries on
//! a fresh connection until `DATABASE_WAIT` (default 60 s) has passed: a
//! replacement makes requests slower, never failed.

use std::time::{Duration, Instant};

pub use postgres::{Client, Error};

/// Connection settings, from `DATABASE_HOST`, `DATABASE_PORT`,
/// `DATABASE_USER`, `DATABASE_NAME` and the secret `DATABASE_PASSWORD`.
#[derive(Clone, Debug)]
pub struct Db {
    config: postgres::Config,
    wait: Duration,
}

impl Db {
    pub fn from_env() -> Db {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        let mut config = postgres::Config::new();
        config
            .host(&var("DATABASE_HOST", "127.0.0.1"))
            .port(
                var("DATABASE_PORT", "5432")
                    .parse()
                    .expect("DATABASE_PORT is a port number"),
            )
            .user(&var("DATABASE_USER", "postgres"))
            .dbname(&var("DATABASE_NAME", "postgres"))
            .password(var("DATABASE_PASSWORD", ""))
            .application_name(&var("KILN_INSTANCE", "shop"))
            .connect_timeout(Duration::from_secs(2));
        let wait = Duration::from_secs(var("DATABASE_WAIT", "60").parse().unwrap_or(60));
        Db { config, wait }
    }

    pub fn connect(&self) -> Result<Client, Error> {
        self.config.connect(postgres::NoTls)
    }

    /// Runs `work` on `conn` (connecting first when there is none), on a new
    /// connection after every failure, until it succeeds or `wait` passed.
    /// `work` must be safe to repeat: a failure may come after the commit.
    pub fn retry<T>(
        &self,
        conn: &mut Option<Client>,
        mut work: impl FnMut(&mut Client) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let attempt = match conn {
                Some(c) => work(c),
                None => self.connect().and_then(|mut c| {
                    let out = work(&mut c);
                    *conn = Some(c);
                    out
                }),
            };
            match attempt {
                Ok(v) => return Ok(v),
                Err(e) if start.elapsed() < self.wait => {
                    if conn.as_ref().is_none_or(Client::is_closed) || is_transient(&e) {
                        *conn = None;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Errors of a database that is going away or coming back (shutting down,
/// starting up, in recovery): worth a new connection.
fn is_transient(e: &Error) -> bool {
    e.code().is_none_or(|c| {
        let c = c.code();
        c.starts_with("08") || c.starts_with("57P") || c == "53300"
    })
}

/// The schema: orders, written by the web service (idempotent by `key`) and
/// processed by the worker.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    key text NOT NULL UNIQUE,
    item text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    processed_by text
)";

pub fn migrate(db: &Db, conn: &mut Option<Client>) -> Result<(), Error> {
    db.retry(conn, |c| c.batch_execute(SCHEMA))
}
