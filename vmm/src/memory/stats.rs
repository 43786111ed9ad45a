//! Pager counters, readable in-process and serialisable as JSON.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters, bumped with relaxed atomics.
        #[derive(Debug, Default)]
        pub struct Counters {
            $(pub $name: AtomicU64,)*
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
        pub struct CounterSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Missing faults on never-written or discarded pages (served zeroes).
    faults_zero,
    /// Missing faults on swapped-out pages (served from swap).
    faults_swap,
    /// Write faults on write-protected (clean) pages: protection removed, dirty.
    faults_write_protect,
    /// Faults on pages already mapped or already being resolved (just woken).
    faults_spurious,
    /// Faults handed to the waiting worker (not NOIO, needed to wait).
    faults_deferred,
    /// Resolutions retried after `EAGAIN` (address space changing).
    fault_retries,
    /// Pages read from swap.
    pages_in,
    /// Pages written to swap.
    pages_out,
    bytes_read,
    bytes_written,
    /// Clean pages dropped without I/O.
    clean_drops,
    /// `madvise` calls that dropped clean pages (one per contiguous run).
    evict_batches,
    /// `pwritev` calls that wrote pages to swap (one per run of slots).
    swap_writes,
    /// `pread` calls that read pages from swap (one per run of slots).
    swap_reads,
    /// Neighbours of a faulting page mapped with it (swap read-around and
    /// zero fault-around), by the same `UFFDIO_COPY`.
    fault_around_pages,
    /// Write faults on never-written pages served with their whole 2 MiB
    /// block while memory was plentiful (their neighbours count above).
    block_fills,
    /// Block fills that mapped less than their whole block (a page of it
    /// was resident or swapped, or a region edge), so no huge page.
    block_fills_partial,
    /// Whole block fills waiting for room for their block under the limit
    /// (a write stream at the limit) instead of mapping a few pages and
    /// leaving the block in 4 KiB pieces for good.
    block_waits,
    /// Whole-block work (a block fill, a block brought back) the fault
    /// handler handed to a worker rather than doing it inline.
    blocks_handed_over,
    /// Block fills collapsed into a transparent huge page (`MADV_COLLAPSE`).
    blocks_collapsed,
    /// Whole block fills the kernel would not collapse (no free huge page).
    collapses_failed,
    /// Such blocks dropped whole by reclaim (their huge page freed at once).
    huge_blocks_dropped,
    /// Such blocks written back whole: one write-protect over the huge page,
    /// which keeps its mapping whole.
    huge_blocks_staged,
    /// Blocks that went out whole brought back whole by a fault on one of
    /// their pages: one read, one copy, collapsed into a huge page again.
    blocks_swapped_in,
    /// Such blocks, brought back by a read, that stay dirty (their
    /// protection met an address-space change): evicted with a write.
    blocks_back_dirty,
    /// Dirty pages found all zero when staged for writeback: left clean
    /// without a swap slot and dropped without a write.
    zero_pages_dropped,
    /// Faults on pages the clock had evicted ...
    refaults,
    /// ... back within the working-set window: spared longer by the hand.
    refaults_near,
    /// Times the clock's hand went once around guest RAM (a page's second
    /// chances are counted in these).
    hand_revolutions,
    /// Faults while a device's resume or reset path ran or had just run:
    /// their pages spared 32 hand passes ...
    pm_marks,
    /// ... or not, past the budget of marks per revolution.
    pm_marks_refused,
    /// Pages written again during their writeback (stay dirty).
    redirtied_in_writeback,
    /// Pages dropped by `Pager::discard` (balloon, free page reporting).
    discarded_pages,
    /// Pages dropped by REMOVE events not caused by the pager.
    removed_pages,
    /// Faults of threads inside a NOIO scope, and the source that served them.
    noio_faults,
    noio_from_free,
    noio_from_discarded,
    noio_from_clean,
    noio_from_reserve,
    noio_from_overshoot,
    /// NOIO swap-ins read past a quiesced volume.
    noio_reads_past_quiesce,
    /// NOIO faults on a page the waiting worker was swapping in: read
    /// inline, the worker's frame charge moved to them.
    noio_swapin_takeovers,
    /// Faults of vCPUs running guest code (or of the kernel on their behalf:
    /// KVM's async page fault worker) while the swap volume was quiesced:
    /// served like NOIO faults (no wait on the volume or on writeback),
    /// since the guest cannot resume its device while stuck.
    guest_faults_past_quiesce,
    /// Writeback batches given up because a page had been zapped from
    /// outside the pager (copied without faulting, see nofault.rs).
    copies_skipped,
    /// Pages evicted on request (the control API's `debug.evict` test aid).
    evicted_on_request,
    /// Frames taken beyond limit + reserve.
    overshoot_events,
    /// Faults the handler resolved itself: how long the longest took from
    /// its read of the fault to the page mapped (`EAGAIN` retries included),
    /// and how many took over 1 ms and over 10 ms.
    handler_fault_ns_max,
    handler_faults_over_1ms,
    handler_faults_over_10ms,
    /// The pager's own zaps that first waited for the handler's retries.
    zaps_held_for_retries,
    /// Faults that waited for a frame or a quiesced volume, and for how long.
    waits,
    wait_ns_total,
    wait_ns_max,
}

/// Everything the pager reports; the VMM prints it as JSON on exit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PagerStats {
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Frames charged now: mapped pages plus frames being filled.
    pub resident_pages: u64,
    pub peak_resident_pages: u64,
    pub clean_pages: u64,
    pub limit_pages: u64,
    pub reserve_pages: u64,
    /// Fewest reserve pages ever left free.
    pub reserve_low_water_pages: u64,
    pub swap_slots_used: u64,
    pub swap_slots_total: u64,
    /// The fatal error, once one happened.
    pub fatal_error: Option<String>,
}

impl PagerStats {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Records a fault the handler resolved `took` after reading it.
pub fn record_handler_fault(c: &Counters, took: Duration) {
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    c.handler_fault_ns_max.fetch_max(ns, Ordering::Relaxed);
    if took > Duration::from_millis(1) {
        bump(&c.handler_faults_over_1ms, 1);
    }
    if took > Duration::from_millis(10) {
        bump(&c.handler_faults_over_10ms, 1);
    }
}

pub fn record_wait(c: &Counters, ns: u64) {
    bump(&c.waits, 1);
    bump(&c.wait_ns_total, ns);
    c.wait_ns_max.fetch_max(ns, Ordering::Relaxed);
}
