//! Fault resolution: the userfaultfd reader (`pager-fault`) and the worker
//! that resolves the faults which must wait (`pager-wait`).
//!
//! The handler resolves a fault inline only when that needs no waiting: a
//! frame is available from [`Budget::try_take`] for the thread's class, and
//! for a swapped page the volume takes I/O now (or the thread is NOIO, whose
//! read goes past a quiesce). Everything else goes to the worker, so one slow
//! fault never holds up the others, NOIO ones above all.

use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::noio::{is_registered, is_thread_noio, is_thread_running_guest};
use vmm_sys_util::eventfd::EventFd;

use super::around::{
    block_went_out_whole, resolve_around, worth_waiting_for_block, Arrival, Staging, BLOCK_PAGES,
    BLOCK_ROOM_KEPT, BLOCK_SWAP_IN_BUF,
};
use super::budget::Source;
use super::pager::Shared;
use super::pages::{PageKind, PageRef};
use super::stats::{bump, record_handler_fault, record_wait};
use super::uffd::{Resolve, UffdEvent};
use super::{PagerError, PAGE_SIZE};

/// Events read from the uffd per `read(2)`.
const EVENT_BATCH: usize = 64;
/// Poll timeout while resolutions wait for an `EAGAIN` to clear.
const RETRY_POLL_MS: i32 = 1;
/// Rounds of `EAGAIN` retries that first yield the CPU instead of sleeping.
/// The usual cause is a `madvise` whose REMOVE event this thread has just
/// read: the address space stays "changing" until that thread runs again,
/// which on a one-CPU host (the nested L1) happens only once this thread
/// gives up the CPU. Sleeping a timer tick (4 ms at HZ=250) per eviction
/// batch instead cost the nested benchmark tens of seconds.
const RETRY_YIELD_ROUNDS: u32 = 8;
/// Longest poll for the end of the pager's own zap while faults wait for a
/// retry (its end wakes the poll at once; the bound covers a lost wake-up).
const ZAP_WAIT_MS: i32 = 20;
/// Longest wait of a first write for room for its whole block; past it
/// the fault is served like any other (a window of the block).
const BLOCK_ROOM_WAIT: Duration = Duration::from_millis(250);
/// Pause of the worker between `EAGAIN` retries.
const WORKER_RETRY: Duration = Duration::from_micros(200);
/// How often an idle worker checks the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Log an overshoot on the first event and then every this many (a power of two).
const OVERSHOOT_LOG_EVERY: u64 = 1024;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// One page fault, page-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub addr: usize,
    pub tid: i32,
    pub write: bool,
    pub wp: bool,
}

pub enum Step {
    Done,
    /// `EAGAIN`: read events, then resolve again.
    Retry,
    /// Needs to wait: hand to the worker.
    Defer,
    /// Too much work for the handler (a whole block): hand to the worker,
    /// which serves it without waiting for anything but its CPU.
    HandOver,
}

/// Faults waiting for a worker. Two queues, each with its own worker: a
/// swap-in parked on a quiesced volume must not hold up zero-fill faults
/// that only wait for a frame, and the other way round.
#[derive(Debug, Default)]
pub struct Deferred {
    /// Each fault, and whether it was handed over rather than deferred to
    /// wait ([`Step::HandOver`]).
    queue: Mutex<VecDeque<(Fault, bool)>>,
    ready: Condvar,
}

/// What a deferred fault is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStage {
    /// In a worker's queue behind other faults.
    Queued,
    /// For a frame (reclaim to make room under the limit).
    Frame,
    /// For its swap-in read (the swap volume may be quiesced).
    SwapIn,
}

impl WaitStage {
    pub fn describe(self) -> &'static str {
        match self {
            WaitStage::Queued => "queued behind other faults",
            WaitStage::Frame => "a free frame (reclaim and writeback)",
            WaitStage::SwapIn => "its swap-in read",
        }
    }
}

