//! Byte rates and sizes as operators write them: `20MiB/s`, `500KB/s`, `1G`,
//! `0` (no limit); `256MiB`, `1GiB`, `1000000`. One parser reads both.

/// A rate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate {input:?}: expected a number of bytes per second such as 20MiB/s, 500KB/s or 1G"
)]
pub struct ParseRateError {
    input: String,
}

/// A size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: expected a number of bytes such as 256MiB, 1GiB or 1000000")]
pub struct ParseSizeError {
    input: String,
}

/// Parses a rate in bytes per second (or a size in bytes); `0` means
/// unlimited. Units: B, K/KB (1000), KiB (1024), M/MB, MiB, G/GB, GiB, T/TB,
/// TiB (every unit [`format_bytes`] prints); a trailing `/s` is optional.
pub fn parse_rate(s: &str) -> Result<u64, ParseRateError> {
    let t = s.trim();
    parse_bytes(t.strip_suffix("/s").unwrap_or(t)).ok_or_else(|| ParseRateError {
        input: s.to_owned(),
    })
}

/// Parses a size in bytes, with the units of [`parse_rate`]; a rate (`/s`)
/// is refused.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    parse_bytes(s).ok_or_else(|| ParseSizeError {
        input: s.to_owned(),
    })
}

/// A number of bytes with an optional unit.
fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return None;
    }
    Some(bytes as u64)
}

/// Formats a byte count with a binary unit, e.g. `1.5 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_rates() {
        assert_eq!(parse_rate("20MiB/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate("500KB/s").unwrap(), 500_000);
        assert_eq!(parse_rate("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("1.5MiB").unwrap(), 3 << 19);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs").is_err());
        assert!(parse_rate("-1M").is_err());
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn parses_sizes_and_refuses_rates() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size(" 1GiB ").unwrap(), 1 << 30);
        assert_eq!(parse_size("1000000").unwrap(), 1_000_000);
        assert!(parse_size("8MiB/s").is_err());
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn issue10_fuzz_what_format_bytes_prints_parses() {
        assert_eq!(format_bytes(3 << 40), "3.0 TiB");
        assert_eq!(parse_rate("3.0TiB").unwrap(), 3 << 40);
        assert_eq!(parse_rate("2T").unwrap(), 2_000_000_000_000);
    }
}

/// Property tests (issue 10, fuzzing). `PROPTEST_CASES` sets the cases.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_rates_parse_or_refuse_without_panicking(
            s in prop_oneof![
                any::<String>(),
                "[ ]?[0-9.]{0,30}[ ]?(|b|B|k|K|KB|KiB|kib|M|MB|MiB|G|GB|GiB|T|e9|x)(|/s)[ ]?",
            ],
        ) {
            match parse_rate(&s) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.to_string().starts_with("invalid rate")),
            }
        }

        #[test]
        fn fuzz_whole_rates_are_exact_in_every_unit(n in 0u64..(1 << 40), unit in 0..7usize, per_second in any::<bool>()) {
            let (suffix, mult) = [
                ("", 1u64),
                ("B", 1),
                ("K", 1000),
                ("KiB", 1024),
                ("MB", 1_000_000),
                ("MiB", 1 << 20),
                ("GiB", 1 << 30),
            ][unit];
            let s = format!("{n}{suffix}{}", if per_second { "/s" } else { "" });
            let want = n.checked_mul(mult);
            match want {
                // f64 holds every integer below 2^53 exactly.
                Some(w) if w < (1 << 53) => prop_assert_eq!(parse_rate(&s).unwrap(), w),
                _ => { let _ = parse_rate(&s); }
            }
        }

        #[test]
        fn fuzz_formatted_sizes_parse_back_close(n in any::<u64>()) {
            // `format_bytes` rounds to one decimal: parsing it back lands within 5%.
            let shown = format_bytes(n);
            let back = parse_rate(&shown.replace(' ', "")).unwrap();
            let (a, b) = (n as f64, back as f64);
            prop_assert!((a - b).abs() <= a * 0.05 + 1.0, "{} -> {} -> {}", n, shown, back);
        }
    }
}
