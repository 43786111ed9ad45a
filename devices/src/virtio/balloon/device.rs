//! The virtio-balloon device: features, configuration space (§5.5.4) and
//! the state the VMM reads and drives through [`BalloonHandle`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::Role;
use super::*;
use crate::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, Worker, VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
};

// Configuration space, struct virtio_balloon_config (§5.5.4), little-endian.
const CFG_NUM_PAGES: usize = 0;
const CFG_ACTUAL: usize = 4;
/// num_pages, actual, free_page_hint_cmd_id, poison_val.
pub const CONFIG_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error("balloon size {size} bytes is larger than guest RAM ({ram} bytes)")]
    TooLarge { size: u64, ram: u64 },
    #[error("cannot create the statistics request eventfd: {0}")]
    EventFd(String),
}

/// Options of the balloon device.
#[derive(Debug, Clone, Default)]
pub struct BalloonOptions {
    /// Initial balloon size in bytes (memory held back from the guest).
    pub size: u64,
    /// Guest RAM in bytes (the balloon cannot be larger).
    pub ram_bytes: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
    /// Ask the guest for fresh statistics this often; `None`: only when
    /// [`BalloonHandle::request_stats`] asks.
    pub stats_interval: Option<Duration>,
}

/// Host-side counters (pages are 4 KiB).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    pub oom_deflated_pages: AtomicU64,
    pub reported_pages: AtomicU64,
    pub reported_ranges: AtomicU64,
    pub discarded_pages: AtomicU64,
    pub discard_errors: AtomicU64,
    pub whole_blocks_discarded: AtomicU64,
    pub bad_pfns: AtomicU64,
    pub ignored_pfns: AtomicU64,
    pub bad_descriptors: AtomicU64,
    pub stats_updates: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct BalloonCounters {
    /// Valid pages the guest put in the balloon (inflate queue).
    pub inflated_pages: u64,
    /// Valid pages the guest took back (deflate queue).
    pub deflated_pages: u64,
    /// Of those, pages deflated while the balloon was not above its
    /// target: the guest's own deflate-on-OOM.
    pub oom_deflated_pages: u64,
    /// Valid pages the guest reported free (reporting queue).
    pub reported_pages: u64,
    /// Reported ranges (descriptors).
    pub reported_ranges: u64,
    /// Pages the host discarded for inflate and reporting, as the sink
    /// counted them.
    pub discarded_pages: u64,
    /// Discards the sink refused (logged).
    pub discard_errors: u64,
    /// Inflated huge-page blocks given back whole, in one discard (with a
    /// discard granule larger than a page).
    pub whole_blocks_discarded: u64,
    /// PFNs and reported pages outside guest RAM (ignored).
    pub bad_pfns: u64,
    /// PFNs past the per-buffer cap (ignored).
    pub ignored_pfns: u64,
    /// Descriptors skipped: wrong direction, outside memory, too long.
    pub bad_descriptors: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

impl Counters {
    fn snapshot(&self) -> BalloonCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BalloonCounters {
            inflated_pages: g(&self.inflated_pages),
            deflated_pages: g(&self.deflated_pages),
            oom_deflated_pages: g(&self.oom_deflated_pages),
            reported_pages: g(&self.reported_pages),
            reported_ranges: g(&self.reported_ranges),
            discarded_pages: g(&self.discarded_pages),
            discard_errors: g(&self.discard_errors),
            whole_blocks_discarded: g(&self.whole_blocks_discarded),
            bad_pfns: g(&self.bad_pfns),
            ignored_pfns: g(&self.ignored_pfns),
            bad_descriptors: g(&self.bad_descriptors),
            stats_updates: g(&self.stats_updates),
        }
    }
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct StatsState {
    latest: Option<GuestStats>,
    at: Option<Instant>,
    seq: u64,
}

/// State shared by the device, its worker and the VMM's handle.
pub(super) struct Shared {
    /// num_pages: the balloon's target size in pages.
    target: AtomicU32,
    /// actual: the guest's balloon size in pages, as it last wrote it.
    actual: AtomicU32,
    ram_bytes: u64,
    acked: AtomicU64,
    active: AtomicBool,
    interrupt: Mutex<Option<VirtioInterrupt>>,
    stats: Mutex<StatsState>,
    stats_cv: Condvar,
    /// Written to ask the worker for fresh statistics.
    pub stats_request: EventFd,
    pub counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn target(&self) -> u32 {
        self.target.load(Ordering::Acquire)
    }

    pub fn actual(&self) -> u32 {
        self.actual.load(Ordering::Acquire)
    }

    /// Records a statistics buffer and wakes whoever waits for one.
    pub fn store_stats(&self, stats: GuestStats) {
        let mut s = lock(&self.stats);
        s.latest = Some(stats);
        s.at = Some(Instant::now());
        s.seq += 1;
        bump(&self.counters.stats_updates, 1);
        self.stats_cv.notify_all();
    }
}

/// What the VMM reports about the balloon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalloonInfo {
    /// The target: memory the balloon should hold back from the guest.
    pub size_bytes: u64,
    /// What the guest says the balloon holds now.
    pub actual_bytes: u64,
    /// The driver is running (DRIVER_OK, not reset).
    pub active: bool,
    /// Negotiated features.
    pub stats_vq: bool,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
    /// The guest's last statistics and their age.
    pub guest_stats: Option<GuestStats>,
    pub stats_age_ms: Option<u64>,
    pub counters: BalloonCounters,
}

