//! Frame accounting: how many guest pages may be resident, and from which
//! source a fault gets its frame.
//!
//! A frame is *charged* before a page is filled and released when the page
//! is dropped, so the charge never undercounts the mapped pages. Ordinary
//! faults take a frame only while the charge is under the limit and otherwise
//! wait for the reclaim thread. NOIO faults never wait: they take, in order,
//! free budget (credited to discards when a discard made the room), a clean
//! page (charged now, dropped by the reclaim thread without I/O), the reserve
//! above the limit, and finally a counted, logged overshoot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a waiting fault rechecks the stop and fatal flags.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// Where a frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Free,
    Discarded,
    Clean,
    Reserve,
    Overshoot,
}

#[derive(Debug, Default)]
struct Acct {
    charged: usize,
    peak: usize,
    /// Clean pages promised to NOIO faults and not yet dropped.
    promised_clean: usize,
    /// Frames freed by discards not yet handed out.
    discard_credit: usize,
    reserve_low_water: usize,
}

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    reserve: usize,
    high: usize,
    low: usize,
    acct: Mutex<Acct>,
    /// Signalled when frames are released.
    freed: Condvar,
    /// Signalled when the reclaim thread has work.
    kick: Condvar,
}

/// Why the reclaim thread woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimNeed {
    pub over_high: bool,
    pub promised_clean: usize,
}

