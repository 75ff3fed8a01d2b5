//! When a periodic entry is due: Celery's 5-field crontab, or a fixed interval, in the entry's
//! time zone.
//!
//! - `cron = "m h dom mon dow"` means what it means to Celery's `crontab.from_string`: day of
//!   week `0-6` with 0 = Sunday (so `1-5` is Monday to Friday; names like `mon-fri` work too), and
//!   a day of month and a day of week both given must both match. The `cron` crate underneath
//!   counts days from 1 = Sunday and wants seconds: both are translated here, never left to the
//!   reader.
//! - `every = "5m"` fires at every multiple of the period since the Unix epoch, so every beat
//!   computes the same ticks however long it has been running.
//! - Across a DST change a tick is a local wall-clock time: when clocks go back, a time that
//!   happens twice fires once (at its first instant); when they go forward, a time that does not
//!   exist that day does not fire.

use chrono::{DateTime, TimeZone as _, Utc};
use chrono_tz::Tz;
use std::str::FromStr as _;
use std::time::Duration;

/// An entry's schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A crontab, in a time zone.
    Cron {
        /// The expression as written.
        source: String,
        /// The translated schedule.
        schedule: Box<cron::Schedule>,
        /// Its zone.
        tz: Tz,
    },
    /// A fixed period.
    Every(Duration),
}

/// Why a schedule is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

impl Schedule {
    /// A crontab in `tz`: five fields, Celery's meaning.
    pub fn cron(expr: &str, tz: Tz) -> Result<Schedule, ScheduleError> {
        let translated = translate(expr)?;
        let schedule = cron::Schedule::from_str(&translated)
            .map_err(|e| ScheduleError(format!("cron {expr:?}: {e}")))?;
        Ok(Schedule::Cron { source: expr.to_string(), schedule: Box::new(schedule), tz })
    }

    /// Every `period` (at least a second).
    pub fn every(period: Duration) -> Result<Schedule, ScheduleError> {
        if period < Duration::from_secs(1) {
            return Err(ScheduleError(format!("every {period:?}: the shortest period is 1s")));
        }
        Ok(Schedule::Every(period))
    }

    /// The ticks after `after`, up to and including `until`, oldest first; at most `limit` of
    /// the most recent ones (a schedule left alone for a year is not walked tick by tick).
    pub fn ticks(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        if until <= after || limit == 0 {
            return Vec::new();
        }
        match self {
            Schedule::Every(period) => {
                let p = period.as_millis().max(1) as i64;
                let last = until.timestamp_millis().div_euclid(p) * p;
                let first = after.timestamp_millis().div_euclid(p) * p + p;
                let count = ((last - first) / p + 1).max(0) as usize;
                (0..count.min(limit))
                    .rev()
                    .filter_map(|i| Utc.timestamp_millis_opt(last - i as i64 * p).single())
                    .collect()
            }
            Schedule::Cron { schedule, tz, .. } => {
                // Walk back from `until`: the newest `limit` ticks, without visiting the rest.
                let until_local = until.with_timezone(tz);
                let mut out: Vec<DateTime<Utc>> = Vec::new();
                // `after_owned(t).rev()` yields the ticks before `t`, newest first; `t` itself is
                // included by stepping one second past it.
                let from = until_local + chrono::TimeDelta::seconds(1);
                for t in schedule.after_owned(from).rev() {
                    if t.with_timezone(&Utc) <= after {
                        break;
                    }
                    if repeated(tz, &t) {
                        continue;
                    }
                    out.push(t.with_timezone(&Utc));
                    if out.len() >= limit {
                        break;
                    }
                }
                out.truncate(limit);
                out.reverse();
                out
            }
        }
    }

    /// The next tick after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(period) => {
                let p = period.as_millis().max(1) as i64;
                Utc.timestamp_millis_opt(after.timestamp_millis().div_euclid(p) * p + p).single()
            }
            Schedule::Cron { schedule, tz, .. } => schedule
                .after(&after.with_timezone(tz))
                .find(|t| !repeated(tz, t))
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// How the schedule was written, for status.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Cron { source, tz, .. } => format!("cron {source:?} ({tz})"),
            Schedule::Every(p) => format!("every {}", crate::units::HumanDuration(*p)),
        }
    }
}

/// Whether `t` is the second instant of its wall-clock time (clocks went back): a wall-clock
/// time fires at its first instant only, wherever the walk that finds it starts.
fn repeated(tz: &Tz, t: &DateTime<Tz>) -> bool {
    tz.from_local_datetime(&t.naive_local()).earliest().is_some_and(|first| first < *t)
}

