//! Byte rates as operators write them: `20MiB/s`, `500KB/s`, `1G`, `0` (no limit).

/// A rate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate {input:?}: expected a number of bytes per second such as 20MiB/s, 500KB/s or 1G"
)]
pub struct ParseRateError {
    input: String,
}

/// Parses a rate in bytes per second; `0` means unlimited. Units: B, K/KB
/// (1000), KiB (1024), M/MB, MiB, G/GB, GiB; a trailing `/s` is optional.
pub fn parse_rate(s: &str) -> Result<u64, ParseRateError> {
    let err = || ParseRateError {
        input: s.to_owned(),
    };
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let value: f64 = num.parse().map_err(|_| err())?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
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
}
