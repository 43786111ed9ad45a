//! Inflated pages held back until their whole host block is in the
//! balloon, for guest RAM backed by huge pages (the sink's
//! [`BalloonSink::discard_granule`]).
//!
//! Linux inflates 256 pages (1 MiB) per buffer, after zeroing each one.
//! Discarding a buffer's pages at once splits the huge page behind their
//! 2 MiB block: the host keeps the other half mapped 4 KiB at a time, and
//! KVM maps it to the guest a page per exit while the guest zeroes those
//! pages for the next buffer. Held until the block is whole, the block
//! goes back in one call, huge page and all, and the guest never leaves
//! the 2 MiB mapping while it zeroes. Pages of blocks that never fill are
//! discarded when the inflate pauses ([`HOLD_DELAY`]) or when too many
//! are held ([`MAX_HELD_PAGES`]). Deflated pages are let go of (never
//! discarded later: the guest owns them again), and so is everything held
//! at a device reset (the holder goes with the worker).

use std::collections::BTreeMap;
use std::time::Duration;

use super::BALLOON_PAGE_SIZE;

/// How long held pages wait for the rest of their block after the last
/// inflate buffer.
pub const HOLD_DELAY: Duration = Duration::from_millis(100);
/// Most pages held at once (64 MiB); past it everything held is discarded.
pub const MAX_HELD_PAGES: u64 = 16384;

/// Pages of partly inflated blocks, by block.
pub struct HeldBlocks {
    /// Block size in bytes: a power of two, a multiple of the page size.
    block: u64,
    /// Block start -> one bit per page.
    held: BTreeMap<u64, Vec<u64>>,
    pages: u64,
    /// Past this many held pages, everything held is let go of.
    max_pages: u64,
}

impl HeldBlocks {
    pub fn new(block: u64, max_pages: u64) -> Self {
        debug_assert!(block.is_power_of_two() && block >= BALLOON_PAGE_SIZE);
        Self {
            block,
            held: BTreeMap::new(),
            pages: 0,
            max_pages,
        }
    }

    fn pages_per_block(&self) -> u64 {
        self.block / BALLOON_PAGE_SIZE
    }

    /// The block size.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Pages held now.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Takes inflated runs (page aligned, each inside one RAM region) and
    /// returns what to discard now: every block they made whole, as one
    /// `(start, block)` run, and the pages of blocks that do not lie
    /// inside one RAM region (`in_one_region(start)` is false: such a
    /// block can never go back in one call), and everything held once
    /// more than `max_pages` would be. The rest is held.
    pub fn add(
        &mut self,
        runs: &[(u64, u64)],
        in_one_region: impl Fn(u64) -> bool,
    ) -> Vec<(u64, u64)> {
        let per_block = self.pages_per_block();
        let words = per_block.div_ceil(64) as usize;
        let mut now = Vec::new();
        for &(gpa, len) in runs {
            let end = gpa.saturating_add(len);
            let mut at = gpa;
            while at < end {
                let start = at & !(self.block - 1);
                let upto = end.min(start.saturating_add(self.block));
                if !in_one_region(start) {
                    now.push((at, upto - at));
                } else {
                    let bits = self.held.entry(start).or_insert_with(|| vec![0; words]);
                    for page in (at - start) / BALLOON_PAGE_SIZE..(upto - start) / BALLOON_PAGE_SIZE
                    {
                        let (w, b) = ((page / 64) as usize, page % 64);
                        if bits[w] & (1 << b) == 0 {
                            bits[w] |= 1 << b;
                            self.pages += 1;
                        }
                    }
                    let full = bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                    if full == per_block {
                        self.held.remove(&start);
                        self.pages -= per_block;
                        now.push((start, self.block));
                    }
                }
                if upto <= at {
                    break; // the top of the address space
                }
                at = upto;
            }
        }
        if self.pages > self.max_pages {
            now.extend(self.take_all());
        }
        now
    }

    /// The guest took `[gpa, gpa + len)` back: none of it is discarded
    /// later.
    pub fn forget(&mut self, gpa: u64, len: u64) {
        let end = gpa.saturating_add(len);
        let first = gpa & !(self.block - 1);
        let starts: Vec<u64> = self.held.range(first..end).map(|(&s, _)| s).collect();
        for start in starts {
            let Some(bits) = self.held.get_mut(&start) else {
                continue;
            };
            let from = gpa.max(start);
            let to = end.min(start.saturating_add(self.block));
            let mut page = (from - start) / BALLOON_PAGE_SIZE;
            while start + page * BALLOON_PAGE_SIZE < to {
                let (w, b) = ((page / 64) as usize, page % 64);
                if bits[w] & (1 << b) != 0 {
                    bits[w] &= !(1 << b);
                    self.pages -= 1;
                }
                page += 1;
            }
            if bits.iter().all(|&w| w == 0) {
                self.held.remove(&start);
            }
        }
    }

