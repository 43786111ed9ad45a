//! Reclaim (`pager-reclaim`) and writeback (`pager-writeback`).
//!
//! Cold-page choice: CLOCK (second chance) over the page array, with the
//! reference bit set by the fault handler on every fault that maps or
//! unprotects a page and cleared by the passing hand. Why CLOCK, and why
//! fault-driven reference bits: userfaultfd shows the pager faults only, not
//! accesses to mapped pages, and the kernel's accessed bits are out of reach
//! without page-idle tracking (root, pagemap PFN lookups per page). A fault is
//! the one access signal we get for free; second chance then keeps a page
//! that was just faulted in (most likely the working set) for at least a
//! full revolution, which stops the swap-in/evict ping-pong a FIFO would
//! cause. CLOCK needs no lists and no per-access work, only a hand.
//!
//! The reclaim thread never does I/O and never waits for it: it drops clean
//! pages (`MADV_DONTNEED`, no write) and hands dirty ones to the writeback
//! thread (write-protect, copy to a staging buffer, queue). Clean pages stay
//! droppable even while the swap volume is quiesced, which is what lets NOIO
//! faults be served from clean pages. The writeback thread waits on the
//! volume; when a write lands and the page was not written again meanwhile,
//! the page is clean and the next hand pass drops it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use devices::noio::{register_current_thread, NoioScope};

use super::pager::Shared;
use super::pages::{PageKind, PageRef, NO_SLOT};
use super::stats::bump;
use super::uffd::Resolve;
use super::{PagerError, PAGE_SIZE};

/// Pages queued or being written at once (staging memory: 256 KiB).
const WRITEBACK_QUEUE_PAGES: usize = 64;
/// Idle reclaim rechecks the watermarks this often.
const RECLAIM_IDLE: Duration = Duration::from_millis(100);
/// After a pass that freed nothing, wait this long for writeback progress.
const NO_PROGRESS_WAIT: Duration = Duration::from_millis(5);

pub struct WritebackJob {
    idx: usize,
    slot: u32,
    data: Box<[u8]>,
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
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.lock().push_back(job);
        self.ready.notify_one();
    }

    fn pop(&self, sh: &Shared) -> Option<WritebackJob> {
        let mut q = self.lock();
        loop {
            if sh.stop.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(job) = q.pop_front() {
                return Some(job);
            }
            q = self
                .ready
                .wait_timeout(q, RECLAIM_IDLE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
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
    // served without waiting (it is what the waiters wait for).
    let _registration = register_current_thread();
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

/// One pass of up to two hand revolutions; whether it dropped any page.
fn reclaim_pass(sh: &Shared, hand: &mut usize) -> Result<bool, PagerError> {
    let n = sh.pages.len();
    let mut progress = false;
    for _ in 0..2 * n {
        if sh.budget.satisfied() || sh.stop.load(Ordering::SeqCst) {
            break;
        }
        let idx = *hand;
        *hand = (*hand + 1) % n;
        let mut p = sh.pages.lock(idx);
        if p.kind != PageKind::Resident || p.writeback {
            continue;
        }
        if p.referenced {
            p.referenced = false;
            continue;
        }
        if p.is_clean() {
            p.kind = PageKind::Evicting;
            drop(p);
            evict(sh, idx)?;
            progress = true;
        } else if sh.wb.in_flight() < WRITEBACK_QUEUE_PAGES && !sh.abort.load(Ordering::SeqCst) {
            start_writeback(sh, idx, p)?;
        }
    }
    Ok(progress)
}

/// Write-protects a dirty page, copies it to staging and queues the write.
fn start_writeback(sh: &Shared, idx: usize, mut p: PageRef<'_>) -> Result<(), PagerError> {
    let host = sh.pages.host_of(idx);
    let slot = match p.slot() {
        Some(slot) => slot,
        None => sh.swap.alloc()?,
    };
    if sh.uffd.protect(host, PAGE_SIZE)? == Resolve::Retry {
        // A REMOVE event is unread; try this page on a later pass.
        if p.slot == NO_SLOT {
            sh.swap.free(slot);
        }
        return Ok(());
    }
    let mut data = vec![0u8; PAGE_SIZE].into_boxed_slice();
    // SAFETY: the page is `Resident` under its lock, so it is mapped (every
    // zap of guest RAM changes the state under this lock first) and reading
    // it cannot fault; it is write-protected, so no thread changes it while
    // it is copied. `data` is a separate heap buffer of PAGE_SIZE bytes.
    unsafe { std::ptr::copy_nonoverlapping(host as *const u8, data.as_mut_ptr(), PAGE_SIZE) };
    p.slot = slot;
    p.wp = true;
    p.dirty = false;
    p.writeback = true;
    drop(p);
    sh.wb.push(WritebackJob { idx, slot, data });
    Ok(())
}

/// Drops a clean page already marked `Evicting`; no I/O.
fn evict(sh: &Shared, idx: usize) -> Result<(), PagerError> {
    let host = sh.pages.host_of(idx);
    if let Err(e) = sh.drop_range(host, host + PAGE_SIZE) {
        let mut p = sh.pages.lock(idx);
        p.kind = PageKind::Resident;
        p.discarded = false;
        return Err(PagerError::Sys(e));
    }
    let mut p = sh.pages.lock(idx);
    let slot = p.slot;
    let discarded = p.discarded;
    if discarded || slot == NO_SLOT {
        if discarded && slot != NO_SLOT {
            sh.swap.free(slot);
        }
        p.reset(PageKind::Empty);
    } else {
        p.reset(PageKind::Swapped);
        p.slot = slot;
    }
    drop(p);
    sh.budget.release(1, true, discarded);
    bump(&sh.counters.clean_drops, 1);
    // Threads that faulted on the page while it was being dropped.
    sh.uffd.wake(host, PAGE_SIZE)?;
    Ok(())
}

/// The writeback thread.
pub fn run_writeback(sh: &Shared) -> Result<(), PagerError> {
    while let Some(job) = sh.wb.pop(sh) {
        let result = sh.swap.write(job.slot, &job.data, &sh.abort);
        let written = result.is_ok();
        if written {
            bump(&sh.counters.pages_out, 1);
            bump(&sh.counters.bytes_written, PAGE_SIZE as u64);
        }
        complete(sh, &job, written);
        sh.wb.finished();
        sh.budget.kick();
        if let Err(e) = result {
            if !sh.abort.load(Ordering::SeqCst) {
                sh.fail(format!("swap writeback of page {} failed: {e}", job.idx));
            }
        }
    }
    Ok(())
}

fn complete(sh: &Shared, job: &WritebackJob, written: bool) {
    let mut p = sh.pages.lock(job.idx);
    if p.kind == PageKind::Resident && p.writeback && p.slot == job.slot {
        p.writeback = false;
        if !written {
            p.dirty = true;
        }
    } else {
        // The page let go of the slot (discarded) while the write was in flight.
        sh.swap.free(job.slot);
    }
}
