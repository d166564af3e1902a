//! Host capability detection: can this host isolate an instance, and if
//! not, why and what to do. [`select_local_driver`] turns the answer into a
//! driver: the `sandbox` (as root, or rootless through user namespaces),
//! else the `process` driver **and a warning** (never silently).
//!
//! The decision ([`HostFacts::decide`]) is a pure function of the facts, so
//! that it is tested with injected facts; [`HostFacts::probe`] gathers them
//! from the running host (sysctls, cgroup mount, and a real
//! `unshare(CLONE_NEWUSER)` in a forked child).

use std::path::PathBuf;

use crate::AnyDriver;
use crate::cgroup::Version;
use crate::error::RuntimeError;
use crate::process::Process;
use crate::sandbox::{Sandbox, SandboxOptions};

/// What the decision depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Effective uid 0.
    pub root: bool,
    /// The caller's effective uid and gid (mapped to 0:0 when rootless).
    pub uid: u32,
    pub gid: u32,
    /// The cgroup filesystem under /sys/fs/cgroup, if any.
    pub cgroups: Option<Version>,
    /// `/proc/sys/kernel/unprivileged_userns_clone` (Debian/Ubuntu kernels
    /// only; `None` when absent, which means allowed).
    pub unprivileged_userns_clone: Option<u64>,
    /// `/proc/sys/user/max_user_namespaces` (`None` when unreadable).
    pub max_user_namespaces: Option<u64>,
    /// The outcome of a real `unshare(CLONE_NEWUSER)` in a forked child;
    /// `None` when not tried (root, or the sysctls already forbid it).
    pub userns_probe: Option<Result<(), String>>,
}

/// What the host allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// The full sandbox, with cgroup limits.
    Root(Version),
    /// The sandbox in a user namespace, without cgroup limits.
    Rootless,
    /// No isolation: why, and what to do about it.
    Unavailable { why: String, hint: String },
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl HostFacts {
    /// Gathers the facts from this host. Not root: also forks a child that
    /// tries `unshare(CLONE_NEWUSER)` (the sysctls do not tell about
    /// AppArmor, SELinux or a container's seccomp filter).
    pub fn probe() -> HostFacts {
        let root = rustix::process::geteuid().is_root();
        let mut facts = HostFacts {
            root,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            cgroups: crate::cgroup::detect(),
            unprivileged_userns_clone: read_u64("/proc/sys/kernel/unprivileged_userns_clone"),
            max_user_namespaces: read_u64("/proc/sys/user/max_user_namespaces"),
            userns_probe: None,
        };
        let forbidden =
            facts.unprivileged_userns_clone == Some(0) || facts.max_user_namespaces == Some(0);
        if !root && !forbidden {
            facts.userns_probe =
                Some(crate::launch::probe_user_namespace().map_err(|e| e.to_string()));
        }
        facts
    }

    /// The decision, from the facts alone.
    pub fn decide(&self) -> Isolation {
        let no = |why: String, hint: &str| Isolation::Unavailable {
            why,
            hint: hint.to_string(),
        };
        if self.root {
            return match self.cgroups {
                Some(v) => Isolation::Root(v),
                None => no(
                    "kiln runs as root, but there is no cgroup filesystem under /sys/fs/cgroup"
                        .into(),
                    "mount cgroups (v2 at /sys/fs/cgroup, or v1 with a memory controller)",
                ),
            };
        }
        let who = format!("kiln runs as uid {} (not root)", self.uid);
        if self.unprivileged_userns_clone == Some(0) {
            return no(
                format!(
                    "{who} and kernel.unprivileged_userns_clone is 0: this kernel forbids user namespaces to unprivileged users"
                ),
                "as root: `sysctl -w kernel.unprivileged_userns_clone=1` (persist it in /etc/sysctl.d/), or run kiln as root",
            );
        }
        if self.max_user_namespaces == Some(0) {
            return no(
                format!(
                    "{who} and user.max_user_namespaces is 0: no user namespace can be created"
                ),
                "as root: `sysctl -w user.max_user_namespaces=15000` (persist it in /etc/sysctl.d/), or run kiln as root",
            );
        }
        match &self.userns_probe {
            Some(Ok(())) => Isolation::Rootless,
            Some(Err(e)) => no(
                format!("{who} and creating a user namespace failed: unshare(CLONE_NEWUSER): {e}"),
                "a security policy blocks user namespaces (AppArmor's kernel.apparmor_restrict_unprivileged_userns, SELinux, or the seccomp filter of the container kiln runs in): allow them for kiln, or run kiln as root",
            ),
            None => no(
                format!("{who} and user namespaces were not probed"),
                "probe the host with `HostFacts::probe`",
            ),
        }
    }
}

/// The local driver this host supports, and a warning to show the user
/// when isolation is reduced (rootless: no cgroup limits) or absent (the
/// `process` fallback: the warning says why and what to do). Probes the
/// host; see [`select_local_driver_with`] for given facts.
pub fn select_local_driver(
    state_dir: impl Into<PathBuf>,
) -> Result<(AnyDriver, Option<String>), RuntimeError> {
    select_local_driver_with(state_dir, &HostFacts::probe())
}

