//! The pager object: start, discard, counters, failure signal, stop.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::around::AroundState;
use super::budget::Budget;
use super::config::PagerConfig;
use super::fault::{self, Deferred, FaultWaits};
use super::pages::{PageKind, PageTable, RamRegion, NO_SLOT};
use super::reclaim::{self, WritebackQueue};
use super::stats::{bump, Counters, PagerStats};
use super::swap::SwapStore;
use super::uffd::{madvise_dontneed, madvise_nohugepage, mincore, Uffd};
use super::workingset::WorkingSet;
use super::zap_gate::ZapGate;
use super::{PagerError, PAGE_SIZE};

/// State shared by the pager threads.
pub struct Shared {
    pub uffd: Uffd,
    pub pages: PageTable,
    pub swap: SwapStore,
    pub budget: Budget,
    pub counters: Counters,
    /// Deferred faults that wait for a frame (zero fill) ...
    pub deferred: Deferred,
    /// ... and those that wait for a swap-in read.
    pub deferred_swap: Deferred,
    /// Every deferred fault, for the stall watchdog.
    pub fault_waits: FaultWaits,
    pub around: AroundState,
    pub wb: WritebackQueue,
    /// Orderly stop requested.
    pub stop: AtomicBool,
    /// Stop requested or a fatal error happened: waits give up.
    pub abort: AtomicBool,
    fatal: Mutex<Option<String>>,
    fatal_evt: EventFd,
    /// Host ranges the pager itself is about to `madvise` away.
    own_removes: OwnRemoves,
    /// The handshake of the pager's own zaps with the handler's retries.
    pub zap_gate: ZapGate,
    /// Copies of pages that may have been zapped from outside (see nofault.rs).
    pub reader: super::nofault::NoFaultReader,
    /// Collapse whole block fills into huge pages ([`PagerConfig::huge_pages`]).
    pub huge_pages: bool,
    /// Which evicted pages come back soon (the clock's second chances).
    pub workingset: WorkingSet,
}

/// Longest a zap of the pager's own waits for the handler's retries (see
/// zap_gate.rs): a bound, so that a fault retried for another reason
/// cannot hold reclaim up.
const ZAP_HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(5);

/// Host ranges the pager is `madvise`-ing away, with counts.
#[derive(Debug, Default)]
struct OwnRemoves(Mutex<HashMap<(usize, usize), u32>>);

impl OwnRemoves {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, usize), u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tag(&self, start: usize, end: usize) {
        *self.lock().entry((start, end)).or_insert(0) += 1;
    }

    /// Whether REMOVE `[start, end)` is tagged, consuming the tag. Only an
    /// exact match counts: a tagged range merely containing the event may
    /// be a concurrent eviction while someone else zaps a page inside it,
    /// and taking that for ours would leave a zapped page marked mapped.
    /// (Every range the pager drops lies inside one guest RAM mapping, a
    /// single VMA, so the kernel reports it as one event.)
    fn take(&self, start: usize, end: usize) -> bool {
        let mut map = self.lock();
        match map.get_mut(&(start, end)) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                map.remove(&(start, end));
            }
            None => return false,
        }
        true
    }
}

impl Shared {
    /// Drops `[start, end)` of guest RAM on behalf of the pager. Its REMOVE
    /// event is tagged so the handler ignores it: the event is read before
    /// the zap but may be processed after this returns, when the caller has
    /// already moved the page on (swapped, discarded, even faulted back in).
    /// Blocks until the handler reads the event: never call on the handler.
    pub fn drop_range(&self, start: usize, end: usize) -> std::io::Result<()> {
        let zap = self.zap_gate.begin_zap(ZAP_HOLD_MAX);
        if zap.held {
            bump(&self.counters.zaps_held_for_retries, 1);
        }
        self.own_removes.tag(start, end);
        let result = madvise_dontneed(start, end - start);
        drop(zap);
        if result.is_err() {
            // No event was generated; forget the tag.
            self.take_own_remove(start, end);
        }
        result
    }

    /// Whether REMOVE `[start, end)` was the pager's own (and consumes the tag).
    pub fn take_own_remove(&self, start: usize, end: usize) -> bool {
        self.own_removes.take(start, end)
    }

