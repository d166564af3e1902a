//! The shop's background worker: marks new orders processed, a batch at a
//! time, through every replacement of the database (it reconnects).

use std::time::Duration;

fn main() {
    let db = shop::Db::from_env();
    let me = std::env::var("KILN_INSTANCE").unwrap_or_else(|_| "worker".into());
    let mut conn = None;
    if let Err(e) = shop::migrate(&db, &mut conn) {
        eprintln!("shop-worker: cannot reach the database: {e}");
        std::process::exit(1);
    }
    eprintln!("shop-worker: {me} processing orders");
    loop {
        let done = db.retry(&mut conn, |c| {
            c.execute(
                "UPDATE orders SET processed_at = now(), processed_by = $1
                 WHERE id IN (SELECT id FROM orders WHERE processed_at IS NULL
                              ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)",
                &[&me],
            )
        });
        match done {
            Ok(0) => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) => {}
            Err(e) => {
                eprintln!("shop-worker: database unavailable for too long: {e}");
                std::process::exit(1);
            }
        }
    }
}