/// A fault a thread is blocked on, as the stall watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultWait {
    pub tid: i32,
    /// Page-aligned host address.
    pub addr: usize,
    pub since: Instant,
    pub stage: WaitStage,
}

/// The deferred faults of every thread, by thread id.
#[derive(Debug, Default)]
pub struct FaultWaits(Mutex<std::collections::HashMap<i32, FaultWait>>);

impl FaultWaits {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i32, FaultWait>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queued(&self, f: &Fault) {
        self.lock().insert(
            f.tid,
            FaultWait {
                tid: f.tid,
                addr: f.addr,
                since: Instant::now(),
                stage: WaitStage::Queued,
            },
        );
    }

    fn stage(&self, tid: i32, stage: WaitStage) {
        if let Some(w) = self.lock().get_mut(&tid) {
            w.stage = stage;
        }
    }

    fn done(&self, tid: i32, addr: usize) {
        let mut m = self.lock();
        if m.get(&tid).is_some_and(|w| w.addr == addr) {
            m.remove(&tid);
        }
    }

    /// Every deferred fault, oldest first.
    pub fn all(&self) -> Vec<FaultWait> {
        let mut v: Vec<FaultWait> = self.lock().values().copied().collect();
        v.sort_by_key(|w| w.since);
        v
    }
}

impl Deferred {
    fn push(&self, f: Fault, handed_over: bool) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((f, handed_over));
        self.ready.notify_one();
    }

    /// The next fault; calls `idle` each time the queue stayed empty for
    /// [`IDLE_POLL`] (without the queue's lock).
    fn pop(&self, sh: &Shared, mut idle: impl FnMut()) -> Option<(Fault, bool)> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if sh.stop.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(f) = q.pop_front() {
                return Some(f);
            }
            let (guard, waited) = self
                .ready
                .wait_timeout(q, IDLE_POLL)
                .unwrap_or_else(|e| e.into_inner());
            q = guard;
            if waited.timed_out() && q.is_empty() {
                drop(q);
                idle();
                q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    pub fn wake_all(&self) {
        self.ready.notify_all();
    }
}

pub fn note_source(sh: &Shared, noio: bool, source: Source) {
    let c = &sh.counters;
    if source == Source::Overshoot {
        let n = c.overshoot_events.fetch_add(1, Ordering::Relaxed);
        if n & (OVERSHOOT_LOG_EVERY - 1) == 0 {
            log::warn!(
                "pager: NOIO fault took a frame beyond limit + reserve ({} overshoots so far)",
                n + 1
            );
        }
    }
    if !noio {
        return;
    }
    bump(
        match source {
            Source::Free => &c.noio_from_free,
            Source::Discarded => &c.noio_from_discarded,
            Source::Clean => &c.noio_from_clean,
            Source::Reserve => &c.noio_from_reserve,
            Source::Overshoot => &c.noio_from_overshoot,
        },
        1,
    );
}

/// Maps `data` at the locked page and records it as resident.
fn fill(
    sh: &Shared,
    p: &mut PageRef<'_>,
    host: usize,
    data: &[u8],
    write: bool,
) -> Result<Resolve, PagerError> {
    let r = sh.uffd.copy_page(host, data, !write)?;
    if r == Resolve::Done {
        p.kind = PageKind::Resident;
        p.wp = !write;
        p.dirty = write;
        p.writeback = false;
        p.discarded = false;
        sh.workingset.faulted(p, &sh.counters);
    }
    Ok(r)
}

