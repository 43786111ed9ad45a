//! Reclaim (`pager-reclaim`) and writeback (`pager-writeback`).
//!
//! Cold-page choice: CLOCK over the page array. Faults give a page second
//! chances (hand passes it is spared, cleared one per pass): one for a plain
//! fault, up to eight for a page that keeps coming back soon after its
//! evictions ([`super::workingset`]). Why CLOCK, and why fault-driven
//! chances: userfaultfd shows the pager faults only, not accesses to mapped
//! pages, and the kernel's accessed bits are out of reach without page-idle
//! tracking (root, pagemap PFN lookups per page, and the guest kernel
//! Debian ships to L1 has it off). A fault is the one access signal we get
//! for free; a second chance then keeps a page that was just faulted in
//! (most likely the working set) for at least a full revolution, which
//! stops the swap-in/evict ping-pong a FIFO would cause, and the refault
//! distance tells a page in constant use from a stream. CLOCK needs no
//! lists and no per-access work, only a hand.
//!
//! The reclaim thread never does I/O and never waits for it: it drops clean
//! pages (`MADV_DONTNEED`, no write) and hands dirty ones to the writeback
//! thread (write-protect, copy to a staging buffer, queue). Clean pages stay
//! droppable even while the swap volume is quiesced, which is what lets NOIO
//! faults be served from clean pages. The writeback thread waits on the
//! volume; when a write lands and the page was not written again meanwhile,
//! the page is clean and the next hand pass drops it.
//!
//! Batching: the hand collects runs of adjacent pages. Clean ones are
//! dropped by one `madvise` per run (one REMOVE event, one wake); dirty ones
//! are write-protected by one ioctl per run, copied to one staging buffer and
//! given consecutive swap slots, and the writeback thread writes what is
//! queued with one `pwritev` per run of consecutive slots. Lock rule: the
//! dirty run is collected with its page locks held (ascending, as the hand
//! moves), so it is always queued before a clean run is dropped: `madvise`
//! waits for the fault handler, which may be waiting for one of those locks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use devices::noio::NoioScope;

use super::around::block_of;
use super::pager::Shared;
use super::pages::{PageKind, PageRef, NO_SLOT};
use super::stats::bump;
use super::uffd::Resolve;
use super::workingset::MAX_CHANCES;
use super::{PagerError, PAGE_SIZE};

/// Pages queued or being written at once (staging memory: 1 MiB; a huge
/// page's block, staged whole, may take it to 3 MiB).
const WRITEBACK_QUEUE_PAGES: usize = 256;
/// Most clean pages dropped by one `madvise` (1 MiB).
const EVICT_BATCH_PAGES: usize = 256;
/// Most dirty pages staged by one write-protect (256 KiB).
const WRITEBACK_BATCH_PAGES: usize = 64;
/// Idle reclaim rechecks the watermarks this often.
const RECLAIM_IDLE: Duration = Duration::from_millis(100);
/// After a pass that freed nothing, wait this long for writeback progress.
const NO_PROGRESS_WAIT: Duration = Duration::from_millis(5);

/// Adjacent dirty pages staged together: `data` holds their copies in order.
pub struct WritebackJob {
    /// `(page index, swap slot)` of each page.
    pages: Vec<(usize, u32)>,
    data: Vec<u8>,
}

/// Dirty pages on their way to swap.
#[derive(Default)]
pub struct WritebackQueue {
    queue: Mutex<VecDeque<WritebackJob>>,
    ready: Condvar,
    /// Queued plus being written.
    in_flight: AtomicUsize,
    /// Signalled when a write completes.
    done: Condvar,
}

