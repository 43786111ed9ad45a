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
//!
//! Levels still let a page in constant use go now and then (it never faults
//! while mapped, so its chances run out), and a page the guest needs for a
//! device's resume or reset then costs that resume a swap-in. So a fault
//! while such a path runs or has just run ([`PM_WINDOW`]) marks its page
//! with [`PM_LEVEL`] at once, within a budget per hand revolution.

use std::sync::atomic::{AtomicU32, Ordering};

use super::pages::PageState;
use super::stats::{bump, Counters};

/// Highest level a page reaches by refaults: passed over up to 8 times.
pub const MAX_LEVEL: u8 = 3;
/// The level of a page faulted while a device's resume or reset path was
/// running or had just run: passed over 32 times. userfaultfd shows the
/// pager no access to a mapped page, so a page the guest's resume path
/// uses every cycle is evicted after its chances all the same and the
/// next resume waits for it; 32 hand revolutions put that far apart.
pub const PM_LEVEL: u8 = 5;
/// Hand passes a refaulting page can be spared at most, which bounds how
/// far one reclaim pass looks ([`PM_LEVEL`] pages are few: see the budget).
pub const MAX_CHANCES: u8 = 1 << MAX_LEVEL;
/// How long after a resume or reset path a fault counts as the guest's
/// side of it.
pub const PM_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

pub struct WorkingSet {
    /// Pages evicted so far (wrapping: only differences matter).
    evictions: AtomicU32,
    /// Refault distance below which a page counts as in use.
    window: u32,
    /// Whether a device's resume or reset path runs or just ran.
    pm_window: fn() -> bool,
    /// Pages raised to [`PM_LEVEL`] since the hand last wrapped, and at
    /// most how many per revolution: the guest's other faults in such a
    /// window (a workload running while the resume sleeps) get the same
    /// mark, and at most 1/64 of the limit per revolution keeps them from
    /// pinning the limit (each mark lasts up to 32 revolutions).
    pm_marks: AtomicU32,
    pm_budget: u32,
}

impl std::fmt::Debug for WorkingSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkingSet")
            .field("window", &self.window)
            .field("pm_budget", &self.pm_budget)
            .finish_non_exhaustive()
    }
}

/// Whether any device's resume or reset path in this process runs or ran
/// within [`PM_WINDOW`].
pub fn device_path_window() -> bool {
    devices::noio::pm_path_within(PM_WINDOW)
}

impl WorkingSet {
    /// For a resident limit of `limit_pages`, with `pm_window` telling
    /// whether a fault is part of a device's resume or reset.
    pub fn with_pm_window(limit_pages: usize, pm_window: fn() -> bool) -> Self {
        Self {
            evictions: AtomicU32::new(0),
            window: u32::try_from(limit_pages / 2).unwrap_or(u32::MAX),
            pm_window,
            pm_marks: AtomicU32::new(0),
            pm_budget: u32::try_from(limit_pages / 64).unwrap_or(u32::MAX),
        }
    }

    /// Whether a device's resume or reset path runs or just ran.
    pub fn device_path_window_open(&self) -> bool {
        (self.pm_window)()
    }

    /// The hand went once around: a new budget of PM marks.
    pub fn revolution(&self) {
        self.pm_marks.store(0, Ordering::Relaxed);
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
                (p.level + 1).min(MAX_LEVEL).max(p.level)
            } else {
                0
            };
            bump(&counters.refaults, 1);
            bump(&counters.refaults_near, u64::from(near));
        }
        if p.level < PM_LEVEL && (self.pm_window)() {
            if self.pm_marks.fetch_add(1, Ordering::Relaxed) < self.pm_budget {
                p.level = PM_LEVEL;
                bump(&counters.pm_marks, 1);
            } else {
                bump(&counters.pm_marks_refused, 1);
            }
        }
        p.chances = p.chances.max(1 << p.level);
        near
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> bool {
        false
    }

    fn always() -> bool {
        true
    }

    #[test]
    fn a_fault_in_a_device_path_window_is_spared_longest_within_a_budget() {
        let ws = WorkingSet::with_pm_window(128, always); // budget: 2 a revolution
        let c = Counters::default();
        let mut pages = [PageState::default(); 3];
        for p in &mut pages {
            ws.faulted(p, &c);
        }
        assert_eq!(
            (pages[0].level, pages[0].chances),
            (PM_LEVEL, 1 << PM_LEVEL)
        );
        assert_eq!(pages[1].level, PM_LEVEL);
        assert_eq!(
            (pages[2].level, pages[2].chances),
            (0, 1),
            "over the budget"
        );
        // A near refault never lowers a marked page's level.
        ws.evicted(&mut pages[0]);
        evict_others(&ws, 5);
        ws.faulted(&mut pages[0], &c);
        assert_eq!(pages[0].level, PM_LEVEL);
        ws.revolution();
        ws.faulted(&mut pages[2], &c);
        assert_eq!(pages[2].level, PM_LEVEL, "a new revolution, a new budget");
        let s = c.snapshot();
        assert_eq!((s.pm_marks, s.pm_marks_refused), (3, 1));
    }

    fn evict_others(ws: &WorkingSet, n: usize) {
        for _ in 0..n {
            ws.evicted(&mut PageState::default());
        }
    }

    #[test]
    fn a_first_fault_gets_one_second_chance() {
        let ws = WorkingSet::with_pm_window(100, never);
        let c = Counters::default();
        let mut p = PageState::default();
        assert!(!ws.faulted(&mut p, &c));
        assert_eq!((p.chances, p.level), (1, 0));
        assert_eq!(c.snapshot().refaults, 0);
    }

    #[test]
    fn near_refaults_raise_the_level_and_far_ones_reset_it() {
        let ws = WorkingSet::with_pm_window(100, never); // window: 50 evictions
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
        let ws = WorkingSet::with_pm_window(100, never);
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
        let ws = WorkingSet::with_pm_window(100, never);
        ws.evictions.store(u32::MAX - 2, Ordering::Relaxed);
        let c = Counters::default();
        let mut p = PageState::default();
        ws.evicted(&mut p);
        evict_others(&ws, 5);
        assert!(ws.faulted(&mut p, &c));
    }
}
