//! Fault-around: an ordinary missing fault is served together with the
//! unmapped neighbours of its page, in one aligned window, with one
//! `UFFDIO_COPY` per run of equal protection and one `pread` per run of
//! consecutive swap slots (swap read-around, as Linux's swap read-ahead).
//!
//! Bounds: the neighbours get frames only from free budget under the limit
//! ([`Budget::try_take_extra`](super::budget::Budget::try_take_extra)), never
//! the reserve; NOIO faults are served one page at a time as before, so the
//! NOIO sources stay as they were. Neighbours are locked with `try_lock`
//! only: the handler never waits for a second page lock, so it cannot take
//! part in a lock cycle with the reclaim thread, which holds runs of locks.
//!
//! Swapped neighbours are mapped write-protected and clean (their copy stays
//! in its slot), so they cost nothing to drop if the guest never uses them.
//! Never-written neighbours are zero pages mapped write-protected and clean
//! too (no slot, dropped for free), except while the guest streams writes
//! through fresh memory - this write fault on a never-written page lies
//! within a window of the previous one - when they are mapped writable (and
//! so dirty): the guest writes them next and would otherwise take a
//! write-protect fault on each. Linux does no fault-around for anonymous
//! memory at all; the streaming test keeps scattered first writes from
//! turning untouched neighbours into dirty pages that must be written back.
//!
//! Block fill: while memory is plentiful (the charge stays under reclaim's
//! low watermark with a whole block added), a write fault on a never-written
//! page maps every never-written page of its aligned 2 MiB block writable in
//! one `UFFDIO_COPY`; under pressure only a write stream does, and only
//! while the block fits under the limit (reclaim then makes room behind
//! it), as the kernel fills a transparent huge page on a first
//! touch of memory it manages itself: one round trip per 2 MiB instead of
//! one per window. The block's pages are ordinary 4 KiB pages to reclaim,
//! dirty until written back; writeback leaves the ones still all zero
//! without a slot and drops them for free (reclaim.rs).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::budget::Source;
use super::fault::{count_swap_in, note_source, release_after_failure, Fault, Step};
use super::pager::Shared;
use super::pages::{PageKind, PageRef, NO_SLOT};
use super::stats::bump;
use super::uffd::Resolve;
use super::{PagerError, PAGE_SIZE};

/// Pages mapped per fault at most, the faulting one included: an aligned
/// window of 64 KiB, Linux's default `fault_around_bytes` (mm/memory.c) and
/// twice its default swap read-ahead cluster (`vm.page-cluster` = 3).
pub const FAULT_AROUND_PAGES: usize = 16;

/// Pages of one block fill: an aligned 2 MiB (a huge page's worth).
pub const BLOCK_PAGES: usize = 512;

/// Staging a fault needs to bring a block back whole: the block's contents,
/// then a window's worth to read it back, piece by piece, after its
/// protection (only the swap-in worker has it; see [`Staging`]).
pub const BLOCK_SWAP_IN_BUF: usize = (BLOCK_PAGES + FAULT_AROUND_PAGES) * PAGE_SIZE;

/// A fault-serving thread's staging: a fault-around window, and for the
/// thread that brings blocks back whole room for one. That room costs host
/// memory only while blocks come back: its owner gives it back once it
/// was not handed out for [`BLOCK_ROOM_KEPT`] (a VMM's own memory counts
/// against the host's budget too: three 4 MiB stagings, always resident,
/// ran eight VMMs over theirs; giving it back after every fault cost 512
/// page faults per block brought back, over a second of a benchmark phase).
pub struct Staging {
    buf: Vec<u8>,
    /// Whether the block room may hold frames.
    room_touched: bool,
    /// When the staging was last handed out with its block room.
    last_use: std::time::Instant,
}

/// How long a staging keeps its block room after its last use.
pub const BLOCK_ROOM_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

impl Staging {
    /// A window's worth, or with `blocks` room to bring a block back whole.
    pub fn new(blocks: bool) -> Self {
        let len = if blocks {
            BLOCK_SWAP_IN_BUF
        } else {
            FAULT_AROUND_PAGES * PAGE_SIZE
        };
        Self {
            buf: vec![0; len],
            room_touched: false,
            last_use: std::time::Instant::now(),
        }
    }

    pub fn buf(&mut self) -> &mut [u8] {
        if self.buf.len() > FAULT_AROUND_PAGES * PAGE_SIZE {
            self.room_touched = true;
            self.last_use = std::time::Instant::now();
        }
        &mut self.buf
    }

