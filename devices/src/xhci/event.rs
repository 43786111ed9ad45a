//! Interrupter 0 and its event ring (xHCI 1.2 sections 4.9.4, 4.17, 5.5.2).
//!
//! The controller is the producer; the guest consumes and reports progress
//! through ERDP. Events that find the ring full wait in a bounded host-side
//! queue until the guest frees space. Interrupt rules: a new event asserts
//! IMAN.IP (and EHB) only while EHB is clear; an ERDP write that clears EHB
//! while events are still pending asserts it again. With moderation on
//! ([`Moderation`]) an assertion due before IMODC has run out waits for the
//! moderation timer instead.

use std::collections::VecDeque;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::moderation::{Clock, Moderation, IMODC_SHIFT, IMODI_MASK, IMODI_RESET};
use super::regs::rt;
use super::trb::{ErstEntry, Trb, CYCLE};

/// Segments we accept (2^ERST Max with ERST Max = 0).
pub const MAX_SEGMENTS: usize = 1;
/// Segment size limits (section 6.5: 16 to 4096 TRBs).
const MIN_SEGMENT_TRBS: u32 = 16;
const MAX_SEGMENT_TRBS: u32 = 4096;
/// Events kept while the guest's ring is full; beyond this they are dropped.
pub const OVERFLOW_LIMIT: usize = 1024;

/// The result of posting an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Written; `true` if the interrupt must be raised.
    Written(bool),
    /// The ring is full; the event waits in the overflow queue.
    Queued,
    /// The event ring is not set up (or its memory is gone).
    NoRing,
}

/// The event ring's producer state that no register shows: what USBCMD.CSS
/// saves and CRS restores (section 4.23.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRingState {
    segments: Vec<(u64, u32)>,
    seg: usize,
    index: u32,
    cycle: bool,
    overflow: VecDeque<Trb>,
}

#[derive(Debug, Default, Clone)]
pub struct Interrupter {
    pub iman: u32,
    /// IMODI (bits 15:0); IMODC lives in `moderation`.
    pub imod: u32,
    pub moderation: Moderation,
    pub erstsz: u32,
    pub erstba: u64,
    /// ERDP as the guest wrote it (pointer, DESI) with our EHB bit.
    pub erdp: u64,
    segments: Vec<ErstEntry>,
    seg: usize,
    index: u32,
    cycle: bool,
    overflow: VecDeque<Trb>,
    pub dropped: u64,
}

impl Interrupter {
    pub fn new() -> Self {
        Self {
            imod: IMODI_RESET,
            ..Default::default()
        }
    }

    pub fn configured(&self) -> bool {
        !self.segments.is_empty()
    }

    /// Whether the interrupt is asserted towards the PCI layer (IP and IE).
    pub fn asserted(&self) -> bool {
        self.iman & rt::IMAN_IP != 0 && self.iman & rt::IMAN_IE != 0
    }

    fn enqueue_addr(&self) -> Option<u64> {
        let s = self.segments.get(self.seg)?;
        Some(s.base + u64::from(self.index) * 16)
    }

    /// Address after the current enqueue position.
    fn next_position(&self) -> (usize, u32, bool) {
        let mut seg = self.seg;
        let mut index = self.index + 1;
        let mut cycle = self.cycle;
        if index >= self.segments[seg].size {
            index = 0;
            seg += 1;
            if seg >= self.segments.len() {
                seg = 0;
                cycle = !cycle;
            }
        }
        (seg, index, cycle)
    }

    fn dequeue_ptr(&self) -> u64 {
        self.erdp & rt::ERDP_PTR_MASK
    }

    /// True when events sit between ERDP and the enqueue pointer.
    pub fn pending(&self) -> bool {
        self.enqueue_addr()
            .is_some_and(|enq| enq != self.dequeue_ptr())
            || !self.overflow.is_empty()
    }

