//! Time as kluis stores it: integer microseconds since the Unix epoch, for rows, records and events.

/// Microseconds since the Unix epoch (0 before it, saturating far after it).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