    /// Gives the frames past the first window back to the host once the
    /// staging was not handed out for `kept` (a no-op without block room,
    /// or when they were given back since).
    pub fn release_block_room(&mut self, kept: std::time::Duration) {
        if !self.room_touched || self.last_use.elapsed() < kept {
            return;
        }
        self.room_touched = false;
        if let Some(room) = self.buf.get_mut(FAULT_AROUND_PAGES * PAGE_SIZE..) {
            if let Err(e) = super::uffd::release_buffer_frames(room) {
                log::debug!("pager: staging not released: {e}");
            }
        }
    }
}

/// The source of block fills. Never written, so the kernel backs it with
/// its shared zero page: copies from it read one cache-hot page.
static ZERO_BLOCK: [u8; BLOCK_PAGES * PAGE_SIZE] = [0; BLOCK_PAGES * PAGE_SIZE];

/// What fault-around remembers between faults.
#[derive(Debug, Default)]
pub struct AroundState {
    /// Page of the last ordinary write fault on a never-written page, plus one
    /// (0: none yet).
    last_fresh_write: AtomicUsize,
}

impl AroundState {
    /// Records a write fault on never-written page `idx`; whether it
    /// continues a stream (the previous one lay within a window of it).
    fn streaming_write(&self, idx: usize) -> bool {
        let prev = self.last_fresh_write.swap(idx + 1, Ordering::Relaxed);
        prev != 0 && (prev - 1).abs_diff(idx) <= FAULT_AROUND_PAGES
    }
}

/// Times a block fill gives the CPU away for a neighbour whose lock is
/// held: the reclaim hand holds an idle page's lock only for a look, and on
/// a one-CPU host it can let go only once this thread yields. A window
/// stops at once.
const BLOCK_LOCK_YIELDS: u32 = 4;

/// Neighbours of `idx` in `range` that are unmapped and idle (never written
/// only, with `fresh_only`), nearest first; stops at the first that is not
/// (or whose lock stays held: a `whole_block` yields for it a few times).
fn neighbours<'a>(
    sh: &'a Shared,
    range: impl Iterator<Item = usize>,
    fresh_only: bool,
    whole_block: bool,
) -> Vec<PageRef<'a>> {
    let mut out = Vec::new();
    let try_lock = |j| {
        let mut yields = if whole_block { BLOCK_LOCK_YIELDS } else { 0 };
        loop {
            match sh.pages.try_lock(j) {
                None if yields > 0 => {
                    yields -= 1;
                    std::thread::yield_now();
                }
                q => return q,
            }
        }
    };
    for j in range {
        match try_lock(j) {
            Some(q)
                if q.kind == PageKind::Empty || (q.kind == PageKind::Swapped && !fresh_only) =>
            {
                out.push(q)
            }
            _ => break,
        }
    }
    out
}

/// The pages a fault on `idx` maps at most: its aligned block (aligned in
/// host addresses, as a huge page) or its fault-around window, cut to its
/// region.
fn window(sh: &Shared, idx: usize, block: bool) -> (usize, usize) {
    let region = sh.pages.region_pages(idx);
    let (lo, hi) = if block {
        let b = block_of(sh, idx);
        (b.start, b.end)
    } else {
        let lo = idx / FAULT_AROUND_PAGES * FAULT_AROUND_PAGES;
        (lo, lo + FAULT_AROUND_PAGES)
    };
    (lo.max(region.start), hi.min(region.end))
}

/// The page indices of the aligned 2 MiB block (in host addresses, as a
/// huge page) holding page `idx`; may reach past its region's ends (and is
/// cut at index 0 when the first region does not start on a block).
pub fn block_of(sh: &Shared, idx: usize) -> std::ops::Range<usize> {
    let into = sh.pages.host_of(idx) / PAGE_SIZE % BLOCK_PAGES;
    let first = idx.saturating_sub(into);
    first..first + BLOCK_PAGES
}

/// Where a fault comes to [`resolve_around`] from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The handler: a first write into a never-written block, or a fault
    /// on a block that went out whole, may defer to wait for room for the
    /// whole block.
    Handler,
    /// A worker that waited for room for the fault's whole block: it fills
    /// the block (or brings it back) if one fits now, stream or not.
    BlockRoom,
    /// A worker, for any other wait.
    Worker,
}

