//! Wall-clock times as people read them, without a date library.

/// `2026-12-01 14:00:17` (UTC, proleptic Gregorian) for unix milliseconds; `None` for
/// 0 or a negative time (unset).
pub fn utc_datetime(ms: i64) -> Option<String> {
    if ms <= 0 {
        return None;
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    Some(format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(utc_datetime(0), None);
        assert_eq!(utc_datetime(1).as_deref(), Some("1970-01-01 00:00:00"));
        assert_eq!(utc_datetime(951_782_400_000).as_deref(), Some("2000-02-29 00:00:00"));
        assert_eq!(utc_datetime(1_796_133_047_123).as_deref(), Some("2026-12-01 13:50:47"));
        assert_eq!(utc_datetime(4_107_542_399_000).as_deref(), Some("2100-02-28 23:59:59"));
    }
}