    /// Everything held, as page-aligned runs in address order; nothing is
    /// held after.
    pub fn take_all(&mut self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (start, bits) in std::mem::take(&mut self.held) {
            for page in 0..self.pages_per_block() {
                if bits[(page / 64) as usize] & (1 << (page % 64)) == 0 {
                    continue;
                }
                let gpa = start + page * BALLOON_PAGE_SIZE;
                match runs.last_mut() {
                    // A run never leaves its block, which lies inside one
                    // RAM region (adjacent regions are separate mappings).
                    Some(last) if last.0 + last.1 == gpa && page != 0 => {
                        last.1 += BALLOON_PAGE_SIZE
                    }
                    _ => runs.push((gpa, BALLOON_PAGE_SIZE)),
                }
            }
        }
        self.pages = 0;
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = BALLOON_PAGE_SIZE;

    fn any(_: u64) -> bool {
        true
    }

    #[test]
    fn a_block_goes_back_whole_once_both_halves_are_in() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        assert!(h.add(&[(4 * MIB + MIB, MIB)], any).is_empty());
        assert_eq!(h.pages(), 256);
        assert_eq!(h.add(&[(4 * MIB, MIB)], any), vec![(4 * MIB, 2 * MIB)]);
        assert_eq!(h.pages(), 0);
        assert!(h.take_all().is_empty());
    }

    #[test]
    fn a_run_over_several_blocks_returns_the_whole_ones_and_holds_the_ends() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        // From the last page of block 0 to the first page of block 3.
        let whole = h.add(&[(2 * MIB - PAGE, 4 * MIB + 2 * PAGE)], any);
        assert_eq!(whole, vec![(2 * MIB, 2 * MIB), (4 * MIB, 2 * MIB)]);
        assert_eq!(h.pages(), 2);
        assert_eq!(h.take_all(), vec![(2 * MIB - PAGE, PAGE), (6 * MIB, PAGE)]);
    }

    #[test]
    fn duplicates_count_once() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        h.add(&[(0, 8 * PAGE)], any);
        h.add(&[(0, 8 * PAGE)], any);
        assert_eq!(h.pages(), 8);
    }

    #[test]
    fn deflated_pages_are_never_discarded_later() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        h.add(&[(0, MIB)], any);
        h.forget(MIB / 2, MIB);
        assert_eq!(h.pages(), 128);
        h.forget(0, PAGE);
        // The block can no longer complete from the first half alone.
        assert!(h.add(&[(MIB, MIB)], any).is_empty());
        assert_eq!(h.take_all(), vec![(PAGE, MIB / 2 - PAGE), (MIB, MIB)]);
        h.add(&[(0, 4 * PAGE)], any);
        h.forget(0, 4 * PAGE);
        assert!(h.take_all().is_empty(), "an emptied block is dropped");
    }

    #[test]
    fn runs_in_adjacent_blocks_stay_separate() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        h.add(&[(2 * MIB - PAGE, 2 * PAGE)], any);
        assert_eq!(h.take_all(), vec![(2 * MIB - PAGE, PAGE), (2 * MIB, PAGE)]);
    }

    #[test]
    fn the_top_of_the_address_space_does_not_loop() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        let top = u64::MAX - PAGE + 1;
        assert!(h.add(&[(top, PAGE)], any).is_empty());
    }

    #[test]
    fn past_the_cap_everything_held_goes_back() {
        let mut h = HeldBlocks::new(2 * MIB, 2);
        assert!(h.add(&[(0, PAGE), (2 * MIB, PAGE)], any).is_empty());
        let now = h.add(&[(4 * MIB, PAGE)], any);
        assert_eq!(now, vec![(0, PAGE), (2 * MIB, PAGE), (4 * MIB, PAGE)]);
        assert_eq!(h.pages(), 0);
    }

    #[test]
    fn blocks_across_a_region_edge_are_not_held() {
        let mut h = HeldBlocks::new(2 * MIB, MAX_HELD_PAGES);
        // Guest RAM ends at 3 MiB: block 2-4 MiB is not inside it.
        let inside = |start: u64| start + 2 * MIB <= 3 * MIB;
        let now = h.add(&[(MIB, 2 * MIB)], inside);
        assert_eq!(now, vec![(2 * MIB, MIB)]);
        assert_eq!(h.pages(), 256);
    }
}
