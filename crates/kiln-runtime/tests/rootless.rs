//! The sandbox as an unprivileged user, for real: as root, this test runs
//! `examples/rootless-probe.rs` under `setpriv --reuid=65534 --regid=65534
//! --clear-groups` (user `nobody`), which selects the local driver and runs
//! one instance. Where the host allows unprivileged user namespaces the
//! instance must be isolated (own hostname, read-only `/`, no host pids)
//! and a declared memory limit refused; where it forbids them, the
//! selection must fall back to `process` with a warning that says why.
//! Needs root, setpriv and /bin/busybox: skipped loudly without them,
//! failed when KILN_STRICT_TESTS=true.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const NOBODY: u32 = 65534;

fn say(msg: &str) {
    let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
}

fn skip(why: &str) {
    if std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true") {
        panic!("KILN_STRICT_TESTS=true and the rootless test cannot run: {why}");
    }
    say(&format!("SKIPPED rootless: {why}"));
}

/// `target/<profile>/examples/rootless-probe`, (re)built here: `cargo test
/// --test rootless` alone does not build examples, and a stale probe would
/// test old code. A no-op when `cargo test` already built it.
fn probe_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "kiln-runtime",
            "--example",
            "rootless-probe",
        ])
        .args(["--profile", profile])
        .status()
        .unwrap();
    assert!(status.success(), "cannot build the rootless-probe example");
    profile_dir.join("examples/rootless-probe")
}

struct Run {
    out: String,
}

impl Run {
    fn get(&self, key: &str) -> Option<&str> {
        self.out
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Runs "$@" in a new user namespace (all ids mapped 1:1, so still root)
/// whose `user.max_user_namespaces` is 0: a host that forbids user
/// namespaces, without touching this host's own sysctl.
const FORBID: &str = r#"#!/bin/sh
cd "$(dirname "$0")"
rm -f go && mkfifo go
unshare --user sh -c 'read x < go; exec sh -c '\''echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'\'' sh "$@"' sh "$@" &
pid=$!
n=0
while [ "$(readlink /proc/$pid/ns/user)" = "$(readlink /proc/self/ns/user)" ]; do
  n=$((n+1)); [ $n -lt 1000 ] || exit 97; sleep 0.01
done
echo "0 0 4294967295" > /proc/$pid/uid_map
echo "0 0 4294967295" > /proc/$pid/gid_map
echo go > go
wait $pid
"#;

#[derive(Clone, Copy, PartialEq)]
enum Host {
    AsIs,
    /// Inside [`FORBID`].
    Forbidding,
}

fn as_nobody(dir: &Path, script: &str, memory: Option<u64>, host: Host) -> Run {
    let work = dir.join(format!("work-{}-{}", memory.is_some(), host == Host::AsIs));
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut cmd = match host {
        Host::AsIs => Command::new("setpriv"),
        Host::Forbidding => {
            std::fs::write(dir.join("forbid.sh"), FORBID).unwrap();
            let mut c = Command::new("sh");
            c.arg(dir.join("forbid.sh")).arg("setpriv");
            c
        }
    };
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(dir.join("rootless-probe"))
        .arg(dir.join("rootfs"))
        .arg(&work)
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    if let Some(m) = memory {
        cmd.env("PROBE_MEMORY_BYTES", m.to_string());
    }
    let output = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    say(&format!(
        "rootless-probe (uid {NOBODY}) said:\n{out}{}",
        String::from_utf8_lossy(&output.stderr)
    ));
    Run { out }
}

/// An independent oracle: may `nobody` create a user namespace at all?
fn userns_allowed_for_nobody() -> Option<bool> {
    let status = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["unshare", "--user", "true"])
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    Some(status.success())
}

/// The temp dir with the image root and the probe, readable by `nobody`.
fn prepare() -> Option<tempfile::TempDir> {
    if !rustix::process::geteuid().is_root() {
        skip("needs root (to run the probe as uid 65534)");
        return None;
    }
    for tool in ["setpriv", "unshare"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(&format!("needs {tool} (util-linux)"));
            return None;
        }
    }
    if !Path::new("/bin/busybox").exists() {
        skip("needs Debian's busybox-static (/bin/busybox)");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in [
        "sh", "hostname", "touch", "ls", "echo", "id", "grep", "tr", "sleep",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::copy(probe_binary(), dir.join("rootless-probe")).unwrap();
    Some(tmp)
}

/// The `process` fallback, and the warning that says so, why and what to do.
fn assert_fallback(run: &Run) {
    assert_eq!(run.get("driver"), Some("process"), "{}", run.out);
    let warning = run.get("warning").unwrap_or_default();
    assert!(
        warning.contains("NO ISOLATION")
            && warning.contains("uid 65534")
            && warning.contains("hint:"),
        "{warning}"
    );
    let isolation = run.get("isolation").unwrap_or_default();
    assert!(
        isolation.starts_with("process: NO isolation"),
        "{isolation}"
    );
    assert_eq!(
        run.get("state"),
        Some("Exited { code: Some(0), signal: None, oom: false }")
    );
}

/// Nothing left on the host: no mount under the temp dir.
fn assert_no_mounts(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*dir.to_string_lossy()), "{mounts}");
}

