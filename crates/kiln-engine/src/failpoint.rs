//! Failpoints: named places where a test can make the daemon die as if
//! `kill -9` hit it there.
//!
//! `KILN_FAILPOINT=NAME` (read once) makes [`hit`] send SIGKILL to the
//! process the first time NAME is reached; `NAME@N` on the N-th time. Names
//! are `before:<step action>`, `after:<step action>` (e.g.
//! `before:shift-traffic`), `recorded` (generation stored, nothing run yet)
//! and `activated` (every step done, generation not yet marked active).
//! Without the variable a failpoint costs one atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

static TARGET: OnceLock<Option<(String, u32)>> = OnceLock::new();
static HITS: AtomicU32 = AtomicU32::new(0);

/// Every failpoint name, for tests that kill at each in turn.
pub const ALL: &[&str] = &[
    "recorded",
    "before:create-instance",
    "after:create-instance",
    "before:await-healthy",
    "after:await-healthy",
    "before:shift-traffic",
    "after:shift-traffic",
    "before:drain",
    "after:drain",
    "before:destroy-instance",
    "after:destroy-instance",
    "before:configure-route",
    "after:configure-route",
    "activated",
];

fn target() -> &'static Option<(String, u32)> {
    TARGET.get_or_init(|| {
        let spec = std::env::var("KILN_FAILPOINT").ok()?;
        match spec.rsplit_once('@') {
            Some((name, n)) => Some((name.to_owned(), n.parse().unwrap_or(1))),
            None => Some((spec, 1)),
        }
    })
}

/// Dies by SIGKILL here if this is the configured failpoint.
pub fn hit(name: &str) {
    let Some((want, nth)) = target() else {
        return;
    };
    if want == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        eprintln!("kiln: failpoint {name}: killing the daemon");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is only reached if kill failed.
        std::process::abort();
    }
}
