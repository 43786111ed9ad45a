//! The guest memory pager: guest RAM paged by userfaultfd against a resident
//! limit, with a swap store on a volume and NOIO-aware fault resolution
//! (DESIGN.md section 5).
//!
//! Threads:
//! - **fault handler** (`pager-fault`, [`fault`]): the only reader of the
//!   userfaultfd. Resolves faults that need no waiting (zero fill, swap-in
//!   when the volume flows, write-protect removal), serves NOIO faults from
//!   I/O-free sources, records REMOVE events. Never blocks on I/O, on reclaim
//!   or on a quiesced volume, and never touches guest memory itself.
//!   Ordinary missing faults map the page's idle neighbours with it
//!   ([`around`]: fault-around and swap read-around, one ioctl per run).
//! - **waiting worker** (`pager-wait`): resolves ordinary faults that must
//!   wait for a frame or for a quiesced volume.
//! - **reclaim** (`pager-reclaim`, [`reclaim`]): keeps the charge between the
//!   watermarks; drops clean pages (no I/O, one `madvise` per run of
//!   adjacent pages) and queues dirty ones (one write-protect per run).
//! - **writeback** (`pager-writeback`): writes queued pages to swap through
//!   the volume (waiting while it is quiesced; one `pwritev` per run of
//!   consecutive slots) and marks them clean.
//!
//! Hazards written down where they bite:
//! - `madvise(MADV_DONTNEED)` on guest RAM blocks until the handler reads its
//!   REMOVE event, so no page lock is held across it and the handler never
//!   calls it ([`Pager::discard`] runs on the caller's thread).
//! - REMOVE is read before the zap, and `madvise` returns once it is read,
//!   so the handler may process an event after its caller has moved the page
//!   on. The pager's own `madvise` calls (evictions, discards) are tagged by
//!   range and do all their bookkeeping themselves; the handler skips them,
//!   so a self-made REMOVE never drops a swap copy. Pages being dropped are
//!   `Evicting` until after the zap: faults on them wait for the dropper's
//!   wake instead of filling a page the zap would then remove.
//! - Discards should go through [`Pager::discard`]; a REMOVE by anyone else
//!   empties the pages when it is processed (best effort).

mod around;
mod budget;
mod config;
mod fault;
mod nofault;
mod pager;
mod pages;
mod reclaim;
mod stats;
mod swap;
mod uffd;
mod workingset;
mod zap_gate;

pub use config::{PagerConfig, MIN_LIMIT_PAGES};
pub use pager::{BlockedFault, Pager, PagerProbe};
pub use pages::RamRegion;
pub use stats::{CounterSnapshot, PagerStats};
pub use uffd::madvise_hugepage;

use thiserror::Error;

/// The page size the pager works in (x86-64 base pages).
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, Error)]
pub enum PagerError {
    #[error("invalid pager configuration: {0}")]
    Config(String),
    #[error("guest RAM region {host_addr:#x}+{len:#x} is not page-aligned")]
    Unaligned { host_addr: usize, len: usize },
    #[error("guest range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    #[error(transparent)]
    Swap(#[from] swap::SwapError),
    #[error("pager system call failed: {0}")]
    Sys(#[source] std::io::Error),
    #[error("pager failed earlier: {0}")]
    Failed(String),
}
