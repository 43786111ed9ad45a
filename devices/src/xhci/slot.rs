//! Device slots and their endpoints (xHCI 1.2 sections 4.5, 4.8).
//!
//! The controller keeps the authoritative slot and endpoint state here and
//! writes it out to the guest's output device context when it changes; it
//! never trusts what the guest may have scribbled into the output context.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ring::RingCursor;
use super::trb::{Context, CONTEXT_SIZE};

/// Slot states (section 4.5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Disabled,
    Enabled,
    Default,
    Addressed,
    Configured,
}

/// Endpoint states (section 4.8.3); the values are the context encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpState {
    Disabled = 0,
    Running = 1,
    Halted = 2,
    Stopped = 3,
}

/// Number of Device Context Indices (1 = EP0, 2..=31 the others).
pub const NUM_DCI: usize = 31;

#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub state: EpState,
    pub ring: RingCursor,
    /// The context as last written out (type, max packet, ...).
    pub ctx: Context,
    /// A TD the device answered with NAK waits at the dequeue pointer.
    pub nak_pending: bool,
    /// Stopped with the Suspend flag (runtime PM).
    pub suspended: bool,
}

impl Default for Endpoint {
    fn default() -> Self {
        Self {
            state: EpState::Disabled,
            ring: RingCursor::default(),
            ctx: Context::default(),
            nak_pending: false,
            suspended: false,
        }
    }
}

/// Endpoint address (bEndpointAddress) of a DCI (section 4.5.1).
pub fn endpoint_address(dci: u8) -> u8 {
    let num = dci / 2;
    if dci % 2 == 1 {
        num | 0x80
    } else {
        num
    }
}

#[derive(Debug, Clone)]
pub struct Slot {
    pub state: SlotState,
    /// Root hub port (1-based) and the device generation addressed there.
    pub port: u8,
    pub generation: u64,
    /// Output device context (from DCBAA) once addressed.
    pub output: u64,
    pub slot_ctx: Context,
    /// Index DCI - 1.
    pub endpoints: [Endpoint; NUM_DCI],
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            state: SlotState::Disabled,
            port: 0,
            generation: 0,
            output: 0,
            slot_ctx: Context::default(),
            endpoints: [Endpoint::default(); NUM_DCI],
        }
    }
}

impl Slot {
    pub fn ep(&mut self, dci: u8) -> Option<&mut Endpoint> {
        self.endpoints.get_mut(usize::from(dci).checked_sub(1)?)
    }

    /// Writes the slot context to the output device context.
    pub fn write_slot_ctx(&self, mem: &GuestMemoryMmap) {
        if self.output != 0
            && mem
                .write_obj(self.slot_ctx, GuestAddress(self.output))
                .is_err()
        {
            log::warn!("xhci: output slot context at {:#x} unwritable", self.output);
        }
    }

    /// Writes endpoint `dci`'s state and dequeue pointer to the output context.
    pub fn write_ep_ctx(&mut self, mem: &GuestMemoryMmap, dci: u8) {
        let output = self.output;
        let Some(ep) = self.ep(dci) else { return };
        ep.ctx.set_ep_state(ep.state as u32);
        ep.ctx.set_dequeue(ep.ring.dequeue, ep.ring.cycle);
        let addr = output + CONTEXT_SIZE as u64 * u64::from(dci);
        if output != 0 && mem.write_obj(ep.ctx, GuestAddress(addr)).is_err() {
            log::warn!("xhci: output endpoint context at {addr:#x} unwritable");
        }
    }

    /// Disables every endpoint but EP0 (Reset Device, Configure Endpoint DC).
    pub fn disable_non_default_endpoints(&mut self, mem: &GuestMemoryMmap) {
        for dci in 2..=NUM_DCI as u8 {
            if let Some(ep) = self.ep(dci) {
                if ep.state != EpState::Disabled {
                    *ep = Endpoint::default();
                    self.write_ep_ctx(mem, dci);
                }
            }
        }
    }

    /// Highest enabled DCI (the slot context's Context Entries).
    pub fn context_entries(&self) -> u32 {
        (1..=NUM_DCI)
            .rev()
            .find(|&d| d == 1 || self.endpoints[d - 1].state != EpState::Disabled)
            .unwrap_or(1) as u32
    }
}