impl WritebackQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<WritebackJob>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, job: WritebackJob) {
        self.in_flight.fetch_add(job.pages.len(), Ordering::SeqCst);
        self.lock().push_back(job);
        self.ready.notify_one();
    }

    /// Takes every queued job, waiting for one.
    fn pop_all(&self, sh: &Shared) -> Option<Vec<WritebackJob>> {
        let mut q = self.lock();
        loop {
            if sh.stop.load(Ordering::SeqCst) {
                return None;
            }
            if !q.is_empty() {
                return Some(q.drain(..).collect());
            }
            q = self
                .ready
                .wait_timeout(q, RECLAIM_IDLE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn finished(&self, pages: usize) {
        self.in_flight.fetch_sub(pages, Ordering::SeqCst);
        let _q = self.lock();
        self.done.notify_all();
    }

    fn wait_done(&self, timeout: Duration) {
        let q = self.lock();
        let _ = self
            .done
            .wait_timeout(q, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn wake_all(&self) {
        self.ready.notify_all();
        self.done.notify_all();
    }
}

/// The reclaim thread.
pub fn run_reclaim(sh: &Shared) -> Result<(), PagerError> {
    // Defence in depth: should this thread ever fault on guest RAM, it is
    // served without waiting (it is what the waiters wait for). Registered
    // like every pager thread by pager.rs's spawn.
    let _noio = NoioScope::enter();
    let mut hand = 0;
    while !sh.stop.load(Ordering::SeqCst) {
        sh.budget.wait_for_work(RECLAIM_IDLE);
        let need = sh.budget.need();
        if sh.stop.load(Ordering::SeqCst) || (!need.over_high && need.promised_clean == 0) {
            continue;
        }
        if !reclaim_pass(sh, &mut hand)? {
            // Nothing droppable: wait for a write to land. With writeback
            // stalled (quiesced volume) wait longer rather than spin.
            let saturated = sh.wb.in_flight() >= WRITEBACK_QUEUE_PAGES;
            sh.wb.wait_done(if saturated {
                RECLAIM_IDLE
            } else {
                NO_PROGRESS_WAIT
            });
        }
    }
    Ok(())
}

/// Clean pages marked `Evicting`, adjacent, waiting for one `madvise`.
#[derive(Default)]
struct EvictRun {
    first: usize,
    len: usize,
    /// A huge page's whole block.
    whole_block: bool,
}

/// One pass of the hand, long enough to find a page whose chances have run
/// out (a revolution per chance it can have, and one more); whether it
/// dropped any page.
fn reclaim_pass(sh: &Shared, hand: &mut usize) -> Result<bool, PagerError> {
    let n = sh.pages.len();
    let mut progress = false;
    let mut evicting = EvictRun::default();
    // Adjacent dirty pages, locked, from index `dirty_first` on.
    let mut dirty: Vec<PageRef<'_>> = Vec::new();
    let mut dirty_first = 0;
    for _ in 0..(1 + usize::from(MAX_CHANCES)) * n {
        if sh.budget.satisfied(evicting.len) || sh.stop.load(Ordering::SeqCst) {
            break;
        }
        let idx = *hand;
        *hand = (*hand + 1) % n;
        if idx == 0 {
            // The hand wrapped: nothing adjacent follows, and a locked dirty
            // page must not be met again.
            bump(&sh.counters.hand_revolutions, 1);
            sh.workingset.revolution();
            start_writeback(sh, dirty_first, &mut dirty)?;
            progress |= evict_run(sh, &mut evicting)?;
        }
        let mut p = sh.pages.lock(idx);
        if p.kind != PageKind::Resident || p.writeback {
            continue;
        }
        if p.huge {
            // A huge page's block goes whole or not at all; the runs
            // collected so far go first (they lie below it: lock order).
            drop(p);
            start_writeback(sh, dirty_first, &mut dirty)?;
            progress |= evict_run(sh, &mut evicting)?;
            let block = block_of(sh, idx);
            progress |= reclaim_huge_block(sh, block.clone())?;
            *hand = block.end % n;
            continue;
        }
        if p.chances > 0 {
            p.chances -= 1;
            continue;
        }
        let region = sh.pages.region_pages(idx);
        if p.is_clean() {
            p.kind = PageKind::Evicting;
            drop(p);
            let adjacent = evicting.len > 0
                && evicting.first + evicting.len == idx
                && region.contains(&evicting.first);
            if !adjacent || evicting.len == EVICT_BATCH_PAGES {
                start_writeback(sh, dirty_first, &mut dirty)?;
                progress |= evict_run(sh, &mut evicting)?;
                evicting.first = idx;
            }
            evicting.len += 1;
        } else {
            queue_dirty(sh, &mut dirty_first, &mut dirty, idx, p)?;
        }
    }
    start_writeback(sh, dirty_first, &mut dirty)?;
    progress |= evict_run(sh, &mut evicting)?;
    Ok(progress)
}

/// One hand step over a block backed by a transparent huge page: the pages
/// of its block are never dropped one by one (the kernel would keep the
/// whole huge page until it splits it under its own memory pressure), but
/// all together with one `madvise` once every page is clean, which frees
/// the huge page at once. Until then: a page with chances left spares the
/// whole block this pass, dirty pages are written back. A block whose pages
/// went their own ways (a discard, the evict aid) is forgotten as a block.
/// Whether it dropped the block.
fn reclaim_huge_block(sh: &Shared, block: std::ops::Range<usize>) -> Result<bool, PagerError> {
    let region = sh.pages.region_pages(block.start);
    if block.start < region.start || block.end > region.end {
        return Ok(false);
    }
    let mut pages: Vec<PageRef<'_>> = block.clone().map(|i| sh.pages.lock(i)).collect();
    if pages
        .iter()
        .any(|q| q.kind != PageKind::Resident || !q.huge)
    {
        pages.iter_mut().for_each(|q| q.huge = false);
        return Ok(false);
    }
    if pages.iter().any(|q| q.chances > 0) {
        pages
            .iter_mut()
            .for_each(|q| q.chances = q.chances.saturating_sub(1));
        return Ok(false);
    }
    if pages.iter().all(|q| q.is_clean()) {
        pages.iter_mut().for_each(|q| q.kind = PageKind::Evicting);
        drop(pages);
        let mut run = EvictRun {
            first: block.start,
            len: block.len(),
            whole_block: true,
        };
        bump(&sh.counters.huge_blocks_dropped, 1);
        return evict_run(sh, &mut run);
    }
    if pages.iter().all(|q| q.dirty && !q.writeback) {
        // Every page dirty (a block fill the guest wrote): the whole block
        // in one job, so that one write-protect covers the huge page (a
        // part of it would split its mapping, and the guest would map the
        // block back 4 KiB at a time while it is still in use).
        if sh.wb.in_flight() <= WRITEBACK_QUEUE_PAGES && !sh.abort.load(Ordering::SeqCst) {
            bump(&sh.counters.huge_blocks_staged, 1);
            start_writeback(sh, block.start, &mut pages)?;
        }
        return Ok(false);
    }
    let mut dirty: Vec<PageRef<'_>> = Vec::new();
    let mut first = block.start;
    for (i, q) in pages.into_iter().enumerate() {
        if q.dirty && !q.writeback {
            queue_dirty(sh, &mut first, &mut dirty, block.start + i, q)?;
        }
    }
    start_writeback(sh, first, &mut dirty)?;
    Ok(false)
}

/// Adds dirty page `idx` (locked in `p`) to the run of adjacent dirty pages
/// from `first` on, queueing the run first when `idx` does not extend it
/// (another region, a gap, a full batch). Leaves the page alone while the
/// writeback queue is full or the pager is aborting.
fn queue_dirty<'a>(
    sh: &'a Shared,
    first: &mut usize,
    run: &mut Vec<PageRef<'a>>,
    idx: usize,
    p: PageRef<'a>,
) -> Result<(), PagerError> {
    if sh.wb.in_flight() + run.len() >= WRITEBACK_QUEUE_PAGES || sh.abort.load(Ordering::SeqCst) {
        return Ok(());
    }
    let adjacent =
        !run.is_empty() && *first + run.len() == idx && sh.pages.region_pages(idx).contains(first);
    if !adjacent || run.len() == WRITEBACK_BATCH_PAGES {
        start_writeback(sh, *first, run)?;
        *first = idx;
    }
    run.push(p);
    Ok(())
}

/// Queues the locked adjacent dirty pages from `first` on for writeback:
/// one write-protect, one copy to staging, fresh consecutive slots. Pages
/// whose copy is all zero get no slot and no write: they are clean and
/// empty, and the hand drops them for free (never-written pages of a block
/// fill, guest pages it zeroed). Empties `pages` (unlocking them).
fn start_writeback(
    sh: &Shared,
    first: usize,
    pages: &mut Vec<PageRef<'_>>,
) -> Result<(), PagerError> {
    if pages.is_empty() {
        return Ok(());
    }
    let n = pages.len();
    let host = sh.pages.host_of(first);
    if sh.uffd.protect(host, n * PAGE_SIZE)? == Resolve::Retry {
        // A REMOVE event is unread; try these pages on a later pass.
        pages.clear();
        return Ok(());
    }
    let mut data = vec![0u8; n * PAGE_SIZE];
    // Write-protected, so no thread changes them while they are copied. The
    // copy cannot fault even if a page was zapped from outside (its REMOVE
    // event then waits for these locks): see nofault.rs.
    if sh.reader.read(host, &mut data).is_err() {
        sh.uffd.unprotect(host, n * PAGE_SIZE)?;
        pages.clear();
        bump(&sh.counters.copies_skipped, 1);
        return Ok(());
    }
    // The old copies are stale: give their slots back.
    for p in pages.iter_mut() {
        if let Some(slot) = p.slot() {
            sh.swap.free(slot);
            p.slot = NO_SLOT;
        }
    }
    let zero: Vec<bool> = data.chunks_exact(PAGE_SIZE).map(is_zero).collect();
    let slots = match alloc_slots(sh, first, &zero) {
        Ok(slots) => slots,
        Err(e) => {
            // The pages stay dirty and writable, as their state says.
            sh.uffd.unprotect(host, n * PAGE_SIZE)?;
            pages.clear();
            return Err(e);
        }
    };
    let mut job = WritebackJob {
        pages: Vec::with_capacity(n),
        data,
    };
    let mut kept = 0;
    let mut zeroes = 0;
    for (i, mut p) in pages.drain(..).enumerate() {
        p.wp = true;
        p.dirty = false;
        if zero[i] {
            zeroes += 1;
            continue;
        }
        p.slot = slots[i];
        p.writeback = true;
        job.pages.push((first + i, slots[i]));
        job.data
            .copy_within(i * PAGE_SIZE..(i + 1) * PAGE_SIZE, kept * PAGE_SIZE);
        kept += 1;
    }
    bump(&sh.counters.zero_pages_dropped, zeroes);
    if kept > 0 {
        job.data.truncate(kept * PAGE_SIZE);
        sh.wb.push(job);
    }
    Ok(())
}

/// Swap slots for the pages from `first` on that are not `zero` (`NO_SLOT`
/// for those that are): each page's home slot where free, so that adjacent
/// pages read back together, else any run.
fn alloc_slots(sh: &Shared, first: usize, zero: &[bool]) -> Result<Vec<u32>, PagerError> {
    let mut slots = vec![NO_SLOT; zero.len()];
    let mut i = 0;
    while i < zero.len() {
        if zero[i] {
            i += 1;
            continue;
        }
        let end = (i..zero.len()).find(|&j| zero[j]).unwrap_or(zero.len());
        let mut at = i;
        while at < end {
            let left = (end - at) as u32;
            let home = u32::try_from(first + at).unwrap_or(u32::MAX);
            let run = match sh.swap.alloc_at(home, left) {
                Some(run) => Ok(run),
                None => sh.swap.alloc_run(left),
            };
            let (start, count) = match run {
                Ok(run) => run,
                Err(e) => {
                    slots
                        .iter()
                        .filter(|&&s| s != NO_SLOT)
                        .for_each(|&s| sh.swap.free(s));
                    return Err(e.into());
                }
            };
            for (k, slot) in (start..start + count).enumerate() {
                slots[at + k] = slot;
            }
            at += count as usize;
        }
        i = end;
    }
    Ok(slots)
}

fn is_zero(page: &[u8]) -> bool {
    // Word compares: the loop vectorises, a 4 KiB page costs tens of ns.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
}

/// Drops a run of clean pages already marked `Evicting` with one `madvise`;
/// no I/O. Empties the run; whether it dropped any page.
fn evict_run(sh: &Shared, run: &mut EvictRun) -> Result<bool, PagerError> {
    let EvictRun {
        first,
        len: n,
        whole_block,
    } = std::mem::take(run);
    if n == 0 {
        return Ok(false);
    }
    let host = sh.pages.host_of(first);
    if let Err(e) = sh.drop_range(host, host + n * PAGE_SIZE) {
        for idx in first..first + n {
            let mut p = sh.pages.lock(idx);
            p.kind = PageKind::Resident;
            p.discarded = false;
        }
        return Err(PagerError::Sys(e));
    }
    let mut discarded_pages = 0;
    for idx in first..first + n {
        let mut p = sh.pages.lock(idx);
        let slot = p.slot;
        let discarded = p.discarded;
        if discarded {
            if slot != NO_SLOT {
                sh.swap.free(slot);
            }
            p.reset(PageKind::Empty);
        } else if slot == NO_SLOT {
            p.reset_keeping_history(PageKind::Empty);
            p.went_out_whole = whole_block;
            sh.workingset.evicted(&mut p);
        } else {
            p.reset_keeping_history(PageKind::Swapped);
            p.slot = slot;
            p.went_out_whole = whole_block;
            sh.workingset.evicted(&mut p);
        }
        discarded_pages += usize::from(discarded);
    }
    sh.budget.release(n - discarded_pages, true, false);
    sh.budget.release(discarded_pages, true, true);
    bump(&sh.counters.clean_drops, n as u64);
    bump(&sh.counters.evict_batches, 1);
    // Threads that faulted on the pages while they were being dropped.
    sh.uffd.wake(host, n * PAGE_SIZE)?;
    Ok(true)
}

/// The writeback thread: writes whatever is queued, one `pwritev` per run
/// of consecutive slots.
pub fn run_writeback(sh: &Shared) -> Result<(), PagerError> {
    while let Some(jobs) = sh.wb.pop_all(sh) {
        let mut pages: Vec<(u32, usize, &[u8])> = jobs
            .iter()
            .flat_map(|job| {
                job.pages
                    .iter()
                    .zip(job.data.chunks_exact(PAGE_SIZE))
                    .map(|(&(idx, slot), data)| (slot, idx, data))
            })
            .collect();
        pages.sort_unstable_by_key(|&(slot, _, _)| slot);
        let mut rest = pages.as_slice();
        while !rest.is_empty() {
            let len = 1 + rest.windows(2).take_while(|w| w[1].0 == w[0].0 + 1).count();
            let (run, tail) = rest.split_at(len);
            rest = tail;
            let bufs: Vec<&[u8]> = run.iter().map(|&(_, _, data)| data).collect();
            let result = sh.swap.write_run(run[0].0, &bufs, &sh.abort);
            if let Ok(calls) = result {
                bump(&sh.counters.pages_out, len as u64);
                bump(&sh.counters.bytes_written, (len * PAGE_SIZE) as u64);
                bump(&sh.counters.swap_writes, calls);
            }
            for &(slot, idx, _) in run {
                complete(sh, idx, slot, result.is_ok());
            }
            sh.wb.finished(len);
            sh.budget.kick();
            if let Err(e) = result {
                if !sh.abort.load(Ordering::SeqCst) {
                    sh.fail(format!(
                        "swap writeback of pages {:?} failed: {e}",
                        run.iter().map(|r| r.1).collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    Ok(())
}

fn complete(sh: &Shared, idx: usize, slot: u32, written: bool) {
    let mut p = sh.pages.lock(idx);
    if p.kind == PageKind::Resident && p.writeback && p.slot == slot {
        p.writeback = false;
        if !written {
            p.dirty = true;
        }
    } else {
        // The page let go of the slot (discarded) while the write was in flight.
        sh.swap.free(slot);
    }
}
