//! The host side of virtio-balloon: where inflated and reported guest pages
//! go, and what the control API and the exit report say about the balloon.
//!
//! Pages are discarded on the device's event-loop thread (the balloon
//! worker), never on the pager's fault-handler thread: `madvise` on guest
//! RAM registered with userfaultfd blocks until the handler has read the
//! REMOVE event, so the handler itself must never make that call.
//! - With a pager (`--memory ...,limit=`) a discard goes through
//!   [`Pager::discard`]: the pages leave the resident count, their swap
//!   slots are freed, and a later guest touch is a zero page.
//! - Without one, `madvise(MADV_DONTNEED)` on the guest RAM mapping (private
//!   anonymous memory: the pages go back to the host, a touch reads zeroes).

use std::sync::Arc;
use std::time::Duration;

use devices::bus::Bus;
use devices::virtio::balloon::{BalloonHandle, BalloonInfo, BalloonOptions, BalloonSink};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::balloon_policy::{AutoPolicy, PolicyThread};
use crate::config::{BalloonConfig, MemoryConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::memory::{PagerProbe, PAGE_SIZE};

/// How long `balloon.stats` waits for the guest's fresh statistics.
pub const STATS_WAIT: Duration = Duration::from_millis(500);

/// Discards guest pages for the balloon.
pub struct GuestRamSink {
    mem: GuestMemoryMmap,
    pager: Option<PagerProbe>,
    /// What a discard should cover whole: a huge page where guest RAM is
    /// on transparent huge pages (no pager, and the host has them).
    granule: u64,
}

impl GuestRamSink {
    pub fn new(mem: GuestMemoryMmap, pager: Option<&PagerProbe>) -> Self {
        let huge = pager.is_none() && !crate::guest_ram::host_thp_disabled();
        Self {
            mem,
            pager: pager.cloned(),
            granule: if huge {
                crate::guest_ram::HUGE_PAGE_SIZE as u64
            } else {
                PAGE_SIZE as u64
            },
        }
    }

    fn madvise(&self, gpa: u64, len: u64) -> std::io::Result<u64> {
        let host = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(format!("{gpa:#x} is not guest RAM: {e}")))?;
        let len_usize = usize::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: the device hands over whole pages inside one guest RAM
        // region, so [host, host + len) lies inside one mapping of `mem`,
        // which `self.mem` keeps mapped; it is private anonymous memory, for
        // which MADV_DONTNEED only drops the contents (the guest gave them
        // up; a later access reads zeroes). No Rust reference into guest RAM
        // exists (the VMM accesses it through volatile slices only).
        let rc = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(len / PAGE_SIZE as u64)
    }
}

impl BalloonSink for GuestRamSink {
    fn discard(&self, gpa: u64, len: u64) -> std::io::Result<u64> {
        match &self.pager {
            Some(pager) => pager
                .discard(GuestAddress(gpa), len)
                .map_err(std::io::Error::other),
            None => self.madvise(gpa, len),
        }
    }

    fn discard_granule(&self) -> u64 {
        self.granule
    }
}

/// The host's view next to the guest's.
#[derive(Debug, Clone, Serialize)]
pub struct HostMemory {
    /// Guest pages the pager charges as resident (with a pager).
    pub pager_resident_bytes: Option<u64>,
    /// Pages the pager has discarded so far (balloon and reporting).
    pub pager_discarded_pages: Option<u64>,
    /// The VMM process's resident set (`/proc/self/statm`).
    pub process_rss_bytes: Option<u64>,
}

/// Everything `balloon.stats` and `vm.info` report about the balloon.
#[derive(Debug, Clone, Serialize)]
pub struct BalloonReport {
    #[serde(flatten)]
    pub balloon: BalloonInfo,
    pub host: HostMemory,
}

/// The balloon as the control thread sees it.
#[derive(Clone)]
pub struct BalloonControl {
    pub handle: BalloonHandle,
    pager: Option<PagerProbe>,
}

