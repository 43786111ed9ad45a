//! The command ring (xHCI 1.2 sections 4.6, 6.4.3): commands are parsed
//! from guest TRBs, executed against slot state, and each gets a Command
//! Completion Event. Unknown commands complete with TRB Error.

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};

use super::controller::Xhci;
use super::ring::RingCursor;
use super::slot::{EpState, Slot, SlotState, NUM_DCI};
use super::trb::{
    ep_type, slot_ctx_state, trb_type, CompletionCode, Context, Trb, BSR, CONTEXT_SIZE, DC,
    DEVICE_CONTEXT_SIZE, INPUT_CONTEXT_SIZE, SP,
};

/// Commands executed per doorbell; the rest wait for the next ring.
pub const COMMAND_BUDGET: u32 = 256;

type CmdResult = Result<u8, CompletionCode>;

/// Reads the input context at `addr` (control, slot, 31 endpoint contexts).
fn read_input(mem: &GuestMemoryMmap, addr: u64) -> Result<[Context; 33], CompletionCode> {
    if addr == 0 || !mem.check_range(GuestAddress(addr), INPUT_CONTEXT_SIZE) {
        return Err(CompletionCode::TrbError);
    }
    let mut ctx = [Context::default(); 33];
    for (i, c) in ctx.iter_mut().enumerate() {
        *c = mem
            .read_obj(GuestAddress(addr + (i * CONTEXT_SIZE) as u64))
            .map_err(|_| CompletionCode::TrbError)?;
    }
    Ok(ctx)
}

impl Xhci {
    /// Runs commands from the command ring until it is empty or the budget ends.
    pub(super) fn process_commands(&mut self) {
        let mut trb_budget = super::ring::TRB_BUDGET;
        for _ in 0..COMMAND_BUDGET {
            if !self.cmd_running || !self.running() {
                return;
            }
            let mem = self.mem.memory();
            let next = self.cmd_ring.next(&mem, &mut trb_budget);
            drop(mem);
            match next {
                Ok(None) => return,
                Ok(Some((addr, trb))) => {
                    let (code, slot) = match self.execute(&trb) {
                        Ok(slot) => (CompletionCode::Success, slot),
                        Err(code) => (code, trb.slot_id()),
                    };
                    self.complete_command(addr, code, slot);
                }
                Err(e) => {
                    // The ring itself is broken (loops, points outside memory).
                    log::warn!("xhci: command ring: {e}");
                    self.host_system_error();
                    return;
                }
            }
        }
    }

    fn execute(&mut self, trb: &Trb) -> CmdResult {
        match trb.trb_type() {
            trb_type::ENABLE_SLOT => self.enable_slot(),
            trb_type::DISABLE_SLOT => self.disable_slot(trb.slot_id()),
            trb_type::ADDRESS_DEVICE => self.address_device(trb),
            trb_type::CONFIGURE_ENDPOINT => self.configure_endpoint(trb),
            trb_type::EVALUATE_CONTEXT => self.evaluate_context(trb),
            trb_type::RESET_ENDPOINT => self.reset_endpoint(trb),
            trb_type::STOP_ENDPOINT => self.stop_endpoint(trb),
            trb_type::SET_TR_DEQUEUE => self.set_tr_dequeue(trb),
            trb_type::RESET_DEVICE => self.reset_device(trb.slot_id()),
            trb_type::NOOP_COMMAND => Ok(0),
            t => {
                log::debug!("xhci: unsupported command type {t}");
                Err(CompletionCode::TrbError)
            }
        }
    }

    /// A slot that is not Disabled, or Slot Not Enabled Error.
    fn enabled_slot(&mut self, id: u8) -> Result<&mut Slot, CompletionCode> {
        match self.slot_mut(id) {
            Some(s) if s.state != SlotState::Disabled => Ok(s),
            _ => Err(CompletionCode::SlotNotEnabled),
        }
    }

    /// Section 4.6.3.
    fn enable_slot(&mut self) -> CmdResult {
        let max = self.max_slots_enabled();
        let free = self.slots[..max]
            .iter()
            .position(|s| s.state == SlotState::Disabled)
            .ok_or(CompletionCode::NoSlotsAvailable)?;
        self.slots[free] = Slot {
            state: SlotState::Enabled,
            ..Slot::default()
        };
        Ok(free as u8 + 1)
    }

    /// Section 4.6.4.
    fn disable_slot(&mut self, id: u8) -> CmdResult {
        let slot = self.enabled_slot(id)?;
        *slot = Slot::default();
        Ok(id)
    }

    /// The device context pointer of `id` from the DCBAA (section 6.1).
    fn output_context(&self, id: u8) -> Result<u64, CompletionCode> {
        let mem = self.mem.memory();
        let entry = self
            .dcbaap
            .checked_add(8 * u64::from(id))
            .ok_or(CompletionCode::TrbError)?;
        let out: u64 = mem
            .read_obj(GuestAddress(entry))
            .map_err(|_| CompletionCode::TrbError)?;
        let out = out & !0x3f;
        if out == 0 || !mem.check_range(GuestAddress(out), DEVICE_CONTEXT_SIZE) {
            return Err(CompletionCode::TrbError);
        }
        Ok(out)
    }

