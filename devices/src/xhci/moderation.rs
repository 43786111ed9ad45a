//! Interrupt moderation of interrupter 0 (xHCI 1.2 sections 4.17.2 and
//! 5.5.2.2).
//!
//! IMOD holds the Interrupt Moderation Interval (IMODI, bits 15:0) and the
//! Interrupt Moderation Counter (IMODC, bits 31:16), both in 250 ns units.
//! IMODC is loaded with IMODI whenever the controller asserts the interrupt
//! and counts down to 0; an interrupt may only be asserted while it is 0.
//! Here the counter is kept as the instant it reaches 0. An interrupt that
//! comes due earlier is *deferred*: the interrupter records the deadline,
//! the controller asks its [`ModerationTimer`] to call back then, and
//! [`Xhci::on_moderation_timer`](super::Xhci::on_moderation_timer) delivers
//! what is still pending under the usual rules (events pending, EHB clear).
//!
//! Moderation needs someone to run that callback, so it is active only once
//! the VMM installs a timer ([`Xhci::set_moderation`](super::Xhci::set_moderation));
//! without one every interrupt is asserted at once, as with IMODI = 0.

use std::time::{Duration, Instant};

/// IMOD bits 15:0: the interval (section 5.5.2.2).
pub const IMODI_MASK: u32 = 0xffff;
/// IMOD bits 31:16: the down-counter.
pub const IMODC_SHIFT: u32 = 16;
/// Unit of both fields: 250 ns.
pub const IMOD_UNIT_NS: u64 = 250;
/// IMODI after reset: 4000 x 250 ns = 1 ms (section 5.5.2.2).
pub const IMODI_RESET: u32 = 4000;

/// Where the controller reads the time (tests inject a manual clock).
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic clock of the host.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Calls the controller back at a deadline: after `arm(at)` the owner calls
/// `on_moderation_timer` at (or soon after) `at`. A later `arm` replaces
/// the earlier one. Called with the controller locked, from any thread.
pub trait ModerationTimer: Send + Sync {
    fn arm(&self, at: Instant);
}

/// `units` x 250 ns.
pub fn imod_duration(units: u32) -> Duration {
    Duration::from_nanos(u64::from(units) * IMOD_UNIT_NS)
}

/// The moderation state of one interrupter.
#[derive(Debug, Default, Clone)]
pub struct Moderation {
    /// When IMODC reaches 0 (None: it is 0).
    counter_end: Option<Instant>,
    /// When a deferred interrupt is due.
    deadline: Option<Instant>,
}

impl Moderation {
    /// Whether an interrupt may be asserted at `now`. If not, records the
    /// deadline at which it may.
    pub fn may_assert(&mut self, now: Instant) -> bool {
        match self.counter_end {
            Some(end) if end > now => {
                self.deadline = Some(end);
                false
            }
            _ => true,
        }
    }

    /// The interrupt was asserted at `now`: IMODC reloads from `imodi`.
    pub fn asserted(&mut self, now: Instant, imodi: u32) {
        self.deadline = None;
        self.counter_end = (imodi != 0).then(|| now + imod_duration(imodi));
    }

    /// A guest write of IMODC at `now` (software may reload the counter).
    /// A deferred interrupt moves to the new end of the count.
    pub fn write_counter(&mut self, now: Instant, imodc: u32) {
        self.counter_end = (imodc != 0).then(|| now + imod_duration(imodc));
        if self.deadline.is_some() {
            self.deadline = Some(self.counter_end.unwrap_or(now));
        }
    }

    /// IMODC as a read at `now` returns it (rounded up, at most 0xffff).
    pub fn counter(&self, now: Instant) -> u32 {
        let Some(left) = self.counter_end.map(|e| e.saturating_duration_since(now)) else {
            return 0;
        };
        let units = left.as_nanos().div_ceil(u128::from(IMOD_UNIT_NS));
        units.min(u128::from(IMODI_MASK)) as u32
    }

    /// When a deferred interrupt is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Takes the deadline if it has passed at `now`.
    pub fn take_expired(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now => {
                self.deadline = None;
                true
            }
            _ => false,
        }
    }

    /// Drops a deferred interrupt and the count (Run/Stop cleared).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_defers_until_it_runs_out() {
        let t0 = Instant::now();
        let mut m = Moderation::default();
        assert!(m.may_assert(t0), "counter starts at 0");
        m.asserted(t0, 160);
        assert_eq!(m.counter(t0), 160);
        let t1 = t0 + Duration::from_micros(10);
        assert_eq!(m.counter(t1), 120);
        assert!(!m.may_assert(t1));
        assert_eq!(m.deadline(), Some(t0 + Duration::from_micros(40)));
        assert!(!m.take_expired(t1));
        let t2 = t0 + Duration::from_micros(40);
        assert!(m.take_expired(t2));
        assert_eq!(m.deadline(), None);
        assert!(m.may_assert(t2));
        assert_eq!(m.counter(t2), 0);
    }

    #[test]
    fn zero_interval_never_defers_and_counter_writes_move_the_deadline() {
        let t0 = Instant::now();
        let mut m = Moderation::default();
        m.asserted(t0, 0);
        assert!(m.may_assert(t0));
        m.write_counter(t0, 4);
        assert!(!m.may_assert(t0));
        assert_eq!(m.deadline(), Some(t0 + Duration::from_nanos(1000)));
        m.write_counter(t0, 0);
        assert_eq!(m.deadline(), Some(t0), "due at once");
        m.clear();
        assert_eq!((m.deadline(), m.counter(t0)), (None, 0));
    }
}