    /// Records the first fatal error, signals it and releases every waiter.
    pub fn fail(&self, msg: String) {
        let mut slot = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            log::error!("pager: fatal: {msg}");
            *slot = Some(msg);
            if let Err(e) = self.fatal_evt.write(1) {
                log::error!("pager: cannot signal the fatal error: {e}");
            }
        }
        drop(slot);
        self.abort.store(true, Ordering::SeqCst);
        self.budget.wake_all();
        self.deferred.wake_all();
        self.deferred_swap.wake_all();
        self.wb.wake_all();
    }

    fn fatal_error(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Guest RAM paged against a resident limit. See the module documentation.
pub struct Pager {
    shared: Arc<Shared>,
    stop_evt: EventFd,
    handler: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    regions: Vec<RamRegion>,
    /// Keeps guest RAM mapped for as long as the threads may touch it.
    _mappings: Vec<Arc<MmapRegion>>,
}

impl Pager {
    /// Starts paging every region of `mem` (anonymous private mappings, as
    /// `GuestMemoryMmap::from_ranges` creates them). Call before vCPUs run;
    /// pages written before (the loaded kernel) are found with `mincore` and
    /// counted as resident and dirty.
    pub fn start(config: &PagerConfig, mem: &GuestMemoryMmap) -> Result<Self, PagerError> {
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for r in mem.iter() {
            let mapping = r.get_mmap();
            regions.push(RamRegion {
                host_addr: mapping.as_ptr() as usize,
                len: mapping.size(),
                guest_addr: r.start_addr().0,
            });
            mappings.push(mapping);
        }
        // SAFETY: the regions are the mappings of `mem`, kept alive by
        // `mappings` for the pager's lifetime; GuestMemoryMmap creates them
        // as anonymous private mappings.
        unsafe { Self::start_inner(config, regions, mappings) }
    }

    /// Starts paging raw host mappings.
    ///
    /// # Safety
    /// Each region must be a page-aligned anonymous private mapping that
    /// stays mapped, and is not remapped, until [`Pager::stop`] returns or the
    /// pager is dropped; regions must not overlap.
    pub unsafe fn start_raw(
        config: &PagerConfig,
        regions: &[RamRegion],
    ) -> Result<Self, PagerError> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::start_inner(config, regions.to_vec(), Vec::new()) }
    }

    unsafe fn start_inner(
        config: &PagerConfig,
        regions: Vec<RamRegion>,
        mappings: Vec<Arc<MmapRegion>>,
    ) -> Result<Self, PagerError> {
        if regions.is_empty() {
            return Err(PagerError::Config("no guest RAM".into()));
        }
        let mut ram_pages = 0;
        for r in &regions {
            if r.host_addr % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 || r.len == 0 {
                return Err(PagerError::Unaligned {
                    host_addr: r.host_addr,
                    len: r.len,
                });
            }
            ram_pages += r.len / PAGE_SIZE;
        }
        let cfg = config.resolve(ram_pages)?;
        let swap = SwapStore::create(
            &config.swap_path,
            cfg.swap_slots,
            config.swap_volume.clone(),
        )?;
        let uffd = Uffd::create()?;
        for r in &regions {
            if let Err(e) = madvise_nohugepage(r.host_addr, r.len) {
                log::warn!("pager: MADV_NOHUGEPAGE on {:#x}: {e}", r.host_addr);
            }
            uffd.register(r.host_addr, r.len)?;
        }
        let pages = PageTable::new(&regions);
        let budget = Budget::new(cfg.limit, cfg.reserve, cfg.high, cfg.low);
        // Pages written before the pager started are resident and dirty.
        let mut preloaded = 0;
        for r in &regions {
            let resident = mincore(r.host_addr, r.len).map_err(PagerError::Sys)?;
            let first = pages.index_of_host(r.host_addr).unwrap_or(0);
            for (i, _) in resident.iter().enumerate().filter(|(_, &res)| res) {
                let mut p = pages.lock(first + i);
                p.kind = PageKind::Resident;
                p.dirty = true;
                preloaded += 1;
            }
        }
        budget.preload(preloaded);
        log::info!(
            "pager: {} pages of guest RAM, limit {} pages, reserve {}, watermarks {}/{}, swap {} slots, {} pages already resident",
            ram_pages, cfg.limit, cfg.reserve, cfg.high, cfg.low, cfg.swap_slots, preloaded
        );
        let shared = Arc::new(Shared {
            uffd,
            pages,
            swap,
            budget,
            counters: Counters::default(),
            deferred: Deferred::default(),
            deferred_swap: Deferred::default(),
            fault_waits: FaultWaits::default(),
            around: AroundState::default(),
            wb: WritebackQueue::default(),
            stop: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            fatal: Mutex::new(None),
            fatal_evt: EventFd::new(EFD_NONBLOCK).map_err(PagerError::Sys)?,
            own_removes: OwnRemoves::default(),
            zap_gate: ZapGate::new().map_err(PagerError::Sys)?,
            reader: super::nofault::NoFaultReader::open().map_err(PagerError::Sys)?,
            huge_pages: config.huge_pages,
            workingset: WorkingSet::with_pm_window(cfg.limit, config.pm_window),
        });
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(PagerError::Sys)?;
        let handler_stop = stop_evt.try_clone().map_err(PagerError::Sys)?;
        let handler = spawn(&shared, "pager-fault", Priority::Urgent, move |sh| {
            fault::run_handler(sh, &handler_stop)
        })?;
        let mut pager = Self {
            shared: shared.clone(),
            stop_evt,
            handler: Some(handler),
            workers: Vec::new(),
            regions,
            _mappings: mappings,
        };
        pager
            .workers
            .push(spawn(&shared, "pager-wait", Priority::Urgent, |sh| {
                fault::run_worker(sh, &sh.deferred, false)
            })?);
        pager
            .workers
            .push(spawn(&shared, "pager-swapin", Priority::Urgent, |sh| {
                fault::run_worker(sh, &sh.deferred_swap, true)
            })?);
        pager.workers.push(spawn(
            &shared,
            "pager-reclaim",
            Priority::Normal,
            reclaim::run_reclaim,
        )?);
        pager.workers.push(spawn(
            &shared,
            "pager-writeback",
            Priority::Normal,
            reclaim::run_writeback,
        )?);
        Ok(pager)
    }

    /// Drops guest pages `[gpa, gpa + len)` (balloon inflation, free page
    /// reporting) and frees their swap slots; they read back as zeroes.
    /// Partial pages at the ends are kept. Runs `madvise` on the calling
    /// thread, which must not be a pager thread. Returns the pages dropped.
    pub fn discard(&self, gpa: GuestAddress, len: u64) -> Result<u64, PagerError> {
        self.probe().discard(gpa, len)
    }

    /// A handle other threads (the stall watchdog, the control API) keep to
    /// read the counters and the blocked faults, and to evict on request.
    pub fn probe(&self) -> PagerProbe {
        PagerProbe {
            shared: self.shared.clone(),
        }
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> PagerStats {
        self.probe().stats()
    }
}

