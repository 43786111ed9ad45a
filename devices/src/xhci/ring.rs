//! Reading a producer/consumer TRB ring (xHCI 1.2 section 4.9): the cycle
//! bit says which TRBs the guest has handed over, Link TRBs chain segments
//! and may toggle the cycle state. Every read costs one unit of a budget so
//! a ring that loops back on itself ends.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::trb::{trb_type, Trb, LINK_TC};
use super::RingError;

/// A consumer position in a ring: dequeue pointer plus consumer cycle state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingCursor {
    pub dequeue: u64,
    pub cycle: bool,
}

/// The largest number of TRBs one doorbell may consume on one ring.
pub const TRB_BUDGET: u32 = 4096;

impl RingCursor {
    pub fn new(dequeue: u64, cycle: bool) -> Self {
        Self {
            dequeue: dequeue & !0xf,
            cycle,
        }
    }

    /// Returns the next TRB the guest has handed over (and its address),
    /// following Link TRBs, or `None` when the ring is empty. Advances the
    /// cursor past the returned TRB.
    pub fn next(
        &mut self,
        mem: &GuestMemoryMmap,
        budget: &mut u32,
    ) -> Result<Option<(u64, Trb)>, RingError> {
        loop {
            if *budget == 0 {
                return Err(RingError::Budget(self.dequeue));
            }
            *budget -= 1;
            let addr = self.dequeue;
            let trb: Trb = mem
                .read_obj(GuestAddress(addr))
                .map_err(|_| RingError::Memory(addr))?;
            if trb.cycle() != self.cycle {
                return Ok(None);
            }
            if trb.trb_type() == trb_type::LINK {
                // Section 6.4.4.1: Ring Segment Pointer, 16-byte aligned.
                self.dequeue = trb.parameter & !0xf;
                if trb.has(LINK_TC) {
                    self.cycle = !self.cycle;
                }
                continue;
            }
            self.dequeue = addr.checked_add(16).ok_or(RingError::Memory(addr))?;
            return Ok(Some((addr, trb)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xhci::trb::CYCLE;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, addr: u64, trb: Trb) {
        m.write_obj(trb, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn follows_links_and_toggles_cycle() {
        let m = mem();
        put(
            &m,
            0x1000,
            Trb {
                parameter: 1,
                status: 0,
                control: CYCLE,
            }
            .with_type(trb_type::NORMAL),
        );
        put(
            &m,
            0x1010,
            Trb {
                parameter: 0x1000,
                status: 0,
                control: CYCLE | LINK_TC,
            }
            .with_type(trb_type::LINK),
        );
        let mut c = RingCursor::new(0x1000, true);
        let mut budget = TRB_BUDGET;
        assert_eq!(c.next(&m, &mut budget).unwrap().unwrap().0, 0x1000);
        // After the link the cycle state flipped: the old TRB is not ours.
        assert_eq!(c.next(&m, &mut budget).unwrap(), None);
        assert_eq!(c, RingCursor::new(0x1000, false));
    }

    #[test]
    fn link_loops_and_wild_pointers_end() {
        let m = mem();
        // A link pointing at itself without toggling loops forever.
        put(
            &m,
            0x2000,
            Trb {
                parameter: 0x2000,
                status: 0,
                control: CYCLE,
            }
            .with_type(trb_type::LINK),
        );
        let mut c = RingCursor::new(0x2000, true);
        let mut budget = 100;
        assert_eq!(c.next(&m, &mut budget), Err(RingError::Budget(0x2000)));
        // A link to nowhere.
        put(
            &m,
            0x3000,
            Trb {
                parameter: 0xdead_0000,
                status: 0,
                control: CYCLE,
            }
            .with_type(trb_type::LINK),
        );
        let mut c = RingCursor::new(0x3000, true);
        let mut budget = 100;
        assert_eq!(c.next(&m, &mut budget), Err(RingError::Memory(0xdead_0000)));
    }
}
