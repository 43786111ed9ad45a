//! Working-set detection for the clock: which evicted pages come back soon.
//!
//! userfaultfd shows the pager faults, never accesses to mapped pages. With
//! a plain second chance a page the guest uses all the time is evicted two
//! hand revolutions after its last fault like any other page, and faulted
//! straight back (kernel code on a device's resume path, say, which then
//! takes a swap-in per page). What the pager does see is the refault, and
//! how soon it came: every eviction is stamped with a running count of
//! evicted pages, and the refault distance is the number of pages evicted
//! between a page's eviction and its return (as in Linux's
//! `mm/workingset.c`). A page back within `window` (half the resident limit)
//! was in use: it would have stayed with a little more memory, and the pages
//! evicted meanwhile were colder. Each such refault raises its level, and
//! the hand passes it over `2^level` times instead of once; a refault from
//! farther away (a stream, a working set larger than the limit) resets it.
//! Pages of a stream never come back within the window, so they still go
//! first.

use std::sync::atomic::{AtomicU32, Ordering};

use super::pages::PageState;
use super::stats::{bump, Counters};

/// Highest level: a page proven hot is passed over up to 8 times.
pub const MAX_LEVEL: u8 = 3;
/// Most hand passes a page can be spared ([`MAX_LEVEL`]'s).
pub const MAX_CHANCES: u8 = 1 << MAX_LEVEL;

#[derive(Debug)]
pub struct WorkingSet {
    /// Pages evicted so far (wrapping: only differences matter).
    evictions: AtomicU32,
    /// Refault distance below which a page counts as in use.
    window: u32,
}

impl WorkingSet {
    /// For a resident limit of `limit_pages`.
    pub fn new(limit_pages: usize) -> Self {
        Self {
            evictions: AtomicU32::new(0),
            window: u32::try_from(limit_pages / 2).unwrap_or(u32::MAX),
        }
    }

    /// `p` is being evicted (its frame dropped, a copy kept or none needed):
    /// stamps it. Call after any reset of its state.
    pub fn evicted(&self, p: &mut PageState) {
        p.evicted_at = Some(self.evictions.fetch_add(1, Ordering::Relaxed));
        p.chances = 0;
    }

    /// A fault mapped or unprotected `p`: sets the hand passes it is spared,
    /// from its level after this fault. Returns whether it was a refault
    /// within the window.
    pub fn faulted(&self, p: &mut PageState, counters: &Counters) -> bool {
        let mut near = false;
        if let Some(at) = p.evicted_at.take() {
            let distance = self.evictions.load(Ordering::Relaxed).wrapping_sub(at);
            near = distance < self.window;
            p.level = if near {
                (p.level + 1).min(MAX_LEVEL)
            } else {
                0
            };
            bump(&counters.refaults, 1);
            bump(&counters.refaults_near, u64::from(near));
        }
        p.chances = p.chances.max(1 << p.level);
        near
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evict_others(ws: &WorkingSet, n: usize) {
        for _ in 0..n {
            ws.evicted(&mut PageState::default());
        }
    }

    #[test]
    fn a_first_fault_gets_one_second_chance() {
        let ws = WorkingSet::new(100);
        let c = Counters::default();
        let mut p = PageState::default();
        assert!(!ws.faulted(&mut p, &c));
        assert_eq!((p.chances, p.level), (1, 0));
        assert_eq!(c.snapshot().refaults, 0);
    }

    #[test]
    fn near_refaults_raise_the_level_and_far_ones_reset_it() {
        let ws = WorkingSet::new(100); // window: 50 evictions
        let c = Counters::default();
        let mut p = PageState::default();
        for expect in [1u8, 2, 3, 3] {
            ws.evicted(&mut p);
            assert_eq!(p.chances, 0);
            evict_others(&ws, 10);
            assert!(ws.faulted(&mut p, &c));
            assert_eq!(p.level, expect);
            assert_eq!(p.chances, 1 << expect);
            assert_eq!(p.evicted_at, None, "a stamp counts once");
        }
        ws.evicted(&mut p);
        evict_others(&ws, 60);
        assert!(
            !ws.faulted(&mut p, &c),
            "60 evictions later is outside the window"
        );
        assert_eq!((p.level, p.chances), (0, 1));
        let s = c.snapshot();
        assert_eq!((s.refaults, s.refaults_near), (5, 4));
    }

    #[test]
    fn a_fault_of_a_resident_page_keeps_its_level_and_never_lowers_its_chances() {
        let ws = WorkingSet::new(100);
        let c = Counters::default();
        let mut p = PageState {
            level: 2,
            chances: 3,
            ..PageState::default()
        };
        ws.faulted(&mut p, &c);
        assert_eq!((p.level, p.chances), (2, 4));
        p.chances = 0;
        ws.faulted(&mut p, &c);
        assert_eq!(p.chances, 4);
        assert_eq!(c.snapshot().refaults, 0);
    }

    #[test]
    fn distances_survive_the_counter_wrapping() {
        let ws = WorkingSet::new(100);
        ws.evictions.store(u32::MAX - 2, Ordering::Relaxed);
        let c = Counters::default();
        let mut p = PageState::default();
        ws.evicted(&mut p);
        evict_others(&ws, 5);
        assert!(ws.faulted(&mut p, &c));
    }
}