/// The userfaultfd reader. Returns when `stop_evt` fires.
pub fn run_handler(sh: &Shared, stop_evt: &EventFd) -> Result<(), PagerError> {
    let mut buf = userfaultfd::EventBuffer::new(EVENT_BATCH);
    let mut events = Vec::with_capacity(EVENT_BATCH);
    let mut retry: Vec<(Fault, Instant)> = Vec::new();
    // A window's worth: whole-block work goes to the workers.
    let mut staging = Staging::new(false);
    let mut retry_rounds = 0u32;
    let mut gate_set = 0;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sh.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sh.zap_gate.zap_done_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // The zap eventfd is polled only while faults wait for a retry.
        let nfds = if retry.is_empty() { 2 } else { 3 };
        let timeout = if retry.is_empty() {
            retry_rounds = 0;
            -1
        } else if sh.zap_gate.zap_in_flight() {
            // The pager's own zap holds the address space: its end (or a
            // new event, such as its REMOVE) wakes this poll.
            ZAP_WAIT_MS
        } else if retry_rounds < RETRY_YIELD_ROUNDS {
            retry_rounds += 1;
            std::thread::yield_now();
            0
        } else {
            RETRY_POLL_MS
        };
        // SAFETY: `fds` is a live array of three pollfd structs and `nfds` is
        // at most its length; poll writes only their `revents` fields.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(PagerError::Sys(e));
            }
        }
        // Only the stop event ends the loop, never the stop flag: while the
        // other threads wind down, one may still sit in madvise waiting for
        // this thread to read its REMOVE event.
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[2].revents != 0 {
            // Drained; a zap ending from here on writes it again.
            let _ = sh.zap_gate.zap_done_fd().read();
        }
        sh.uffd.read_events(&mut buf, &mut events)?;
        noio_first(&mut events, is_thread_noio);
        for ev in &events {
            match *ev {
                UffdEvent::Fault {
                    addr,
                    tid,
                    write,
                    wp,
                } => {
                    let f = Fault {
                        addr: addr & !(PAGE_SIZE - 1),
                        tid,
                        write,
                        wp,
                    };
                    dispatch(sh, f, Instant::now(), staging.buf(), &mut retry)?;
                }
                UffdEvent::Remove { start, end } => on_remove(sh, start, end),
                UffdEvent::Other => {}
            }
        }
        for (f, seen) in std::mem::take(&mut retry) {
            dispatch(sh, f, seen, staging.buf(), &mut retry)?;
        }
        if retry.len() != gate_set {
            gate_set = retry.len();
            sh.zap_gate.set_retries(gate_set);
        }
    }
}

/// Puts the faults of NOIO threads first in a batch: they must not queue
/// behind the swap reads the handler does inline for ordinary faults. Only
/// when the batch has no REMOVE event, whose order against faults matters;
/// otherwise (and among equals) the kernel's order stays.
fn noio_first(events: &mut [UffdEvent], is_noio: impl Fn(i32) -> bool) {
    if events.iter().any(|e| matches!(e, UffdEvent::Remove { .. })) {
        return;
    }
    events.sort_by_key(|e| match *e {
        UffdEvent::Fault { tid, .. } => !is_noio(tid),
        _ => true,
    });
}

/// Resolves `f`, read from the uffd at `seen`, or queues it for a retry
/// or for a worker.
fn dispatch(
    sh: &Shared,
    f: Fault,
    seen: Instant,
    staging: &mut [u8],
    retry: &mut Vec<(Fault, Instant)>,
) -> Result<(), PagerError> {
    match resolve_now(sh, f, staging)? {
        Step::Done => record_handler_fault(&sh.counters, seen.elapsed()),
        Step::Retry => {
            bump(&sh.counters.fault_retries, 1);
            retry.push((f, seen));
        }
        step @ (Step::Defer | Step::HandOver) => {
            let handed_over = matches!(step, Step::HandOver);
            bump(&sh.counters.faults_deferred, u64::from(!handed_over));
            sh.fault_waits.queued(&f);
            let swapped = sh
                .pages
                .index_of_host(f.addr)
                .is_some_and(|i| sh.pages.lock(i).kind == PageKind::Swapped);
            if swapped {
                sh.deferred_swap.push(f, handed_over);
            } else {
                sh.deferred.push(f, handed_over);
            }
        }
    }
    Ok(())
}

fn wake(sh: &Shared, host: usize) -> Result<(), PagerError> {
    Ok(sh.uffd.wake(host, PAGE_SIZE)?)
}