impl BalloonControl {
    pub fn new(handle: BalloonHandle, pager: Option<&PagerProbe>) -> Self {
        Self {
            handle,
            pager: pager.cloned(),
        }
    }

    pub fn report(&self) -> BalloonReport {
        let pager = self.pager.as_ref().map(|p| p.stats());
        BalloonReport {
            balloon: self.handle.info(),
            host: HostMemory {
                pager_resident_bytes: pager.as_ref().map(|s| s.resident_pages * PAGE_SIZE as u64),
                pager_discarded_pages: pager.as_ref().map(|s| s.counters.discarded_pages),
                process_rss_bytes: process_rss(),
            },
        }
    }

    /// The report as one JSON line (printed at exit).
    pub fn report_json(&self) -> String {
        serde_json::to_string(&self.report()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Asks the guest for fresh statistics (bounded wait), then reports.
    pub fn stats(&self) -> BalloonReport {
        self.handle.request_stats(STATS_WAIT);
        self.report()
    }
}

/// Adds the balloon of `--balloon` with a sink on guest RAM (through the
/// pager when there is one).
pub fn add(
    cfg: &BalloonConfig,
    memory: &MemoryConfig,
    devices: &DeviceManager,
    mmio: &Bus,
    mem: &GuestMemoryMmap,
    pager: Option<&PagerProbe>,
) -> Result<(BalloonControl, Option<PolicyThread>), DeviceError> {
    let sink = Arc::new(GuestRamSink::new(mem.clone(), pager));
    let options = BalloonOptions {
        size: cfg.size,
        ram_bytes: memory.size,
        deflate_on_oom: cfg.deflate_on_oom,
        free_page_reporting: cfg.free_page_reporting,
        stats_interval: (cfg.stats_interval_s > 0)
            .then(|| Duration::from_secs(cfg.stats_interval_s)),
    };
    let handle = devices.add_balloon(options, sink, mmio)?;
    let policy = match (cfg.auto, pager) {
        (true, Some(p)) => {
            let max = cfg.auto_max_bytes(memory);
            log::info!(
                "balloon policy: on, between {} and {} MiB",
                cfg.size >> 20,
                max >> 20
            );
            let policy = AutoPolicy::new(cfg.size, max);
            Some(
                PolicyThread::start(policy, handle.clone(), p.clone()).map_err(|source| {
                    DeviceError::Io {
                        what: "balloon policy thread",
                        source,
                    }
                })?,
            )
        }
        _ => None,
    };
    log::info!(
        "balloon: {} MiB, deflate_on_oom={}, free_page_reporting={}, stats every {} s, discards {}",
        cfg.size >> 20,
        cfg.deflate_on_oom,
        cfg.free_page_reporting,
        cfg.stats_interval_s,
        if pager.is_some() {
            "through the pager"
        } else {
            "by madvise"
        }
    );
    Ok((BalloonControl::new(handle, pager), policy))
}

/// Resident set of this process in bytes.
pub fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn madvise_sink_returns_pages_to_the_host_and_they_read_zero() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(&[0xaa; 6 << 20], GuestAddress(0x10_0000))
            .unwrap();
        let sink = GuestRamSink::new(mem.clone(), None);
        let rss_before = process_rss().unwrap();
        assert_eq!(sink.discard(0x10_0000, 4 << 20).unwrap(), 1024);
        let rss_after = process_rss().unwrap();
        assert!(
            rss_before - rss_after >= 3 << 20,
            "RSS {rss_before} -> {rss_after}"
        );
        let mut b = [0xffu8; 16];
        mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(b, [0; 16], "a discarded page reads zeroes");
        mem.read_slice(&mut b, GuestAddress(0x50_0000)).unwrap();
        assert_eq!(b, [0xaa; 16], "outside the range untouched");
        assert!(sink.discard(64 << 20, 4096).is_err(), "not guest RAM");
    }
}