    /// Guest ranges of the segment table and the segments.
    pub fn guest_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(self.erstba, 16 * u64::from(self.erstsz.max(1)))];
        v.extend(
            self.segments
                .iter()
                .map(|s| (s.base, 16 * u64::from(s.size))),
        );
        v
    }

    fn segment_list(&self) -> Vec<(u64, u32)> {
        self.segments.iter().map(|s| (s.base, s.size)).collect()
    }

    /// The producer state for Save State, `None` without a configured ring.
    pub fn save(&self) -> Option<EventRingState> {
        self.configured().then(|| EventRingState {
            segments: self.segment_list(),
            seg: self.seg,
            index: self.index,
            cycle: self.cycle,
            overflow: self.overflow.clone(),
        })
    }

    /// Restore State: puts the enqueue position (and events still waiting
    /// for room) back where Save State found them, undoing the reset that
    /// the guest's ERSTBA write-back made. False, changing nothing, when the
    /// guest's segment table is not the one saved: then nothing valid can
    /// be restored.
    pub fn restore(&mut self, saved: &EventRingState) -> bool {
        if self.segment_list() != saved.segments {
            return false;
        }
        self.seg = saved.seg;
        self.index = saved.index;
        self.cycle = saved.cycle;
        self.overflow = saved.overflow.clone();
        true
    }

    /// Reads the segment table after an ERSTBA write (section 4.9.4).
    pub fn load_erst(&mut self, mem: &GuestMemoryMmap) {
        self.segments.clear();
        self.overflow.clear();
        let n = (self.erstsz & rt::ERSTSZ_MASK) as usize;
        let base = self.erstba & rt::ERSTBA_MASK;
        for i in 0..n.min(MAX_SEGMENTS) {
            let Ok(e) = mem.read_obj::<ErstEntry>(GuestAddress(base + 16 * i as u64)) else {
                log::warn!("xhci: ERST at {base:#x} is outside guest memory");
                self.segments.clear();
                return;
            };
            let seg_base = e.base & !0x3f;
            let size = e.size & 0xffff;
            let len = u64::from(size) * 16;
            let valid = (MIN_SEGMENT_TRBS..=MAX_SEGMENT_TRBS).contains(&size)
                && mem.check_range(GuestAddress(seg_base), len as usize);
            if !valid {
                log::warn!("xhci: invalid event ring segment {seg_base:#x} x {size}");
                self.segments.clear();
                return;
            }
            self.segments.push(ErstEntry {
                base: seg_base,
                size,
                reserved: 0,
            });
        }
        self.seg = 0;
        self.index = 0;
        self.cycle = true;
    }

    fn write(&mut self, mem: &GuestMemoryMmap, mut trb: Trb) -> Posted {
        let Some(addr) = self.enqueue_addr() else {
            return Posted::NoRing;
        };
        let (seg, index, cycle) = self.next_position();
        let next = self.segments[seg].base + u64::from(index) * 16;
        if next == self.dequeue_ptr() {
            // One slot stays free so that full and empty differ (section 4.9.4).
            return Posted::Queued;
        }
        trb.control = (trb.control & !CYCLE) | u32::from(self.cycle);
        // Parameter and status first, then the dword holding the cycle bit.
        let head = GuestAddress(addr);
        let ok = mem.write_obj(trb.parameter, head).is_ok()
            && mem.write_obj(trb.status, GuestAddress(addr + 8)).is_ok()
            && mem.write_obj(trb.control, GuestAddress(addr + 12)).is_ok();
        if !ok {
            return Posted::NoRing;
        }
        self.seg = seg;
        self.index = index;
        self.cycle = cycle;
        Posted::Written(true)
    }

    /// Posts `trb`; `Written(true)` means the interrupt must be signalled
    /// now. `raise` is false for events of TRBs with BEI (Block Event
    /// Interrupt). `clock` is set when moderation is on.
    pub fn post(
        &mut self,
        mem: &GuestMemoryMmap,
        trb: Trb,
        raise: bool,
        clock: Option<&dyn Clock>,
    ) -> Posted {
        if !self.overflow.is_empty() {
            return self.queue(trb);
        }
        match self.write(mem, trb) {
            Posted::Written(_) => Posted::Written(raise && self.assert_if_idle(clock)),
            Posted::Queued => self.queue(trb),
            Posted::NoRing => Posted::NoRing,
        }
    }

    fn queue(&mut self, trb: Trb) -> Posted {
        if self.overflow.len() >= OVERFLOW_LIMIT {
            self.dropped += 1;
            log::warn!("xhci: event ring full, dropping an event");
        } else {
            self.overflow.push_back(trb);
        }
        Posted::Queued
    }

    /// Sets IP and EHB unless the guest is still handling the last interrupt
    /// or (with `clock`) IMODC has not run out, in which case the deferred
    /// interrupt's deadline is recorded. Returns true if an interrupt should
    /// be delivered.
    fn assert_if_idle(&mut self, clock: Option<&dyn Clock>) -> bool {
        if self.erdp & rt::ERDP_EHB != 0 {
            return false;
        }
        if let Some(clock) = clock {
            let now = clock.now();
            if !self.moderation.may_assert(now) {
                return false;
            }
            self.moderation.asserted(now, self.imod & IMODI_MASK);
        }
        self.erdp |= rt::ERDP_EHB;
        self.iman |= rt::IMAN_IP;
        self.iman & rt::IMAN_IE != 0
    }

    /// An ERDP write (section 5.5.2.3.3). Returns true if the interrupt must
    /// be signalled again because events are still pending.
    pub fn write_erdp(
        &mut self,
        mem: &GuestMemoryMmap,
        value: u64,
        clock: Option<&dyn Clock>,
    ) -> bool {
        let ehb = if value & rt::ERDP_EHB != 0 {
            0 // RW1C
        } else {
            self.erdp & rt::ERDP_EHB
        };
        self.erdp = (value & (rt::ERDP_PTR_MASK | rt::ERDP_DESI_MASK)) | ehb;
        // Space may have opened up: move queued events in.
        while let Some(&trb) = self.overflow.front() {
            match self.write(mem, trb) {
                Posted::Written(_) => {
                    self.overflow.pop_front();
                }
                _ => break,
            }
        }
        self.pending() && self.assert_if_idle(clock)
    }

    /// The moderation timer fired at `clock`'s now: asserts a deferred
    /// interrupt if it is due and events are still pending. Returns true if
    /// an interrupt should be delivered.
    pub fn moderation_expired(&mut self, clock: &dyn Clock) -> bool {
        self.moderation.take_expired(clock.now())
            && self.pending()
            && self.assert_if_idle(Some(clock))
    }

    /// IMOD as the guest reads it at `now`.
    pub fn read_imod(&self, now: Option<Instant>) -> u32 {
        let counter = now.map_or(0, |n| self.moderation.counter(n));
        (self.imod & IMODI_MASK) | (counter << IMODC_SHIFT)
    }

    /// An IMOD write: IMODI is stored, IMODC (with moderation on) reloads
    /// the counter.
    pub fn write_imod(&mut self, value: u32, now: Option<Instant>) {
        self.imod = value & IMODI_MASK;
        if let Some(now) = now {
            self.moderation.write_counter(now, value >> IMODC_SHIFT);
        }
    }

    /// IMAN write: IP is RW1C, IE is RW.
    pub fn write_iman(&mut self, value: u32) -> bool {
        let ip = if value & rt::IMAN_IP != 0 {
            0
        } else {
            self.iman & rt::IMAN_IP
        };
        let newly_enabled = value & rt::IMAN_IE != 0 && self.iman & rt::IMAN_IE == 0;
        self.iman = ip | (value & rt::IMAN_IE);
        // Enabling with an interrupt already pending delivers it.
        newly_enabled && ip != 0
    }
}
