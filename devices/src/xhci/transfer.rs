//! Transfer rings (xHCI 1.2 section 4.10): a doorbell gathers whole TDs from
//! an endpoint's ring, hands each to the device as one scatter list over
//! guest memory, and reports Transfer Events by the IOC/ISP rules.
//!
//! A TD becomes visible only when all its TRBs are (the guest writes the
//! first TRB's cycle bit last), so an incomplete TD waits for the next
//! doorbell without being consumed.

use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

use super::controller::Xhci;
use super::ring::RingCursor;
use super::slot::{endpoint_address, EpState};
use super::trb::{trb_type, CompletionCode, Trb, BEI, DIR_IN, IDT, IOC, ISP};
use super::RingError;
use crate::usb::{
    BufferError, Direction, SetupPacket, TransferBuffer, TransferResult, TransferStatus,
};

/// TDs run per doorbell on one endpoint.
pub const TDS_PER_DOORBELL: usize = 64;
/// TRB reads (links included) allowed while gathering one TD.
pub const TD_TRB_BUDGET: u32 = 4096;
/// Passes over NAK'd endpoints of a slot after a doorbell made progress.
const NAK_RETRY_PASSES: usize = 4;

/// One TRB of a gathered TD.
#[derive(Debug, Clone, Copy)]
struct TdTrb {
    addr: u64,
    trb: Trb,
}

/// A piece of a scatter list.
#[derive(Debug, Clone, Copy)]
enum Segment {
    Guest {
        addr: u64,
        len: usize,
    },
    /// Immediate data (IDT) carried in the TRB itself, OUT only.
    Immediate {
        data: [u8; 8],
        len: usize,
    },
}

impl Segment {
    fn len(&self) -> usize {
        match self {
            Segment::Guest { len, .. } | Segment::Immediate { len, .. } => *len,
        }
    }
}

/// The data buffers of one TD over guest memory.
struct GuestSg<'a> {
    mem: &'a GuestMemoryMmap,
    segments: Vec<Segment>,
    len: usize,
}

impl<'a> GuestSg<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            segments: Vec::new(),
            len: 0,
        }
    }

    fn push(&mut self, s: Segment) {
        self.len += s.len();
        self.segments.push(s);
    }

    /// Calls `f(segment, offset in segment, range in the caller's buffer)`
    /// for each piece of `[offset, offset + len)`.
    fn walk(
        &mut self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(&GuestMemoryMmap, &mut Segment, usize, std::ops::Range<usize>) -> bool,
    ) -> Result<(), BufferError> {
        let err = BufferError { offset, len };
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or(err)?;
        let mut seg_start = 0usize;
        let mut pos = offset;
        for seg in &mut self.segments {
            let seg_end = seg_start + seg.len();
            if pos < seg_end && pos < end {
                let n = (seg_end - pos).min(end - pos);
                let within = pos - seg_start;
                let range = (pos - offset)..(pos - offset + n);
                if !f(self.mem, seg, within, range) {
                    return Err(err);
                }
                pos += n;
            }
            seg_start = seg_end;
            if pos == end {
                break;
            }
        }
        Ok(())
    }
}

