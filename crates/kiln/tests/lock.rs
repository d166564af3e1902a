//! `kiln lock` end to end, against the machine's apt sources: it writes a
//! deterministic kiln.lock, leaves a complete one alone, shows `--update`
//! as a diff, and refuses a malformed lock by file and line. Needs the
//! network to the apt sources: skipped loudly without it, failed when
//! `KILN_STRICT_TESTS=true`.

#[path = "support/env.rs"]
mod env;

use std::path::Path;
use std::process::{Command, Output};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("KILN_STATE_DIR")
        .output()
        .expect("kiln runs")
}

const SPEC: &str =
    "[project]\nname = \"locktest\"\n\n[image.tz]\nfrom = \"scratch\"\ndebian = [\"tzdata\"]\n";

#[test]
fn kiln_lock_pins_keeps_updates_with_a_diff_and_refuses_a_malformed_lock() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("kiln.toml"), SPEC).unwrap();

    let first = kiln(root, &["lock"]);
    if !first.status.success() {
        let err = env::text(&first.stderr);
        if err.contains("apt-get") && (err.contains("update") || err.contains("cannot run")) {
            let why = format!("the apt sources are unreachable: {}", err.trim());
            if !env::may_run("kiln lock", Some(why)) {
                return;
            }
        }
        panic!("kiln lock failed:\n{}", env::show(&first));
    }
    let lock_path = root.join("kiln.lock");
    let text = std::fs::read_to_string(&lock_path).unwrap();
    assert!(
        text.contains("[image.tz]\nrequested = [\"tzdata\"]\n"),
        "{text}"
    );
    assert!(
        text.contains("[[image.tz.package]]\nname = \"tzdata\"\n"),
        "{text}"
    );
    let stdout = env::text(&first.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("+ tz: tzdata ")),
        "{stdout}"
    );
    assert!(stdout.lines().all(|l| l.starts_with("+ tz: ")), "{stdout}");

    // Complete: nothing resolved, nothing rewritten, no diff.
    let again = kiln(root, &["lock"]);
    assert!(again.status.success(), "{}", env::show(&again));
    assert_eq!(env::text(&again.stdout), "");
    assert!(
        env::text(&again.stderr).contains("up to date"),
        "{}",
        env::show(&again)
    );
    assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), text);

    // An older pin moves forward with --update, visibly.
    let version = text
        .lines()
        .skip_while(|l| *l != "name = \"tzdata\"")
        .find_map(|l| l.strip_prefix("version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    std::fs::write(&lock_path, text.replace(&version, "2020a-0+deb10u1")).unwrap();
    let update = kiln(root, &["lock", "--update"]);
    assert!(update.status.success(), "{}", env::show(&update));
    assert_eq!(
        env::text(&update.stdout),
        format!("~ tz: tzdata 2020a-0+deb10u1 -> {version}\n")
    );
    assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), text);

    // Malformed: the file, the line, the fix; exit 1.
    std::fs::write(&lock_path, text.replacen("size = ", "size = \"x\" #", 1)).unwrap();
    let bad = kiln(root, &["lock"]);
    assert_eq!(bad.status.code(), Some(1), "{}", env::show(&bad));
    let err = env::text(&bad.stderr);
    let line = text.lines().position(|l| l.starts_with("size = ")).unwrap() + 1;
    assert!(err.contains(&format!("kiln.lock:{line}:")), "{err}");
    assert!(err.contains("kiln lock --update"), "{err}");
}
