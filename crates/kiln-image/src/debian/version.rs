//! Debian version numbers: `[epoch:]upstream[-revision]`, compared exactly
//! as `dpkg --compare-versions` does (dpkg's `verrevcmp`): non-digit runs
//! compare character by character with letters before other characters and
//! `~` before everything, even the end of the string; digit runs compare as
//! numbers.

use std::cmp::Ordering;

/// Whether `v` is a version dpkg accepts: non-empty, no whitespace, an
/// optional numeric epoch, and only `[A-Za-z0-9.+~:-]` after it.
pub fn is_valid(v: &str) -> bool {
    if v.is_empty() || v.len() > 256 {
        return false;
    }
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) => (Some(e), rest),
        None => (None, v),
    };
    if let Some(e) = epoch
        && (e.is_empty() || e.len() > 9 || !e.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let upstream = rest.rsplit_once('-').map_or(rest, |(u, _)| u);
    !upstream.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".+~:-".contains(&b))
}

/// `dpkg --compare-versions a lt b` is `compare(a, b) == Less`, and so on.
/// Defined for any strings (invalid ones compare by the same rules), so it
/// is a total order usable for sorting untrusted input.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

fn split(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if e.bytes().all(|b| b.is_ascii_digit()) => {
            (e.parse::<u64>().unwrap_or(u64::MAX), rest)
        }
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// The weight of a non-digit position: `~` sorts first (before the end of
/// the string, which is 0), then digits and the end, then letters, then
/// everything else.
fn order(c: Option<&u8>) -> i32 {
    match c {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(*c),
        Some(b'~') => -1,
        Some(c) => i32::from(*c) + 256,
    }
}

fn verrevcmp(mut a: &[u8], mut b: &[u8]) -> Ordering {
    let digit = |s: &[u8]| s.first().is_some_and(u8::is_ascii_digit);
    while !a.is_empty() || !b.is_empty() {
        while (!a.is_empty() && !digit(a)) || (!b.is_empty() && !digit(b)) {
            let (ac, bc) = (order(a.first()), order(b.first()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            a = a.get(1..).unwrap_or_default();
            b = b.get(1..).unwrap_or_default();
        }
        while a.first() == Some(&b'0') {
            a = &a[1..];
        }
        while b.first() == Some(&b'0') {
            b = &b[1..];
        }
        let mut first_diff = Ordering::Equal;
        while digit(a) && digit(b) {
            if first_diff == Ordering::Equal {
                first_diff = a[0].cmp(&b[0]);
            }
            a = &a[1..];
            b = &b[1..];
        }
        if digit(a) {
            return Ordering::Greater;
        }
        if digit(b) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// A version constraint operator of a relation field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `<<`
    Lt,
    /// `<=` (and the obsolete `<`)
    Le,
    /// `=`
    Eq,
    /// `>=` (and the obsolete `>`)
    Ge,
    /// `>>`
    Gt,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "<<" => Op::Lt,
            "<=" | "<" => Op::Le,
            "=" => Op::Eq,
            ">=" | ">" => Op::Ge,
            ">>" => Op::Gt,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        }
    }

    /// Whether `have OP want` holds.
    pub fn holds(self, have: &str, want: &str) -> bool {
        let o = compare(have, want);
        match self {
            Op::Lt => o == Ordering::Less,
            Op::Le => o != Ordering::Greater,
            Op::Eq => o == Ordering::Equal,
            Op::Ge => o != Ordering::Less,
            Op::Gt => o == Ordering::Greater,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (a, b, expected): dpkg's own test cases plus the shapes Debian's
    /// archive has (epochs, `+debNuM`, `~rc`, revisions).
    const CASES: &[(&str, &str, Ordering)] = &[
        ("1.0", "1.0", Ordering::Equal),
        ("1.0", "1.0-0", Ordering::Equal),
        ("1.0-1", "1.0-2", Ordering::Less),
        ("1.0", "1.1", Ordering::Less),
        ("1.10", "1.9", Ordering::Greater),
        ("1:1.0", "2.0", Ordering::Greater),
        ("0:1.0", "1.0", Ordering::Equal),
        ("1.0~rc1", "1.0", Ordering::Less),
        ("1.0~rc1", "1.0~rc2", Ordering::Less),
        ("1.0~", "1.0~~", Ordering::Greater),
        ("1.0~~a", "1.0~~", Ordering::Greater),
        ("1.0a", "1.0", Ordering::Greater),
        ("1.0.", "1.0+", Ordering::Greater),
        ("1.0.", "1.0+", Ordering::Greater),
        ("1.0-1", "1.0-1+b1", Ordering::Less),
        ("15.8-0+deb12u1", "15.10-0+deb12u1", Ordering::Less),
        ("2.36-9+deb12u10", "2.36-9+deb12u9", Ordering::Greater),
        ("2.36-9+deb12u4", "2.36-9", Ordering::Greater),
        ("1.2.3-1~bpo12+1", "1.2.3-1", Ordering::Less),
        ("001", "1", Ordering::Equal),
        ("1.001", "1.1", Ordering::Equal),
        ("a", "b", Ordering::Less),
        ("1-1-1", "1-1", Ordering::Greater),
        ("7.88.1-10+deb12u8", "7.88.1-10+deb12u12", Ordering::Less),
        ("1:2.0", "1:10.0", Ordering::Less),
        ("10:1", "9:2", Ordering::Greater),
        ("2025b-0+deb12u1", "2025a-0+deb12u1", Ordering::Greater),
        ("1.0+dfsg", "1.0", Ordering::Greater),
        ("1.0-0.1", "1.0-0", Ordering::Greater),
        ("1.2~beta", "1.2~alpha", Ordering::Greater),
        ("3.0.11-1~deb12u2", "3.0.11-1", Ordering::Less),
        ("252.33-1~deb12u1", "252.36-1~deb12u1", Ordering::Less),
    ];

    #[test]
    fn compare_table() {
        for &(a, b, want) in CASES {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    /// The same table through the real `dpkg --compare-versions`: our
    /// table must be dpkg's truth, not our belief about it.
    #[test]
    fn compare_table_agrees_with_dpkg() {
        let has_dpkg = std::process::Command::new("dpkg")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_dpkg {
            if std::env::var("KILN_STRICT_TESTS").is_ok_and(|v| v == "true") {
                panic!("dpkg is not installed, and KILN_STRICT_TESTS=true");
            }
            eprintln!(
                "\n!!!!! SKIPPED: dpkg is not installed; set KILN_STRICT_TESTS=true to make this a failure !!!!!\n"
            );
            return;
        }
        for &(a, b, want) in CASES {
            for (op, holds) in [
                ("lt", want == Ordering::Less),
                ("eq", want == Ordering::Equal),
                ("gt", want == Ordering::Greater),
            ] {
                let status = std::process::Command::new("dpkg")
                    .args(["--compare-versions", a, op, b])
                    .status()
                    .unwrap();
                assert_eq!(
                    status.success(),
                    holds,
                    "dpkg --compare-versions {a} {op} {b}"
                );
            }
        }
    }

    proptest::proptest! {
        /// A total order: reflexive, antisymmetric, transitive (the
        /// resolver sorts by it and picks the maximum).
        #[test]
        fn compare_is_a_total_order(
            a in "([0-9]:)?[0-9a-z.+~]{1,6}(-[0-9a-z.+~]{1,4})?",
            b in "([0-9]:)?[0-9a-z.+~]{1,6}(-[0-9a-z.+~]{1,4})?",
            c in "([0-9]:)?[0-9a-z.+~]{1,6}(-[0-9a-z.+~]{1,4})?",
        ) {
            proptest::prop_assert_eq!(compare(&a, &a), Ordering::Equal);
            proptest::prop_assert_eq!(compare(&a, &b), compare(&b, &a).reverse());
            if compare(&a, &b) != Ordering::Greater && compare(&b, &c) != Ordering::Greater {
                proptest::prop_assert_ne!(compare(&a, &c), Ordering::Greater, "{} <= {} <= {}", a, b, c);
            }
            // `~` sorts before anything, even the end of the version.
            proptest::prop_assert_eq!(compare(&format!("{a}~"), &a), Ordering::Less);
        }
    }

    #[test]
    fn ops() {
        assert!(Op::Ge.holds("15.10-0+deb12u1", "15.8"));
        assert!(Op::Lt.holds("1.0~rc1", "1.0"));
        assert!(!Op::Gt.holds("1.0", "1.0"));
        assert!(Op::Le.holds("1.0", "1.0-0"));
        assert_eq!(Op::parse("<"), Some(Op::Le));
        assert_eq!(Op::parse("=>"), None);
    }

    #[test]
    fn validity() {
        assert!(is_valid("1:2.36-9+deb12u10"));
        assert!(is_valid("2025b-0+deb12u1"));
        assert!(!is_valid(""));
        assert!(!is_valid("1 0"));
        assert!(!is_valid("x:1.0"));
        assert!(!is_valid("1:"));
        assert!(!is_valid("-1"));
    }
}
