//! Durations as operators write them: `90s`, `30m`, `8h`, `1h30m`, `2d`.

#![forbid(unsafe_code)]

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A whole number of seconds, parsed from and printed as `1h30m`-style text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(u64);

/// The longest duration we accept anywhere: a year. Keeps arithmetic on timestamps far from
/// overflow whatever the input.
pub const MAX_SECS: u64 = 366 * 24 * 3600;

impl Dur {
    pub const fn from_secs(s: u64) -> Self {
        Dur(s)
    }
    pub const fn secs(self) -> u64 {
        self.0
    }

    /// Parse `<n><unit>` groups, units s, m, h, d, in any order, each at most once.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty duration; write e.g. 30m or 8h".into());
        }
        let mut total: u64 = 0;
        let mut num: Option<u64> = None;
        let mut seen = [false; 4];
        for c in text.chars() {
            if let Some(d) = c.to_digit(10) {
                let n = num.unwrap_or(0);
                num = Some(
                    n.checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(d)))
                        .filter(|&n| n <= MAX_SECS)
                        .ok_or_else(|| format!("duration {text:?} is too long (at most 366d)"))?,
                );
                continue;
            }
            let (idx, mult) = match c {
                's' => (0, 1),
                'm' => (1, 60),
                'h' => (2, 3600),
                'd' => (3, 86400),
                _ => {
                    return Err(format!(
                        "duration {text:?} has an unknown unit {c:?}; units are s, m, h, d (e.g. 1h30m)"
                    ));
                }
            };
            let n = num
                .take()
                .ok_or_else(|| format!("duration {text:?} has a unit without a number"))?;
            if seen[idx] {
                return Err(format!("duration {text:?} repeats the unit {c:?}"));
            }
            seen[idx] = true;
            total = n
                .checked_mul(mult)
                .and_then(|v| total.checked_add(v))
                .filter(|&t| t <= MAX_SECS)
                .ok_or_else(|| format!("duration {text:?} is too long (at most 366d)"))?;
        }
        if num.is_some() {
            return Err(format!(
                "duration {text:?} ends in a number without a unit; write e.g. {text}m"
            ));
        }
        Ok(Dur(total))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = self.0;
        if s == 0 {
            return f.write_str("0s");
        }
        for (unit, len) in [('d', 86400), ('h', 3600), ('m', 60), ('s', 1)] {
            if s >= len {
                write!(f, "{}{unit}", s / len)?;
                s %= len;
            }
        }
        Ok(())
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (t, secs, canon) in [
            ("90s", 90, "1m30s"),
            ("30m", 1800, "30m"),
            ("8h", 28800, "8h"),
            ("1h30m", 5400, "1h30m"),
            ("2d", 172800, "2d"),
            ("0s", 0, "0s"),
        ] {
            let d = Dur::parse(t).unwrap();
            assert_eq!(d.secs(), secs, "{t}");
            assert_eq!(d.to_string(), canon, "{t}");
        }
    }

    #[test]
    fn rejects_bad_text() {
        for t in [
            "",
            "h",
            "10",
            "1x",
            "1h1h",
            "-1h",
            "1.5h",
            "99999999999999999999s",
            "367d",
        ] {
            assert!(Dur::parse(t).is_err(), "{t} should be rejected");
        }
    }
}
