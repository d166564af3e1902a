//! `examples/shop` end to end, through the `kiln` binary and the sandbox
//! driver: PostgreSQL built from Debian's packages (resolved, fetched,
//! verified and pinned in `kiln.lock`), a web service and a worker on it.
//!
//! One test, because the PostgreSQL image (≈ 95 packages) is built once:
//! the stack comes up and the web service reads and writes PostgreSQL; a
//! writer inserts rows through the route while PostgreSQL is replaced 20
//! times (its config file changes each time) and the web service is rolled
//! 20 times; every acknowledged row is there at the end and the route lost
//! no request; a thread watching every process's mounts from the host sees
//! the database volume open in at most one instance at any moment; `kiln
//! rollback 1` brings back the first config of every service with the data
//! written since.
//!
//! Needs root (the sandbox) and the Debian archive (apt's sources of this
//! machine): skipped loudly without them, failed in strict mode.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[path = "support/env.rs"]
mod env;
#[path = "support/mounts.rs"]
mod mounts;

use env::{http, kiln_command, repo, sandbox_unavailable, say, show, text};

/// How long a condition may take to come true. The first apply builds the
/// PostgreSQL image (download, verify, unpack ≈ 400 MB of files).
const DEADLINE: Duration = Duration::from_secs(300);

/// Replacements of each service.
const ROUNDS: usize = 20;

fn can_run(test: &str) -> bool {
    let why = sandbox_unavailable().or_else(|| {
        let apt = Command::new("apt-get").arg("--version").output();
        (!apt.is_ok_and(|o| o.status.success()))
            .then(|| "apt-get is not available (Debian packages are the image source)".to_owned())
    });
    env::may_run(&format!("shop::{test}"), why)
}

/// The shop's two binaries, built from the workspace.
fn shop_binaries() -> &'static [PathBuf; 2] {
    static BINS: std::sync::OnceLock<[PathBuf; 2]> = std::sync::OnceLock::new();
    BINS.get_or_init(|| {
        let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
        let profile_dir = kiln.parent().expect("the kiln binary has a directory");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "shop"])
            .args((!profile_dir.ends_with("debug")).then_some("--release"))
            .current_dir(repo())
            .status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "cannot build the shop (`cargo build -p shop`): {status:?}"
        );
        ["shop-web", "shop-worker"].map(|b| {
            let path = profile_dir.join(b);
            assert!(path.is_file(), "{} was not built", path.display());
            path
        })
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

// ---- the project --------------------------------------------------------

/// A copy of `examples/shop` with its own state, daemon and ports; `kiln
/// down` when dropped.
struct Shop {
    dir: tempfile::TempDir,
    web: SocketAddr,
}

impl Shop {
    fn new() -> Shop {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let example = repo().join("examples/shop");
        let (web, db) = (free_port(), free_port());
        let mut spec = std::fs::read_to_string(example.join("kiln.toml")).unwrap();
        for (from, to) in [
            (
                "listen = \"127.0.0.1:8088\"",
                format!("listen = \"127.0.0.1:{web}\""),
            ),
            (
                "listen = \"127.0.0.1:15432\"",
                format!("listen = \"127.0.0.1:{db}\""),
            ),
            (
                "DATABASE_PORT = \"15432\"",
                format!("DATABASE_PORT = \"{db}\""),
            ),
        ] {
            assert!(spec.contains(from), "the example changed: no `{from}`");
            spec = spec.replace(from, &to);
        }
        // No kiln.lock: the first apply resolves the packages and writes it
        // (a committed lock would pin versions the archive drops when
        // security updates supersede them).
        std::fs::write(dir.path().join("kiln.toml"), spec).unwrap();
        for file in [
            "config/postgresql.conf",
            "config/web.toml",
            "db/entrypoint.sh",
            "secrets/db-password",
        ] {
            let to = dir.path().join(file);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(example.join(file), &to).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        for bin in shop_binaries() {
            std::fs::copy(bin, dir.path().join("bin").join(bin.file_name().unwrap())).unwrap();
        }
        Shop {
            dir,
            web: SocketAddr::from(([127, 0, 0, 1], web)),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn kiln(&self, args: &[&str]) -> Output {
        kiln_command(self.path())
            .args(args)
            .output()
            .expect("kiln runs")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert_eq!(out.status.code(), Some(0), "kiln {args:?}: {}", show(&out));
        text(&out.stdout)
    }

    fn write(&self, file: &str, content: &str) {
        std::fs::write(self.path().join(file), content).unwrap();
    }

    /// `GET path` through the web route, which must answer 200.
    #[track_caller]
    fn get(&self, path: &str) -> String {
        match http(self.web, "GET", path) {
            Ok((200, body)) => body.trim_end().to_owned(),
            other => panic!("GET {path}: {other:?}"),
        }
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        let out = self.kiln(&["down", "."]);
        if !out.status.success() {
            say(&format!("shop: `kiln down` failed: {}", show(&out)));
        }
    }
}

fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    env::wait_until(what, DEADLINE, f)
}

// ---- load and watch -----------------------------------------------------

/// Inserts orders through the route, one after another, until stopped:
/// the keys whose insert was acknowledged, and every failure.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl Writer {
    fn start(addr: SocketAddr) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("w{n}");
                match http(addr, "POST", &format!("/orders?key={key}&item=tea")) {
                    Ok((200, body)) if body.trim().parse::<u64>().is_ok() => acked.push(key),
                    other => failed.push(format!("{key}: {other:?}")),
                }
            }
            (acked, failed)
        });
        Writer { stop, thread }
    }

    fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the writer does not panic")
    }
}

