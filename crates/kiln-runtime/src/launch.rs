//! Starting an instance: the only module with `unsafe` (fork, execve,
//! signal dispositions). Shared by the `process` and `sandbox` drivers.
//!
//! ## Design: a forked supervisor per instance
//! ```text
//! daemon ──fork──▶ S0 ──fork──▶ S (supervisor, setsid, reparented to init)
//!                  └─ exits        ├─[unshare(NEWPID)]─clone(VM)──▶ I (sandbox: init, PID 1)
//!                                  └─vfork──▶ C (PID 2 in the sandbox) ──execve──▶ program
//! ```
//! * **S** owns the instance: it waits for C, writes `<state>/<id>/exit`
//!   (`code N` / `signal N`) the moment C ends, and pumps C's stdout/stderr
//!   pipes into `stdout.log`/`stderr.log`, rotating at `log_max_bytes` to
//!   one `.1` file each. Because S is not the daemon's child (double fork),
//!   the instance, its logs and its exit status survive a restart (or a
//!   kill -9) of the daemon: a new driver adopts it from the state dir.
//! * **I** (sandbox only) is the init of the instance's new PID namespace
//!   (PID 1), like `docker --init`/tini: it creates the mount, UTS, IPC (and
//!   network) namespaces and builds the instance root in its private mount
//!   namespace (see [`setup_root`]), so no mount ever shows on the host and
//!   all of them vanish with the instance. Then it forwards SIGTERM, SIGINT,
//!   SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH to the program and reaps
//!   every child the kernel gives it (orphans), until S kills it. It shares
//!   S's memory (see [`spawn_init`], [`init_loop`]): no copy of the page
//!   tables, no exec. I stays outside the instance's cgroup.
//! * **C** is the instance's process-group leader (setsid) and the program:
//!   its pid is the one reported (`Launched::pid`). In the sandbox it is
//!   PID 2, S's child (so S waits for it and records its status exactly as
//!   for the `process` driver), joins I's namespaces (setns: its root
//!   becomes the instance's) and its cgroup. Not being PID 1, the program
//!   gets the kernel's default signal actions: SIGTERM ends a program
//!   without a handler. When C ends, S kills I (SIGKILL from outside the
//!   namespace), which kills what is left in the namespace; once I is
//!   reaped (so nothing is left) S records C's status.
//! * **Rootless** (`SandboxPlan::userns`): S first unshares a user
//!   namespace and waits; S0, still outside it, writes S's `setgroups`
//!   (deny), `uid_map` and `gid_map` (the caller's uid and gid as 0, single-id
//!   maps: all an unprivileged process may write) and lets S go on. S is then
//!   root in that namespace, which owns the PID, mount, UTS and IPC
//!   namespaces created next, so the rest is unchanged. [`probe_user_namespace`]
//!   tells beforehand whether the kernel allows it.
//! * Errors in C before execve are reported through a CLOEXEC pipe (step and
//!   errno); EOF on that pipe means execve succeeded.
//!
//! Rejected: a pipe read by a thread of the daemon (the instance would die
//! of SIGPIPE with the daemon); re-executing the kiln binary as the
//! supervisor (it needs an entry point in every binary that links the crate,
//! test binaries included); writing straight to the log files (no size
//! rotation, no exit status after a daemon restart).
//!
//! ## Limits of forking without exec
//! S and C run Rust code after `fork` in a multi-threaded process. glibc
//! resets its malloc locks in the child, so allocation is safe; std's global
//! locks (stdout, stderr, env) are never touched there. S and C never return
//! into the caller's stack: every path ends in `_exit`. A panic in them is
//! caught and turned into an exit. C is started vfork-style (see
//! [`spawn_child`]): it shares S's memory until execve while S, which is
//! single-threaded, is suspended, so nothing else touches that memory.
//! I shares S's memory for good (`CLONE_VM` without `CLONE_VFORK`): S waits,
//! blocked on a pipe, while I sets up (and may allocate); afterwards I runs
//! only raw system calls (rustix's linux_raw backend: no errno, which lives
//! in the TLS it shares with S; no allocation, no lock) on its own stack,
//! and S makes their memory not dumpable before anything of the instance
//! runs (nothing inside may ptrace I, or read S's memory through it).

#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Pid, WaitOptions};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};

/// Everything the child needs, prepared (and checked) before forking.
#[derive(Debug)]
pub struct Plan {
    /// The path given to execve, as the child sees it after its setup.
    pub exec: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// The working directory as the child sees it.
    pub workdir: PathBuf,
    pub user: Option<(u32, u32)>,
    pub sandbox: Option<SandboxPlan>,
    pub cgroup_procs: Vec<File>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub log_max_bytes: u64,
    pub exit_file: PathBuf,
}

#[derive(Debug)]
pub struct SandboxPlan {
    /// Empty host directory on which the instance's root is assembled, in
    /// I's private mount namespace only (so instances may share it).
    pub root: PathBuf,
    /// The shared image root (never written).
    pub image: PathBuf,
    /// The image root's top-level entries.
    pub entries: Vec<(OsString, Entry)>,
    pub mounts: Vec<MountOp>,
    pub hostname: String,
    pub private_network: bool,
    pub keep_caps: CapabilitySet,
    /// Rootless mode: the host `(uid, gid)` mapped to 0 inside a new user
    /// namespace that S creates before the others (see [`launch`]).
    pub userns: Option<(u32, u32)>,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Dir,
    File,
    Symlink(PathBuf),
}