#[test]
fn rootless_sandbox_isolates_or_falls_back_loudly() {
    let Some(tmp) = prepare() else { return };
    let dir = tmp.path();

    let script = "echo host=$(hostname); echo ids=$(id -u):$(id -g); \
                  if touch /written 2>/dev/null; then echo root=writable; else echo root=read-only; fi; \
                  echo pids=$(ls /proc | grep '^[0-9]' | tr '\\n' ' ')";
    let run = as_nobody(dir, script, None, Host::AsIs);
    let driver = run.get("driver").expect("the probe names its driver");
    let warning = run.get("warning").unwrap_or_default();
    let isolation = run.get("isolation").unwrap_or_default();
    let oracle = userns_allowed_for_nobody();
    match driver {
        "sandbox" => {
            assert_ne!(
                oracle,
                Some(false),
                "sandbox chosen, but `unshare --user` fails"
            );
            assert!(
                isolation.starts_with("sandbox (rootless): user,mount,pid,uts,ipc")
                    && isolation.contains("no cgroup limits: not delegated"),
                "{isolation}"
            );
            assert!(warning.contains("no cgroup limits"), "{warning}");
            assert_eq!(
                run.get("state"),
                Some("Exited { code: Some(0), signal: None, oom: false }")
            );
            let host = rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned();
            assert_eq!(run.get("host"), Some("probe-0"));
            assert_ne!(run.get("host"), Some(host.as_str()));
            assert_eq!(run.get("ids"), Some("0:0"), "the caller is root inside");
            assert_eq!(run.get("root"), Some("read-only"));
            assert!(!dir.join("rootfs/written").exists());
            let pids: Vec<u32> = run
                .get("pids")
                .unwrap_or_default()
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
            assert!(
                pids.contains(&1) && pids.len() < 10,
                "host pids visible: {pids:?}"
            );
            assert!(!pids.contains(&std::process::id()) || std::process::id() < 10);
            // `exec` joins the instance's user, PID and UTS namespaces.
            assert_eq!(run.get("exec_code"), Some("Some(0)"), "{}", run.out);
            let exec = run.get("exec").unwrap_or_default();
            let fields: Vec<&str> = exec.split(':').collect();
            assert_eq!(fields[..2], ["probe-1", "0"], "{exec}");
            let n: usize = fields[2].parse().unwrap();
            assert!(n < 10, "exec sees host pids: {exec}");

            // A declared memory limit cannot be enforced: refused, clearly.
            let limited = as_nobody(dir, "true", Some(64 << 20), Host::AsIs);
            let error = limited.get("error").unwrap_or_default();
            assert!(
                error.contains("instance probe-0")
                    && error.contains("resource limits")
                    && error.contains("cgroups are not delegated"),
                "{}",
                limited.out
            );
        }
        "process" => {
            say(
                "NOTE rootless: this host forbids unprivileged user namespaces; checked the `process` fallback instead",
            );
            assert_ne!(
                oracle,
                Some(true),
                "`unshare --user` works for nobody, yet the sandbox was not chosen: {warning}"
            );
            assert_fallback(&run);
        }
        other => panic!("unexpected driver {other}: {}", run.out),
    }
    assert_no_mounts(dir);
}

/// The fallback for real, on any host: inside a user namespace whose
/// `user.max_user_namespaces` is 0, `nobody` gets `process` and a warning
/// naming that sysctl and how to change it.
#[test]
fn forbidden_user_namespaces_fall_back_loudly() {
    let Some(tmp) = prepare() else { return };
    let dir = tmp.path();
    let run = as_nobody(dir, "echo host=$(hostname)", None, Host::Forbidding);
    assert_fallback(&run);
    let warning = run.get("warning").unwrap_or_default();
    assert!(
        warning.contains("user.max_user_namespaces is 0")
            && warning.contains("sysctl -w user.max_user_namespaces="),
        "{warning}"
    );
    // Really unisolated: the host's hostname.
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    assert_eq!(run.get("host"), Some(host.as_str()));
    assert_no_mounts(dir);
}