/// The VMM's side of the balloon: set its size, read its state. Cheap to
/// clone; usable from any thread.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Sets the balloon's target size (rounded down to 4 KiB pages) and
    /// tells a running driver (configuration change interrupt). Returns the
    /// target in bytes.
    pub fn set_size(&self, bytes: u64) -> Result<u64, BalloonError> {
        let sh = &self.shared;
        if bytes > sh.ram_bytes {
            return Err(BalloonError::TooLarge {
                size: bytes,
                ram: sh.ram_bytes,
            });
        }
        // ram_bytes <= 16 TiB, so the page count fits in u32.
        let pages = (bytes / BALLOON_PAGE_SIZE).min(u64::from(u32::MAX)) as u32;
        sh.target.store(pages, Ordering::Release);
        if let Some(irq) = lock(&sh.interrupt).as_ref() {
            irq.signal_config();
        }
        Ok(u64::from(pages) * BALLOON_PAGE_SIZE)
    }

    pub fn info(&self) -> BalloonInfo {
        let sh = &self.shared;
        let acked = sh.acked.load(Ordering::Acquire);
        let (guest_stats, stats_age_ms) = {
            let s = lock(&sh.stats);
            (
                s.latest.clone(),
                s.at.map(|t| t.elapsed().as_millis() as u64),
            )
        };
        BalloonInfo {
            size_bytes: u64::from(sh.target()) * BALLOON_PAGE_SIZE,
            actual_bytes: u64::from(sh.actual()) * BALLOON_PAGE_SIZE,
            active: sh.active.load(Ordering::Acquire),
            stats_vq: acked & VIRTIO_BALLOON_F_STATS_VQ != 0,
            deflate_on_oom: acked & VIRTIO_BALLOON_F_DEFLATE_ON_OOM != 0,
            free_page_reporting: acked & VIRTIO_BALLOON_F_REPORTING != 0,
            guest_stats,
            stats_age_ms,
            counters: sh.counters.snapshot(),
        }
    }

    /// Asks the guest for fresh statistics and waits at most `timeout` for
    /// them (a guest cannot stall the caller longer); returns whether new
    /// ones arrived. Without a running stats queue it returns at once.
    pub fn request_stats(&self, timeout: Duration) -> bool {
        let sh = &self.shared;
        let acked = sh.acked.load(Ordering::Acquire);
        if !sh.active.load(Ordering::Acquire) || acked & VIRTIO_BALLOON_F_STATS_VQ == 0 {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut s = lock(&sh.stats);
        let seq = s.seq;
        if let Err(e) = sh.stats_request.write(1) {
            log::warn!("virtio-balloon: cannot request statistics: {e}");
            return false;
        }
        while s.seq == seq {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = sh
                .stats_cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// virtio-balloon. See the module documentation.
pub struct Balloon {
    shared: Arc<Shared>,
    sink: Arc<dyn BalloonSink>,
    options: BalloonOptions,
    features: u64,
}

impl Balloon {
    pub fn new(options: BalloonOptions, sink: Arc<dyn BalloonSink>) -> Result<Self, BalloonError> {
        if options.size > options.ram_bytes {
            return Err(BalloonError::TooLarge {
                size: options.size,
                ram: options.ram_bytes,
            });
        }
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ;
        if options.deflate_on_oom {
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if options.free_page_reporting {
            features |= VIRTIO_BALLOON_F_REPORTING;
        }
        let stats_request =
            EventFd::new(EFD_NONBLOCK).map_err(|e| BalloonError::EventFd(e.to_string()))?;
        let shared = Arc::new(Shared {
            target: AtomicU32::new((options.size / BALLOON_PAGE_SIZE) as u32),
            actual: AtomicU32::new(0),
            ram_bytes: options.ram_bytes,
            acked: AtomicU64::new(0),
            active: AtomicBool::new(false),
            interrupt: Mutex::new(None),
            stats: Mutex::new(StatsState::default()),
            stats_cv: Condvar::new(),
            stats_request,
            counters: Counters::default(),
        });
        Ok(Self {
            shared,
            sink,
            options,
            features,
        })
    }

    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[CFG_NUM_PAGES..CFG_NUM_PAGES + 4].copy_from_slice(&self.shared.target().to_le_bytes());
        c[CFG_ACTUAL..CFG_ACTUAL + 4].copy_from_slice(&self.shared.actual().to_le_bytes());
        c
    }

    /// Queue roles from the negotiated features: inflate 0, deflate 1, then
    /// statistics and reporting packed in that order (Linux numbers its
    /// queues this way; fixed spec numbers break reporting).
    fn roles(acked: u64) -> Vec<Role> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked & VIRTIO_BALLOON_F_STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if acked & VIRTIO_BALLOON_F_REPORTING != 0 {
            roles.push(Role::Reporting);
        }
        roles
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; Self::roles(self.features).len()]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's (poison_val needs PAGE_POISON, not
        // offered). Byte writes merge into it.
        let mut c = self.config_bytes();
        let Some(start) = usize::try_from(offset).ok() else {
            return;
        };
        for (i, &b) in data.iter().enumerate() {
            match start.checked_add(i) {
                Some(o) if (CFG_ACTUAL..CFG_ACTUAL + 4).contains(&o) => c[o] = b,
                _ => log::debug!("virtio-balloon: ignored config write at {offset:#x}"),
            }
        }
        let mut a = [0u8; 4];
        a.copy_from_slice(&c[CFG_ACTUAL..CFG_ACTUAL + 4]);
        self.shared
            .actual
            .store(u32::from_le_bytes(a), Ordering::Release);
    }

    fn activate(&mut self, a: Activation) -> Result<Worker, ActivateError> {
        let roles = Self::roles(a.acked_features);
        let mut queues = Vec::new();
        for q in a.queues {
            match roles.get(usize::from(q.index)) {
                Some(&role) => queues.push((role, q)),
                None => log::warn!("virtio-balloon: queue {} has no role; ignored", q.index),
            }
        }
        for needed in [Role::Inflate, Role::Deflate] {
            if !queues.iter().any(|(r, _)| *r == needed) {
                return Err(ActivateError::BadQueue(
                    needed as u16,
                    format!("the {needed:?} queue is not enabled"),
                ));
            }
        }
        let interval = self
            .options
            .stats_interval
            .filter(|_| a.acked_features & VIRTIO_BALLOON_F_STATS_VQ != 0);
        let worker = BalloonWorker::new(
            self.shared.clone(),
            self.sink.clone(),
            a.mem,
            a.interrupt.clone(),
            queues,
            interval,
        )
        .map_err(ActivateError::EventFd)?;
        let sh = &self.shared;
        sh.acked.store(a.acked_features, Ordering::Release);
        *lock(&sh.interrupt) = Some(a.interrupt);
        sh.active.store(true, Ordering::Release);
        log::info!(
            "virtio-balloon: active, target {} pages, features {:#x}",
            sh.target(),
            a.acked_features
        );
        Ok(Box::new(worker))
    }

    fn reset(&mut self) {
        // The transport has stopped the worker: no discard is in flight and
        // no buffer from before the reset will be looked at again; the held
        // statistics buffer went with the worker. The target stays.
        let sh = &self.shared;
        sh.active.store(false, Ordering::Release);
        *lock(&sh.interrupt) = None;
        sh.acked.store(0, Ordering::Release);
        sh.actual.store(0, Ordering::Release);
        log::debug!("virtio-balloon: reset");
    }
}

#[cfg(test)]
impl Balloon {
    pub(super) fn shared_for_tests(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub(super) fn sink_for_tests(&self) -> Arc<dyn BalloonSink> {
        self.sink.clone()
    }
}