/// A bind mount into the instance root; `create` lists mount points to
/// make first (only ever inside the instance's own tmpfs root).
#[derive(Debug)]
pub struct MountOp {
    pub source: PathBuf,
    /// Relative to the instance root.
    pub target: PathBuf,
    pub read_only: bool,
    pub create: Vec<(PathBuf, bool)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Launched {
    pub pid: u32,
    pub supervisor: u32,
}

#[derive(Debug)]
pub struct LaunchError {
    pub step: &'static str,
    pub error: std::io::Error,
}

const STEPS: &[&str] = &[
    "start the supervisor",
    "create the PID namespace",
    "fork the instance",
    "create the session",
    "join the cgroup",
    "create the namespaces",
    "set the hostname",
    "make mounts private",
    "mount the instance root",
    "mount the image root read-only",
    "mount /proc",
    "mount /dev",
    "mount /tmp and /run",
    "mount a volume or file",
    "make the root read-only",
    "pivot_root",
    "redirect stdio",
    "change to the working directory",
    "drop capabilities",
    "switch user",
    "set no_new_privs",
    "execve",
    "create the user namespace",
    "map the user namespace",
    "start the init",
    "join the namespaces",
];

fn step(name: &str) -> u32 {
    STEPS.iter().position(|s| *s == name).unwrap_or(0) as u32
}

type StepResult<T = ()> = Result<T, (u32, rustix::io::Errno)>;

trait At<T> {
    fn at(self, name: &str) -> StepResult<T>;
}
impl<T> At<T> for rustix::io::Result<T> {
    fn at(self, name: &str) -> StepResult<T> {
        self.map_err(|e| (step(name), e))
    }
}

const TAG_SUPERVISOR: u32 = 1;
const TAG_CHILD: u32 = 2;
const TAG_ERROR: u32 = 3;

fn send(fd: &OwnedFd, tag: u32, a: u32, b: i32) {
    let mut msg = [0u8; 12];
    msg[..4].copy_from_slice(&tag.to_ne_bytes());
    msg[4..8].copy_from_slice(&a.to_ne_bytes());
    msg[8..].copy_from_slice(&b.to_ne_bytes());
    let _ = rustix::io::write(fd, &msg);
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Starts the instance described by `plan`; returns once the program was
/// executed (or failed to be).
pub fn launch(plan: &Plan) -> Result<Launched, LaunchError> {
    let io = |step: &'static str| move |error| LaunchError { step, error };
    let stdin = File::open("/dev/null").map_err(io("open /dev/null"))?;
    let out = open_append(&plan.stdout).map_err(io("open stdout.log"))?;
    let err = open_append(&plan.stderr).map_err(io("open stderr.log"))?;
    let (rd, wr) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| LaunchError {
            step: "create a pipe",
            error: e.into(),
        })?;
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let ptrs = (argv.as_ptr(), envp.as_ptr());
    let userns = plan.sandbox.as_ref().and_then(|sb| sb.userns);
    // Rootless: S unshares its user namespace and says so on `ready`; S0,
    // its parent, still outside, writes the id maps and answers on `go`.
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| LaunchError {
            step: "create a pipe",
            error: e.into(),
        })
    };
    let sync = match userns {
        Some(_) => Some((pipe()?, pipe()?)),
        None => None,
    };

    // SAFETY: the child only runs `intermediate`, which forks once more and
    // `_exit`s; see the module docs for what the grandchild may do.
    let s0 = unsafe { libc::fork() };
    if s0 == 0 {
        let s = {
            // SAFETY: as above; S runs `supervise`, which never returns.
            unsafe { libc::fork() }
        };
        if s == 0 {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(((ready_r, ready_w), (go_r, go_w))) = &sync {
                    drop_raw(&[ready_r, go_w]);
                    enter_user_namespace(&wr, ready_w, go_r);
                }
                supervise(plan, &wr, &stdin, &out, &err, ptrs)
            }));
        }
        if let (Some(((ready_r, ready_w), (go_r, go_w))), Some(ids)) = (&sync, userns) {
            drop_raw(&[ready_w, go_r]);
            if s > 0 {
                map_user_namespace(&wr, s, ids, ready_r, go_w);
            }
        }
        // SAFETY: `_exit` ends the process without running the parent's
        // destructors or atexit handlers, which belong to the daemon.
        unsafe { libc::_exit(i32::from(s < 0)) }
    }
    drop(wr);
    drop(sync);
    if s0 < 0 {
        return Err(LaunchError {
            step: STEPS[0],
            error: std::io::Error::last_os_error(),
        });
    }
    // EOF once C has executed the program (or failed) and S and S0 closed
    // their copies; S0 has ended (or is ending) by then: reaping it after
    // saves the daemon one sleep and wake-up on the way.
    let mut bytes = vec![];
    let mut file = File::from(rd);
    let _ = std::io::Read::read_to_end(&mut file, &mut bytes);
    if let Some(pid) = Pid::from_raw(s0) {
        let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
    }
    let (mut supervisor, mut pid, mut error) = (None, None, None);
    for msg in bytes.chunks_exact(12) {
        let word = |i: usize| u32::from_ne_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
        match word(0) {
            TAG_SUPERVISOR => supervisor = Some(word(4)),
            TAG_CHILD => pid = Some(word(4)),
            TAG_ERROR => error = Some((word(4), word(8) as i32)),
            _ => {}
        }
    }
    match (error, pid, supervisor) {
        (Some((s, errno)), _, _) => Err(LaunchError {
            step: STEPS.get(s as usize).copied().unwrap_or("start"),
            error: std::io::Error::from_raw_os_error(errno),
        }),
        (None, Some(pid), Some(supervisor)) => Ok(Launched { pid, supervisor }),
        _ => Err(LaunchError {
            step: STEPS[0],
            error: std::io::Error::other("the supervisor ended without starting the instance"),
        }),
    }
}

