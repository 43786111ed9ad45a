//! Per-page state of guest RAM and the address translation between guest
//! addresses, host addresses and page indices.
//!
//! Each page has its own small lock. A lock is held only for bookkeeping,
//! single-page ioctls and page-sized copies; never across blocking I/O, never
//! across `madvise` (whose REMOVE event the fault handler must read), and
//! never by a thread that is touching guest memory through it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::PAGE_SIZE;

/// "No swap slot" marker in [`PageState::slot`].
pub const NO_SLOT: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageKind {
    /// No frame and no copy: reads as zeroes (never written, or discarded).
    #[default]
    Empty,
    /// Mapped; `slot` may hold a copy (identical when clean).
    Resident,
    /// Not mapped; its only copy is in swap slot `slot`.
    Swapped,
    /// The reclaim thread is dropping the frame; it wakes waiters when done.
    Evicting,
    /// A waiting worker is reading it from swap; it holds a charged frame
    /// and wakes waiters when done.
    SwapIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageState {
    pub kind: PageKind,
    pub slot: u32,
    /// Mapped write-protected: any write faults first.
    pub wp: bool,
    /// Contents differ from the swap copy (or there is none and it was written).
    pub dirty: bool,
    /// A copy is on its way to `slot`.
    pub writeback: bool,
    /// Hand passes this page is still spared (second chances): set by
    /// faults, from `level` ([`super::workingset`]).
    pub chances: u8,
    /// How often in a row it came back soon after an eviction.
    pub level: u8,
    /// The eviction count when the clock last evicted it (its stamp).
    pub evicted_at: Option<u32>,
    /// Discarded while `Evicting`: the evictor must forget the copy.
    pub discarded: bool,
    /// One of the 512 pages of a block the kernel backs with a transparent
    /// huge page (collapsed after a block fill). Reclaim drops such a block
    /// only whole, so that the huge page goes back to the host at once.
    pub huge: bool,
    /// Evicted with its whole huge-page block in one piece (swapped, or
    /// empty when all zero): a fault on it brings the block back whole.
    pub went_out_whole: bool,
}

impl Default for PageState {
    fn default() -> Self {
        Self {
            kind: PageKind::Empty,
            slot: NO_SLOT,
            wp: false,
            dirty: false,
            writeback: false,
            chances: 0,
            level: 0,
            evicted_at: None,
            discarded: false,
            huge: false,
            went_out_whole: false,
        }
    }
}

impl PageState {
    /// Droppable without I/O: mapped, write-protected, and either identical to
    /// its swap copy or a never-written zero page.
    pub fn is_clean(&self) -> bool {
        self.kind == PageKind::Resident && self.wp && !self.dirty && !self.writeback
    }

    pub fn slot(&self) -> Option<u32> {
        (self.slot != NO_SLOT).then_some(self.slot)
    }

    /// Forgets everything but the kind, which the caller sets.
    pub fn reset(&mut self, kind: PageKind) {
        *self = PageState {
            kind,
            ..PageState::default()
        };
    }

    /// [`Self::reset`], keeping what the working-set detection knows of the
    /// page (its level and eviction stamp): for an eviction or a swap-in,
    /// not for a discard.
    pub fn reset_keeping_history(&mut self, kind: PageKind) {
        let (level, evicted_at) = (self.level, self.evicted_at);
        self.reset(kind);
        self.level = level;
        self.evicted_at = evicted_at;
    }
}

/// A guest RAM mapping as the pager sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Host virtual address of the mapping (page-aligned).
    pub host_addr: usize,
    /// Length in bytes (a multiple of the page size).
    pub len: usize,
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
}

#[derive(Debug)]
struct Mapped {
    region: RamRegion,
    first_page: usize,
}

/// The state of every guest page plus a count of clean pages.
#[derive(Debug)]
pub struct PageTable {
    regions: Vec<Mapped>,
    pages: Vec<Mutex<PageState>>,
    clean: AtomicUsize,
}

/// A locked page. Dropping it keeps the clean-page count in step.
pub struct PageRef<'a> {
    guard: MutexGuard<'a, PageState>,
    was_clean: bool,
    clean: &'a AtomicUsize,
}

impl std::ops::Deref for PageRef<'_> {
    type Target = PageState;
    fn deref(&self) -> &PageState {
        &self.guard
    }
}

impl std::ops::DerefMut for PageRef<'_> {
    fn deref_mut(&mut self) -> &mut PageState {
        &mut self.guard
    }
}

