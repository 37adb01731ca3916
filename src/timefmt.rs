//! RFC 3339 UTC timestamps without a date-time dependency: `2026-11-24T02:30:00Z` in grants,
//! `2026-11-24T02:30:00.123Z` in the audit log. Parsing is strict (UTC `Z` only, years
//! 1970-9999), so one instant has one spelling in signed data.

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Latest instant accepted anywhere: 9999-12-31T23:59:59Z.
pub const MAX_SECS: i64 = 253_402_300_799;

/// Milliseconds since the epoch (0 for a clock before 1970).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whole seconds since the epoch (0 for a clock before 1970).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The `SystemTime` of `secs` since the epoch (clamped at the epoch).
pub fn from_secs(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

/// Seconds since the epoch of a UTC civil time, or `None` when a field is out of range.
pub fn civil_to_unix(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Option<i64> {
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || s > 59
    {
        return None;
    }
    Some(
        days_from_civil(y, mo, d) * 86400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s),
    )
}

fn split(secs: i64) -> (i64, u32, u32, i64, i64, i64) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `2026-11-24T02:30:00Z`.
pub fn rfc3339_secs(secs: i64) -> String {
    let (y, m, d, h, mi, s) = split(secs.clamp(0, MAX_SECS));
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2026-11-24T02:30:00.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let ms = ms.clamp(0, MAX_SECS * 1000 + 999);
    let (y, m, d, h, mi, s) = split(ms.div_euclid(1000));
    format!(
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        ms.rem_euclid(1000)
    )
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |n, &c| n * 10 + u32::from(c - b'0')))
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.fff...]Z` into milliseconds since the epoch (fraction digits
/// beyond milliseconds are dropped). Offsets other than `Z` are refused.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b.len() > 30 {
        return None;
    }
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if *b.last()? != b'Z' {
        return None;
    }
    let secs = civil_to_unix(
        i64::from(digits(&b[0..4])?),
        digits(&b[5..7])?,
        digits(&b[8..10])?,
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    )?;
    let frac = &b[19..b.len() - 1];
    let ms = if frac.is_empty() {
        0
    } else {
        if frac[0] != b'.' || frac.len() < 2 || frac.len() > 10 {
            return None;
        }
        let f = &frac[1..];
        digits(f)?;
        let mut ms = 0u32;
        for i in 0..3 {
            ms = ms * 10 + f.get(i).map_or(0, |c| u32::from(c - b'0'));
        }
        ms
    };
    Some(secs * 1000 + i64::from(ms))
}

/// Parse the seconds-precision form that grants use, `YYYY-MM-DDTHH:MM:SSZ`, exactly.
pub fn parse_rfc3339_secs(s: &str) -> Option<i64> {
    if s.len() != 20 {
        return None;
    }
    parse_rfc3339_ms(s).map(|ms| ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for secs in [0, 951_782_400, 1_700_000_000, 1_795_000_000, MAX_SECS] {
            let t = rfc3339_secs(secs);
            assert_eq!(parse_rfc3339_secs(&t), Some(secs), "{t}");
            let ms = secs * 1000 + 7;
            assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms));
        }
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_000_123), "1970-01-01T00:16:40.123Z");
        assert_eq!(rfc3339_secs(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn refuses_sloppy_text() {
        for t in [
            "",
            "2026-11-24",
            "2026-11-24T02:30:00",
            "2026-11-24T02:30:00+00:00",
            "2026-11-24 02:30:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-11-24T02:30:00.Z",
            "2026-11-24T02:30:0aZ",
            "+026-11-24T02:30:00Z",
        ] {
            assert_eq!(parse_rfc3339_ms(t), None, "{t}");
        }
        assert_eq!(parse_rfc3339_secs("2026-11-24T02:30:00.000Z"), None);
    }
}