/// Closes every descriptor but `keep`: the daemon's other descriptors
/// (including other launches' status pipes) must not live on in S.
fn close_all_except(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut lo: u32 = 0;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > lo {
            // SAFETY: close_range only closes descriptors; the ones closed
            // are owned by objects S will never use or drop.
            unsafe { libc::syscall(libc::SYS_close_range, lo, fd - 1, 0) };
        }
        lo = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0) };
}

/// Closes descriptors that this side of a fork does not use; the
/// `OwnedFd`s are never dropped on this side (it ends in `_exit`).
fn drop_raw(fds: &[&OwnedFd]) {
    for fd in fds {
        // SAFETY: closes this process's copy only; the owner is never
        // used or dropped again here (every path ends in `_exit`).
        unsafe { libc::close(fd.as_raw_fd()) };
    }
}

/// S, rootless: a new user namespace, mapped by S0 (see [`map_user_namespace`]).
/// If unshare fails S reports it; if S0 fails to map, S0 reports it and S
/// sees EOF on `go`: either way S ends before anything else is set up.
fn enter_user_namespace(wr: &OwnedFd, ready: &OwnedFd, go: &OwnedFd) {
    // SAFETY: S is single-threaded; NEWUSER affects only itself.
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) } {
        send(
            wr,
            TAG_ERROR,
            step("create the user namespace"),
            e.raw_os_error(),
        );
        // SAFETY: see `launch`.
        unsafe { libc::_exit(127) }
    }
    let _ = rustix::io::write(ready, b"u");
    let mut b = [0u8; 1];
    if !matches!(rustix::io::read(go, &mut b), Ok(1)) {
        // SAFETY: see `launch`.
        unsafe { libc::_exit(127) }
    }
}

/// S0, rootless: maps the caller's `(uid, gid)` to 0:0 in S's new user
/// namespace (single-id maps, which an unprivileged process may write for
/// its own ids once `setgroups` is denied), then lets S go on.
fn map_user_namespace(wr: &OwnedFd, s: i32, (uid, gid): (u32, u32), ready: &OwnedFd, go: &OwnedFd) {
    let mut b = [0u8; 1];
    if !matches!(rustix::io::read(ready, &mut b), Ok(1)) {
        return; // S failed and reported it.
    }
    let proc = PathBuf::from(format!("/proc/{s}"));
    let result = std::fs::write(proc.join("setgroups"), "deny")
        .and_then(|()| std::fs::write(proc.join("uid_map"), format!("0 {uid} 1\n")))
        .and_then(|()| std::fs::write(proc.join("gid_map"), format!("0 {gid} 1\n")));
    match result {
        Ok(()) => {
            let _ = rustix::io::write(go, b"g");
        }
        Err(e) => send(
            wr,
            TAG_ERROR,
            step("map the user namespace"),
            e.raw_os_error().unwrap_or(libc::EPERM),
        ),
    }
}

/// Whether this process may create a user namespace: tried for real in a
/// forked child (a multi-threaded process cannot unshare NEWUSER itself).
/// `Err` carries the errno the kernel answered.
pub fn probe_user_namespace() -> Result<(), std::io::Error> {
    // SAFETY: the child only calls unshare and `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; the child is single-threaded.
        let code = match unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) } {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().clamp(1, 255),
        };
        // SAFETY: see `launch`.
        unsafe { libc::_exit(code) }
    }
    let pid = Pid::from_raw(pid).ok_or_else(std::io::Error::last_os_error)?;
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(status) => {
                return match status.and_then(|(_, s)| s.exit_status()) {
                    Some(0) => Ok(()),
                    Some(n) => Err(std::io::Error::from_raw_os_error(n)),
                    None => Err(std::io::Error::other("the probe process was killed")),
                };
            }
        }
    }
}

type Ptrs = (*const *const libc::c_char, *const *const libc::c_char);

