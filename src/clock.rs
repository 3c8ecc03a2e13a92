//! Time as kluis stores it: integer microseconds since the Unix epoch, for rows, records and events;
//! and the clock retention decisions read, which tests can move forward.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

/// Microseconds since the Unix epoch (0 before it, saturating far after it).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The clock of one kluis instance: the system clock, plus an offset that only an adjustable
/// clock (made by tests and benchmarks, never by configuration) can move. Retention clocks,
/// processing records and audit events read it, so a test can jump seven years.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_us: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that starts at the system time and can be moved forward with [`Clock::advance`].
    pub fn adjustable() -> Self {
        Self {
            offset_us: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// Moves an adjustable clock forward by `us` microseconds (a system clock ignores it).
    pub fn advance_us(&self, us: i64) {
        if let Some(offset) = &self.offset_us {
            offset.fetch_add(us, Ordering::SeqCst);
        }
    }

    /// Now, in microseconds since the Unix epoch.
    pub fn now_us(&self) -> i64 {
        let offset = self
            .offset_us
            .as_ref()
            .map_or(0, |o| o.load(Ordering::SeqCst));
        now_us().saturating_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adjustable_clock_moves_forward_and_the_system_clock_does_not() {
        let system = Clock::system();
        system.advance_us(1_000_000_000);
        assert!(system.now_us() - now_us() < 1_000_000);
        let clock = Clock::adjustable();
        let copy = clock.clone();
        clock.advance_us(86_400_000_000);
        assert!(copy.now_us() - now_us() >= 86_400_000_000 - 1_000_000);
    }
}