impl TransferBuffer for GuestSg<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn read_at(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), BufferError> {
        self.walk(offset, dst.len(), |mem, seg, within, range| match seg {
            Segment::Guest { addr, .. } => mem
                .read_slice(&mut dst[range], GuestAddress(*addr + within as u64))
                .is_ok(),
            Segment::Immediate { data, .. } => {
                let n = range.len();
                dst[range].copy_from_slice(&data[within..within + n]);
                true
            }
        })
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), BufferError> {
        self.walk(offset, src.len(), |mem, seg, within, range| match seg {
            Segment::Guest { addr, .. } => mem
                .write_slice(&src[range], GuestAddress(*addr + within as u64))
                .is_ok(),
            Segment::Immediate { .. } => false,
        })
    }

    fn guest_slices(&self, offset: usize, len: usize) -> Option<Vec<VolatileSlice<'_>>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len)?;
        let mut out = Vec::with_capacity(self.segments.len());
        let mut seg_start = 0usize;
        for seg in &self.segments {
            let seg_end = seg_start + seg.len();
            let (from, to) = (offset.max(seg_start), end.min(seg_end));
            if from < to {
                let Segment::Guest { addr, .. } = seg else {
                    return None;
                };
                let start = addr.checked_add((from - seg_start) as u64)?;
                // get_slices splits at region boundaries and bounds-checks.
                for s in self.mem.get_slices(GuestAddress(start), to - from) {
                    out.push(s.ok()?);
                }
            }
            seg_start = seg_end;
            if seg_start >= end {
                break;
            }
        }
        Some(out)
    }
}

/// How a TD ended.
enum Outcome {
    /// Completed (successfully or short): advance past it.
    Done,
    /// The device NAKed: keep it at the dequeue pointer.
    Nak,
    /// Error reported; the endpoint halts with the TD at the dequeue pointer.
    Halt,
}

/// Gathers the TD at `cursor`: TRBs up to one without CHAIN (bulk) or up to
/// the Status Stage (control). `Ok(None)` when it is not all there yet.
fn gather_td(
    mem: &GuestMemoryMmap,
    cursor: &mut RingCursor,
    control: bool,
) -> Result<Option<Vec<TdTrb>>, RingError> {
    let mut budget = TD_TRB_BUDGET;
    let mut td = Vec::new();
    loop {
        let Some((addr, trb)) = cursor.next(mem, &mut budget)? else {
            return Ok(None);
        };
        td.push(TdTrb { addr, trb });
        let t = trb.trb_type();
        let last = if control {
            t == trb_type::STATUS_STAGE || (td.len() == 1 && t == trb_type::NOOP)
        } else {
            !trb.has(super::trb::CHAIN)
        };
        if last {
            return Ok(Some(td));
        }
    }
}

impl Xhci {
    /// A doorbell for endpoint `dci` of slot `slot_id` (section 4.7).
    pub(super) fn ring_endpoint(&mut self, slot_id: u8, dci: u8) {
        let mem = self.mem.memory();
        let Some(slot) = self.slot_mut(slot_id) else {
            return;
        };
        let Some(ep) = slot.ep(dci) else { return };
        match ep.state {
            EpState::Running => {}
            EpState::Stopped => {
                // A doorbell restarts a stopped endpoint.
                ep.state = EpState::Running;
                ep.suspended = false;
                slot.write_ep_ctx(&mem, dci);
            }
            _ => return,
        }
        drop(mem);
        let mut progressed = self.process_endpoint(slot_id, dci);
        for _ in 0..NAK_RETRY_PASSES {
            if !progressed {
                break;
            }
            progressed = false;
            let waiting: Vec<u8> = match self.slot_mut(slot_id) {
                Some(s) => (1..=31u8)
                    .filter(|&d| s.endpoints[usize::from(d) - 1].nak_pending)
                    .collect(),
                None => break,
            };
            for d in waiting {
                progressed |= self.process_endpoint(slot_id, d);
            }
        }
    }