fn supervise(plan: &Plan, wr: &OwnedFd, stdin: &File, out: &File, err: &File, ptrs: Ptrs) -> ! {
    let mut keep = vec![
        wr.as_raw_fd(),
        stdin.as_raw_fd(),
        out.as_raw_fd(),
        err.as_raw_fd(),
    ];
    keep.extend(plan.cgroup_procs.iter().map(|f| f.as_raw_fd()));
    close_all_except(&mut keep);
    // Descriptors 0-2 must stay taken: a pipe landing on 1 would make C's
    // dup2(1, 1) a no-op that keeps CLOEXEC, and its stdout would vanish.
    for _ in 0..3 {
        if let Ok(fd) = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR,
            rustix::fs::Mode::empty(),
        ) {
            std::mem::forget(fd);
        }
    }
    // SAFETY: resetting a disposition; S waits for C and needs SIGCHLD's
    // default (a daemon may have set it to SIG_IGN, which discards statuses).
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let _ = rustix::process::setsid();
    send(
        wr,
        TAG_SUPERVISOR,
        rustix::process::getpid().as_raw_nonzero().get() as u32,
        0,
    );
    let fail = |s: &str, e: rustix::io::Errno| -> ! {
        send(wr, TAG_ERROR, step(s), e.raw_os_error());
        // SAFETY: see `launch`.
        unsafe { libc::_exit(127) }
    };
    let pipes = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).and_then(|a| {
        Ok((
            a,
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?,
        ))
    });
    let ((out_r, out_w), (err_r, err_w)) = match pipes {
        Ok(p) => p,
        Err(e) => fail("start the supervisor", e),
    };
    let mut init = None;
    let mut join = vec![];
    if let Some(sb) = &plan.sandbox {
        // SAFETY: NEWPID only affects the children S forks from now on.
        if let Err(e) = unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) } {
            fail("create the PID namespace", e);
        }
        let i = match spawn_init(sb, wr) {
            Ok(i) => i,
            Err((None, e)) => fail("start the init", e),
            // I reported its error; its status is the instance's.
            Err((Some(i), _)) => {
                end_init(plan, Some(i), None);
                // SAFETY: see `launch`.
                unsafe { libc::_exit(0) }
            }
        };
        init = Some(i);
        let mut names = vec!["uts", "ipc"];
        if sb.private_network {
            names.push("net");
        }
        names.push("mnt");
        for ns in names {
            let path = format!("/proc/{}/ns/{ns}", i.as_raw_nonzero());
            match rustix::fs::open(
                path.as_str(),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            ) {
                Ok(fd) => join.push(fd),
                Err(e) => {
                    send(wr, TAG_ERROR, step("join the namespaces"), e.raw_os_error());
                    end_init(plan, init, None);
                    // SAFETY: see `launch`.
                    unsafe { libc::_exit(127) }
                }
            }
        }
        // Not dumpable (this memory is I's too): nothing in the instance may
        // ptrace I or read its memory. Only now: it also closes I's
        // /proc/PID/ns to S in rootless mode. No instance process exists yet.
        let nd = rustix::process::DumpableBehavior::NotDumpable;
        if let Err(e) = rustix::process::set_dumpable_behavior(nd) {
            send(wr, TAG_ERROR, step("start the init"), e.raw_os_error());
            end_init(plan, init, None);
            // SAFETY: see `launch`.
            unsafe { libc::_exit(127) }
        }
    }
    let c = spawn_child(&ChildArgs {
        plan,
        stdin,
        out: &out_w,
        err: &err_w,
        wr,
        join: &join,
        ptrs,
    });
    if c < 0 {
        let e = rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
            .unwrap_or(rustix::io::Errno::AGAIN);
        send(wr, TAG_ERROR, step("fork the instance"), e.raw_os_error());
        end_init(plan, init, None);
        // SAFETY: see `launch`.
        unsafe { libc::_exit(127) }
    }
    drop((out_w, err_w, join));
    send(wr, TAG_CHILD, c as u32, 0);
    // SAFETY: closing our copy of the status pipe: C keeps its own until
    // execve; the daemon reads until both are closed. `wr` is not used again.
    unsafe { libc::close(wr.as_raw_fd()) };
    pump(plan, c, init, out_r, err_r, out, err);
    // SAFETY: see `launch`.
    unsafe { libc::_exit(0) }
}

/// Writes the instance's exit status to `plan.exit_file` (atomically).
fn record_exit(plan: &Plan, status: rustix::process::WaitStatus) {
    let text = match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => format!("code {code}\n"),
        (_, Some(sig)) => format!("signal {sig}\n"),
        _ => "unknown\n".to_string(),
    };
    let mut tmp = plan.exit_file.as_os_str().to_owned();
    tmp.push(".tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &plan.exit_file);
    }
}

/// Ends the sandbox's init I (SIGKILL from outside its namespace, which
/// the kernel always delivers; its exit kills whatever is left in the
/// namespace and completes only once all of it is gone), reaps it, then
/// records `status` (C's), or I's own status when C never ran.
fn end_init(plan: &Plan, init: Option<Pid>, status: Option<rustix::process::WaitStatus>) {
    let mut own = None;
    if let Some(i) = init {
        let _ = rustix::process::kill_process(i, rustix::process::Signal::KILL);
        loop {
            match rustix::process::waitpid(Some(i), WaitOptions::empty()) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(s) => own = s.map(|(_, s)| s),
                Err(_) => {}
            }
            break;
        }
    }
    if let Some(s) = status.or(own) {
        record_exit(plan, s);
    }
}

/// The signals I forwards to the program (as `tini` does); the others sent
/// to it are dropped (the kernel's rule for a namespace's PID 1).
const FORWARDED: [(i32, rustix::process::Signal); 7] = [
    (libc::SIGTERM, rustix::process::Signal::TERM),
    (libc::SIGINT, rustix::process::Signal::INT),
    (libc::SIGHUP, rustix::process::Signal::HUP),
    (libc::SIGQUIT, rustix::process::Signal::QUIT),
    (libc::SIGUSR1, rustix::process::Signal::USR1),
    (libc::SIGUSR2, rustix::process::Signal::USR2),
    (libc::SIGWINCH, rustix::process::Signal::WINCH),
];

/// C's pid inside the namespace: the second process S starts in it, after I.
const PROGRAM_IN_NAMESPACE: i32 = 2;

/// What I needs until it is ready, on S's stack (S waits meanwhile).
struct InitArgs<'a> {
    sb: &'a SandboxPlan,
    wr: &'a OwnedFd,
    ready: &'a OwnedFd,
}