/// Celery's five fields as the `cron` crate's six: seconds `0` first, and every numeric day of
/// week `d` (0-6, 0 = Sunday) as `d + 1` (the crate's 1 = Sunday). Names pass through.
fn translate(expr: &str) -> Result<String, ScheduleError> {
    let expr = expr.trim();
    if expr.starts_with('@') {
        return Ok(expr.to_string());
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = fields.as_slice() else {
        return Err(ScheduleError(format!(
            "cron {expr:?}: expected 5 fields (minute hour day-of-month month day-of-week), got {}",
            fields.len()
        )));
    };
    let mut days = Vec::new();
    for part in dow.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        let shift = |d: &str| -> Result<String, ScheduleError> {
            match d.parse::<u8>() {
                Ok(n @ 0..=6) => Ok((n + 1).to_string()),
                Ok(n) => Err(ScheduleError(format!(
                    "cron {expr:?}: day of week {n} is out of range (0-6, 0 = Sunday)"
                ))),
                Err(_) => Ok(d.to_string()),
            }
        };
        let range = match range.split_once('-') {
            Some((a, b)) => format!("{}-{}", shift(a)?, shift(b)?),
            None => shift(range)?,
        };
        days.push(match step {
            Some(s) => format!("{range}/{s}"),
            None => range,
        });
    }
    Ok(format!("0 {minute} {hour} {dom} {month} {}", days.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike as _, Timelike as _, Weekday};

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn one_to_five_is_monday_to_friday_as_in_celery() {
        let s = Schedule::cron("0 9 * * 1-5", Tz::UTC).unwrap();
        // Sunday 2026-11-22 to Sunday 2026-11-29.
        let ticks = s.ticks(utc("2026-11-22T00:00:00Z"), utc("2026-11-29T23:59:59Z"), 100);
        let days: Vec<Weekday> = ticks.iter().map(|t| t.weekday()).collect();
        use Weekday::*;
        assert_eq!(days, [Mon, Tue, Wed, Thu, Fri]);
        assert!(ticks.iter().all(|t| (t.hour(), t.minute()) == (9, 0)));
        // 0 is Sunday, and names work.
        let sunday = Schedule::cron("30 8 * * 0", Tz::UTC).unwrap();
        assert_eq!(sunday.next_after(utc("2026-11-23T00:00:00Z")).unwrap().weekday(), Sun);
        let named = Schedule::cron("0 9 * * mon-fri", Tz::UTC).unwrap();
        assert_eq!(
            named.ticks(utc("2026-11-22T00:00:00Z"), utc("2026-11-29T00:00:00Z"), 9).len(),
            5
        );
        assert!(Schedule::cron("0 9 * * 7", Tz::UTC).unwrap_err().0.contains("out of range"));
        assert!(Schedule::cron("*/5 * * *", Tz::UTC).unwrap_err().0.contains("5 fields"));
    }

    #[test]
    fn a_day_of_month_and_a_day_of_week_must_both_match() {
        let s = Schedule::cron("0 9 13 * 5", Tz::UTC).unwrap();
        let ticks = s.ticks(utc("2026-01-01T00:00:00Z"), utc("2026-12-31T00:00:00Z"), 100);
        let dates: Vec<String> = ticks.iter().map(|t| t.format("%m-%d").to_string()).collect();
        assert_eq!(dates, ["02-13", "03-13", "11-13"]);
    }

    #[test]
    fn berlin_dst_fires_each_wall_clock_time_once() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // Clocks go back on 2026-10-25 at 03:00 CEST to 02:00 CET: 02:30 happens twice.
        let s = Schedule::cron("30 2 * * *", berlin).unwrap();
        let ticks = s.ticks(utc("2026-10-24T12:00:00Z"), utc("2026-10-26T12:00:00Z"), 10);
        assert_eq!(ticks, [utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]);
        assert_eq!(s.next_after(utc("2026-10-24T12:00:00Z")), Some(utc("2026-10-25T00:30:00Z")));
        assert_eq!(s.next_after(utc("2026-10-25T00:30:00Z")), Some(utc("2026-10-26T01:30:00Z")));
        // Every 15 minutes through the repeated hour: four fires for its four wall times.
        let quarter = Schedule::cron("*/15 2 * * *", berlin).unwrap();
        let ticks = quarter.ticks(utc("2026-10-24T23:59:00Z"), utc("2026-10-25T02:00:00Z"), 100);
        assert_eq!(ticks.len(), 4, "{ticks:?}");
        // Clocks go forward on 2026-03-29 at 02:00 CET to 03:00 CEST: 02:30 does not exist.
        let ticks = s.ticks(utc("2026-03-28T12:00:00Z"), utc("2026-03-30T12:00:00Z"), 10);
        assert_eq!(ticks, [utc("2026-03-30T00:30:00Z")]);
    }

    #[test]
    fn every_ticks_on_multiples_of_its_period_and_keeps_the_newest() {
        let s = Schedule::every(Duration::from_secs(300)).unwrap();
        let ticks = s.ticks(utc("2026-11-23T10:01:00Z"), utc("2026-11-23T10:20:00Z"), 100);
        assert_eq!(
            ticks,
            [
                utc("2026-11-23T10:05:00Z"),
                utc("2026-11-23T10:10:00Z"),
                utc("2026-11-23T10:15:00Z"),
                utc("2026-11-23T10:20:00Z")
            ]
        );
        let newest = s.ticks(utc("2026-11-23T10:01:00Z"), utc("2026-11-23T10:20:00Z"), 2);
        assert_eq!(newest, [utc("2026-11-23T10:15:00Z"), utc("2026-11-23T10:20:00Z")]);
        assert_eq!(s.next_after(utc("2026-11-23T10:20:00Z")), Some(utc("2026-11-23T10:25:00Z")));
        assert!(Schedule::every(Duration::from_millis(10)).is_err());
    }
}