/// A fault some thread has been blocked on (see [`PagerProbe::blocked_faults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedFault {
    pub tid: i32,
    /// Guest-physical address of the page.
    pub gpa: u64,
    pub waited: std::time::Duration,
    /// What it waits for, in words.
    pub waiting_for: &'static str,
}

/// See [`Pager::probe`].
#[derive(Clone)]
pub struct PagerProbe {
    shared: Arc<Shared>,
}

impl PagerProbe {
    /// Drops guest pages `[gpa, gpa + len)` (balloon inflation, free page
    /// reporting) and frees their swap slots; they read back as zeroes.
    /// Partial pages at the ends are kept. Runs `madvise` on the calling
    /// thread, which must not be a pager thread. Returns the pages dropped.
    /// (On the probe so that the balloon's sink, a clone, can call it.)
    pub fn discard(&self, gpa: GuestAddress, len: u64) -> Result<u64, PagerError> {
        let sh = &self.shared;
        let runs = sh
            .pages
            .guest_runs(gpa.0, len)
            .ok_or(PagerError::NotRam { gpa: gpa.0, len })?;
        let mut total = 0;
        for (first, host, n) in runs {
            // Mark every page `Evicting` first, so that a fault in the window
            // before the zap waits instead of filling a page the zap removes.
            let mut ours = Vec::with_capacity(n);
            let mut charged = 0;
            for idx in first..first + n {
                let mut p = sh.pages.lock(idx);
                match p.kind {
                    PageKind::Evicting => {
                        // Being evicted: the evictor frees slot and frame.
                        p.discarded = true;
                        total += 1;
                        continue;
                    }
                    PageKind::Empty => {}
                    PageKind::Resident | PageKind::SwapIn => {
                        charged += 1;
                        total += 1;
                    }
                    PageKind::Swapped => total += 1,
                }
                let slot = if p.writeback { NO_SLOT } else { p.slot };
                p.reset(PageKind::Evicting);
                p.discarded = true;
                p.slot = slot;
                ours.push(idx);
            }
            let dropped = sh.drop_range(host, host + n * PAGE_SIZE);
            for &idx in &ours {
                let mut p = sh.pages.lock(idx);
                if let Some(slot) = p.slot() {
                    sh.swap.free(slot);
                }
                p.reset(PageKind::Empty);
            }
            sh.budget.release(charged, false, true);
            sh.uffd.wake(host, n * PAGE_SIZE)?;
            dropped.map_err(PagerError::Sys)?;
        }
        bump(&sh.counters.discarded_pages, total);
        Ok(total)
    }