impl Budget {
    pub fn new(limit: usize, reserve: usize, high: usize, low: usize) -> Self {
        Self {
            limit,
            reserve,
            high,
            low,
            acct: Mutex::new(Acct {
                reserve_low_water: reserve,
                ..Acct::default()
            }),
            freed: Condvar::new(),
            kick: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Acct> {
        self.acct.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn reserve(&self) -> usize {
        self.reserve
    }

    pub fn charged(&self) -> usize {
        self.lock().charged
    }

    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    pub fn reserve_low_water(&self) -> usize {
        self.lock().reserve_low_water
    }

    fn charge(&self, a: &mut Acct) {
        a.charged += 1;
        a.peak = a.peak.max(a.charged);
        if a.charged > self.high {
            self.kick.notify_one();
        }
    }

    fn charge_free(&self, a: &mut Acct) -> Source {
        self.charge(a);
        if a.discard_credit > 0 {
            a.discard_credit -= 1;
            Source::Discarded
        } else {
            Source::Free
        }
    }

    /// Charges pages found resident at start.
    pub fn preload(&self, n: usize) {
        let mut a = self.lock();
        a.charged += n;
        a.peak = a.peak.max(a.charged);
        if a.charged > self.high {
            self.kick.notify_one();
        }
    }

    /// Charges a frame without waiting, if the caller's class allows one now.
    /// `clean_pages` is how many clean pages exist to be dropped.
    pub fn try_take(&self, noio: bool, clean_pages: usize) -> Option<Source> {
        let mut a = self.lock();
        if a.charged < self.limit {
            return Some(self.charge_free(&mut a));
        }
        if !noio {
            return None;
        }
        let source = if a.charged < self.limit + self.reserve {
            if clean_pages > a.promised_clean {
                a.promised_clean += 1;
                Source::Clean
            } else {
                Source::Reserve
            }
        } else {
            Source::Overshoot
        };
        self.charge(&mut a);
        let used = a.charged - self.limit;
        a.reserve_low_water = a.reserve_low_water.min(self.reserve.saturating_sub(used));
        Some(source)
    }

    /// Charges up to `max` frames for pages mapped around a fault, only from
    /// free budget under the limit (never the reserve, never for NOIO);
    /// returns how many. Give back unused ones with [`Budget::release`].
    pub fn try_take_extra(&self, max: usize) -> usize {
        let mut a = self.lock();
        let n = max.min(self.limit.saturating_sub(a.charged));
        if n > 0 {
            a.charged += n;
            a.peak = a.peak.max(a.charged);
            if a.charged > self.high {
                self.kick.notify_one();
            }
        }
        n
    }

    /// Whether `n` more frames would leave the charge at or under reclaim's
    /// low watermark: memory is plentiful, reclaim would not start.
    pub fn plentiful(&self, n: usize) -> bool {
        self.lock().charged + n <= self.low
    }

    /// Whether `n` more frames fit under the limit.
    pub fn fits(&self, n: usize) -> bool {
        self.lock().charged + n <= self.limit
    }

    /// Whether reclaim makes room for `n` frames whenever they do not fit:
    /// it runs while the charge is over the high watermark and stops below
    /// it, so it does when `n` fit between that watermark and the limit.
    pub fn room_comes_for(&self, n: usize) -> bool {
        self.high + n <= self.limit
    }

    /// Waits until `n` frames fit under the limit (kicking reclaim), at most
    /// `timeout`; gives up early when `abort` is set or `give_up` is true.
    /// Charges nothing. Whether they fit.
    pub fn wait_room(
        &self,
        n: usize,
        timeout: Duration,
        abort: &AtomicBool,
        give_up: impl Fn() -> bool,
    ) -> bool {
        let start = Instant::now();
        let mut a = self.lock();
        loop {
            if a.charged + n <= self.limit {
                return true;
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() || abort.load(Ordering::SeqCst) || give_up() {
                return false;
            }
            self.kick.notify_one();
            a = self
                .freed
                .wait_timeout(a, left.min(WAIT_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Charges a frame, waiting until the charge is under the limit. Gives up
    /// waiting when `abort` is set and charges anyway (an overshoot), so no
    /// faulting thread hangs once the pager failed or is stopping.
    #[cfg(test)]
    pub fn take_waiting(&self, abort: &AtomicBool) -> (Source, Duration) {
        self.take_waiting_unless(abort, || false)
            .unwrap_or_else(|| unreachable!("a wait that never gives up returned none"))
    }

    /// [`Budget::take_waiting`] that charges nothing and returns `None` once
    /// `give_up` is true (checked at least every poll interval).
    pub fn take_waiting_unless(
        &self,
        abort: &AtomicBool,
        give_up: impl Fn() -> bool,
    ) -> Option<(Source, Duration)> {
        let start = Instant::now();
        let mut a = self.lock();
        loop {
            if a.charged < self.limit {
                let s = self.charge_free(&mut a);
                return Some((s, start.elapsed()));
            }
            if abort.load(Ordering::SeqCst) {
                self.charge(&mut a);
                return Some((Source::Overshoot, start.elapsed()));
            }
            if give_up() {
                return None;
            }
            self.kick.notify_one();
            a = self
                .freed
                .wait_timeout(a, WAIT_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Undoes a [`Budget::try_take`] whose page was not filled after all.
    pub fn untake(&self, source: Source) {
        let mut a = self.lock();
        if source == Source::Clean {
            a.promised_clean = a.promised_clean.saturating_sub(1);
        }
        if source == Source::Discarded {
            a.discard_credit += 1;
        }
        a.charged = a.charged.saturating_sub(1);
        self.freed.notify_all();
    }

    /// Releases `n` frames: `clean` when they were clean pages dropped by the
    /// reclaim thread (paying back promises), `discard` when a discard freed them.
    pub fn release(&self, n: usize, clean: bool, discard: bool) {
        if n == 0 {
            return;
        }
        let mut a = self.lock();
        a.charged = a.charged.saturating_sub(n);
        if clean {
            a.promised_clean = a.promised_clean.saturating_sub(n);
        }
        if discard {
            a.discard_credit += n;
        }
        self.freed.notify_all();
    }

    /// Whether the reclaim thread should be working.
    pub fn need(&self) -> ReclaimNeed {
        let a = self.lock();
        ReclaimNeed {
            over_high: a.charged > self.high,
            promised_clean: a.promised_clean,
        }
    }

    /// Whether reclaim has reached its low watermark once `pending` more
    /// clean pages (collected for a batch, not yet dropped) are released.
    pub fn satisfied(&self, pending: usize) -> bool {
        let a = self.lock();
        a.charged.saturating_sub(pending) <= self.low && a.promised_clean <= pending
    }

    /// Blocks the reclaim thread until there is work or `timeout` passes.
    pub fn wait_for_work(&self, timeout: Duration) {
        let a = self.lock();
        if a.charged > self.high || a.promised_clean > 0 {
            return;
        }
        let _ = self
            .kick
            .wait_timeout(a, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Wakes the reclaim thread.
    pub fn kick(&self) {
        self.kick.notify_all();
    }

    /// Wakes every waiter (stop, fatal error).
    pub fn wake_all(&self) {
        self.freed.notify_all();
        self.kick.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noio_sources_in_order() {
        let b = Budget::new(2, 2, 2, 1);
        assert_eq!(b.try_take(false, 0), Some(Source::Free));
        assert_eq!(b.try_take(true, 0), Some(Source::Free));
        assert_eq!(b.try_take(false, 5), None, "ordinary fault must wait");
        assert_eq!(b.try_take(true, 1), Some(Source::Clean));
        assert_eq!(b.reserve_low_water(), 1);
        assert_eq!(b.try_take(true, 1), Some(Source::Reserve));
        assert_eq!(b.reserve_low_water(), 0);
        assert_eq!(b.try_take(true, 1), Some(Source::Overshoot));
        assert_eq!(b.charged(), 5);
        b.release(1, true, false);
        assert_eq!(b.need().promised_clean, 0);
        b.release(4, false, true);
        assert_eq!(b.try_take(false, 0), Some(Source::Discarded));
        b.untake(Source::Discarded);
        assert_eq!(b.try_take(false, 0), Some(Source::Discarded));
    }

    #[test]
    fn extra_frames_come_only_from_free_budget() {
        let b = Budget::new(8, 4, 6, 4);
        assert_eq!(b.try_take(false, 0), Some(Source::Free));
        assert_eq!(b.try_take_extra(16), 7, "capped by the limit");
        assert_eq!(b.try_take_extra(1), 0, "never the reserve");
        assert_eq!(b.charged(), 8);
        b.release(3, false, false);
        assert!(!b.satisfied(0));
        assert!(b.satisfied(1));
        assert_eq!(b.try_take_extra(2), 2);
    }

    #[test]
    fn room_for_a_block_is_waited_for_within_a_bound() {
        // Limit 1024, high 512: reclaim, running above 512, makes room for
        // 512; not for 513.
        let b = std::sync::Arc::new(Budget::new(1024, 16, 512, 256));
        assert!(b.room_comes_for(512));
        assert!(!b.room_comes_for(513));
        let abort = AtomicBool::new(false);
        assert_eq!(b.try_take_extra(1000), 1000);
        let t = Instant::now();
        assert!(!b.wait_room(512, Duration::from_millis(30), &abort, || false));
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(
            !b.wait_room(512, Duration::from_secs(5), &abort, || true),
            "gave up"
        );
        let b2 = b.clone();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b2.release(600, true, false);
        });
        assert!(b.wait_room(512, Duration::from_secs(5), &abort, || false));
        assert_eq!(b.charged(), 400, "waiting charges nothing");
        releaser.join().unwrap();
    }

    #[test]
    fn waiting_take_returns_when_frames_are_released_or_aborted() {
        let b = std::sync::Arc::new(Budget::new(1, 0, 1, 0));
        let abort = std::sync::Arc::new(AtomicBool::new(false));
        assert_eq!(b.try_take(false, 0), Some(Source::Free));
        let (b2, a2) = (b.clone(), abort.clone());
        let t = std::thread::spawn(move || b2.take_waiting(&a2).0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        b.release(1, false, false);
        assert_eq!(t.join().unwrap(), Source::Free);
        abort.store(true, Ordering::SeqCst);
        assert_eq!(b.take_waiting(&abort).0, Source::Overshoot);
    }
}