/// Resolves a fault if that needs no waiting. `buf` holds
/// [`super::around::FAULT_AROUND_PAGES`] pages or more.
fn resolve_now(sh: &Shared, f: Fault, buf: &mut [u8]) -> Result<Step, PagerError> {
    let Some(idx) = sh.pages.index_of_host(f.addr) else {
        log::warn!("pager: fault at {:#x} outside guest RAM", f.addr);
        return Ok(Step::Done);
    };
    let host = f.addr;
    let noio = is_thread_noio(f.tid);
    // A vCPU running guest code while the swap volume is quiesced: the
    // guest's own access, which the guest cannot unblock by resuming its
    // device while that vCPU is stuck. Served without waiting, like NOIO.
    // So is a thread that is none of ours: the kernel faulting on a vCPU's
    // behalf (KVM's asynchronous page fault worker).
    let guest = !noio
        && (is_thread_running_guest(f.tid) || !is_registered(f.tid))
        && sh.swap.volume().is_quiesced();
    let c = &sh.counters;
    let mut p = sh.pages.lock(idx);
    if f.wp {
        return write_protect_fault(sh, p, host, noio);
    }
    if guest
        && matches!(
            p.kind,
            PageKind::Empty | PageKind::Swapped | PageKind::SwapIn
        )
    {
        bump(&c.guest_faults_past_quiesce, 1);
    }
    let noio_counted = noio;
    let noio = noio || guest;
    if !noio && matches!(p.kind, PageKind::Empty | PageKind::Swapped) {
        let Some(source) = sh.budget.try_take(false, 0) else {
            return Ok(Step::Defer);
        };
        return resolve_around(sh, f, idx, p, source, buf, Arrival::Handler);
    }
    // NOIO faults: one page at a time, from the NOIO sources.
    let staging = &mut buf[..PAGE_SIZE];
    match p.kind {
        PageKind::Resident => {
            drop(p);
            bump(&c.faults_spurious, 1);
            wake(sh, host)?;
            Ok(Step::Done)
        }
        // Whoever owns the transition wakes the page when it is done: the
        // evictor after a no-I/O madvise, the worker after its read.
        PageKind::Evicting => Ok(Step::Done),
        PageKind::SwapIn if !noio => Ok(Step::Done),
        PageKind::SwapIn => {
            // The worker waits on a quiesced volume with a frame charged for
            // this page; a NOIO thread cannot wait, so read it here and let
            // the charge move with the state (the worker sees the change).
            let past = match sh.swap.read_noio(p.slot, staging) {
                Ok(past) => past,
                Err(e) => {
                    sh.fail(format!("swap-in of page {idx} failed: {e}"));
                    return release_after_failure(sh, p, host, f.write);
                }
            };
            let slot = p.slot;
            match fill(sh, &mut p, host, staging, f.write)? {
                Resolve::Retry => return Ok(Step::Retry),
                Resolve::Exists => {
                    drop(p);
                    wake(sh, host)?;
                    return Ok(Step::Done);
                }
                Resolve::Done => p.slot = slot,
            }
            if noio_counted {
                bump(&c.noio_faults, 1);
                bump(&c.noio_swapin_takeovers, 1);
            }
            count_swap_fault(sh, past && noio_counted);
            Ok(Step::Done)
        }
        PageKind::Empty | PageKind::Swapped => {
            let Some(source) = sh.budget.try_take(noio, sh.pages.clean_pages()) else {
                return Ok(Step::Defer);
            };
            let swapped = p.kind == PageKind::Swapped;
            let slot = p.slot;
            let mut past = false;
            if swapped {
                let read = if noio {
                    sh.swap.read_noio(slot, staging).map(|b| {
                        past = b;
                        true
                    })
                } else {
                    sh.swap.try_read(slot, staging)
                };
                match read {
                    Ok(true) => {}
                    Ok(false) => {
                        sh.budget.untake(source);
                        return Ok(Step::Defer);
                    }
                    Err(e) => {
                        sh.budget.untake(source);
                        sh.fail(format!("swap-in of page {idx} failed: {e}"));
                        return release_after_failure(sh, p, host, f.write);
                    }
                }
            }
            let data: &[u8] = if swapped { staging } else { &ZERO_PAGE };
            match fill(sh, &mut p, host, data, f.write) {
                Ok(Resolve::Done) => {}
                Ok(Resolve::Retry) => {
                    sh.budget.untake(source);
                    return Ok(Step::Retry);
                }
                Ok(Resolve::Exists) => {
                    sh.budget.untake(source);
                    drop(p);
                    wake(sh, host)?;
                    return Ok(Step::Done);
                }
                Err(e) => {
                    sh.budget.untake(source);
                    return Err(e);
                }
            }
            p.slot = slot;
            drop(p);
            if noio_counted {
                bump(&c.noio_faults, 1);
            }
            note_source(sh, noio_counted, source);
            if swapped {
                count_swap_fault(sh, past && noio_counted);
            } else {
                bump(&c.faults_zero, 1);
            }
            Ok(Step::Done)
        }
    }
}