    /// Section 4.6.5.
    fn address_device(&mut self, trb: &Trb) -> CmdResult {
        let id = trb.slot_id();
        let bsr = trb.has(BSR);
        let state = self.enabled_slot(id)?.state;
        let allowed = state == SlotState::Enabled || (!bsr && state == SlotState::Default);
        if !allowed {
            return Err(CompletionCode::ContextStateError);
        }
        let mem = self.mem.memory();
        let input = read_input(&mem, trb.parameter & !0xf)?;
        drop(mem);
        let (control, mut slot_ctx, mut ep0) = (input[0], input[1], input[2]);
        if control.add_flags() & 3 != 3 {
            return Err(CompletionCode::ParameterError);
        }
        if ep0.ep_type() != ep_type::CONTROL || ep0.dequeue().0 == 0 {
            return Err(CompletionCode::ParameterError);
        }
        let port_id = slot_ctx.root_hub_port();
        let port = self
            .ports
            .get(usize::from(port_id).wrapping_sub(1))
            .ok_or(CompletionCode::ParameterError)?;
        // No hubs: a route string means a device that does not exist.
        let present = port.device.is_some() && port.enabled() && slot_ctx.route_string() == 0;
        if !bsr && !present {
            return Err(CompletionCode::UsbTransactionError);
        }
        let generation = port.generation;
        let output = self.output_context(id)?;
        let address = if bsr { 0 } else { id };
        let ctx_state = if bsr {
            slot_ctx_state::DEFAULT
        } else {
            slot_ctx_state::ADDRESSED
        };
        slot_ctx.set_slot_state(ctx_state, address);
        slot_ctx.set_context_entries(1);
        let (deq, dcs) = ep0.dequeue();
        ep0.set_ep_state(EpState::Running as u32);
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        slot.state = if bsr {
            SlotState::Default
        } else {
            SlotState::Addressed
        };
        slot.port = port_id;
        slot.generation = generation;
        slot.output = output;
        slot.slot_ctx = slot_ctx;
        slot.endpoints[0].state = EpState::Running;
        slot.endpoints[0].ring = RingCursor::new(deq, dcs);
        slot.endpoints[0].ctx = ep0;
        slot.endpoints[0].nak_pending = false;
        slot.write_slot_ctx(&mem);
        slot.write_ep_ctx(&mem, 1);
        Ok(id)
    }

    /// Section 4.6.6.
    fn configure_endpoint(&mut self, trb: &Trb) -> CmdResult {
        let id = trb.slot_id();
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        if !matches!(slot.state, SlotState::Addressed | SlotState::Configured) {
            return Err(CompletionCode::ContextStateError);
        }
        if trb.has(DC) {
            slot.disable_non_default_endpoints(&mem);
            slot.state = SlotState::Addressed;
            let address = slot.slot_ctx.device_address();
            slot.slot_ctx
                .set_slot_state(slot_ctx_state::ADDRESSED, address);
            slot.slot_ctx.set_context_entries(1);
            slot.write_slot_ctx(&mem);
            return Ok(id);
        }
        let input = read_input(&mem, trb.parameter & !0xf)?;
        let (drop_flags, add_flags) = (input[0].drop_flags(), input[0].add_flags());
        // Validate every added endpoint before changing anything.
        for dci in 2..=NUM_DCI {
            if add_flags & (1 << dci) == 0 {
                continue;
            }
            let ctx = input[dci + 1];
            let t = ctx.ep_type();
            let dir_ok = t != 0 && t != ep_type::CONTROL && (t > 4) == (dci % 2 == 1);
            if !dir_ok || ctx.dequeue().0 == 0 || ctx.max_packet_size() == 0 {
                return Err(CompletionCode::ParameterError);
            }
        }
        for dci in 2..=NUM_DCI as u8 {
            let bit = 1u32 << dci;
            if drop_flags & bit != 0 || add_flags & bit != 0 {
                if let Some(ep) = slot.ep(dci) {
                    *ep = Default::default();
                }
            }
            if add_flags & bit != 0 {
                let mut ctx = input[usize::from(dci) + 1];
                let (deq, dcs) = ctx.dequeue();
                ctx.set_ep_state(EpState::Running as u32);
                if let Some(ep) = slot.ep(dci) {
                    ep.state = EpState::Running;
                    ep.ring = RingCursor::new(deq, dcs);
                    ep.ctx = ctx;
                }
            }
            if (drop_flags | add_flags) & bit != 0 {
                slot.write_ep_ctx(&mem, dci);
            }
        }
        let entries = slot.context_entries();
        slot.state = if entries > 1 {
            SlotState::Configured
        } else {
            SlotState::Addressed
        };
        let address = slot.slot_ctx.device_address();
        let st = if entries > 1 {
            slot_ctx_state::CONFIGURED
        } else {
            slot_ctx_state::ADDRESSED
        };
        if add_flags & 1 != 0 {
            slot.slot_ctx = input[1];
        }
        slot.slot_ctx.set_slot_state(st, address);
        slot.slot_ctx.set_context_entries(entries);
        slot.write_slot_ctx(&mem);
        Ok(id)
    }