// ---- the test -----------------------------------------------------------

#[test]
fn shop_keeps_every_row_through_database_and_web_replacements() {
    if !can_run("shop_keeps_every_row_through_database_and_web_replacements") {
        return;
    }
    let shop = Shop::new();
    let first = shop.ok(&["apply", ".", "-y"]);
    assert!(first.contains("is active"), "{first}");
    let lock = std::fs::read_to_string(shop.path().join("kiln.lock"))
        .expect("the first apply writes kiln.lock");
    assert!(lock.contains("postgresql-15"), "kiln.lock:\n{lock}");

    // Up: the web service answers through the route and uses PostgreSQL.
    let greeting = wait_until("the web route answers", || {
        http(shop.web, "GET", "/").ok().filter(|(c, _)| *c == 200)
    })
    .1;
    assert!(
        greeting.starts_with("welcome to the shop from web-"),
        "{greeting}"
    );
    let id = match http(shop.web, "POST", "/orders?key=first&item=coffee") {
        Ok((200, body)) => body,
        other => panic!("the first order: {other:?}"),
    };
    assert_eq!(shop.get("/orders/first"), format!("{} coffee", id.trim()));
    assert_eq!(shop.get("/db/show?name=work_mem"), "4MB");
    wait_until("the worker processes the first order", || {
        let counts = shop.get("/orders");
        (counts.split_whitespace().nth(1) != Some("0")).then_some(())
    });

    // 20 replacements of each, under writes.
    let volume = shop.path().join(".kiln/volumes/pg-data");
    assert!(
        volume.is_dir(),
        "no volume directory at {}",
        volume.display()
    );
    let watch = mounts::Watch::start(mounts::Needle {
        unique: shop
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        suffix: "/volumes/pg-data".into(),
    });
    let writer = Writer::start(shop.web);
    let pg_conf = std::fs::read_to_string(shop.path().join("config/postgresql.conf")).unwrap();
    for round in 1..=ROUNDS {
        shop.write(
            "config/postgresql.conf",
            &format!("{pg_conf}work_mem = '{}MB'\n", 4 + round),
        );
        shop.write(
            "config/web.toml",
            &format!("greeting = \"round {round}\"\n"),
        );
        let out = shop.kiln(&["apply", ".", "-y"]);
        assert_eq!(out.status.code(), Some(0), "round {round}: {}", show(&out));
        assert_eq!(
            shop.get("/db/show?name=work_mem"),
            format!("{}MB", 4 + round),
            "round {round}: the new database config is live"
        );
    }
    let (acked, failed) = writer.finish();
    let seen = watch.finish();
    say(&format!(
        "shop: {} orders acknowledged during {ROUNDS} rounds, {} failed; mounts swept {} times",
        acked.len(),
        failed.len(),
        seen.sweeps
    ));
    assert!(failed.is_empty(), "the route lost requests: {failed:#?}");
    assert!(
        acked.len() > ROUNDS,
        "too few writes to mean anything: {}",
        acked.len()
    );
    assert!(seen.sweeps > 100, "the mount watch hardly ran: {seen:?}");
    assert!(
        seen.seen_mounted > seen.sweeps / 2,
        "the watch saw the database volume mounted in too few sweeps: it does not find it: {seen:?}"
    );
    assert!(
        seen.overlaps.is_empty(),
        "the database volume was open in two instances at once: {:#?}",
        seen.overlaps
    );

    // Every acknowledged row is there.
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| !matches!(http(shop.web, "GET", &format!("/orders/{k}")), Ok((200, _))))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let total: u64 = shop
        .get("/orders")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        total as usize > acked.len(),
        "{total} rows for {} acknowledged + 1",
        acked.len()
    );

    // Backups ran before each database replacement, stored by digest.
    let backups: BTreeSet<String> = std::fs::read_dir(shop.path().join(".kiln/backups"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(!backups.is_empty(), "no backup stored under .kiln/backups");

    // Rollback to the first generation: first configs, today's data.
    let out = shop.ok(&["rollback", "1", "-C", "."]);
    assert!(out.contains("is active"), "{out}");
    wait_until("the first database config is back", || {
        (shop.get("/db/show?name=work_mem") == "4MB").then_some(())
    });
    let greeting = wait_until("the first greeting is back on every web instance", || {
        let answers: BTreeSet<String> = (0..6).map(|_| shop.get("/")).collect();
        answers
            .iter()
            .all(|g| g.starts_with("welcome to the shop from web-"))
            .then_some(answers)
    });
    assert!(!greeting.is_empty());
    let last = acked.last().expect("some writes");
    assert!(shop.get(&format!("/orders/{last}")).ends_with(" tea"));
    let after: u64 = shop
        .get("/orders")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(after, total, "the rollback lost rows");
}