    /// Faults handed to the waiting workers and not resolved yet, oldest first.
    pub fn blocked_faults(&self) -> Vec<BlockedFault> {
        let sh = &self.shared;
        sh.fault_waits
            .all()
            .into_iter()
            .map(|w| BlockedFault {
                tid: w.tid,
                gpa: sh.pages.gpa_of_host(w.addr).unwrap_or(0),
                waited: w.since.elapsed(),
                waiting_for: w.stage.describe(),
            })
            .collect()
    }

    /// The swap volume's name.
    pub fn swap_volume(&self) -> String {
        self.shared.swap.volume().name().to_string()
    }

    /// Test aid (control API `debug.evict`): writes the resident pages of
    /// `[gpa, gpa + len)` to swap, past a quiesced volume, and drops them,
    /// so the next touch of each is a swap-in. Returns the pages evicted.
    /// Not for the fault handler's thread (it `madvise`s).
    pub fn evict(&self, gpa: GuestAddress, len: u64) -> Result<u64, PagerError> {
        let sh = &self.shared;
        let runs = sh
            .pages
            .guest_runs(gpa.0, len)
            .ok_or(PagerError::NotRam { gpa: gpa.0, len })?;
        let mut total = 0;
        for (first, _, n) in runs {
            for idx in first..first + n {
                total += u64::from(evict_page(sh, idx)?);
            }
        }
        bump(&sh.counters.evicted_on_request, total);
        Ok(total)
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> PagerStats {
        let sh = &self.shared;
        PagerStats {
            counters: sh.counters.snapshot(),
            resident_pages: sh.budget.charged() as u64,
            peak_resident_pages: sh.budget.peak() as u64,
            clean_pages: sh.pages.clean_pages() as u64,
            limit_pages: sh.budget.limit() as u64,
            reserve_pages: sh.budget.reserve() as u64,
            reserve_low_water_pages: sh.budget.reserve_low_water() as u64,
            swap_slots_used: u64::from(sh.swap.used_slots()),
            swap_slots_total: u64::from(sh.swap.total_slots()),
            fatal_error: sh.fatal_error(),
        }
    }
}

/// Evicts one resident page to swap (see [`PagerProbe::evict`]); whether it did.
fn evict_page(sh: &Shared, idx: usize) -> Result<bool, PagerError> {
    let host = sh.pages.host_of(idx);
    let mut p = sh.pages.lock(idx);
    if p.kind != PageKind::Resident || p.writeback {
        return Ok(false);
    }
    // Write-protected first, so a write during the copy faults (and waits
    // for the wake below) instead of being lost.
    if sh.uffd.protect(host, PAGE_SIZE)? == super::uffd::Resolve::Retry {
        return Ok(false);
    }
    let slot = match p.slot() {
        Some(slot) if p.is_clean() => slot,
        old => {
            if let Some(slot) = old {
                sh.swap.free(slot);
            }
            let home = u32::try_from(idx).unwrap_or(u32::MAX);
            let slot = match sh.swap.alloc_at(home, 1) {
                Some((slot, _)) => slot,
                None => sh.swap.alloc()?,
            };
            let mut data = vec![0u8; PAGE_SIZE];
            if sh.reader.read(host, &mut data).is_err() {
                // Zapped from outside: its REMOVE event will empty it.
                sh.swap.free(slot);
                sh.uffd.unprotect(host, PAGE_SIZE)?;
                return Ok(false);
            }
            if let Err(e) = sh.swap.write_past_quiesce(slot, &data) {
                sh.swap.free(slot);
                return Err(e.into());
            }
            slot
        }
    };
    p.reset(PageKind::Evicting);
    p.slot = slot;
    drop(p);
    let dropped = sh.drop_range(host, host + PAGE_SIZE);
    let mut p = sh.pages.lock(idx);
    if p.discarded {
        sh.swap.free(slot);
        p.reset(PageKind::Empty);
    } else {
        p.reset(PageKind::Swapped);
        p.slot = slot;
    }
    drop(p);
    sh.budget.release(1, true, false);
    sh.uffd.wake(host, PAGE_SIZE)?;
    dropped.map_err(PagerError::Sys)?;
    bump(&sh.counters.pages_out, 1);
    Ok(true)
}

impl Pager {
    /// Pages charged as resident right now.
    pub fn resident_pages(&self) -> usize {
        self.shared.budget.charged()
    }