/// Starts I, the sandbox's init (PID 1 of the new PID namespace), as a
/// `CLONE_VM` child of S on a stack of its own *without* `CLONE_VFORK`: it
/// shares S's memory for good (no copy of the page tables, nothing to tear
/// down), so S waits, blocked on `ready`, while I sets up (which may
/// allocate, as C does); once I says it is ready it only makes raw system
/// calls on its own stack (see [`init_loop`]). The stack is never unmapped:
/// S ends soon after I. Returns I's pid; or `(Some(I), _)` when I failed
/// (and reported why on `wr`), `(None, errno)` when it could not start.
fn spawn_init(sb: &SandboxPlan, wr: &OwnedFd) -> Result<Pid, (Option<Pid>, rustix::io::Errno)> {
    let errno = || {
        rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
            .unwrap_or(rustix::io::Errno::AGAIN)
    };
    let (ready_r, ready_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| (None, e))?;
    // SAFETY: a fresh private anonymous mapping, I's for its lifetime.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            CHILD_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err((None, errno()));
    }
    // SAFETY: the lowest page of the mapping above becomes the guard page.
    unsafe { libc::mprotect(stack, 4096, libc::PROT_NONE) };
    let args = InitArgs {
        sb,
        wr,
        ready: &ready_w,
    };
    // SAFETY: `init_entry` runs on the new stack (its top, 16-byte aligned);
    // it reads `args` only until it writes to `ready` or ends, while S is
    // blocked below and `args` is alive.
    let i = unsafe {
        libc::clone(
            init_entry,
            stack.cast::<u8>().add(CHILD_STACK).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            std::ptr::from_ref(&args).cast_mut().cast(),
        )
    };
    if i < 0 {
        let e = errno();
        // SAFETY: no process runs on this stack.
        unsafe { libc::munmap(stack, CHILD_STACK) };
        return Err((None, e));
    }
    // Only system calls on S's own stack until I is ready.
    drop(ready_w);
    let mut b = [0u8; 1];
    let ready = loop {
        match rustix::io::read(&ready_r, &mut b) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break matches!(r, Ok(1)),
        }
    };
    match Pid::from_raw(i) {
        Some(pid) if ready => Ok(pid),
        pid => Err((pid, rustix::io::Errno::CHILD)),
    }
}

/// I's entry point (see [`spawn_init`]): sets up, says it is ready, then
/// runs [`init_loop`] until S kills it; `_exit`s on failure.
extern "C" fn init_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `InitArgs` that `spawn_init` was given, alive
    // until I writes to `ready` or ends.
    let a = unsafe { &*arg.cast::<InitArgs<'_>>() };
    let (wr, ready) = (a.wr.as_raw_fd(), a.ready.as_raw_fd());
    let setup =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| init_setup(a.sb, wr, ready)));
    match setup {
        Ok(Ok(sfd)) => {
            // SAFETY: `ready` is I's own copy, open until closed here.
            let _ = rustix::io::write(unsafe { BorrowedFd::borrow_raw(ready) }, b"r");
            // From here S runs again in this memory: `a` is gone.
            // SAFETY: I's own copies, never used again.
            unsafe {
                rustix::io::close(ready);
                rustix::io::close(wr);
            }
            init_loop(sfd)
        }
        Ok(Err((s, e))) => send(a.wr, TAG_ERROR, s, e.raw_os_error()),
        Err(_) => {}
    }
    // SAFETY: see `launch`.
    unsafe { libc::_exit(127) }
}

/// I before it is ready (S waits): its own session, killed if S ends (so it
/// never outlives its supervisor; S then makes their shared memory not
/// dumpable, see [`supervise`]), the instance's
/// namespaces and root, and a signalfd for [`FORWARDED`] and SIGCHLD,
/// blocked (blocked signals reach a namespace's init even without a
/// handler). Closes every descriptor but `wr`, `ready` and the signalfd.
fn init_setup(sb: &SandboxPlan, wr: RawFd, ready: RawFd) -> StepResult<RawFd> {
    rustix::process::setsid().at("start the init")?;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .at("start the init")?;
    let _ = rustix::thread::set_name(c"kiln-init");
    let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    if sb.private_network {
        flags |= UnshareFlags::NEWNET;
    }
    // SAFETY: I is single-threaded; unsharing affects only itself.
    unsafe { rustix::thread::unshare_unsafe(flags) }.at("create the namespaces")?;
    rustix::system::sethostname(sb.hostname.as_bytes()).at("set the hostname")?;
    setup_root(sb)?;
    // SAFETY: a signal set on I's stack; blocking signals and creating a
    // signalfd only affect I.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for (sig, _) in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if sfd < 0 {
        return Err((
            step("start the init"),
            rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
                .unwrap_or(rustix::io::Errno::INVAL),
        ));
    }
    close_all_except(&mut [sfd, wr, ready]);
    Ok(sfd)
}

/// I once ready, sharing S's memory while S runs: only raw system calls
/// (rustix's linux_raw backend: no errno, no allocation, no lock) on I's own
/// stack. Forwards [`FORWARDED`] signals to the program (pid 2 in the
/// namespace) and reaps every child (the orphans the kernel gives a
/// namespace's init). S, which waits for the program, kills I when the
/// program has ended.
fn init_loop(sfd: RawFd) -> ! {
    // SAFETY: I's own signalfd, never closed.
    let fd = unsafe { BorrowedFd::borrow_raw(sfd) };
    let program = Pid::from_raw(PROGRAM_IN_NAMESPACE);
    // A `struct signalfd_siginfo`; `ssi_signo` first.
    let mut info = [0u8; 128];
    loop {
        if !matches!(rustix::io::read(fd, &mut info), Ok(128)) {
            continue;
        }
        let signo = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        if signo == libc::SIGCHLD {
            while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {}
        } else if let (Some(pid), Some((_, sig))) =
            (program, FORWARDED.iter().find(|(n, _)| *n == signo))
        {
            let _ = rustix::process::kill_process(pid, *sig);
        }
    }
}

