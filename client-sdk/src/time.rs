//! Timestamps: milliseconds since the Unix epoch, UTC, read and written as RFC 3339.
//!
//! The SDK never reads the clock inside its logic: every operation that depends on time
//! takes `now` as an argument, so tests and replays are deterministic. [`Timestamp::now`]
//! is for the edge (the app, the `fedpref-device` binary).

use std::fmt;

/// Milliseconds in a day.
pub const MILLIS_PER_DAY: i64 = 86_400_000;

/// An instant, in milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The instant `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// A protobuf timestamp from the coordinator, to the millisecond; values beyond the
    /// representable range (hostile or corrupt ones) saturate instead of overflowing.
    pub fn from_proto(t: &fedpref_proto::prost_types::Timestamp) -> Self {
        Self(
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos / 1_000_000)),
        )
    }

    /// The system clock, for the edge of the program (never called by the SDK's logic).
    pub fn now() -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }

    /// This instant moved by `millis` (negative moves back), saturating.
    pub const fn plus_millis(self, millis: i64) -> Self {
        Self(self.0.saturating_add(millis))
    }

    /// This instant moved back by `days` days, saturating.
    pub const fn minus_days(self, days: u32) -> Self {
        Self(self.0.saturating_sub(days as i64 * MILLIS_PER_DAY))
    }

    /// The hour of the day (0–23, UTC).
    pub fn hour_utc(self) -> u32 {
        (self.0.rem_euclid(MILLIS_PER_DAY) / 3_600_000) as u32
    }

    /// Parses an RFC 3339 timestamp: `YYYY-MM-DDTHH:MM:SS`, optional fraction (kept to the
    /// millisecond), then `Z` or an offset `±HH:MM`. The error says what was wrong.
    ///
    /// ```
    /// use fedpref_client_sdk::Timestamp;
    /// let t = Timestamp::parse_rfc3339("2026-01-05T01:00:00+01:00").unwrap();
    /// assert_eq!(t.to_rfc3339(), "2026-01-05T00:00:00Z");
    /// assert!(Timestamp::parse_rfc3339("2026-02-30T00:00:00Z").is_err());
    /// ```
    pub fn parse_rfc3339(text: &str) -> Result<Self, String> {
        let b = text.as_bytes();
        let bad = || format!("'{text}' is not an RFC 3339 timestamp like 2026-01-05T00:00:00Z");
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !matches!(b[10], b'T' | b't')
            || b[13] != b':'
            || b[16] != b':'
        {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
            let s = &b[r];
            if s.iter().all(u8::is_ascii_digit) {
                Ok(s.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
            } else {
                Err(bad())
            }
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return Err(format!("'{text}' is not a valid date and time"));
        }
        let mut rest = &b[19..];
        let mut millis = 0i64;
        if rest.first() == Some(&b'.') {
            let digits = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return Err(bad());
            }
            for (i, d) in rest[1..=digits].iter().enumerate().take(3) {
                millis += i64::from(d - b'0') * [100, 10, 1][i];
            }
            rest = &rest[1 + digits..];
        }
        let offset_minutes = match rest {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let digits = [*h1, *h2, *m1, *m2];
                if !digits.iter().all(u8::is_ascii_digit) {
                    return Err(bad());
                }
                let h = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
                let m = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
                if h > 23 || m > 59 {
                    return Err(bad());
                }
                if *sign == b'+' {
                    h * 60 + m
                } else {
                    -(h * 60 + m)
                }
            }
            _ => return Err(bad()),
        };
        // A leap second is read as the last millisecond of its minute's 59th second.
        let (second, millis) = if second == 60 {
            (59, 999)
        } else {
            (second, millis)
        };
        let days = days_from_civil(year, month, day);
        let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
        Ok(Self(seconds * 1_000 + millis))
    }

    /// Formats as RFC 3339 in UTC: `2026-01-05T00:00:00Z`, with `.mmm` when the instant
    /// has milliseconds.
    pub fn to_rfc3339(self) -> String {
        let days = self.0.div_euclid(MILLIS_PER_DAY);
        let in_day = self.0.rem_euclid(MILLIS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        let (h, min, s, ms) = (
            in_day / 3_600_000,
            in_day / 60_000 % 60,
            in_day / 1_000 % 60,
            in_day % 1_000,
        );
        if ms == 0 {
            format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z")
        } else {
            format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{ms:03}Z")
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protobuf_timestamp_saturates_rather_than_overflowing() {
        use fedpref_proto::prost_types::Timestamp as Proto;
        let at = |seconds, nanos| Timestamp::from_proto(&Proto { seconds, nanos }).millis();
        assert_eq!(at(1_700_000_000, 250_000_000), 1_700_000_000_250);
        // Found by fuzzing a distributed task's stage deadlines.
        assert_eq!(at(i64::MAX, 999_999_999), i64::MAX);
        assert_eq!(at(i64::MIN, -999_999_999), i64::MIN);
        assert_eq!(at(i64::MAX / 1000, i32::MAX), i64::MAX);
    }

    #[test]
    fn the_epoch_and_a_known_date_parse_to_their_millisecond_counts() {
        assert_eq!(
            Timestamp::parse_rfc3339("1970-01-01T00:00:00Z").unwrap(),
            Timestamp(0)
        );
        // date -u -d 2026-01-05T00:00:00Z +%s → 1767571200
        assert_eq!(
            Timestamp::parse_rfc3339("2026-01-05T00:00:00Z")
                .unwrap()
                .millis(),
            1_767_571_200_000
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2026-01-05T00:00:00.25-00:30")
                .unwrap()
                .millis(),
            1_767_571_200_000 + 250 + 30 * 60_000
        );
    }

    #[test]
    fn formatting_round_trips_over_four_centuries_of_days() {
        for day in (-146_097..146_097).step_by(97) {
            let t = Timestamp(day * MILLIS_PER_DAY + 12_345_678);
            assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).unwrap(), t);
        }
    }

    #[test]
    fn malformed_and_impossible_timestamps_are_refused() {
        for text in [
            "",
            "2026-01-05",
            "2026-01-05 00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-01-05T24:00:00Z",
            "2026-01-05T00:00:00",
            "2026-01-05T00:00:00+0100",
            "2026-01-05T00:00:00.Z",
            "NaN",
        ] {
            assert!(Timestamp::parse_rfc3339(text).is_err(), "{text}");
        }
        assert!(Timestamp::parse_rfc3339("2024-02-29T00:00:00Z").is_ok());
    }

    #[test]
    fn hour_of_day_is_taken_in_utc() {
        let t = Timestamp::parse_rfc3339("2026-01-05T23:30:00+02:00").unwrap();
        assert_eq!(t.hour_utc(), 21);
    }
}