/// Whether a write fault on never-written page `idx` should wait for room
/// for its whole block rather than map a window of it: the block is
/// [`whole_block_fresh`] and reclaim makes room for a block whenever one
/// does not fit.
pub fn worth_waiting_for_block(sh: &Shared, idx: usize) -> bool {
    sh.budget.room_comes_for(BLOCK_PAGES) && whole_block_fresh(sh, idx)
}

/// Whether every page of `idx`'s aligned block other than `idx` is
/// never-written (and idle), inside one region: filled whole, the block
/// can become one huge page; a window mapped now would keep it in 4 KiB
/// pages for good.
fn whole_block_fresh(sh: &Shared, idx: usize) -> bool {
    let block = block_of(sh, idx);
    let region = sh.pages.region_pages(idx);
    if block.start < region.start || block.end > region.end {
        return false;
    }
    block.filter(|&j| j != idx).all(|j| {
        sh.pages
            .try_lock(j)
            .is_some_and(|q| q.kind == PageKind::Empty)
    })
}

/// Whether a fault on page `p` (`idx`), swapped, should bring its whole
/// block back: the block went out whole (a huge page's, dropped by reclaim
/// in one piece) and none of its pages came back since. Back whole, it can
/// be one huge page again instead of 512 small ones the guest maps one by
/// one.
pub fn block_went_out_whole(sh: &Shared, idx: usize, p: &PageRef<'_>) -> bool {
    if !sh.huge_pages || p.kind != PageKind::Swapped || !p.went_out_whole {
        return false;
    }
    let block = block_of(sh, idx);
    let region = sh.pages.region_pages(idx);
    if block.start < region.start
        || block.end > region.end
        || !sh
            .pages
            .host_of(block.start)
            .is_multiple_of(BLOCK_PAGES * PAGE_SIZE)
    {
        return false;
    }
    block.filter(|&j| j != idx).all(|j| {
        sh.pages.try_lock(j).is_some_and(|q| {
            q.went_out_whole && matches!(q.kind, PageKind::Swapped | PageKind::Empty)
        })
    })
}