    /// Runs ready TDs; true if any completed.
    fn process_endpoint(&mut self, slot_id: u8, dci: u8) -> bool {
        let mut progressed = false;
        for _ in 0..TDS_PER_DOORBELL {
            let Some(slot) = self.slot_mut(slot_id) else {
                break;
            };
            let (port, generation) = (slot.port, slot.generation);
            let Some(ep) = slot.ep(dci) else { break };
            if ep.state != EpState::Running {
                break;
            }
            let start = ep.ring;
            let mut cursor = start;
            let mem = self.mem.memory();
            let gathered = gather_td(&mem, &mut cursor, dci == 1);
            drop(mem);
            let outcome = match gathered {
                Ok(None) => break,
                Ok(Some(td)) => self.run_td(slot_id, dci, port, generation, &td),
                Err(e) => {
                    log::debug!("xhci: slot {slot_id} ep {dci}: {e}");
                    let addr = match e {
                        RingError::Memory(a) | RingError::Budget(a) => a,
                    };
                    self.transfer_event(slot_id, dci, addr, 0, CompletionCode::TrbError, true);
                    Outcome::Halt
                }
            };
            let mem = self.mem.memory();
            let Some(slot) = self.slot_mut(slot_id) else {
                break;
            };
            let Some(ep) = slot.ep(dci) else { break };
            match outcome {
                Outcome::Done => {
                    ep.ring = cursor;
                    ep.nak_pending = false;
                    progressed = true;
                }
                Outcome::Nak => {
                    ep.nak_pending = true;
                    break;
                }
                Outcome::Halt => {
                    ep.state = EpState::Halted;
                    ep.nak_pending = false;
                    ep.ring = start;
                    slot.write_ep_ctx(&mem, dci);
                    progressed = true;
                    break;
                }
            }
        }
        progressed
    }

    fn transfer_event(
        &mut self,
        slot: u8,
        dci: u8,
        addr: u64,
        residual: u32,
        code: CompletionCode,
        raise: bool,
    ) {
        self.post_event(
            Trb::transfer_event(addr, residual, code, false, slot, dci),
            raise,
        );
    }

    /// Executes one TD against the device and reports it.
    fn run_td(&mut self, slot_id: u8, dci: u8, port: u8, generation: u64, td: &[TdTrb]) -> Outcome {
        let control = dci == 1;
        let first = td[0];
        if first.trb.trb_type() == trb_type::NOOP {
            if first.trb.has(IOC) {
                let raise = !first.trb.has(BEI);
                self.transfer_event(slot_id, dci, first.addr, 0, CompletionCode::Success, raise);
            }
            return Outcome::Done;
        }
        let mem = self.mem.memory();
        let mut sg = GuestSg::new(&mem);
        // Parse the whole TD before touching the device.
        let parsed = if control {
            Self::parse_control(td, &mut sg)
        } else {
            Self::parse_bulk(td, &mut sg)
        };
        let setup = match parsed {
            Ok(setup) => setup,
            Err(bad) => {
                drop(sg);
                drop(mem);
                self.transfer_event(slot_id, dci, bad, 0, CompletionCode::TrbError, true);
                return Outcome::Halt;
            }
        };
        let device = self
            .ports
            .get_mut(usize::from(port).wrapping_sub(1))
            .filter(|p| p.generation == generation && p.enabled())
            .and_then(|p| p.device.as_mut());
        let result = match (device, setup) {
            (None, _) => TransferResult::error(0),
            (Some(dev), Some(setup)) => dev.control(&setup, &mut sg),
            (Some(dev), None) => dev.bulk(endpoint_address(dci), &mut sg),
        };
        drop(sg);
        drop(mem);
        if result.status == TransferStatus::Nak {
            return Outcome::Nak;
        }
        self.report(slot_id, dci, td, result)
    }

    /// Bulk/interrupt TD: Normal and Event Data TRBs. Err(addr) names a bad TRB.
    fn parse_bulk(td: &[TdTrb], sg: &mut GuestSg) -> Result<Option<SetupPacket>, u64> {
        for t in td {
            match t.trb.trb_type() {
                trb_type::NORMAL => Self::add_buffer(t, sg)?,
                trb_type::EVENT_DATA | trb_type::NOOP => {}
                _ => return Err(t.addr),
            }
        }
        Ok(None)
    }