    /// Section 4.6.7: slot context (A0) and EP0 max packet size (A1).
    fn evaluate_context(&mut self, trb: &Trb) -> CmdResult {
        let id = trb.slot_id();
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        if slot.state == SlotState::Enabled {
            return Err(CompletionCode::ContextStateError);
        }
        let input = read_input(&mem, trb.parameter & !0xf)?;
        let add = input[0].add_flags();
        if add & 1 != 0 {
            // Max Exit Latency and Interrupter Target.
            slot.slot_ctx.0[1] = (slot.slot_ctx.0[1] & !0xffff) | (input[1].0[1] & 0xffff);
            slot.slot_ctx.0[2] =
                (slot.slot_ctx.0[2] & 0x003f_ffff) | (input[1].0[2] & !0x003f_ffff);
            slot.write_slot_ctx(&mem);
        }
        if add & 2 != 0 {
            let mps = input[2].max_packet_size();
            if mps == 0 {
                return Err(CompletionCode::ParameterError);
            }
            slot.endpoints[0].ctx.set_max_packet_size(mps);
            slot.write_ep_ctx(&mem, 1);
        }
        Ok(id)
    }

    /// The endpoint named by a command, checked to exist and be enabled.
    fn command_endpoint(&mut self, trb: &Trb) -> Result<(u8, u8), CompletionCode> {
        let (id, dci) = (trb.slot_id(), trb.endpoint_id());
        let slot = self.enabled_slot(id)?;
        match slot.ep(dci) {
            Some(ep) if ep.state != EpState::Disabled => Ok((id, dci)),
            _ => Err(CompletionCode::EndpointNotEnabled),
        }
    }

    /// Section 4.6.8: Halted -> Stopped.
    fn reset_endpoint(&mut self, trb: &Trb) -> CmdResult {
        let (id, dci) = self.command_endpoint(trb)?;
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        let ep = slot.ep(dci).ok_or(CompletionCode::TrbError)?;
        if ep.state != EpState::Halted {
            return Err(CompletionCode::ContextStateError);
        }
        ep.state = EpState::Stopped;
        ep.nak_pending = false;
        slot.write_ep_ctx(&mem, dci);
        Ok(id)
    }

    /// Section 4.6.9: Running -> Stopped; a TD the device held (NAK) ends
    /// with a Stopped transfer event.
    fn stop_endpoint(&mut self, trb: &Trb) -> CmdResult {
        let (id, dci) = self.command_endpoint(trb)?;
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        let ep = slot.ep(dci).ok_or(CompletionCode::TrbError)?;
        if ep.state != EpState::Running {
            return Err(CompletionCode::ContextStateError);
        }
        ep.state = EpState::Stopped;
        ep.suspended = trb.has(SP);
        let pending = std::mem::take(&mut ep.nak_pending).then_some(ep.ring);
        slot.write_ep_ctx(&mem, dci);
        if let Some(ring) = pending {
            let first: Option<Trb> = mem.read_obj(GuestAddress(ring.dequeue)).ok();
            let residual = first.map_or(0, |t| t.transfer_length());
            drop(mem);
            self.post_event(
                Trb::transfer_event(
                    ring.dequeue,
                    residual,
                    CompletionCode::Stopped,
                    false,
                    id,
                    dci,
                ),
                true,
            );
        }
        Ok(id)
    }

    /// Section 4.6.10: only while Stopped.
    fn set_tr_dequeue(&mut self, trb: &Trb) -> CmdResult {
        let (id, dci) = self.command_endpoint(trb)?;
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        let ep = slot.ep(dci).ok_or(CompletionCode::TrbError)?;
        if ep.state != EpState::Stopped {
            return Err(CompletionCode::ContextStateError);
        }
        let ptr = trb.parameter & !0xf;
        if ptr == 0 {
            return Err(CompletionCode::ParameterError);
        }
        ep.ring = RingCursor::new(ptr, trb.parameter & 1 != 0);
        ep.nak_pending = false;
        slot.write_ep_ctx(&mem, dci);
        Ok(id)
    }

    /// Section 4.6.11: back to Default, every endpoint but EP0 disabled.
    fn reset_device(&mut self, id: u8) -> CmdResult {
        let mem = self.mem.memory();
        let slot = self.enabled_slot(id)?;
        if slot.state == SlotState::Enabled {
            return Err(CompletionCode::ContextStateError);
        }
        slot.disable_non_default_endpoints(&mem);
        slot.state = SlotState::Default;
        slot.slot_ctx.set_slot_state(slot_ctx_state::DEFAULT, 0);
        slot.slot_ctx.set_context_entries(1);
        slot.write_slot_ctx(&mem);
        Ok(id)
    }
}