/// What C needs, on S's stack (S is suspended while C uses it).
struct ChildArgs<'a> {
    plan: &'a Plan,
    stdin: &'a File,
    out: &'a OwnedFd,
    err: &'a OwnedFd,
    wr: &'a OwnedFd,
    /// Sandbox: the init's namespaces, for C to join.
    join: &'a [OwnedFd],
    ptrs: Ptrs,
}

/// Size of C's stack until execve (with a guard page at its low end).
const CHILD_STACK: usize = 1 << 20;

/// Starts C as a `vfork`-style child of S (CLONE_VM | CLONE_VFORK, on a
/// stack of its own, like glibc's `posix_spawn`): C shares S's memory until
/// it executes the program, so S's address space (a copy of the daemon's)
/// is neither copied for C by the kernel nor torn down again by its
/// execve; S stays suspended until then. C still gets its own descriptors,
/// filesystem context, namespaces, credentials and signal dispositions (no
/// CLONE_FILES, CLONE_FS, CLONE_SIGHAND). Returns C's pid, or -1 (errno set).
fn spawn_child(args: &ChildArgs<'_>) -> i32 {
    // SAFETY: a fresh private anonymous mapping, owned here until munmap.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            CHILD_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return -1;
    }
    // SAFETY: the lowest page of the mapping above becomes the guard page.
    unsafe { libc::mprotect(stack, 4096, libc::PROT_NONE) };
    // SAFETY: `child_entry` runs on the new stack (its top, 16-byte aligned)
    // and only reads `args`, which outlives it: with CLONE_VFORK, clone
    // returns here only once C has executed the program or ended.
    let c = unsafe {
        libc::clone(
            child_entry,
            stack.cast::<u8>().add(CHILD_STACK).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(args).cast_mut().cast(),
        )
    };
    let errno = std::io::Error::last_os_error();
    // SAFETY: C no longer runs on this stack (see above).
    unsafe { libc::munmap(stack, CHILD_STACK) };
    if c < 0 {
        // SAFETY: restores the errno of clone for the caller.
        unsafe { *libc::__errno_location() = errno.raw_os_error().unwrap_or(libc::EAGAIN) };
    }
    c
}

/// C's entry point (see [`spawn_child`]): ends in execve or `_exit`.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `spawn_child` was given, alive
    // while S is suspended.
    let a = unsafe { &*arg.cast::<ChildArgs<'_>>() };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Err((s, e)) = child(a.plan, a.stdin, a.out, a.err, a.join, a.ptrs);
        send(a.wr, TAG_ERROR, s, e.raw_os_error());
    }));
    // SAFETY: see `launch`.
    unsafe { libc::_exit(127) }
}

/// A log file rotated to `<name>.1` so that neither exceeds `max` bytes.
struct Log<'a> {
    path: &'a Path,
    file: File,
    size: u64,
    max: u64,
}

impl Log<'_> {
    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.size >= self.max {
                let mut old = self.path.as_os_str().to_owned();
                old.push(".1");
                let _ = std::fs::rename(self.path, &old);
                match open_append(self.path) {
                    Ok(f) => self.file = f,
                    Err(_) => return,
                }
                self.size = 0;
            }
            let n = data.len().min((self.max - self.size) as usize);
            if self.file.write_all(&data[..n]).is_err() {
                return;
            }
            self.size += n as u64;
            data = &data[n..];
        }
    }
}

fn pump(
    plan: &Plan,
    c: i32,
    init: Option<Pid>,
    out_r: OwnedFd,
    err_r: OwnedFd,
    out: &File,
    err: &File,
) {
    let max = plan.log_max_bytes.max(1);
    let log = |path, file: &File| {
        let file = file.try_clone().ok()?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Some(Log {
            path,
            file,
            size,
            max,
        })
    };
    let pid = Pid::from_raw(c);
    let mut exited: Option<Instant> = None;
    let mut buf = vec![0u8; 1 << 16];
    // The instance has ended once C has and, in the sandbox, with it the
    // init and whatever was left in the namespace.
    let record = |status| end_init(plan, init, Some(status));
    let (Some(lo), Some(le)) = (log(&plan.stdout, out), log(&plan.stderr, err)) else {
        // Without its log files S still owes the exit status.
        if let Ok(Some((_, status))) = rustix::process::waitpid(pid, WaitOptions::empty()) {
            record(status);
        }
        return;
    };
    let mut logs = [lo, le];
    let mut fds = [Some(out_r), Some(err_r)];
    // C's exit wakes the poll below through a pidfd, so an idle instance
    // costs its supervisor no wake-ups (without pidfds: every 100 ms).
    let exit_fd =
        pid.and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    loop {
        if exited.is_none() {
            match rustix::process::waitpid(pid, WaitOptions::NOHANG) {
                Ok(Some((_, status))) => {
                    // What the program wrote is in the pipes already: in
                    // the logs before its exit is visible.
                    drain(&mut fds, &mut logs, &mut buf);
                    record(status);
                    exited = Some(Instant::now());
                }
                Ok(None) => {}
                Err(rustix::io::Errno::INTR) => continue,
                // ECHILD: nothing left to wait for (cannot happen: C is ours).
                Err(_) => exited = Some(Instant::now()),
            }
        }
        let open: Vec<usize> = (0..2).filter(|i| fds[*i].is_some()).collect();
        // Output left by stragglers holding the pipes open is not waited
        // for long once the instance's process is gone.
        if open.is_empty() || exited.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            if exited.is_some() {
                return;
            }
            // Both pipes closed: only the exit is left to wait for.
            match rustix::process::waitpid(pid, WaitOptions::empty()) {
                Ok(Some((_, status))) => {
                    record(status);
                    exited = Some(Instant::now());
                }
                Err(rustix::io::Errno::INTR) | Ok(None) => {}
                Err(_) => exited = Some(Instant::now()),
            }
            continue;
        }
        let mut pfds: Vec<rustix::event::PollFd<'_>> = open
            .iter()
            .filter_map(|i| fds[*i].as_ref())
            .map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN))
            .collect();
        let watch_exit = exited.is_none() && exit_fd.is_some();
        if watch_exit && let Some(fd) = exit_fd.as_ref() {
            pfds.push(rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN));
        }
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // Block until output or C's exit; poll every 100 ms only without a
        // pidfd, or while stragglers hold the pipes after the exit.
        let wait = if watch_exit { None } else { Some(&timeout) };
        if rustix::event::poll(&mut pfds, wait).unwrap_or(0) == 0 {
            continue;
        }
        let ready: Vec<bool> = pfds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(pfds);
        for (k, i) in open.into_iter().enumerate() {
            if !ready[k] {
                continue;
            }
            let Some(fd) = fds[i].as_ref() else { continue };
            match rustix::io::read(fd, &mut buf) {
                Ok(0) => fds[i] = None,
                Ok(n) => logs[i].write(&buf[..n]),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => fds[i] = None,
            }
        }
    }
}