    /// Control TD: Setup, optional Data (+ Normal/Event Data), Status.
    fn parse_control(td: &[TdTrb], sg: &mut GuestSg) -> Result<Option<SetupPacket>, u64> {
        let setup_trb = td[0];
        let ok = setup_trb.trb.trb_type() == trb_type::SETUP_STAGE
            && setup_trb.trb.has(IDT)
            && setup_trb.trb.transfer_length() == 8;
        if !ok {
            return Err(setup_trb.addr);
        }
        let setup = SetupPacket::from_bytes(setup_trb.trb.parameter.to_le_bytes());
        let data_in = setup.direction() == Direction::In;
        let last = td.len() - 1;
        for (i, t) in td.iter().enumerate().skip(1) {
            let ty = t.trb.trb_type();
            match ty {
                trb_type::DATA_STAGE if i == 1 => {
                    if t.trb.has(DIR_IN) != data_in {
                        return Err(t.addr);
                    }
                    Self::add_buffer(t, sg)?;
                }
                trb_type::NORMAL if i > 1 && i < last => Self::add_buffer(t, sg)?,
                trb_type::EVENT_DATA if i < last => {}
                trb_type::STATUS_STAGE if i == last => {}
                _ => return Err(t.addr),
            }
        }
        if sg.len() > usize::from(setup.length) {
            // The device sees at most wLength bytes.
            Self::truncate(sg, usize::from(setup.length));
        }
        Ok(Some(setup))
    }

    fn truncate(sg: &mut GuestSg, len: usize) {
        let mut left = len;
        for s in &mut sg.segments {
            let n = s.len().min(left);
            match s {
                Segment::Guest { len, .. } | Segment::Immediate { len, .. } => *len = n,
            }
            left -= n;
        }
        sg.len = len;
    }

    /// Adds a data TRB's buffer, checking it lies in guest memory.
    fn add_buffer(t: &TdTrb, sg: &mut GuestSg) -> Result<(), u64> {
        let len = t.trb.transfer_length() as usize;
        if t.trb.has(IDT) {
            if len > 8 {
                return Err(t.addr);
            }
            sg.push(Segment::Immediate {
                data: t.trb.parameter.to_le_bytes(),
                len,
            });
            return Ok(());
        }
        if len > 0 && !sg.mem.check_range(GuestAddress(t.trb.parameter), len) {
            return Err(t.addr);
        }
        sg.push(Segment::Guest {
            addr: t.trb.parameter,
            len,
        });
        Ok(())
    }

    /// Posts the Transfer Events a finished TD owes (section 4.10.1.1):
    /// IOC TRBs, the TRB where a short packet hit (ISP), the TRB where an
    /// error hit, Event Data TRBs with the accumulated length.
    fn report(&mut self, slot: u8, dci: u8, td: &[TdTrb], result: TransferResult) -> Outcome {
        let control = dci == 1;
        let fail = match result.status {
            TransferStatus::Stall => Some(CompletionCode::StallError),
            TransferStatus::Error => Some(CompletionCode::UsbTransactionError),
            _ => None,
        };
        let mut remaining = result.actual;
        let mut edtla: u32 = 0;
        let mut short = false;
        for t in td {
            let raise = !t.trb.has(BEI);
            let ioc = t.trb.has(IOC);
            match t.trb.trb_type() {
                trb_type::EVENT_DATA => {
                    if ioc {
                        let code = if short {
                            CompletionCode::ShortPacket
                        } else {
                            CompletionCode::Success
                        };
                        self.post_event(
                            Trb::transfer_event(t.trb.parameter, edtla, code, true, slot, dci),
                            raise,
                        );
                    }
                    edtla = 0;
                }
                trb_type::NORMAL | trb_type::DATA_STAGE => {
                    let len = t.trb.transfer_length() as usize;
                    let moved = remaining.min(len);
                    remaining -= moved;
                    edtla = edtla.saturating_add(moved as u32);
                    let residual = (len - moved) as u32;
                    if moved < len {
                        if let Some(code) = fail {
                            self.transfer_event(slot, dci, t.addr, residual, code, true);
                            return Outcome::Halt;
                        }
                        let first_short = !short;
                        short = true;
                        if (first_short && t.trb.has(ISP)) || ioc {
                            self.transfer_event(
                                slot,
                                dci,
                                t.addr,
                                residual,
                                CompletionCode::ShortPacket,
                                raise,
                            );
                            if !control {
                                return Outcome::Done;
                            }
                        }
                    } else if ioc {
                        self.transfer_event(slot, dci, t.addr, 0, CompletionCode::Success, raise);
                    }
                }
                trb_type::STATUS_STAGE => {
                    if let Some(code) = fail {
                        self.transfer_event(slot, dci, t.addr, 0, code, true);
                        return Outcome::Halt;
                    }
                    if ioc {
                        self.transfer_event(slot, dci, t.addr, 0, CompletionCode::Success, raise);
                    }
                }
                _ => {
                    // Setup Stage / No Op.
                    if ioc && fail.is_none() {
                        self.transfer_event(slot, dci, t.addr, 0, CompletionCode::Success, raise);
                    }
                }
            }
        }
        if let Some(code) = fail {
            // The whole buffer moved but the transfer still failed (e.g. a
            // STALL after the last byte): report it on the last TRB.
            let last = td[td.len() - 1];
            self.transfer_event(slot, dci, last.addr, 0, code, true);
            return Outcome::Halt;
        }
        Outcome::Done
    }

