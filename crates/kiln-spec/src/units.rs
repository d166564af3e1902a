//! Strict parsers for durations (`"500ms"`, `"1m30s"`) and sizes
//! (`"256MiB"`). Strict means: integers only, a unit on every number, units
//! of a duration in decreasing order and each at most once, no spaces, no
//! overflow. Anything else is an error that says what to write instead.

use crate::model::{ByteSize, Duration};

const DURATION_UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)];

/// Parses a duration like `"1h"`, `"1m30s"`, `"500ms"`, `"0s"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("a duration cannot be empty".into());
    }
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_rank: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(if rest.starts_with('.') || rest.contains('.') {
                "fractions are not allowed; combine units instead (\"1s500ms\")".into()
            } else {
                format!("expected a number at `{rest}`")
            });
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{}` is too large", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        if unit.is_empty() {
            return Err(if rest.starts_with('.') {
                "fractions are not allowed; combine units instead (\"1s500ms\")".into()
            } else {
                format!("`{number}` has no unit; write it with one of h, m, s, ms")
            });
        }
        let Some(rank) = DURATION_UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(format!("unknown unit `{unit}`; use h, m, s or ms"));
        };
        if last_rank.is_some_and(|r| rank <= r) {
            return Err(
                "units must appear once each, largest first (\"1h30m\", not \"30m1h\")".into(),
            );
        }
        last_rank = Some(rank);
        total = number
            .checked_mul(DURATION_UNITS[rank].1)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| "the duration is too large".to_string())?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total))
}

const SIZE_UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KB", 1000),
    ("MB", 1000 * 1000),
    ("GB", 1000 * 1000 * 1000),
    ("TB", 1000 * 1000 * 1000 * 1000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Parses a size like `"256MiB"`, `"1GiB"`, `"500MB"`, `"4096B"`.
pub fn parse_size(text: &str) -> Result<ByteSize, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("a size starts with a whole number, like \"256MiB\"".into());
    }
    let number: u64 = text[..digits]
        .parse()
        .map_err(|_| format!("`{}` is too large", &text[..digits]))?;
    let unit = &text[digits..];
    if unit.is_empty() {
        return Err(format!(
            "`{number}` has no unit; write \"{number}B\" or use KiB, MiB, GiB"
        ));
    }
    if unit.starts_with('.') {
        return Err(
            "fractions are not allowed; use a smaller unit (\"1536MiB\", not \"1.5GiB\")".into(),
        );
    }
    let Some((_, scale)) = SIZE_UNITS.iter().find(|(u, _)| *u == unit) else {
        let hint = SIZE_UNITS
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(unit))
            .map(|(u, _)| format!(" (units are case-sensitive: did you mean `{u}`?)"))
            .unwrap_or_default();
        return Err(format!(
            "unknown unit `{unit}`{hint}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        ));
    };
    number
        .checked_mul(*scale)
        .map(|bytes| ByteSize { bytes })
        .ok_or_else(|| "the size is too large".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap().millis, 500);
        assert_eq!(parse_duration("1m30s").unwrap().millis, 90_000);
        assert_eq!(parse_duration("2h").unwrap().millis, 7_200_000);
        assert_eq!(parse_duration("0s").unwrap().millis, 0);
        assert_eq!(parse_duration("1h1m1s1ms").unwrap().millis, 3_661_001);
        for bad in [
            "",
            "5",
            "1.5s",
            "30s1m",
            "1s1s",
            "1 s",
            "1d",
            "s",
            "-1s",
            "1S",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB").unwrap().bytes, 256 << 20);
        assert_eq!(parse_size("1GB").unwrap().bytes, 1_000_000_000);
        assert_eq!(parse_size("10B").unwrap().bytes, 10);
        for bad in [
            "",
            "256",
            "1.5GiB",
            "256mib",
            "256 MiB",
            "MiB",
            "-1B",
            "99999999999TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(
            parse_size("256mib")
                .unwrap_err()
                .contains("did you mean `MiB`")
        );
    }

    proptest! {
        #[test]
        fn duration_display_round_trips(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&d.to_string()).unwrap(), d);
        }

        #[test]
        fn size_display_round_trips(bytes in 0u64..(1 << 50)) {
            let s = ByteSize { bytes };
            prop_assert_eq!(parse_size(&s.to_string()).unwrap(), s);
        }

        #[test]
        fn parsers_never_panic(text in "\\PC{0,24}") {
            let _ = parse_duration(&text);
            let _ = parse_size(&text);
        }
    }
}
