//! virtio-balloon (§5.5): inflate and deflate queues, statistics
//! (VIRTIO_BALLOON_F_STATS_VQ), deflate-on-OOM
//! (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and free page reporting
//! (VIRTIO_BALLOON_F_REPORTING).
//!
//! `device.rs` is the [`crate::virtio::VirtioDevice`] (features, the
//! configuration space, the shared state the VMM drives through
//! [`BalloonHandle`]); `worker.rs` runs the queues on the event loop;
//! `ranges.rs` turns untrusted PFN lists and reported ranges into runs of
//! guest RAM; `held.rs` holds inflated pages until their huge page's block
//! is whole; `stats.rs` parses the guest's statistics buffer.
//!
//! Host memory is given back through a [`BalloonSink`], which the VMM
//! implements (the pager's discard, or `madvise` on guest RAM). It runs on
//! the event-loop thread, before the buffer is returned to the guest: the
//! guest may reuse reported pages as soon as it has them back
//! (`../shared/reference/virtio-balloon.md`).

mod device;
mod held;
mod ranges;
mod stats;
mod worker;

pub use device::{
    Balloon, BalloonCounters, BalloonError, BalloonHandle, BalloonInfo, BalloonOptions,
};
pub use ranges::{pfn_runs, ram_runs, Runs};
pub use stats::{parse_stats, GuestStats};
pub use worker::BalloonWorker;

// Feature bits (§5.5.3).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
pub const VIRTIO_BALLOON_F_PAGE_POISON: u64 = 1 << 4;
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;

/// PFNs in the inflate and deflate queues are in 4 KiB units (§5.5.6).
pub const BALLOON_PAGE_SHIFT: u32 = 12;
pub const BALLOON_PAGE_SIZE: u64 = 1 << BALLOON_PAGE_SHIFT;

// Statistics tags (§5.5.6.3; Linux adds the hugetlb pair).
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;
/// One statistic: packed `{le16 tag; le64 val}` (§5.5.6.3).
pub const STAT_ENTRY_LEN: usize = 10;

/// Queue size offered for every queue (Linux wants >= 32 for reporting).
pub const QUEUE_SIZE: u16 = 128;
/// Descriptors looked at per chain; more are skipped and counted. Linux
/// sends one for inflate, deflate and statistics, at most 32 for reporting.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// PFNs taken from one inflate or deflate chain (Linux sends at most 256);
/// more are ignored and counted.
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Longest reported range (Linux reports 2 MiB and 4 MiB blocks); longer
/// descriptors are skipped and counted.
pub const MAX_REPORT_LEN: u64 = 64 << 20;
/// Statistics entries read from one buffer (Linux sends 10).
pub const MAX_STAT_ENTRIES: usize = 64;

/// Where the balloon hands host memory back. Implemented by the VMM.
pub trait BalloonSink: Send + Sync {
    /// Drops the host memory behind guest RAM `[gpa, gpa + len)`: whole
    /// 4 KiB pages inside one RAM region (the device has checked). Later
    /// guest reads of those pages see zeroes. Returns how many pages were
    /// discarded.
    fn discard(&self, gpa: u64, len: u64) -> std::io::Result<u64>;

    /// The host page size behind guest RAM, when it is larger than a page
    /// and a discard should cover it whole (2 MiB for guest RAM on
    /// transparent huge pages): inflated pages are then held until their
    /// aligned block is whole, or the inflate pauses (`held.rs`). The
    /// default, one page, discards every inflated page at once.
    fn discard_granule(&self) -> u64 {
        BALLOON_PAGE_SIZE
    }

    /// The guest takes `[gpa, gpa + len)` back (deflate). Nothing has to
    /// happen for a discarded page to come back (a touch faults in a zero
    /// page); the default does nothing.
    fn reclaim(&self, _gpa: u64, _len: u64) {}
}

#[cfg(test)]
mod tests;