    /// The device on `port` (generation `generation`) went away: TDs it held
    /// (NAK'd, i.e. in flight) end with USB Transaction Error.
    pub(super) fn fail_pending_transfers(&mut self, port: u8, generation: u64) {
        let mem = self.mem.memory();
        let mut events = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.state == super::slot::SlotState::Disabled
                || slot.port != port
                || slot.generation != generation
            {
                continue;
            }
            for dci in 1..=31u8 {
                let Some(ep) = slot.ep(dci) else { continue };
                if !ep.nak_pending {
                    continue;
                }
                ep.nak_pending = false;
                ep.state = EpState::Halted;
                let addr = ep.ring.dequeue;
                let residual = mem
                    .read_obj::<Trb>(GuestAddress(addr))
                    .map_or(0, |t| t.transfer_length());
                slot.write_ep_ctx(&mem, dci);
                events.push((i as u8 + 1, dci, addr, residual));
            }
        }
        drop(mem);
        for (slot, dci, addr, residual) in events {
            self.transfer_event(
                slot,
                dci,
                addr,
                residual,
                CompletionCode::UsbTransactionError,
                true,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        // Two regions so a segment can straddle a region boundary.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn guest_slices_cover_the_range_across_segments_and_regions() {
        let m = mem();
        let mut sg = GuestSg::new(&m);
        sg.push(Segment::Guest {
            addr: 0x800,
            len: 0x1000,
        }); // crosses 0x1000
        sg.push(Segment::Guest {
            addr: 0x1f00,
            len: 0x100,
        });
        let s = sg.guest_slices(0x10, 0x1000).unwrap();
        let lens: Vec<usize> = s.iter().map(|v| v.len()).collect();
        assert_eq!(lens, vec![0x7f0, 0x800, 0x10]);
        m.write_slice(&[7u8; 4], GuestAddress(0x1f00)).unwrap();
        let mut b = [0u8; 4];
        s[2].copy_to(&mut b[..]);
        assert_eq!(b, [7; 4]);
        assert!(sg.guest_slices(0x1000, 0x101).is_none(), "past the end");
        assert!(sg.guest_slices(usize::MAX, 2).is_none(), "overflow");
    }

    #[test]
    fn guest_slices_refuse_immediate_data() {
        let m = mem();
        let mut sg = GuestSg::new(&m);
        sg.push(Segment::Guest { addr: 0, len: 16 });
        sg.push(Segment::Immediate {
            data: [1; 8],
            len: 8,
        });
        assert_eq!(sg.guest_slices(0, 16).map(|v| v.len()), Some(1));
        assert!(sg.guest_slices(8, 16).is_none());
    }
}
