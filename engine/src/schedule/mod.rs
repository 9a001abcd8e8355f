//! Policy time: work hours (here: when the work-hours bandwidth limit
//! applies, and when the off-hours window for automatic resyncs opens), the
//! host-wide upload limit ([`throttle`]) and the retry backoff ([`retry`]).
//! Pure: callers pass the local time ([`local_now`] reads it).

pub mod retry;
pub mod throttle;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Local wall-clock time as the schedule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Monday .. 6 = Sunday.
    pub weekday: u8,
    /// Minutes since local midnight, 0..1440.
    pub minute: u16,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Work hours `[start, end)` on the given days. Default 08:00-18:00, Monday to Friday.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkSchedule {
    pub start_minute: u16,
    pub end_minute: u16,
    /// Monday first.
    pub days: [bool; 7],
}

impl Default for WorkSchedule {
    fn default() -> Self {
        WorkSchedule { start_minute: 8 * 60, end_minute: 18 * 60, days: [true, true, true, true, true, false, false] }
    }
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
}

impl WorkSchedule {
    /// Parses `08:00-18:00` and `mon-fri` (also `mon,wed,fri`, `all`, `none`).
    pub fn parse(hours: &str, days: &str) -> Result<Self> {
        let bad_hours = || Error::invalid("work hours", format!("{hours:?}: expected HH:MM-HH:MM, e.g. 08:00-18:00"));
        let (a, b) = hours.split_once('-').ok_or_else(bad_hours)?;
        let (start_minute, end_minute) = (parse_hhmm(a).ok_or_else(bad_hours)?, parse_hhmm(b).ok_or_else(bad_hours)?);
        if start_minute >= end_minute {
            return Err(Error::invalid("work hours", format!("{hours:?}: the start must come before the end")));
        }
        Ok(WorkSchedule { start_minute, end_minute, days: parse_days(days)? })
    }

    pub fn is_work_time(&self, t: LocalTime) -> bool {
        self.days[t.weekday as usize % 7] && (self.start_minute..self.end_minute).contains(&t.minute)
    }

    /// Minutes from `t` until off-hours (0 when it is off-hours now).
    pub fn minutes_until_off_hours(&self, t: LocalTime) -> u32 {
        if self.is_work_time(t) {
            (self.end_minute - t.minute) as u32
        } else {
            0
        }
    }

    pub fn hours_string(&self) -> String {
        let f = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        format!("{}-{}", f(self.start_minute), f(self.end_minute))
    }

    pub fn days_string(&self) -> String {
        let on: Vec<&str> = DAY_NAMES.iter().zip(self.days).filter(|(_, d)| *d).map(|(n, _)| *n).collect();
        match on.len() {
            0 => "none".into(),
            7 => "all".into(),
            _ => on.join(","),
        }
    }
}

fn parse_days(s: &str) -> Result<[bool; 7]> {
    let s = s.trim().to_ascii_lowercase();
    let idx = |d: &str| {
        DAY_NAMES.iter().position(|n| *n == d.trim()).ok_or_else(|| {
            Error::invalid("work days", format!("{d:?} is not a day; use mon,tue,wed,thu,fri,sat,sun, a range or all"))
        })
    };
    let mut days = [false; 7];
    match s.as_str() {
        "all" => return Ok([true; 7]),
        "none" => return Ok(days),
        _ => {}
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (idx(a)?, idx(b)?);
                if a > b {
                    return Err(Error::invalid("work days", format!("{part:?}: the range runs backwards")));
                }
                days[a..=b].iter_mut().for_each(|d| *d = true);
            }
            None => days[idx(part)?] = true,
        }
    }
    Ok(days)
}

/// The host's local time now.
pub fn local_now() -> LocalTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes into the tm we own; a zeroed tm is valid input.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return LocalTime { weekday: 0, minute: 0 };
    }
    // tm_wday: 0 = Sunday.
    LocalTime { weekday: ((tm.tm_wday + 6) % 7) as u8, minute: (tm.tm_hour * 60 + tm.tm_min) as u16 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(weekday: u8, h: u16, m: u16) -> LocalTime {
        LocalTime { weekday, minute: h * 60 + m }
    }

    #[test]
    fn work_hours_table() {
        let s = WorkSchedule::parse("08:00-18:00", "mon-fri").unwrap();
        let cases = [
            (t(0, 7, 59), false, 0),
            (t(0, 8, 0), true, 600),
            (t(2, 17, 59), true, 1),
            (t(4, 18, 0), false, 0),
            (t(5, 12, 0), false, 0),
            (t(6, 9, 0), false, 0),
        ];
        for (at, work, until_off) in cases {
            assert_eq!(s.is_work_time(at), work, "{at:?}");
            assert_eq!(s.minutes_until_off_hours(at), until_off, "{at:?}");
        }
        assert_eq!((s.hours_string().as_str(), s.days_string().as_str()), ("08:00-18:00", "mon,tue,wed,thu,fri"));
    }

    #[test]
    fn parsing_names_the_problem() {
        assert_eq!(
            WorkSchedule::parse("09:30-17:00", "mon,wed,sun").unwrap().days,
            [true, false, true, false, false, false, true]
        );
        assert_eq!(WorkSchedule::parse("00:00-24:00", "all").unwrap().end_minute, 1440);
        for (h, d, field) in [
            ("8-18", "mon", "work hours"),
            ("18:00-08:00", "mon", "work hours"),
            ("08:00-18:60", "mon", "work hours"),
            ("08:00-18:00", "funday", "work days"),
            ("08:00-18:00", "fri-mon", "work days"),
        ] {
            let e = WorkSchedule::parse(h, d).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { field: f, .. } if f == field), "{h} {d}: {e}");
        }
        let now = local_now();
        assert!(now.weekday < 7 && now.minute < 1440);
    }
}
