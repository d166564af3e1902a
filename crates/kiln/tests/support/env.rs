//! What the end-to-end tests of the `kiln` binary share: strict mode and
//! loud skips, the sandbox's requirements, the example's service binary,
//! and showing a command's output. Loaded by each test crate with
//! `#[path = "support/env.rs"] mod env;` (not every test crate uses all).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// `KILN_STRICT_TESTS=true` (CI): a missing dependency fails the test.
pub fn strict() -> bool {
    std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true")
}

/// Straight to fd 2: libtest captures `eprintln!` of passing tests.
pub fn say(msg: &str) {
    let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
}

/// Whether `test` may run: `why` is `Some` when it cannot. Fails in strict
/// mode, else skips loudly.
pub fn may_run(test: &str, why: Option<String>) -> bool {
    let Some(why) = why else { return true };
    assert!(
        !strict(),
        "KILN_STRICT_TESTS=true and {test} cannot run: {why} (scripts/test runs as root and starts dockerd)"
    );
    say(&format!(
        "\n!!!!! SKIPPED {test}: {why}; set KILN_STRICT_TESTS=true to make this a failure !!!!!\n"
    ));
    false
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// Why the sandbox driver cannot run here, if it cannot.
pub fn sandbox_unavailable() -> Option<String> {
    if !is_root() {
        return Some("not root: the sandbox driver needs root (run scripts/test as root)".into());
    }
    if !Path::new("/sys/fs/cgroup").is_dir() {
        return Some("no /sys/fs/cgroup: the sandbox driver needs cgroups".into());
    }
    None
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The example's service binary, built from the workspace (`hello`) next to
/// the kiln binary under test (same profile).
pub fn hello_binary() -> &'static Path {
    static HELLO: OnceLock<PathBuf> = OnceLock::new();
    HELLO.get_or_init(|| {
        let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
        let profile_dir = kiln.parent().expect("the kiln binary is in a directory");
        let hello = profile_dir.join("hello");
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", "hello"])
            .current_dir(repo())
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        match build.status() {
            Ok(s) if s.success() => {}
            other if hello.is_file() => say(&format!(
                "`cargo build -p hello` failed ({other:?}); using the existing {}",
                hello.display()
            )),
            other => panic!(
                "cannot build the example service (`cargo build -p hello`: {other:?}) and {} does not exist",
                hello.display()
            ),
        }
        assert!(hello.is_file(), "{} was not built", hello.display());
        hello
    })
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The `kiln` binary run in `dir`, without colour and without the
/// environment variables that would point it at another state, image store
/// or failpoint.
pub fn kiln_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("KILN_HOME")
        .env_remove("KILN_STATE_DIR")
        .env_remove("KILN_IMAGE_STORE")
        .env_remove("KILN_DRIFT_INTERVAL")
        .env_remove("KILN_FAILPOINT")
        .env_remove("KILN_FAILPOINTS")
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Polls `f` every 100 ms until it gives a value; fails after `limit`
/// naming `what`.
#[track_caller]
pub fn wait_until<T>(
    what: &str,
    limit: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `METHOD path` (no body) over a fresh connection with `Connection:
/// close`: the status and the body (de-chunked).
pub fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    http_to_host(addr, method, &addr.to_string(), path)
}

/// [`http`] with this `Host` header.
pub fn http_to_host(
    addr: std::net::SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10))
            .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(90)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let raw = text(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {raw:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
