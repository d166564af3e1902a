//! Running a command to completion with a timeout and capped output: what
//! `Driver::exec` shares between the drivers that exec through a host
//! command (`nsenter`, the program itself, `runc exec`/`crun exec`).

use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::error::RuntimeError;
use crate::types::{EXEC_OUTPUT_CAP, ExecOutput};

/// Appends `data` to `buf` up to [`EXEC_OUTPUT_CAP`] bytes.
pub(crate) fn push_capped(buf: &mut Vec<u8>, data: &[u8]) {
    let room = EXEC_OUTPUT_CAP.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// `argv` as one line for messages.
/// Every driver refuses an empty command the same way.
pub(crate) fn ensure_command(id: &str, argv: &[String]) -> Result<(), RuntimeError> {
    if argv.is_empty() {
        return Err(RuntimeError::Setup {
            id: id.into(),
            what: "exec: the command is empty".into(),
            hint: "give a program to run".into(),
        });
    }
    Ok(())
}

pub(crate) fn display(argv: &[String]) -> String {
    argv.join(" ")
}

pub(crate) fn timed_out(id: &str, argv: &[String], timeout: Duration) -> RuntimeError {
    RuntimeError::ExecTimedOut {
        id: id.to_string(),
        command: display(argv),
        timeout,
    }
}

/// Drains a pipe on a thread, keeping the first [`EXEC_OUTPUT_CAP`] bytes;
/// reading on past the cap keeps the writer from blocking on a full pipe.
fn drain(
    pipe: Option<impl std::io::Read + Send + 'static>,
    done: mpsc::Sender<()>,
) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = Arc::clone(&buf);
    std::thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                push_capped(
                    &mut out.lock().unwrap_or_else(|e| e.into_inner()),
                    &chunk[..n],
                );
            }
        }
        let _ = done.send(());
    });
    buf
}

fn kill_group(child: &Child) {
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured, in its own
/// process group) for at most `timeout`. On timeout, `on_timeout` gets the
/// command's pid (to end what the command started outside its process
/// group, e.g. the process `runc exec` runs in the container), then the
/// group is killed and the error says so. Output still held open by a
/// background process after the command ends is collected until the
/// deadline, then that process group is killed.
pub(crate) fn run(
    id: &str,
    mut cmd: Command,
    argv: &[String],
    timeout: Duration,
    on_timeout: impl FnOnce(u32),
) -> Result<ExecOutput, RuntimeError> {
    let deadline = Instant::now() + timeout;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| RuntimeError::Io {
        id: id.to_string(),
        op: "spawn the exec command",
        source,
    })?;
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = drain(child.stdout.take(), done_tx.clone());
    let stderr = drain(child.stderr.take(), done_tx);
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                kill_group(&child);
                let _ = child.wait();
                return Err(RuntimeError::Io {
                    id: id.to_string(),
                    op: "wait for the exec command",
                    source,
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            on_timeout(child.id());
            kill_group(&child);
            let _ = child.kill();
            let _ = child.wait();
            return Err(timed_out(id, argv, timeout));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx
            .recv_timeout(left.max(Duration::from_millis(100)))
            .is_err()
        {
            kill_group(&child);
            break;
        }
    }
    let take =
        |b: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(ExecOutput {
        code: status.code(),
        signal: status.signal(),
        stdout: take(&stdout),
        stderr: take(&stderr),
    })
}

/// An executable's absolute path on the host `PATH` (commands run with the
/// instance's env, whose `PATH` is the image's, must be named absolutely).
pub(crate) fn host_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain([
            "/usr/bin".into(),
            "/bin".into(),
            "/usr/sbin".into(),
            "/sbin".into(),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> (Command, Vec<String>) {
        let argv: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(&argv[1..]);
        (cmd, argv)
    }

    #[test]
    fn output_code_and_signal() {
        let (cmd, argv) = sh("echo hi; echo err >&2; exit 7");
        let out = run("t", cmd, &argv, Duration::from_secs(60), |_| {}).unwrap();
        assert_eq!(out.code, Some(7));
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(!out.success());
        let (cmd, argv) = sh("kill -9 $$");
        let out = run("t", cmd, &argv, Duration::from_secs(60), |_| {}).unwrap();
        assert_eq!((out.code, out.signal), (None, Some(9)));
    }

    #[test]
    fn output_is_capped() {
        let (cmd, argv) = sh("head -c 200000 /dev/zero");
        let out = run("t", cmd, &argv, Duration::from_secs(60), |_| {}).unwrap();
        assert!(out.success());
        assert_eq!(out.stdout.len(), EXEC_OUTPUT_CAP);
    }

    #[test]
    fn timeout_kills_the_group() {
        let (cmd, argv) = sh("sleep 600 & sleep 600");
        let mut seen = None;
        let err = run("t", cmd, &argv, Duration::from_millis(200), |pid| {
            seen = Some(pid)
        })
        .unwrap_err();
        assert!(matches!(err, RuntimeError::ExecTimedOut { .. }), "{err}");
        assert!(err.to_string().contains("killed"), "{err}");
        let pid = seen.unwrap();
        // The whole group is gone (the background sleep included).
        let deadline = Instant::now() + Duration::from_secs(60);
        while rustix::process::test_kill_process_group(Pid::from_raw(pid as i32).unwrap()).is_ok() {
            assert!(Instant::now() < deadline, "the group of {pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