/// After a fatal swap-in error: the VM is stopping, but the faulting thread
/// must not stay blocked (it could never see the stop). It gets a zero page
/// (the pager has failed; its memory is no longer trusted) and runs on.
pub fn release_after_failure(
    sh: &Shared,
    mut p: PageRef<'_>,
    host: usize,
    write: bool,
) -> Result<Step, PagerError> {
    match fill(sh, &mut p, host, &ZERO_PAGE, write)? {
        Resolve::Retry => Ok(Step::Retry),
        Resolve::Done => Ok(Step::Done),
        Resolve::Exists => {
            drop(p);
            wake(sh, host)?;
            Ok(Step::Done)
        }
    }
}

/// A fault served from swap with one page read.
fn count_swap_fault(sh: &Shared, past_quiesce: bool) {
    bump(&sh.counters.faults_swap, 1);
    bump(&sh.counters.swap_reads, 1);
    count_swap_in(sh, 1, past_quiesce);
}

/// `pages` pages read from swap and mapped.
pub fn count_swap_in(sh: &Shared, pages: u64, past_quiesce: bool) {
    let c = &sh.counters;
    bump(&c.pages_in, pages);
    bump(&c.bytes_read, pages * PAGE_SIZE as u64);
    if past_quiesce {
        bump(&c.noio_reads_past_quiesce, 1);
    }
}

fn write_protect_fault(
    sh: &Shared,
    mut p: PageRef<'_>,
    host: usize,
    noio: bool,
) -> Result<Step, PagerError> {
    let c = &sh.counters;
    match p.kind {
        PageKind::Resident if p.wp => {
            if sh.uffd.unprotect(host, PAGE_SIZE)? == Resolve::Retry {
                return Ok(Step::Retry);
            }
            p.wp = false;
            p.dirty = true;
            sh.workingset.faulted(&mut p, &sh.counters);
            if p.writeback {
                bump(&c.redirtied_in_writeback, 1);
            }
            bump(&c.faults_write_protect, 1);
            if noio {
                bump(&c.noio_faults, 1);
            }
            Ok(Step::Done)
        }
        PageKind::Evicting | PageKind::SwapIn => Ok(Step::Done),
        _ => {
            drop(p);
            bump(&c.faults_spurious, 1);
            wake(sh, host)?;
            Ok(Step::Done)
        }
    }
}

/// A REMOVE event. The pager's own (evictions, discards) were accounted by
/// their caller; anyone else's drops the pages.
fn on_remove(sh: &Shared, start: usize, end: usize) {
    if sh.take_own_remove(start, end) {
        return;
    }
    for (first, _, n) in sh.pages.host_runs(start, end) {
        let mut freed = 0;
        for idx in first..first + n {
            let mut p = sh.pages.lock(idx);
            let kind = p.kind;
            match kind {
                PageKind::Empty | PageKind::Evicting => continue,
                PageKind::Resident | PageKind::SwapIn => freed += 1,
                PageKind::Swapped => {}
            }
            // A slot with a write in flight is freed when the write completes.
            if let Some(slot) = p.slot() {
                if !p.writeback {
                    sh.swap.free(slot);
                }
            }
            p.reset(PageKind::Empty);
            bump(&sh.counters.removed_pages, 1);
        }
        sh.budget.release(freed, false, false);
    }
}

