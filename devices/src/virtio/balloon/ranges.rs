//! Untrusted guest page lists made safe: PFNs and reported ranges become
//! page-aligned runs, each inside one guest RAM region; whatever lies
//! outside guest RAM (past its end, in the 32-bit MMIO hole) is dropped and
//! counted. Work is linear in the input, which the callers bound.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE};

/// Page-aligned runs of guest RAM `(gpa, len)`, with page counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Runs {
    pub runs: Vec<(u64, u64)>,
    /// Pages in `runs`.
    pub pages: u64,
    /// Pages refused: not guest RAM (or, for ranges, partial pages).
    pub bad_pages: u64,
}

impl Runs {
    fn push_page(&mut self, gpa: u64, region_start: u64) {
        self.pages += 1;
        // A run never crosses into another region: regions are separate
        // host mappings even when they are adjacent in guest space.
        if let Some(last) = self.runs.last_mut() {
            if last.0 + last.1 == gpa && gpa != region_start {
                last.1 += BALLOON_PAGE_SIZE;
                return;
            }
        }
        self.runs.push((gpa, BALLOON_PAGE_SIZE));
    }
}

/// `[start, end)` of the RAM region holding `gpa`.
pub(super) fn region_of(mem: &GuestMemoryMmap, gpa: u64) -> Option<(u64, u64)> {
    let r = mem.find_region(GuestAddress(gpa))?;
    let start = r.start_addr().0;
    Some((start, start.checked_add(r.len())?))
}

/// Sorts and deduplicates `pfns` (4 KiB frame numbers), then coalesces
/// them into runs of guest RAM. Duplicates are not errors (compaction
/// sends them); frames outside guest RAM are counted in `bad_pages`.
pub fn pfn_runs(mem: &GuestMemoryMmap, pfns: &mut Vec<u32>) -> Runs {
    pfns.sort_unstable();
    pfns.dedup();
    let mut out = Runs::default();
    let mut region: Option<(u64, u64)> = None;
    for &pfn in pfns.iter() {
        let gpa = u64::from(pfn) << BALLOON_PAGE_SHIFT;
        let inside = |r: (u64, u64)| gpa >= r.0 && gpa + BALLOON_PAGE_SIZE <= r.1;
        if !region.is_some_and(inside) {
            region = region_of(mem, gpa).filter(|&r| inside(r));
        }
        match region {
            Some((start, _)) => out.push_page(gpa, start),
            None => out.bad_pages += 1,
        }
    }
    out
}

/// The whole 4 KiB pages of `[gpa, gpa + len)` that are guest RAM, as runs
/// clamped to their regions. Partial pages at the ends and pages outside
/// guest RAM count as bad.
pub fn ram_runs(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Runs {
    let mut out = Runs::default();
    let pages_in = |a: u64, b: u64| b.saturating_sub(a).div_ceil(BALLOON_PAGE_SIZE);
    let Some(end) = gpa.checked_add(len) else {
        out.bad_pages = len.div_ceil(BALLOON_PAGE_SIZE);
        return out;
    };
    // No whole page: none starts in the range, or (None) `gpa` lies in the
    // last page below 2^64, so no page starts at or after it.
    let first = gpa.checked_next_multiple_of(BALLOON_PAGE_SIZE);
    let last = end & !(BALLOON_PAGE_SIZE - 1);
    let Some(first) = first.filter(|&f| f < last) else {
        out.bad_pages = u64::from(len > 0);
        return out;
    };
    out.bad_pages += u64::from(first != gpa) + u64::from(last != end);
    let mut cur = first;
    while cur < last {
        match region_of(mem, cur) {
            Some((_, rend)) => {
                // Regions are page-aligned, so run_end is too.
                let run_end = last.min(rend);
                out.runs.push((cur, run_end - cur));
                out.pages += (run_end - cur) >> BALLOON_PAGE_SHIFT;
                cur = run_end;
            }
            None => {
                // Skip the hole up to the next region (or the end).
                let next = mem
                    .iter()
                    .map(|r| r.start_addr().0)
                    .filter(|&s| s > cur)
                    .min()
                    .unwrap_or(last)
                    .min(last);
                out.bad_pages += pages_in(cur, next);
                cur = next;
            }
        }
    }
    out
}
