//! Retention periods: the ISO-8601 durations of the policy file (`P7Y`, `P0D`, `P1Y6M`), in words,
//! and added to a point in time in calendar terms.

use std::fmt;

use super::Lang;

const DAY_US: i64 = 86_400_000_000;

/// A calendar period: years and months follow the calendar, days are whole days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Period {
    pub years: u32,
    pub months: u32,
    pub days: u32,
}

impl Period {
    pub const ZERO: Period = Period {
        years: 0,
        months: 0,
        days: 0,
    };

    pub fn is_zero(self) -> bool {
        self == Period::ZERO
    }

    /// Parses `PnYnMnD` with at least one part, the parts in that order (`P7Y`, `P0D`, `P30D`,
    /// `P1Y6M`). Weeks and times are not accepted: retention is kept in whole days.
    pub fn parse(text: &str) -> Option<Period> {
        let mut rest = text.strip_prefix('P')?;
        if rest.is_empty() {
            return None;
        }
        let mut period = Period::ZERO;
        let mut last_unit = 0u8;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 6 {
                return None;
            }
            let (number, tail) = rest.split_at(digits);
            let n: u32 = number.parse().ok()?;
            let (unit, tail) = match tail.as_bytes().first()? {
                b'Y' => (1, &tail[1..]),
                b'M' => (2, &tail[1..]),
                b'D' => (3, &tail[1..]),
                _ => return None,
            };
            if unit <= last_unit {
                return None;
            }
            match unit {
                1 => period.years = n,
                2 => period.months = n,
                _ => period.days = n,
            }
            last_unit = unit;
            rest = tail;
        }
        Some(period)
    }

    /// The instant `self` after `start_us` (microseconds since the Unix epoch, UTC). Adding months
    /// keeps the day of the month, clamped to the month's end (31 January + P1M = 28/29 February);
    /// saturates at `i64::MAX`.
    pub fn after(self, start_us: i64) -> i64 {
        let day = start_us.div_euclid(DAY_US);
        let time = start_us.rem_euclid(DAY_US);
        let (y, m, d) = civil_from_days(day);
        let months = y * 12 + (m - 1) + i64::from(self.years) * 12 + i64::from(self.months);
        let (y, m) = (months.div_euclid(12), months.rem_euclid(12) + 1);
        let d = d.min(days_in_month(y, m));
        (days_from_civil(y, m, d) + i64::from(self.days))
            .checked_mul(DAY_US)
            .and_then(|us| us.checked_add(time))
            .unwrap_or(i64::MAX)
    }

    /// The period in words: "7 jaar" / "7 years", "1 jaar en 6 maanden".
    pub fn words(self, lang: Lang) -> String {
        let units: [(u32, &str, &str); 3] = match lang {
            Lang::Nl => [
                (self.years, "jaar", "jaar"),
                (self.months, "maand", "maanden"),
                (self.days, "dag", "dagen"),
            ],
            Lang::En => [
                (self.years, "year", "years"),
                (self.months, "month", "months"),
                (self.days, "day", "days"),
            ],
        };
        let parts: Vec<String> = units
            .iter()
            .filter(|(n, _, _)| *n > 0)
            .map(|(n, one, many)| format!("{n} {}", if *n == 1 { one } else { many }))
            .collect();
        let and = match lang {
            Lang::Nl => " en ",
            Lang::En => " and ",
        };
        if parts.is_empty() {
            match lang {
                Lang::Nl => "0 dagen".to_owned(),
                Lang::En => "0 days".to_owned(),
            }
        } else {
            parts.join(and)
        }
    }
}

/// ISO-8601: `P7Y`, `P1Y6M`, `P0D`.
impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return f.write_str("P0D");
        }
        f.write_str("P")?;
        for (n, unit) in [(self.years, 'Y'), (self.months, 'M'), (self.days, 'D')] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

pub(crate) fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

/// Days in month `m` (1–12) of year `y`.
pub(crate) fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01: (year, month 1–12, day 1–31).
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(y: i64, m: i64, d: i64) -> i64 {
        days_from_civil(y, m, d) * DAY_US
    }

    #[test]
    fn parses_iso_periods() {
        let p = |y, m, d| {
            Some(Period {
                years: y,
                months: m,
                days: d,
            })
        };
        assert_eq!(Period::parse("P7Y"), p(7, 0, 0));
        assert_eq!(Period::parse("P0D"), p(0, 0, 0));
        assert_eq!(Period::parse("P30D"), p(0, 0, 30));
        assert_eq!(Period::parse("P1Y6M"), p(1, 6, 0));
        assert_eq!(Period::parse("P1Y2M3D"), p(1, 2, 3));
        for bad in [
            "",
            "P",
            "7Y",
            "P7",
            "PY",
            "P-1Y",
            "P7y",
            "P6M1Y",
            "P1Y1Y",
            "P2W",
            "PT1H",
            "P1DT1H",
            " P7Y",
            "P7Y ",
            "P1234567D",
            "P1.5Y",
        ] {
            assert_eq!(Period::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn displays_and_words() {
        for s in ["P7Y", "P0D", "P30D", "P1Y6M", "P1Y2M3D"] {
            assert_eq!(Period::parse(s).map(|p| p.to_string()).as_deref(), Some(s));
        }
        let p = Period::parse("P7Y").unwrap_or_default();
        assert_eq!(p.words(Lang::Nl), "7 jaar");
        assert_eq!(p.words(Lang::En), "7 years");
        let p = Period::parse("P1Y6M1D").unwrap_or_default();
        assert_eq!(p.words(Lang::Nl), "1 jaar en 6 maanden en 1 dag");
        assert_eq!(p.words(Lang::En), "1 year and 6 months and 1 day");
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for day in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn adds_calendar_periods() {
        let seven = Period {
            years: 7,
            ..Period::ZERO
        };
        let t = us(2019, 8, 1) + 3_600_000_000;
        assert_eq!(seven.after(t), us(2026, 8, 1) + 3_600_000_000);
        assert_eq!(seven.after(us(2020, 2, 29)), us(2027, 2, 28));
        let month = Period {
            months: 1,
            ..Period::ZERO
        };
        assert_eq!(month.after(us(2024, 1, 31)), us(2024, 2, 29));
        assert_eq!(month.after(us(2023, 12, 15)), us(2024, 1, 15));
        let days = Period {
            days: 30,
            ..Period::ZERO
        };
        assert_eq!(days.after(us(2024, 2, 15)), us(2024, 3, 16));
        assert_eq!(Period::ZERO.after(t), t);
        assert_eq!(Period::ZERO.after(-1), -1);
        assert_eq!(seven.after(i64::MAX - 1), i64::MAX);
        let huge = Period {
            years: u32::MAX,
            ..Period::ZERO
        };
        assert_eq!(huge.after(0), i64::MAX);
    }
}
