//! Doorbells off the vCPU threads (xHCI 1.2 section 5.6, Doorbell Registers).
//!
//! The VMM registers one KVM ioeventfd per (doorbell register, DB Target)
//! pair returned by [`doorbell_events`]; a guest doorbell write then only
//! signals an eventfd, and [`DoorbellWorker`] runs the command or transfer
//! ring work on an event-loop thread with the controller locked. Register
//! accesses (USBSTS, ERDP, PORTSC, ...) stay on the vCPU thread under the same
//! lock.
//!
//! Why a datamatch per DB Target rather than one eventfd per doorbell
//! register: the written value names the endpoint (DCI), and a doorbell
//! restarts a *Stopped* endpoint (section 4.6.9). Without the value the
//! worker would have to restart every stopped endpoint of the slot, including
//! one whose cancelled TD waits for the guest's Set TR Dequeue Pointer
//! (Linux stops an endpoint, rewrites its ring, then rings only that
//! endpoint). Writes no ioeventfd matches (a slot beyond the registered ones,
//! a Stream ID in bits 31:16, a reserved target) still reach the register
//! through the MMIO path and run synchronously there.
//!
//! The worker also owns the interrupt moderation timer (a timerfd in the
//! same event loop, see `moderation.rs`): the controller arms it, from
//! whichever thread defers an interrupt, and the worker delivers the
//! deferred interrupt when it fires.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::moderation::{ModerationTimer, SystemClock};
use super::regs::DB_BASE;
use super::XhciPci;

/// Doorbell register stride (section 5.6: one dword per slot).
pub const DOORBELL_STRIDE: u64 = 4;
/// DB Target of the Host Controller Command doorbell (section 5.6, table 5-43).
pub const TARGET_COMMAND: u8 = 0;
/// Device Context Indices a device doorbell can name (section 5.6: 1..=31).
pub const DCI_RANGE: std::ops::RangeInclusive<u8> = 1..=31;

/// One ioeventfd: a write of `target` to the doorbell register of `slot`.
#[derive(Debug, Clone)]
pub struct DoorbellEvent {
    /// 0 = the command doorbell, otherwise a device slot ID.
    pub slot: u8,
    /// DB Target: 0 for the command ring, else the endpoint's DCI.
    pub target: u8,
    pub fd: Arc<EventFd>,
}

impl DoorbellEvent {
    /// Offset of the doorbell register within the xHCI BAR.
    pub fn bar_offset(&self) -> u64 {
        DB_BASE + DOORBELL_STRIDE * u64::from(self.slot)
    }

    /// The 32-bit value the ioeventfd matches (DB Target, Stream ID 0).
    pub fn datamatch(&self) -> u32 {
        u32::from(self.target)
    }
}

/// Eventfds for the command doorbell and every endpoint of slots
/// `1..=device_slots` (slot IDs are handed out lowest first, so with one
/// device per root port the first `ports` slots cover every device).
pub fn doorbell_events(device_slots: u8) -> io::Result<Vec<DoorbellEvent>> {
    let mut v = Vec::with_capacity(1 + usize::from(device_slots) * DCI_RANGE.len());
    let new = |slot, target| -> io::Result<DoorbellEvent> {
        Ok(DoorbellEvent {
            slot,
            target,
            fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    };
    v.push(new(0, TARGET_COMMAND)?);
    for slot in 1..=device_slots {
        for dci in DCI_RANGE {
            v.push(new(slot, dci)?);
        }
    }
    Ok(v)
}

/// Event data of the moderation timer (doorbells use their list index).
const MODERATION_TIMER_DATA: u32 = u32::MAX;

/// The interrupt moderation timer: a non-blocking one-shot timerfd.
struct ModerationTimerFd(Mutex<TimerFd>);

impl ModerationTimerFd {
    fn new() -> io::Result<Self> {
        let fd = TimerFd::new()?;
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, with integer arguments only;
        // the return values are checked.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(Mutex::new(fd)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TimerFd> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Consumes an expiry (without blocking if a re-arm raced with it).
    fn acknowledge(&self) {
        if let Err(e) = self.lock().wait() {
            if e.errno() != libc::EAGAIN {
                log::warn!("xhci: moderation timer: {e}");
            }
        }
    }
}

impl ModerationTimer for ModerationTimerFd {
    fn arm(&self, at: Instant) {
        // A zero duration would disarm the timerfd: at least 1 ns.
        let left = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        if let Err(e) = self.lock().reset(left, None) {
            log::warn!("xhci: cannot arm the moderation timer: {e}");
        }
    }
}

/// Runs doorbells signalled through eventfds against the shared controller,
/// and the controller's interrupt moderation timer.
pub struct DoorbellWorker {
    device: Arc<Mutex<XhciPci>>,
    events: Vec<DoorbellEvent>,
    timer: Arc<ModerationTimerFd>,
}

impl DoorbellWorker {
    /// A worker for `events`; it turns on the controller's interrupt
    /// moderation with its timer.
    pub fn new(device: Arc<Mutex<XhciPci>>, events: Vec<DoorbellEvent>) -> io::Result<Self> {
        let timer = Arc::new(ModerationTimerFd::new()?);
        device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_moderation(timer.clone(), Arc::new(SystemClock));
        Ok(Self {
            device,
            events,
            timer,
        })
    }

    /// The moderation timer fired.
    pub fn moderation_timer(&mut self) {
        // Reset the expiry before looking: an arm after this fires again.
        self.timer.acknowledge();
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_moderation_timer();
    }

    /// Handles the doorbell at `index` of the event list (what `process`
    /// does for a readable eventfd; tests call it directly).
    pub fn ring(&mut self, index: usize) {
        let Some(ev) = self.events.get(index) else {
            return;
        };
        // Reset the counter first: a write that lands after this read
        // signals again, so no doorbell is lost.
        if let Err(e) = ev.fd.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("xhci: doorbell eventfd: {e}");
            }
        }
        let (slot, target) = (ev.slot, ev.target);
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .doorbell(slot, target);
    }
}

impl MutEventSubscriber for DoorbellWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, ev) in self.events.iter().enumerate() {
            // i < 1 + 255 * 31 fits in u32.
            if let Err(e) = ops.add(Events::with_data(ev.fd.as_ref(), i as u32, EventSet::IN)) {
                log::error!("xhci: cannot watch doorbell {}/{}: {e}", ev.slot, ev.target);
            }
        }
        let timer = self.timer.lock();
        let ev = Events::with_data(&*timer, MODERATION_TIMER_DATA, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("xhci: cannot watch the interrupt moderation timer: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            return;
        }
        match events.data() {
            MODERATION_TIMER_DATA => self.moderation_timer(),
            i => self.ring(i as usize),
        }
    }
}