/// Reads what is already in the log pipes (never blocks; bounded, should
/// a straggler keep writing).
fn drain(fds: &mut [Option<OwnedFd>; 2], logs: &mut [Log<'_>; 2], buf: &mut [u8]) {
    for i in 0..2 {
        for _ in 0..64 {
            let Some(fd) = fds[i].as_ref() else { break };
            let mut pfd = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut pfd, Some(&zero)).unwrap_or(0) == 0 {
                break;
            }
            match rustix::io::read(fd, &mut *buf) {
                Ok(0) => fds[i] = None,
                Ok(n) => logs[i].write(&buf[..n]),
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => fds[i] = None,
            }
        }
    }
}

/// C: from fork to execve. Returns only on failure.
fn child(
    plan: &Plan,
    stdin: &File,
    out: &OwnedFd,
    err: &OwnedFd,
    join: &[OwnedFd],
    ptrs: Ptrs,
) -> StepResult<std::convert::Infallible> {
    rustix::process::setsid().at("create the session")?;
    for f in &plan.cgroup_procs {
        rustix::io::write(f, b"0").at("join the cgroup")?;
    }
    // Sandbox: the init's namespaces (mount last: its root becomes ours).
    for fd in join {
        rustix::thread::move_into_link_name_space(fd.as_fd(), None).at("join the namespaces")?;
    }
    rustix::stdio::dup2_stdin(stdin.as_fd()).at("redirect stdio")?;
    rustix::stdio::dup2_stdout(out.as_fd()).at("redirect stdio")?;
    rustix::stdio::dup2_stderr(err.as_fd()).at("redirect stdio")?;
    rustix::process::chdir(&plan.workdir).at("change to the working directory")?;
    if let Some(sb) = &plan.sandbox {
        // Dropping a capability already out of the set succeeds: one call
        // per capability, EINVAL past the kernel's last one.
        for bit in 0..64 {
            let cap = CapabilitySet::from_bits_retain(1 << bit);
            if sb.keep_caps.contains(cap) {
                continue;
            }
            match rustix::thread::remove_capability_from_bounding_set(cap) {
                Ok(()) => {}
                Err(rustix::io::Errno::INVAL) => break,
                // Without CAP_SETPCAP only a capability still in the set
                // is an error.
                Err(e) => {
                    if rustix::thread::capability_is_in_bounding_set(cap).unwrap_or(true) {
                        return Err((step("drop capabilities"), e));
                    }
                }
            }
        }
    }
    if let Some((uid, gid)) = plan.user {
        let (u, g) = (
            rustix::process::Uid::from_raw(uid),
            rustix::process::Gid::from_raw(gid),
        );
        rustix::thread::set_thread_groups(&[g]).at("switch user")?;
        rustix::thread::set_thread_res_gid(g, g, g).at("switch user")?;
        rustix::thread::set_thread_res_uid(u, u, u).at("switch user")?;
    }
    if let Some(sb) = &plan.sandbox {
        if rustix::process::geteuid().is_root() {
            let keep = sb.keep_caps;
            let sets = CapabilitySets {
                effective: keep,
                permitted: keep,
                inheritable: CapabilitySet::empty(),
            };
            rustix::thread::set_capabilities(None, sets).at("drop capabilities")?;
        }
        rustix::thread::clear_ambient_capability_set().at("drop capabilities")?;
    }
    rustix::thread::set_no_new_privs(true).at("set no_new_privs")?;
    // SAFETY: restoring default dispositions and an empty mask for the
    // program (Rust ignores SIGPIPE; ignored signals survive execve).
    unsafe {
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    // SAFETY: `exec`, `argv` and `envp` are NUL-terminated strings and
    // null-terminated arrays built before the fork and still owned by `plan`.
    unsafe { libc::execve(plan.exec.as_ptr(), ptrs.0, ptrs.1) };
    Err((
        step("execve"),
        rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
            .unwrap_or(rustix::io::Errno::NOEXEC),
    ))
}

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Builds the instance root inside I's (the init's) private mount namespace:
/// a tmpfs holding one read-only bind mount per top-level entry of the
/// image (the image itself is never written, and mount points that a
/// `scratch` image lacks can be created in the tmpfs), fresh /proc,
/// a minimal /dev, tmpfs /tmp and /run, volumes and files; then the tmpfs
/// is made read-only and becomes `/` through pivot_root.
fn setup_root(sb: &SandboxPlan) -> StepResult {
    use rustix::fs::Mode;
    let r = &sb.root;
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .at("make mounts private")?;
    rustix::mount::mount("tmpfs", r, "tmpfs", nosuid, c"mode=0755,size=1m")
        .at("mount the instance root")?;
    // In a user namespace the host mount's nosuid/nodev/noexec/atime
    // flags are locked: a remount must keep them or it fails with EPERM.
    let locked = |dst: &Path| -> MountFlags {
        use rustix::fs::StatVfsMountFlags as S;
        let Some(st) = sb.userns.and_then(|_| rustix::fs::statvfs(dst).ok()) else {
            return MountFlags::empty();
        };
        let mut f = MountFlags::empty();
        for (s, m) in [
            (S::NOEXEC, MountFlags::NOEXEC),
            (S::NOATIME, MountFlags::NOATIME),
            (S::NODIRATIME, MountFlags::NODIRATIME),
            (S::RELATIME, MountFlags::RELATIME),
        ] {
            if st.f_flag.contains(s) {
                f |= m;
            }
        }
        f
    };
    let ro_bind = |src: &Path, dst: &Path| -> rustix::io::Result<()> {
        rustix::mount::mount_bind_recursive(src, dst)?;
        let flags = MountFlags::BIND | MountFlags::RDONLY | nosuid | locked(dst);
        rustix::mount::mount_remount(dst, flags, c"")
    };
    let touch = |p: &Path| {
        rustix::fs::open(
            p,
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            Mode::from(0o644),
        )
        .map(drop)
    };
    for (name, kind) in &sb.entries {
        let dst = r.join(name);
        let src = sb.image.join(name);
        match kind {
            Entry::Dir => {
                rustix::fs::mkdir(&dst, Mode::from(0o755)).and_then(|()| ro_bind(&src, &dst))
            }
            Entry::File => touch(&dst).and_then(|()| ro_bind(&src, &dst)),
            Entry::Symlink(t) => rustix::fs::symlink(t, &dst),
        }
        .at("mount the image root read-only")?;
    }
    for d in ["proc", "dev", "tmp", "run"] {
        rustix::fs::mkdir(r.join(d), Mode::from(0o755)).at("mount the instance root")?;
    }
    rustix::mount::mount(
        "proc",
        r.join("proc"),
        "proc",
        nosuid | MountFlags::NOEXEC,
        None,
    )
    .at("mount /proc")?;
    let dev = r.join("dev");
    rustix::mount::mount(
        "tmpfs",
        &dev,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"mode=0755,size=64k",
    )
    .at("mount /dev")?;
    for d in DEVICES {
        let dst = dev.join(d);
        touch(&dst)
            .and_then(|()| rustix::mount::mount_bind(Path::new("/dev").join(d), &dst))
            .at("mount /dev")?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        rustix::fs::symlink(target, dev.join(name)).at("mount /dev")?;
    }
    rustix::fs::mkdir(dev.join("shm"), Mode::from(0o1777)).at("mount /dev")?;
    rustix::mount::mount(
        "tmpfs",
        dev.join("shm"),
        "tmpfs",
        nosuid | MountFlags::NOEXEC,
        c"mode=1777",
    )
    .at("mount /dev")?;
    rustix::mount::mount("tmpfs", r.join("tmp"), "tmpfs", nosuid, c"mode=1777")
        .at("mount /tmp and /run")?;
    rustix::mount::mount("tmpfs", r.join("run"), "tmpfs", nosuid, c"mode=0755")
        .at("mount /tmp and /run")?;
    for m in &sb.mounts {
        for (p, is_dir) in &m.create {
            let p = r.join(p);
            if *is_dir {
                rustix::fs::mkdir(&p, Mode::from(0o755))
            } else {
                touch(&p)
            }
            .at("mount a volume or file")?;
        }
        let dst = r.join(&m.target);
        rustix::mount::mount_bind_recursive(&m.source, &dst).at("mount a volume or file")?;
        if m.read_only {
            let flags = MountFlags::BIND | MountFlags::RDONLY | nosuid | locked(&dst);
            rustix::mount::mount_remount(&dst, flags, c"").at("mount a volume or file")?;
        }
    }
    rustix::mount::mount_remount(r, MountFlags::BIND | MountFlags::RDONLY | nosuid, c"")
        .at("make the root read-only")?;
    rustix::process::chdir(r).at("pivot_root")?;
    rustix::process::pivot_root(".", ".").at("pivot_root")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).at("pivot_root")?;
    rustix::process::chdir("/").at("pivot_root")?;
    Ok(())
}

/// Makes `cmd`'s process join the instance's cgroup between fork and exec,
/// by writing `0` to each of `files` (`tasks` on v1, `cgroup.procs` on v2,
/// opened by the caller) as C does, so an `exec` is accounted to (and
/// limited with) the instance from its first instruction.
pub fn join_cgroup_before_exec(cmd: &mut std::process::Command, files: Vec<File>) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls write(2), which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                rustix::io::write(f, b"0")?;
            }
            Ok(())
        });
    }
}