/// Serves fault `f` on page `idx` (locked in `p`, `Empty` or `Swapped`, a
/// frame charged from `source`) and as many neighbours as the budget allows.
/// `buf` holds [`FAULT_AROUND_PAGES`] pages, or [`BLOCK_SWAP_IN_BUF`]
/// bytes (then a block that went out whole comes back whole). From the
/// handler it may give the frame back and defer the fault (see
/// [`Arrival::Handler`]).
pub fn resolve_around<'a>(
    sh: &'a Shared,
    f: Fault,
    idx: usize,
    p: PageRef<'a>,
    source: Source,
    buf: &mut [u8],
    arrival: Arrival,
) -> Result<Step, PagerError> {
    let fresh_write = f.write && p.kind == PageKind::Empty;
    let streaming =
        fresh_write && (sh.around.streaming_write(idx) || arrival == Arrival::BlockRoom);
    let plentiful = fresh_write && sh.budget.plentiful(BLOCK_PAGES);
    // Under pressure a first write fills its block too, as long as a block
    // fits under the limit (the faulting page's frame is charged already),
    // when the write continues a stream, or when the whole block is
    // never-written and the limit keeps room for blocks (it becomes one
    // huge page, as the kernel gives one to a first touch of memory it
    // manages): reclaim makes room behind it.
    let whole_fresh = fresh_write && !plentiful && worth_waiting_for_block(sh, idx);
    let block = plentiful || ((streaming || whole_fresh) && sh.budget.fits(BLOCK_PAGES - 1));
    // A block that went out whole comes back whole while one fits (on the
    // swap-in worker, whose staging has room for one).
    let out_whole = !block
        && (arrival == Arrival::Handler || buf.len() >= BLOCK_SWAP_IN_BUF)
        && block_went_out_whole(sh, idx, &p);
    let fits_in = out_whole && sh.budget.fits(BLOCK_PAGES - 1);
    let block_in = fits_in && buf.len() >= BLOCK_SWAP_IN_BUF;
    if arrival == Arrival::Handler {
        // As the kernel reclaims before it gives a huge page to a first
        // touch: a worker waits for room, then fills the block (or reads
        // it back).
        let room_wait = !block
            && !fits_in
            && (whole_fresh || (out_whole && sh.budget.room_comes_for(BLOCK_PAGES)));
        if room_wait {
            sh.budget.untake(source);
            bump(&sh.counters.block_waits, 1);
            return Ok(Step::Defer);
        }
        // A block coming back (a 2 MiB read, copy, collapse and compare)
        // runs on the swap-in worker, which has room for it; so does a
        // block fill while a device's resume or reset path runs or just
        // ran: its guest side's faults must not queue behind 2 MiB of
        // copying. Otherwise a fill (no I/O) stays here: handing every
        // first touch over made a guest with memory plentiful slower.
        if fits_in || (block && sh.workingset.device_path_window_open()) {
            sh.budget.untake(source);
            bump(&sh.counters.blocks_handed_over, 1);
            return Ok(Step::HandOver);
        }
    }
    // No zap of reclaim's may start between the block's copy and its
    // protection (the protection would fail and leave it all dirty).
    let _hold = block_in.then(|| sh.zap_gate.hold());
    let whole = block || block_in;
    // A block fill maps its pages writable like a write stream does.
    let fresh_stream = streaming || block;
    let (win_lo, win_hi) = window(sh, idx, whole);
    let mut above = neighbours(sh, idx + 1..win_hi, block, whole);
    let mut below = neighbours(sh, (win_lo..idx).rev(), block, whole);
    let extra = sh.budget.try_take_extra(above.len() + below.len());
    // Forward first: sequential access is the common pattern.
    above.truncate(extra);
    below.truncate(extra - above.len());
    below.reverse();
    let lo = idx - below.len();
    let fault_pos = below.len();
    let mut pages = below;
    pages.push(p);
    pages.append(&mut above);
    let n = pages.len();
    // Contents: zeroes, or read in runs of consecutive slots.
    let mut reads: Vec<(u32, usize, usize)> = Vec::new();
    if !block {
        plan_contents(&pages, &mut buf[..n * PAGE_SIZE], &mut reads);
    }
    let give_back = |mapped_extra: usize| {
        sh.budget.release(extra - mapped_extra, false, false);
    };
    if !reads.is_empty() {
        match sh.swap.try_read_merged(&mut buf[..n * PAGE_SIZE], &reads) {
            Ok(Some(calls)) => bump(&sh.counters.swap_reads, calls),
            Ok(None) => {
                sh.budget.untake(source);
                give_back(0);
                return Ok(Step::Defer);
            }
            Err(e) => {
                sh.budget.untake(source);
                give_back(0);
                sh.fail(format!("swap-in of pages {lo}..{} failed: {e}", lo + n));
                let faulting = pages.swap_remove(fault_pos);
                drop(pages);
                return release_after_failure(sh, faulting, f.addr, f.write);
            }
        }
    }

    let data: &[u8] = if block {
        &ZERO_BLOCK[..n * PAGE_SIZE]
    } else {
        &buf[..n * PAGE_SIZE]
    };

    // Protection per page: the faulting page as accessed, neighbours
    // write-protected (clean) unless fresh ones in a write stream. A block
    // coming back is mapped writable (a write-protected page cannot be
    // collapsed) and protected after its collapse.
    let wp: Vec<bool> = pages
        .iter()
        .enumerate()
        .map(|(i, q)| {
            if block_in {
                false
            } else if i == fault_pos {
                !f.write
            } else {
                q.kind == PageKind::Swapped || !fresh_stream
            }
        })
        .collect();
    let host_lo = sh.pages.host_of(lo);
    // Map from the faulting page on, then the pages below it; one copy per
    // run of equal protection. A block fill maps its block in one copy (all
    // writable), so that a zap starting between two copies cannot leave it
    // in pieces that never become a huge page.
    let mut mapped = vec![false; n];
    let mut fault_result = Resolve::Done;
    let segments = if whole {
        [(0, n), (n, n)]
    } else {
        [(fault_pos, n), (0, fault_pos)]
    };
    'segments: for (seg_lo, seg_hi) in segments {
        let mut start = seg_lo;
        while start < seg_hi {
            let end = (start..seg_hi)
                .find(|&i| wp[i] != wp[start])
                .unwrap_or(seg_hi);
            let (done, res) = sh.uffd.copy_range(
                host_lo + start * PAGE_SIZE,
                &data[start * PAGE_SIZE..end * PAGE_SIZE],
                wp[start],
            )?;
            mapped[start..start + done].fill(true);
            if res != Resolve::Done {
                if !mapped[fault_pos] {
                    // The failure is the fault's own.
                    fault_result = res;
                }
                // A neighbour mapped behind our back or an address space
                // change: leave the rest to their own faults.
                break 'segments;
            }
            start = end;
        }
    }

    let mut swapped_in: u64 = 0;
    let mut mapped_extra = 0;
    for (i, q) in pages.iter_mut().enumerate() {
        if !mapped[i] {
            continue;
        }
        let slot = if q.kind == PageKind::Swapped {
            swapped_in += 1;
            q.slot
        } else {
            NO_SLOT
        };
        q.reset_keeping_history(PageKind::Resident);
        q.slot = slot;
        q.wp = wp[i];
        q.dirty = !wp[i];
        // Only the faulting page is known to be in use.
        if i == fault_pos {
            sh.workingset.faulted(q, &sh.counters);
        }
        mapped_extra += usize::from(i != fault_pos);
    }
    give_back(mapped_extra);
    bump(&sh.counters.fault_around_pages, mapped_extra as u64);
    let all_mapped = n == BLOCK_PAGES && mapped.iter().all(|&m| m);
    if block && mapped_extra > 0 {
        bump(&sh.counters.block_fills, 1);
        if all_mapped {
            collapse(sh, lo, &mut pages);
        } else {
            bump(&sh.counters.block_fills_partial, 1);
        }
    }
    if block_in {
        if all_mapped {
            collapse(sh, lo, &mut pages);
            bump(&sh.counters.blocks_swapped_in, 1);
        }
        if !f.write {
            let (data, readback) = buf.split_at_mut(BLOCK_PAGES * PAGE_SIZE);
            protect_back(
                sh,
                host_lo,
                &mut pages,
                &mapped,
                &data[..n * PAGE_SIZE],
                readback,
            )?;
        }
    }
    drop(pages);
    let fault_swapped = reads
        .iter()
        .any(|&(_, off, len)| (off..off + len).contains(&(fault_pos * PAGE_SIZE)));
    match fault_result {
        Resolve::Done => {
            note_source(sh, false, source);
            if !fault_swapped {
                bump(&sh.counters.faults_zero, 1);
            }
        }
        Resolve::Exists => {
            sh.budget.untake(source);
            sh.uffd.wake(f.addr, PAGE_SIZE)?;
        }
        Resolve::Retry => sh.budget.untake(source),
    }
    if swapped_in > 0 {
        if fault_result == Resolve::Done && fault_swapped {
            bump(&sh.counters.faults_swap, 1);
        }
        count_swap_in(sh, swapped_in, false);
    }
    Ok(match fault_result {
        Resolve::Retry => Step::Retry,
        _ => Step::Done,
    })
}

