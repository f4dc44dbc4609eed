//! A UTC calendar day: the period of one TLS-RPT report (RFC 8460 §4.1).

use std::fmt;
use std::str::FromStr;

/// A UTC day, counted from 1970-01-01. A session belongs to the day of its UTC
/// timestamp, whatever the machine's time zone (R71).
///
/// ```
/// use stsrelay::tlsrpt::Day;
/// let d: Day = "2026-11-27".parse().unwrap();
/// assert_eq!(d.start(), 1_795_737_600);
/// assert_eq!(d.end() - d.start(), 86_400);
/// assert_eq!(Day::of(d.end() - 1), d);
/// assert_eq!(Day::of(d.end()).to_string(), "2026-11-28");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(i64);

/// Not a `YYYY-MM-DD` date.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a date (want YYYY-MM-DD): {0:?}")]
pub struct BadDay(pub String);

impl Day {
    /// The UTC day of the Unix time `unix`.
    pub fn of(unix: i64) -> Day {
        Day(unix.div_euclid(86_400))
    }

    /// 00:00:00 UTC of this day, Unix seconds.
    pub fn start(self) -> i64 {
        self.0 * 86_400
    }

    /// 00:00:00 UTC of the next day (exclusive end).
    pub fn end(self) -> i64 {
        self.start() + 86_400
    }

    /// The day before.
    pub fn prev(self) -> Day {
        Day(self.0 - 1)
    }

    /// The day after.
    pub fn next(self) -> Day {
        Day(self.0 + 1)
    }

    /// (year, month, day), proleptic Gregorian.
    pub fn ymd(self) -> (i64, u32, u32) {
        crate::clock::civil_from_days(self.0)
    }

    /// The day of (year, month, day), or `None` if there is no such date.
    pub fn from_ymd(y: i64, m: u32, d: u32) -> Option<Day> {
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        Some(Day(crate::clock::days_from_civil(y, m, d)))
    }
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl FromStr for Day {
    type Err = BadDay;
    fn from_str(s: &str) -> Result<Day, BadDay> {
        let bad = || BadDay(s.to_string());
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, BadDay> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        Day::from_ymd(i64::from(num(0..4)?), num(5..7)?, num(8..10)?).ok_or_else(bad)
    }
}

/// RFC 3339 `date-time` in UTC (`2026-11-27T00:00:00Z`) of a Unix time.
pub fn rfc3339(unix: i64) -> String {
    let day = Day::of(unix);
    let secs = unix - day.start();
    format!(
        "{day}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_across_centuries_and_leap_days() {
        for day in [-300_000i64, -1, 0, 1, 11_016, 20_513, 20_514, 2_932_896] {
            let d = Day(day);
            assert_eq!(d.to_string().parse::<Day>().ok(), Some(d), "{d}");
        }
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(
            "2024-02-29".parse::<Day>().unwrap().next().to_string(),
            "2024-03-01"
        );
        assert!("2023-02-29".parse::<Day>().is_err());
        assert!("2026-13-01".parse::<Day>().is_err());
        assert!("2026-1-01".parse::<Day>().is_err());
        assert!("2026-01-+1".parse::<Day>().is_err());
    }

    #[test]
    fn timestamps_fall_in_their_utc_day() {
        let d: Day = "2026-11-27".parse().unwrap();
        assert_eq!(Day::of(d.start() - 30), d.prev());
        assert_eq!(Day::of(d.start() + 30), d);
        assert_eq!(rfc3339(d.start()), "2026-11-27T00:00:00Z");
        assert_eq!(rfc3339(d.end() - 1), "2026-11-27T23:59:59Z");
    }
}
