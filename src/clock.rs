//! Wall-clock helpers in the platform's terms: Unix seconds for `timestamp`,
//! `yyyy-MM-dd HH:mm:ss` at a fixed UTC offset (Beijing, +08:00, unless the
//! configuration says otherwise) for `time` fields, and the start of the next
//! local day for daily call caps (10034 resets at Beijing midnight).
//!
//! A fixed offset, not the machine's time zone: counter PCs are often set to
//! UTC or to nothing at all, and the platform does not care what they think.

use time::{
    format_description::BorrowedFormatItem, macros::format_description, OffsetDateTime, UtcOffset,
};

/// The platform's `time` format.
pub const PLATFORM_TIME: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");

/// Beijing time.
pub const BEIJING: UtcOffset = match UtcOffset::from_hms(8, 0, 0) {
    Ok(o) => o,
    Err(_) => panic!("constant offset"),
};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Format Unix seconds as platform time at `offset`.
/// The end of a wait of `wait_s` seconds from now, as a whole second
/// rounded *up*: a deadline stored in seconds must never cut a wait short
/// (`use_wait_s`: HIS's `use` arriving 0.9 s before the configured end
/// would otherwise find its default use already claimed).
pub fn deadline_after(wait_s: u64) -> i64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    ceil_secs(now_ms + (wait_s as i64).saturating_mul(1000))
}

/// Milliseconds to whole seconds, rounded up.
pub fn ceil_secs(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

pub fn platform_time(unix: i64, offset: UtcOffset) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .to_offset(offset)
        .format(PLATFORM_TIME)
        .unwrap_or_default()
}

/// Parse platform time (strictly `yyyy-MM-dd HH:mm:ss`).
pub fn parse_platform_time(s: &str, offset: UtcOffset) -> Option<i64> {
    let t = time::PrimitiveDateTime::parse(s, PLATFORM_TIME).ok()?;
    Some(t.assume_offset(offset).unix_timestamp())
}

/// Unix seconds of the next midnight at `offset` after `unix`.
pub fn next_midnight(unix: i64, offset: UtcOffset) -> i64 {
    let off = i64::from(offset.whole_seconds());
    let local = unix + off;
    (local.div_euclid(86_400) + 1) * 86_400 - off
}

/// The local day number at `offset`, for per-day counters.
pub fn day_number(unix: i64, offset: UtcOffset) -> i64 {
    (unix + i64::from(offset.whole_seconds())).div_euclid(86_400)
}

/// Parse `+08:00` / `-05:30` (also `+0800`, `Z`).
pub fn parse_offset(s: &str) -> Option<UtcOffset> {
    if s == "Z" || s == "+00:00" {
        return Some(UtcOffset::UTC);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1i8, &s[1..]),
        b'-' => (-1i8, &s[1..]),
        _ => return None,
    };
    let (h, m) = match rest.len() {
        5 if rest.as_bytes()[2] == b':' => (&rest[..2], &rest[3..]),
        4 => (&rest[..2], &rest[2..]),
        _ => return None,
    };
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m > 59 || (h == 14 && m != 0) {
        return None;
    }
    UtcOffset::from_hms(sign * h, sign * m, 0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_never_down() {
        assert_eq!(ceil_secs(1_000), 1);
        assert_eq!(ceil_secs(1_001), 2);
        assert_eq!(ceil_secs(1_999), 2);
        assert_eq!(ceil_secs(0), 0);
        let before = now_unix();
        let d = deadline_after(20);
        assert!(d >= before + 20 && d <= now_unix() + 21, "{d}");
    }

    #[test]
    fn formats_beijing_time() {
        // 1525392000 = 2018-05-04 00:00:00 UTC = 08:00 in Beijing.
        assert_eq!(platform_time(1_525_392_000, BEIJING), "2018-05-04 08:00:00");
        assert_eq!(
            parse_platform_time("2018-05-04 08:00:00", BEIJING),
            Some(1_525_392_000)
        );
        assert_eq!(parse_platform_time("2018-05-04T08:00:00", BEIJING), None);
        assert_eq!(parse_platform_time("2018-5-4 08:00:00", BEIJING), None);
    }

    #[test]
    fn next_beijing_midnight() {
        // 2018-05-04 23:59:59 Beijing -> 2018-05-05 00:00:00 Beijing.
        let t = parse_platform_time("2018-05-04 23:59:59", BEIJING).unwrap();
        assert_eq!(next_midnight(t, BEIJING), t + 1);
        let t0 = parse_platform_time("2018-05-05 00:00:00", BEIJING).unwrap();
        assert_eq!(next_midnight(t0, BEIJING), t0 + 86_400);
        assert_eq!(day_number(t, BEIJING) + 1, day_number(t0, BEIJING));
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("+08:00"), Some(BEIJING));
        assert_eq!(parse_offset("+0800"), Some(BEIJING));
        assert_eq!(
            parse_offset("-05:30").unwrap().whole_seconds(),
            -(5 * 3600 + 30 * 60)
        );
        for bad in [
            "08:00",
            "+8:00",
            "+24:00",
            "+08:60",
            "+14:30",
            "",
            "+",
            "+ab:cd",
            "+08:00:00",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
    }
}