/// As [`select_local_driver`], from the given facts (no probing).
/// Errs only when not even the `process` driver can be created.
pub fn select_local_driver_with(
    state_dir: impl Into<PathBuf>,
    facts: &HostFacts,
) -> Result<(AnyDriver, Option<String>), RuntimeError> {
    let state_dir = state_dir.into();
    let isolation = facts.decide();
    match Sandbox::with_facts(&state_dir, SandboxOptions::default(), facts) {
        Ok(sb) => {
            let warning = matches!(isolation, Isolation::Rootless).then(|| {
                "the sandbox runs rootless (user namespaces): no cgroup limits, since cgroups are not delegated to this user; services that declare memory, cpu or pids limits are refused\n  hint: run kiln as root to enforce resource limits".to_string()
            });
            Ok((AnyDriver::Sandbox(sb), warning))
        }
        Err(RuntimeError::Unavailable { why, hint, .. }) => {
            let process = Process::new(&state_dir)?;
            let warning = format!(
                "NO ISOLATION: the sandbox is unavailable because {why}; instances run with the `process` driver ({})\n  hint: {hint}",
                crate::process::ISOLATION
            );
            Ok((AnyDriver::Process(process), Some(warning)))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(root: bool) -> HostFacts {
        HostFacts {
            root,
            uid: if root { 0 } else { 1000 },
            gid: if root { 0 } else { 1000 },
            cgroups: Some(Version::V2),
            unprivileged_userns_clone: None,
            max_user_namespaces: Some(15000),
            userns_probe: if root { None } else { Some(Ok(())) },
        }
    }

    fn select(f: &HostFacts) -> (AnyDriver, Option<String>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (d, w) = select_local_driver_with(dir.path().join("state"), f).unwrap();
        (d, w, dir)
    }

    #[test]
    fn root_with_cgroups_gets_the_full_sandbox_silently() {
        let f = facts(true);
        assert_eq!(f.decide(), Isolation::Root(Version::V2));
        let (d, w, _dir) = select(&f);
        assert!(matches!(d, AnyDriver::Sandbox(_)));
        assert_eq!(w, None);
    }

    #[test]
    fn root_without_cgroups_falls_back_with_a_warning() {
        let f = HostFacts {
            cgroups: None,
            ..facts(true)
        };
        let (d, w, _dir) = select(&f);
        assert!(matches!(d, AnyDriver::Process(_)));
        let w = w.unwrap();
        assert!(
            w.contains("NO ISOLATION") && w.contains("no cgroup filesystem"),
            "{w}"
        );
        assert!(w.contains("hint: mount cgroups"), "{w}");
    }

    #[test]
    fn unprivileged_with_user_namespaces_gets_the_rootless_sandbox() {
        let f = facts(false);
        assert_eq!(f.decide(), Isolation::Rootless);
        // Cgroups are irrelevant rootless.
        let f = HostFacts { cgroups: None, ..f };
        let (d, w, _dir) = select(&f);
        assert!(matches!(d, AnyDriver::Sandbox(_)));
        assert!(w.unwrap().contains("no cgroup limits"));
    }

    #[test]
    fn each_reason_is_named_with_its_remedy() {
        let cases = [
            (
                HostFacts {
                    unprivileged_userns_clone: Some(0),
                    userns_probe: None,
                    ..facts(false)
                },
                "kernel.unprivileged_userns_clone is 0",
                "sysctl -w kernel.unprivileged_userns_clone=1",
            ),
            (
                HostFacts {
                    max_user_namespaces: Some(0),
                    userns_probe: None,
                    ..facts(false)
                },
                "user.max_user_namespaces is 0",
                "sysctl -w user.max_user_namespaces=15000",
            ),
            (
                HostFacts {
                    userns_probe: Some(Err("Operation not permitted (os error 1)".into())),
                    ..facts(false)
                },
                "unshare(CLONE_NEWUSER): Operation not permitted",
                "AppArmor",
            ),
        ];
        for (f, why, hint) in cases {
            let (d, w, _dir) = select(&f);
            assert!(matches!(d, AnyDriver::Process(_)), "{f:?}");
            let w = w.expect("a fallback is never silent");
            assert!(w.contains("NO ISOLATION") && w.contains("uid 1000"), "{w}");
            assert!(w.contains(why), "{w}");
            assert!(w.contains(hint), "{w}");
            assert!(w.contains(crate::process::ISOLATION), "{w}");
        }
    }

    /// Enabled sysctls alone do not decide: the probe must have succeeded.
    #[test]
    fn sysctls_alone_are_not_enough() {
        let f = HostFacts {
            unprivileged_userns_clone: Some(1),
            userns_probe: None,
            ..facts(false)
        };
        assert!(matches!(f.decide(), Isolation::Unavailable { .. }));
    }

    /// The real probe on this host: it must agree with the kernel.
    #[test]
    fn real_probe_matches_the_host() {
        let f = HostFacts::probe();
        assert_eq!(f.root, rustix::process::geteuid().is_root());
        // Whoever we are, the forked probe answers (root may create one).
        let probe = crate::launch::probe_user_namespace();
        let allowed = f.max_user_namespaces != Some(0) && f.unprivileged_userns_clone != Some(0);
        if f.root {
            assert!(
                probe.is_ok() || !allowed,
                "root could not unshare NEWUSER: {probe:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let (d, w) = select_local_driver(dir.path().join("state")).unwrap();
        match f.decide() {
            Isolation::Root(_) => assert!(matches!(d, AnyDriver::Sandbox(_)) && w.is_none()),
            Isolation::Rootless => assert!(matches!(d, AnyDriver::Sandbox(_)) && w.is_some()),
            Isolation::Unavailable { .. } => {
                assert!(matches!(d, AnyDriver::Process(_)) && w.is_some())
            }
        }
    }
}