/// A worker: resolves the deferred faults of `queue`, waiting as long as it
/// takes. With `blocks` it has room to bring blocks back whole (the
/// handler hands it the swapped faults), given back once it served no
/// fault for a while.
pub fn run_worker(sh: &Shared, queue: &Deferred, blocks: bool) -> Result<(), PagerError> {
    let mut staging = Staging::new(blocks);
    while let Some((f, handed_over)) = queue.pop(sh, || staging.release_block_room(BLOCK_ROOM_KEPT))
    {
        let start = Instant::now();
        let resolved = resolve_waiting(sh, f, staging.buf());
        sh.fault_waits.done(f.tid, f.addr);
        resolved?;
        if !handed_over {
            record_wait(&sh.counters, start.elapsed().as_nanos() as u64);
        }
        wake(sh, f.addr)?;
    }
    Ok(())
}

fn resolve_waiting(sh: &Shared, f: Fault, around_buf: &mut [u8]) -> Result<(), PagerError> {
    let Some(idx) = sh.pages.index_of_host(f.addr) else {
        return Ok(());
    };
    let host = f.addr;
    let c = &sh.counters;
    // NOIO lent to the faulting thread while it waited here (a NOIO path
    // waits for that thread): stop waiting, serve it the NOIO way.
    let lent = || is_thread_noio(f.tid);
    while !sh.stop.load(Ordering::SeqCst) {
        if lent() {
            match resolve_now(sh, f, around_buf)? {
                Step::Done => return Ok(()),
                Step::Retry => {
                    bump(&c.fault_retries, 1);
                    std::thread::sleep(WORKER_RETRY);
                    continue;
                }
                // No NOIO source after all (or a whole block): wait below.
                Step::Defer | Step::HandOver => {}
            }
        }
        let (kind, slot) = {
            let p = sh.pages.lock(idx);
            (p.kind, p.slot)
        };
        if !matches!(kind, PageKind::Empty | PageKind::Swapped) {
            return Ok(());
        }
        sh.fault_waits.stage(f.tid, WaitStage::Frame);
        // A first write into a never-written block waits for room for the
        // whole block, then fills it (one huge page instead of 512 small);
        // a fault on a block that went out whole, to bring it back whole.
        let whole_block = match kind {
            PageKind::Empty => f.write && worth_waiting_for_block(sh, idx),
            // Not while the volume is quiesced: the read below waits for it.
            _ => {
                around_buf.len() >= BLOCK_SWAP_IN_BUF
                    && sh.budget.room_comes_for(BLOCK_PAGES)
                    && !sh.swap.volume().is_quiesced()
                    && block_went_out_whole(sh, idx, &sh.pages.lock(idx))
            }
        };
        let block_room = whole_block
            && sh
                .budget
                .wait_room(BLOCK_PAGES, BLOCK_ROOM_WAIT, &sh.abort, lent);
        let Some((source, _)) = sh.budget.take_waiting_unless(&sh.abort, lent) else {
            continue;
        };
        let mut p = sh.pages.lock(idx);
        if p.kind != kind || p.slot != slot {
            drop(p);
            sh.budget.untake(source);
            continue;
        }
        // Room for the block came; or the frame came and the volume flows:
        // serve the fault as the handler would (a block fill or a block
        // coming back the handler handed over, one read for the run of
        // swapped neighbours).
        if block_room || !sh.swap.volume().is_quiesced() {
            let arrival = if block_room {
                Arrival::BlockRoom
            } else {
                Arrival::Worker
            };
            match resolve_around(sh, f, idx, p, source, around_buf, arrival)? {
                Step::Done => return Ok(()),
                Step::Retry => {
                    bump(&c.fault_retries, 1);
                    std::thread::sleep(WORKER_RETRY);
                }
                // Quiesced meanwhile (the frame went back): wait again.
                Step::Defer | Step::HandOver => {}
            }
            continue;
        }
        let staging = &mut around_buf[..PAGE_SIZE];
        if kind == PageKind::Empty {
            // The volume is quiesced: a zero page, no neighbours to read.
            match fill(sh, &mut p, host, &ZERO_PAGE, f.write)? {
                Resolve::Done => {
                    note_source(sh, false, source);
                    bump(&c.faults_zero, 1);
                    return Ok(());
                }
                Resolve::Exists => {
                    sh.budget.untake(source);
                    return Ok(());
                }
                Resolve::Retry => {
                    drop(p);
                    sh.budget.untake(source);
                    bump(&c.fault_retries, 1);
                    std::thread::sleep(WORKER_RETRY);
                    continue;
                }
            }
        }
        // Swapped: claim the page, read without holding its lock.
        p.kind = PageKind::SwapIn;
        drop(p);
        sh.fault_waits.stage(f.tid, WaitStage::SwapIn);
        let read = sh
            .swap
            .read_wait_unless(slot, staging, || sh.abort.load(Ordering::SeqCst) || lent());
        if let Err(e) = read {
            let mut p = sh.pages.lock(idx);
            if p.kind == PageKind::SwapIn {
                p.kind = PageKind::Swapped;
                drop(p);
                sh.budget.untake(source);
            }
            if sh.abort.load(Ordering::SeqCst) {
                return Ok(());
            }
            if lent() {
                continue;
            }
            sh.fail(format!("swap-in of page {idx} failed: {e}"));
            return Ok(());
        }
        loop {
            let mut p = sh.pages.lock(idx);
            if p.kind != PageKind::SwapIn {
                // Discarded, or served to a NOIO thread: the charge went with it.
                return Ok(());
            }
            match fill(sh, &mut p, host, staging, f.write)? {
                Resolve::Done => {
                    p.slot = slot;
                    note_source(sh, false, source);
                    count_swap_fault(sh, false);
                    return Ok(());
                }
                Resolve::Exists => {
                    // Mapped behind our back: keep it, assume it was written.
                    p.kind = PageKind::Resident;
                    p.dirty = true;
                    p.wp = false;
                    return Ok(());
                }
                Resolve::Retry => {
                    drop(p);
                    bump(&c.fault_retries, 1);
                    std::thread::sleep(WORKER_RETRY);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(tid: i32, addr: usize) -> UffdEvent {
        UffdEvent::Fault {
            addr,
            tid,
            write: false,
            wp: false,
        }
    }

    fn order(events: &[UffdEvent]) -> Vec<usize> {
        events
            .iter()
            .map(|e| match *e {
                UffdEvent::Fault { addr, .. } => addr,
                UffdEvent::Remove { start, .. } => start,
                UffdEvent::Other => 0,
            })
            .collect()
    }

    #[test]
    fn noio_faults_go_first_unless_a_remove_is_in_the_batch() {
        // Threads 7 and 9 are NOIO.
        let noio = |tid: i32| tid == 7 || tid == 9;
        let mut batch = vec![
            fault(1, 0x1000),
            fault(7, 0x2000),
            fault(2, 0x3000),
            fault(9, 0x4000),
        ];
        noio_first(&mut batch, noio);
        assert_eq!(
            order(&batch),
            vec![0x2000, 0x4000, 0x1000, 0x3000],
            "stable within each class"
        );
        let mut with_remove = vec![
            fault(1, 0x1000),
            UffdEvent::Remove {
                start: 0x5000,
                end: 0x6000,
            },
            fault(7, 0x2000),
        ];
        noio_first(&mut with_remove, noio);
        assert_eq!(
            order(&with_remove),
            vec![0x1000, 0x5000, 0x2000],
            "order kept"
        );
    }
}