    /// Readable (counter > 0) once the pager has failed; add it to the VMM's
    /// epoll set and stop the VM when it fires.
    pub fn fatal_eventfd(&self) -> &EventFd {
        &self.shared.fatal_evt
    }

    /// The fatal error, once one happened.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared.fatal_error()
    }

    /// Stops and joins every pager thread, then unregisters guest RAM so any
    /// later access is an ordinary anonymous fault (swapped-out contents are
    /// gone: stop only once vCPUs and devices are done with guest memory).
    /// Returns the final counters.
    pub fn stop(mut self) -> PagerStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let sh = &self.shared;
        sh.stop.store(true, Ordering::SeqCst);
        sh.abort.store(true, Ordering::SeqCst);
        sh.budget.wake_all();
        sh.deferred.wake_all();
        sh.deferred_swap.wake_all();
        sh.wb.wake_all();
        // The reclaim thread may sit in madvise waiting for the handler to
        // read its REMOVE event: join the others before the handler.
        for t in self.workers.drain(..) {
            if t.join().is_err() {
                log::error!("pager: a pager thread panicked");
            }
        }
        if let Err(e) = self.stop_evt.write(1) {
            log::error!("pager: cannot signal the fault handler to stop: {e}");
        }
        if let Some(t) = self.handler.take() {
            if t.join().is_err() {
                log::error!("pager: the fault handler panicked");
            }
        }
        for r in &self.regions {
            sh.uffd.unregister(r.host_addr, r.len);
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        if self.handler.is_some() {
            self.shutdown();
        }
    }
}

/// CPU priority of a pager thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Priority {
    /// Serves faults a vCPU or a device path is blocked on: raised where
    /// the host allows it (CAP_SYS_NICE), so that reclaim and writeback,
    /// busy copying pages, do not preempt a fault half served. It runs
    /// only while some thread waits for it, so it cannot starve them.
    Urgent,
    /// Reclaim and writeback.
    Normal,
}

/// The nice value of [`Priority::Urgent`] threads.
const URGENT_NICE: libc::c_int = -5;

impl Priority {
    /// Sets the calling thread's priority; a failure only costs speed.
    fn apply(self, name: &str) {
        if self == Priority::Urgent {
            // SAFETY: setpriority with PRIO_PROCESS and who 0 changes only
            // the calling thread's nice value (Linux: a per-thread value);
            // no memory is passed.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, URGENT_NICE) } != 0 {
                log::debug!(
                    "{name}: nice {URGENT_NICE}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Spawns a pager thread whose error, panic or early exit is fatal.
///
/// Every pager thread is registered (devices::noio): the fault handler takes
/// a fault of an unregistered thread for the kernel's on a vCPU's behalf
/// (KVM's asynchronous page fault worker) and serves it past a quiesced
/// volume. A pager thread can fault on guest RAM: a thread that waits on the
/// sleeping swap volume runs the volume's waker, the device's remote-wake
/// path, inline. That path is a NOIO scope and is served as NOIO because the
/// thread is registered; with NOIO disabled it waits like any other thread,
/// as the A/B test expects, instead of slipping past the quiesce.
fn spawn(
    shared: &Arc<Shared>,
    name: &'static str,
    priority: Priority,
    body: impl FnOnce(&Shared) -> Result<(), PagerError> + Send + 'static,
) -> Result<JoinHandle<()>, PagerError> {
    let sh = shared.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _registration = devices::noio::register_current_thread();
            priority.apply(name);
            crate::seccomp::apply(crate::seccomp::ThreadKind::Pager);
            let outcome = catch_unwind(AssertUnwindSafe(|| body(&sh)));
            let stopping = sh.stop.load(Ordering::SeqCst);
            match outcome {
                Ok(Ok(())) if stopping => {}
                Ok(Ok(())) => sh.fail(format!("{name} exited unexpectedly")),
                Ok(Err(e)) => sh.fail(format!("{name} failed: {e}")),
                Err(_) => sh.fail(format!("{name} panicked")),
            }
        })
        .map_err(PagerError::Sys)
}

#[cfg(test)]
mod tests {
    use super::OwnRemoves;

    #[test]
    fn own_removes_match_exactly_and_count() {
        let t = OwnRemoves::default();
        t.tag(0x1000, 0x5000);
        t.tag(0x1000, 0x5000);
        assert!(!t.take(0x6000, 0x7000), "not ours");
        assert!(!t.take(0x2000, 0x3000), "inside ours: someone else's");
        assert!(t.take(0x1000, 0x5000));
        assert!(t.take(0x1000, 0x5000));
        assert!(!t.take(0x1000, 0x5000), "all tags consumed");
    }
}