impl Drop for PageRef<'_> {
    fn drop(&mut self) {
        match (self.was_clean, self.guard.is_clean()) {
            (false, true) => {
                self.clean.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.clean.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl PageTable {
    /// `regions` must be page-aligned and must not overlap (checked by the caller).
    pub fn new(regions: &[RamRegion]) -> Self {
        let mut mapped = Vec::with_capacity(regions.len());
        let mut total = 0;
        for r in regions {
            mapped.push(Mapped {
                region: *r,
                first_page: total,
            });
            total += r.len / PAGE_SIZE;
        }
        Self {
            regions: mapped,
            pages: (0..total)
                .map(|_| Mutex::new(PageState::default()))
                .collect(),
            clean: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn clean_pages(&self) -> usize {
        self.clean.load(Ordering::Relaxed)
    }

    pub fn lock(&self, idx: usize) -> PageRef<'_> {
        let guard = self.pages[idx].lock().unwrap_or_else(|e| e.into_inner());
        let was_clean = guard.is_clean();
        PageRef {
            guard,
            was_clean,
            clean: &self.clean,
        }
    }

    /// Locks a page unless another thread holds it.
    pub fn try_lock(&self, idx: usize) -> Option<PageRef<'_>> {
        let guard = match self.pages.get(idx)?.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let was_clean = guard.is_clean();
        Some(PageRef {
            guard,
            was_clean,
            clean: &self.clean,
        })
    }

    /// The page-index range `[first, end)` of the region holding page `idx`:
    /// pages in it are contiguous in host memory (one mapping).
    pub fn region_pages(&self, idx: usize) -> std::ops::Range<usize> {
        self.regions
            .iter()
            .map(|m| m.first_page..m.first_page + m.region.len / PAGE_SIZE)
            .find(|r| r.contains(&idx))
            .unwrap_or(idx..idx + 1)
    }

    /// The page index holding host address `addr`, if it is guest RAM.
    pub fn index_of_host(&self, addr: usize) -> Option<usize> {
        self.regions.iter().find_map(|m| {
            let off = addr.checked_sub(m.region.host_addr)?;
            (off < m.region.len).then(|| m.first_page + off / PAGE_SIZE)
        })
    }

    /// The guest-physical address of host address `addr`, if it is guest RAM.
    pub fn gpa_of_host(&self, addr: usize) -> Option<u64> {
        self.regions.iter().find_map(|m| {
            let off = addr.checked_sub(m.region.host_addr)?;
            (off < m.region.len).then(|| m.region.guest_addr + off as u64)
        })
    }

    /// Host address of page `idx` (`idx < len()`).
    pub fn host_of(&self, idx: usize) -> usize {
        let m = self
            .regions
            .iter()
            .rev()
            .find(|m| m.first_page <= idx)
            .unwrap_or(&self.regions[0]);
        m.region.host_addr + (idx - m.first_page) * PAGE_SIZE
    }

    /// Page-index runs `(first index, host address, pages)` of the host range
    /// `[start, end)` clamped to guest RAM (whole pages inside it only).
    pub fn host_runs(&self, start: usize, end: usize) -> Vec<(usize, usize, usize)> {
        let mut runs = Vec::new();
        for m in &self.regions {
            let r = &m.region;
            let lo = start.max(r.host_addr).next_multiple_of(PAGE_SIZE);
            let hi = end.min(r.host_addr + r.len) / PAGE_SIZE * PAGE_SIZE;
            if lo < hi {
                let idx = m.first_page + (lo - r.host_addr) / PAGE_SIZE;
                runs.push((idx, lo, (hi - lo) / PAGE_SIZE));
            }
        }
        runs
    }

    /// Page-index runs of the guest range `[gpa, gpa + len)`, or `None` if any
    /// part of it is not guest RAM. Partial pages at the ends are left out.
    pub fn guest_runs(&self, gpa: u64, len: u64) -> Option<Vec<(usize, usize, usize)>> {
        let end = gpa.checked_add(len)?;
        let mut runs = Vec::new();
        let mut cur = gpa;
        while cur < end {
            let m = self.regions.iter().find(|m| {
                cur >= m.region.guest_addr && cur - m.region.guest_addr < m.region.len as u64
            })?;
            let r = &m.region;
            let region_end = r.guest_addr + r.len as u64;
            let piece_end = end.min(region_end);
            let host_lo = r.host_addr + (cur - r.guest_addr) as usize;
            let host_hi = r.host_addr + (piece_end - r.guest_addr) as usize;
            runs.extend(self.host_runs(host_lo, host_hi));
            cur = piece_end;
        }
        Some(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PageTable {
        PageTable::new(&[
            RamRegion {
                host_addr: 0x10_0000,
                len: 4 * PAGE_SIZE,
                guest_addr: 0,
            },
            RamRegion {
                host_addr: 0x80_0000,
                len: 2 * PAGE_SIZE,
                guest_addr: 0x1_0000_0000,
            },
        ])
    }

    #[test]
    fn translates_between_host_addresses_and_indices() {
        let t = table();
        assert_eq!(t.len(), 6);
        assert_eq!(t.index_of_host(0x10_0000), Some(0));
        assert_eq!(t.index_of_host(0x10_3fff), Some(3));
        assert_eq!(t.index_of_host(0x10_4000), None);
        assert_eq!(t.index_of_host(0x80_1000), Some(5));
        assert_eq!(t.host_of(4), 0x80_0000);
        assert_eq!(t.host_of(3), 0x10_3000);
    }

    #[test]
    fn region_pages_and_try_lock() {
        let t = table();
        assert_eq!(t.region_pages(2), 0..4);
        assert_eq!(t.region_pages(5), 4..6);
        let held = t.lock(1);
        assert!(t.try_lock(1).is_none());
        assert!(t.try_lock(2).is_some());
        assert!(t.try_lock(6).is_none(), "out of range");
        drop(held);
        assert!(t.try_lock(1).is_some());
    }

    #[test]
    fn guest_runs_clamp_and_reject_holes() {
        let t = table();
        // Partial pages at both ends are left out.
        assert_eq!(
            t.guest_runs(0x800, 3 * PAGE_SIZE as u64),
            Some(vec![(1, 0x10_1000, 2)])
        );
        assert_eq!(
            t.guest_runs(0x1_0000_0000, 2 * PAGE_SIZE as u64),
            Some(vec![(4, 0x80_0000, 2)])
        );
        // Crossing into the hole after the first region.
        assert_eq!(t.guest_runs(0x3000, 2 * PAGE_SIZE as u64), None);
        assert_eq!(t.guest_runs(u64::MAX, 2), None);
    }

    #[test]
    fn clean_count_follows_state_changes() {
        let t = table();
        {
            let mut p = t.lock(2);
            p.kind = PageKind::Resident;
            p.wp = true;
        }
        assert_eq!(t.clean_pages(), 1);
        t.lock(2).dirty = true;
        assert_eq!(t.clean_pages(), 0);
    }
}