/// Backs a block fill with one transparent huge page when it mapped a whole
/// aligned block (`pages` from page `lo` on, still locked), and marks its
/// pages `huge`. As the kernel's own first touch of memory it manages would:
/// a nested guest on 4 KiB host pages ran 3x slower in guest mode than on
/// huge pages (BENCHMARKS.md, issue 16 section).
fn collapse(sh: &Shared, lo: usize, pages: &mut [PageRef<'_>]) {
    let host = sh.pages.host_of(lo);
    if !sh.huge_pages || !host.is_multiple_of(BLOCK_PAGES * PAGE_SIZE) {
        return;
    }
    match super::uffd::collapse_block(host, BLOCK_PAGES * PAGE_SIZE) {
        Ok(()) => {
            pages.iter_mut().for_each(|q| q.huge = true);
            bump(&sh.counters.blocks_collapsed, 1);
        }
        Err(e) => {
            let n = sh.counters.collapses_failed.fetch_add(1, Ordering::Relaxed);
            // Quiet: a host without huge pages refuses every one (the
            // counter tells); the first few say why at info level.
            if n < 4 || n.is_power_of_two() {
                log::info!("pager: no huge page for {host:#x} (failure {}): {e}", n + 1);
            }
        }
    }
}

/// A block brought back by a read fault was mapped writable (and counted
/// dirty) for its collapse: write-protect what was mapped (the prefix of
/// `pages` in `mapped`; one call, which keeps a huge page's mapping whole)
/// and count clean every page still equal (read back, a piece at a time,
/// into `readback`) to what was read for it (`data`): its copy in swap, or
/// all zero. A page that differs was written by
/// another vCPU before the protection and stays dirty. If the protection
/// must wait for an unread REMOVE, every page stays dirty (correct, only
/// dearer to evict).
fn protect_back(
    sh: &Shared,
    host_lo: usize,
    pages: &mut [PageRef<'_>],
    mapped: &[bool],
    data: &[u8],
    readback: &mut [u8],
) -> Result<(), PagerError> {
    let m = mapped.iter().take_while(|&&x| x).count();
    if m == 0 {
        return Ok(());
    }
    if sh.uffd.protect(host_lo, m * PAGE_SIZE)? == Resolve::Retry {
        bump(&sh.counters.blocks_back_dirty, 1);
        return Ok(());
    }
    // Read back without faulting (a page zapped from outside meanwhile
    // would fault on this very thread; then all stay dirty), a piece at a
    // time into `readback`. Either way the pages are protected now: a
    // write must find them so.
    let all_dirty = |pages: &mut [PageRef<'_>]| {
        pages.iter_mut().take(m).for_each(|q| q.wp = true);
        bump(&sh.counters.blocks_back_dirty, 1);
    };
    let piece = readback.len() / PAGE_SIZE * PAGE_SIZE;
    if piece == 0 {
        all_dirty(pages);
        return Ok(());
    }
    let mut same = vec![false; m];
    for first in (0..m).step_by(piece / PAGE_SIZE) {
        let at = first * PAGE_SIZE..(m * PAGE_SIZE).min(first * PAGE_SIZE + piece);
        let now = &mut readback[..at.len()];
        if sh.reader.read(host_lo + at.start, now).is_err() {
            all_dirty(pages);
            return Ok(());
        }
        for (k, (now, then)) in now
            .chunks(PAGE_SIZE)
            .zip(data[at].chunks(PAGE_SIZE))
            .enumerate()
        {
            same[first + k] = now == then;
        }
    }
    for (q, same) in pages.iter_mut().zip(same) {
        q.wp = true;
        q.dirty = !same;
    }
    Ok(())
}

/// Zeroes the window's never-written pages in `buf` and plans the reads of
/// its swapped ones: `(first slot, offset in buf, length)` per run of
/// consecutive slots.
fn plan_contents(pages: &[PageRef<'_>], buf: &mut [u8], reads: &mut Vec<(u32, usize, usize)>) {
    for (i, q) in pages.iter().enumerate() {
        let off = i * PAGE_SIZE;
        if q.kind != PageKind::Swapped {
            buf[off..off + PAGE_SIZE].fill(0);
            continue;
        }
        match reads.last_mut() {
            Some((slot, start, len))
                if *start + *len == off
                    && u64::from(*slot) + (*len / PAGE_SIZE) as u64 == u64::from(q.slot) =>
            {
                *len += PAGE_SIZE
            }
            _ => reads.push((q.slot, off, PAGE_SIZE)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_room_in_a_staging_goes_back_to_the_host_and_the_window_stays() {
        let mut st = Staging::new(true);
        st.buf().fill(0xa5);
        st.release_block_room(BLOCK_ROOM_KEPT);
        let window = FAULT_AROUND_PAGES * PAGE_SIZE;
        assert_eq!(st.buf[window], 0xa5, "given back while in use");
        st.release_block_room(std::time::Duration::ZERO);
        let buf = st.buf();
        assert!(buf[..window].iter().all(|&b| b == 0xa5), "window kept");
        // Whole pages of the block room read as zero and hold no frame
        // (a partial page at either end of the allocation is kept).
        let start = (buf.as_ptr() as usize + window).next_multiple_of(PAGE_SIZE);
        let end = (buf.as_ptr() as usize + buf.len()) / PAGE_SIZE * PAGE_SIZE;
        assert!(end - start >= (BLOCK_PAGES - 1) * PAGE_SIZE);
        // (Looked at before the read below, which maps the zero page.)
        let resident = super::super::uffd::mincore(start, end - start).unwrap();
        assert!(resident.iter().all(|&r| !r), "frames still held");
        let off = start - buf.as_ptr() as usize;
        assert!(buf[off..off + (end - start)].iter().all(|&b| b == 0));
        // A staging without block room has nothing to give back.
        let mut small = Staging::new(false);
        small.buf().fill(1);
        small.release_block_room(std::time::Duration::ZERO);
        assert!(small.buf().iter().all(|&b| b == 1));
    }

    #[test]
    fn a_write_stream_is_adjacent_fresh_write_faults() {
        let s = AroundState::default();
        assert!(!s.streaming_write(100), "first write fault");
        assert!(s.streaming_write(116), "next window");
        assert!(s.streaming_write(100), "backwards, one window");
        assert!(!s.streaming_write(5000), "a jump");
        assert!(!s.streaming_write(0));
        assert!(s.streaming_write(1));
    }
}
