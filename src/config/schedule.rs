//! Job schedules and time zones as the config states them, parsed by validation and by the
//! job runner alike (so a schedule that validates is one the runner can run).

use std::str::FromStr;

use chrono::FixedOffset;

pub(crate) fn parse_schedule(s: &str) -> Result<cron::Schedule, cron::error::Error> {
    cron::Schedule::from_str(s)
}

/// `UTC` (or `Z`) or a fixed offset `+HH:MM` / `-HH:MM`.
pub(crate) fn parse_offset(tz: &str) -> Option<FixedOffset> {
    if tz.eq_ignore_ascii_case("utc") || tz == "Z" {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if h > 23 || m > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_schedules() {
        assert_eq!(parse_offset("UTC"), FixedOffset::east_opt(0));
        assert_eq!(parse_offset("+02:00"), FixedOffset::east_opt(7200));
        assert_eq!(parse_offset("-05:30"), FixedOffset::east_opt(-(5 * 3600 + 1800)));
        assert!(parse_offset("Europe/Berlin").is_none() && parse_offset("+25:00").is_none());
        assert!(parse_schedule("*/5 * * * * *").is_ok());
        assert!(parse_schedule("not cron").is_err());
    }
}
