//! Parsing what operators type: durations ("30s", "5m"), bandwidth
//! ("100Mbps", "512Kbps", "unlimited"), sizes ("256MiB", "1GiB").

/// Parses a duration like `30s`, `5m`, `1h 30m`, `1500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration ({e}); try 30s, 5m or 15m"))
}

pub fn format_duration(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Parses a bandwidth in bits per second: `unlimited`, `100Mbps`, `512Kbps`,
/// `1Gbps`, or a plain number of bits per second. Units are decimal (K = 1000).
pub fn parse_bandwidth(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "unlimited" || t == "none" || t == "0" {
        return Ok(None);
    }
    let (num, mult) = [("gbps", 1_000_000_000u64), ("mbps", 1_000_000), ("kbps", 1_000), ("bps", 1)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1));
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a bandwidth; try 100Mbps, 512Kbps or unlimited"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{s:?} must be a positive bandwidth or 'unlimited'"));
    }
    Ok(Some((value * mult as f64).round() as u64))
}

pub fn format_bandwidth(bps: Option<u64>) -> String {
    match bps {
        None => "unlimited".into(),
        Some(b) if b % 1_000_000 == 0 => format!("{}Mbps", b / 1_000_000),
        Some(b) if b % 1_000 == 0 => format!("{}Kbps", b / 1_000),
        Some(b) => format!("{b}bps"),
    }
}

/// Parses a size in bytes: `256MiB`, `1GiB`, `64KiB`, `2TiB` (binary), `1MB`,
/// `1GB` (decimal), `0`, or a plain number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let units: [(&str, u64); 9] = [
        ("tib", 1 << 40),
        ("gib", 1 << 30),
        ("mib", 1 << 20),
        ("kib", 1 << 10),
        ("tb", 1_000_000_000_000),
        ("gb", 1_000_000_000),
        ("mb", 1_000_000),
        ("kb", 1_000),
        ("b", 1),
    ];
    let (num, mult) =
        units.iter().find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim(), *m))).unwrap_or((t.as_str(), 1));
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size; try 256MiB, 1GiB or 0"))?;
    let bytes = value * mult as f64;
    if !(value.is_finite() && value >= 0.0 && bytes < u64::MAX as f64) {
        return Err(format!("{s:?} must be a size of zero bytes or more"));
    }
    Ok(bytes.round() as u64)
}

pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("100Mbps"), Ok(Some(100_000_000)));
        assert_eq!(parse_bandwidth("512Kbps"), Ok(Some(512_000)));
        assert_eq!(parse_bandwidth("1.5Gbps"), Ok(Some(1_500_000_000)));
        assert_eq!(parse_bandwidth("unlimited"), Ok(None));
        assert_eq!(parse_bandwidth("64000"), Ok(Some(64_000)));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("-1Mbps").is_err());
        assert_eq!(format_bandwidth(Some(100_000_000)), "100Mbps");
        assert_eq!(format_bandwidth(None), "unlimited");
    }

    #[test]
    fn sizes() {
        let table = [
            ("256MiB", Ok(256 << 20)),
            ("1GiB", Ok(1 << 30)),
            (" 64 KiB ", Ok(64 << 10)),
            ("1.5GiB", Ok(3 << 29)),
            ("1MB", Ok(1_000_000)),
            ("0", Ok(0)),
            ("4096", Ok(4096)),
            ("12B", Ok(12)),
        ];
        for (text, want) in table {
            assert_eq!(parse_bytes(text), want, "{text:?}");
        }
        for bad in ["lots", "-1MiB", "1QiB", "", "NaNGiB", "99999999999TiB"] {
            assert!(parse_bytes(bad).unwrap_err().contains(bad.trim()), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("15m").unwrap().as_secs(), 900);
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert_eq!(format_bytes(64 << 20), "64.0 MiB");
    }
}
