//! The controller: register file, interrupter 0, ports and slots, and the
//! MMIO entry points a PCI function forwards its BAR accesses to.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::event::{EventRingState, Interrupter, Posted};
use super::moderation::{Clock, ModerationTimer};
use super::port::{Port, PortProtocol};
use super::regs::{self, cap, op, rt, DB_BASE, MAX_SLOTS, OP_BASE, PORT_BASE, RT_BASE, XECP_BASE};
use super::ring::RingCursor;
use super::shadow::{self, ReadShadow};
use super::slot::{EpState, Slot};
use super::trb::{CompletionCode, Trb};
use super::{XhciConfig, XhciError};
use crate::bus::BusDevice;
use crate::interrupt::Interrupt;
use crate::noio::PmPath;
use crate::usb::UsbDevice;

/// The MSI-X vector / interrupter index used for every event.
pub const INTERRUPTER_VECTOR: u16 = 0;

/// An xHCI host controller.
pub struct Xhci {
    pub(super) config: XhciConfig,
    pub(super) mem: GuestMemoryAtomic<GuestMemoryMmap>,
    irq: Arc<dyn Interrupt>,
    pub(super) usbcmd: u32,
    pub(super) usbsts: u32,
    dnctrl: u32,
    /// CRCR as written (pointer kept for the next ring start) and the live cursor.
    crcr: u64,
    pub(super) cmd_ring: RingCursor,
    pub(super) cmd_running: bool,
    pub(super) dcbaap: u64,
    config_reg: u32,
    pub(super) interrupter: Interrupter,
    pub(super) ports: Vec<Port>,
    /// Index = slot ID - 1.
    pub(super) slots: Vec<Slot>,
    started: Instant,
    /// Where guest reads of the registers are served, if the VMM maps
    /// them (see `shadow.rs`).
    shadow: Option<Arc<dyn ReadShadow>>,
    /// Interrupt moderation, when the VMM runs a timer for it.
    moderation: Option<ModerationHooks>,
    /// What the last Save State (USBCMD.CSS) kept for Restore State.
    saved: Option<EventRingState>,
    /// The PCI function is in D3hot: no DMA, no interrupts.
    d3hot: bool,
    /// A wake event happened while the controller was not running: the
    /// PCI function should set PME_Status ([`Xhci::take_pme_request`]).
    pme_request: bool,
}

/// A root hub port as diagnostics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPower {
    pub port: u8,
    pub protocol: PortProtocol,
    pub portsc: u32,
    /// PORTSC.PLS.
    pub link_state: u32,
    /// `Some(suspended)` when a device is attached.
    pub device_suspended: Option<bool>,
}

/// Name of a PORTSC.PLS value (section 5.4.8).
pub fn link_state_name(pls: u32) -> &'static str {
    match pls {
        0 => "U0",
        1 => "U1",
        2 => "U2",
        3 => "U3",
        4 => "Disabled",
        5 => "RxDetect",
        6 => "Inactive",
        7 => "Polling",
        8 => "Recovery",
        9 => "HotReset",
        10 => "ComplianceMode",
        11 => "TestMode",
        15 => "Resume",
        _ => "reserved",
    }
}

/// Interrupter 0 and the registers around it, as [`Xhci::interrupt_state`]
/// reports them: what to look at when a guest waits for an interrupt that
/// does not come (IMAN.IP/IE, ERDP.EHB, events the guest has not consumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptState {
    pub usbcmd: u32,
    pub usbsts: u32,
    pub iman: u32,
    /// ERDP with the controller's EHB bit (bit 3).
    pub erdp: u64,
    /// Events written past the guest's dequeue pointer (or queued).
    pub events_pending: bool,
    /// Events lost to a full event ring.
    pub events_dropped: u64,
    /// IMAN.IP && IMAN.IE && USBCMD.INTE.
    pub asserted: bool,
    /// An interrupt is deferred by moderation.
    pub deferred: bool,
}

/// The timer and clock interrupt moderation runs on (see `moderation.rs`).
struct ModerationHooks {
    timer: Arc<dyn ModerationTimer>,
    clock: Arc<dyn Clock>,
    /// The deadline the timer was last armed for.
    armed: Option<Instant>,
}

impl Xhci {
    /// Creates a halted controller with `config.usb2_ports` USB 2 ports
    /// (numbered first) and `config.usb3_ports` USB 3 ports.
    pub fn new(
        config: XhciConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<Self, XhciError> {
        let total = usize::from(config.usb2_ports) + usize::from(config.usb3_ports);
        if total == 0 || total > regs::MAX_PORTS.min(255) {
            return Err(XhciError::InvalidConfig(format!("{total} ports")));
        }
        let ports = (0..config.usb2_ports)
            .map(|_| Port::new(PortProtocol::Usb2))
            .chain((0..config.usb3_ports).map(|_| Port::new(PortProtocol::Usb3)))
            .collect();
        Ok(Self {
            config,
            mem,
            irq,
            usbcmd: 0,
            usbsts: op::STS_HCH,
            dnctrl: 0,
            crcr: 0,
            cmd_ring: RingCursor::default(),
            cmd_running: false,
            dcbaap: 0,
            config_reg: 0,
            interrupter: Interrupter::new(),
            ports,
            slots: vec![Slot::default(); MAX_SLOTS],
            started: Instant::now(),
            shadow: None,
            moderation: None,
            saved: None,
            d3hot: false,
            pme_request: false,
        })
    }

    /// Size of the MMIO BAR.
    pub const fn mmio_size() -> u64 {
        regs::MMIO_SIZE
    }

    pub fn num_ports(&self) -> u8 {
        self.ports.len() as u8
    }

    /// The protocol of 1-based `port`.
    pub fn port_protocol(&self, port: u8) -> Option<PortProtocol> {
        self.port_ref(port).map(|p| p.protocol)
    }

    fn port_ref(&self, port: u8) -> Option<&Port> {
        self.ports.get(usize::from(port).checked_sub(1)?)
    }

    /// PORTSC of 1-based `port` (for tests and the control API).
    pub fn portsc(&self, port: u8) -> Option<u32> {
        self.port_ref(port).map(Port::portsc)
    }

    /// Running: R/S set, not halted, and powered (not in D3hot).
    pub fn running(&self) -> bool {
        self.usbcmd & op::CMD_RUN != 0 && self.usbsts & op::STS_HCH == 0 && !self.d3hot
    }

    /// The guest pages the controller reads or writes on its own: DCBAA,
    /// command ring, event ring segment table and segments, every device's
    /// output context and the page at each endpoint's dequeue pointer.
    /// Page-aligned `(gpa, len)` ranges (for the evict test aid).
    pub fn guest_structures(&self) -> Vec<(u64, u64)> {
        let mut v = vec![
            (self.dcbaap, 8 * (MAX_SLOTS as u64 + 1)),
            (self.cmd_ring.dequeue, 16),
        ];
        v.extend(self.interrupter.guest_ranges());
        for s in self.slots.iter().filter(|s| s.output != 0) {
            v.push((s.output, 32 * 32));
            v.extend(
                s.endpoints
                    .iter()
                    .filter(|e| e.state != EpState::Disabled)
                    .map(|e| (e.ring.dequeue, 16)),
            );
        }
        let mut pages: Vec<(u64, u64)> = v
            .into_iter()
            .filter(|&(a, _)| a != 0)
            .flat_map(|(a, len)| {
                let first = a & !0xfff;
                let last = (a + len.max(1) - 1) & !0xfff;
                (first..=last).step_by(0x1000).map(|p| (p, 0x1000))
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Whether the PCI function put the controller in D3hot.
    pub fn in_d3hot(&self) -> bool {
        self.d3hot
    }

    /// Each port's state for diagnostics.
    pub fn port_power(&self) -> Vec<PortPower> {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| PortPower {
                port: i as u8 + 1,
                protocol: p.protocol,
                portsc: p.portsc(),
                link_state: p.link_state(),
                device_suspended: p.device_suspended(),
            })
            .collect()
    }

    /// D0 -> D3hot (PCI PM): the controller stops DMA and interrupts and
    /// every attached device is suspended (their volumes quiesced). A wake
    /// event the guest armed a port for and has not seen yet asks for PME
    /// at once: the guest clears PME_Status on its way to D3hot, so a
    /// connect between its `xhci_suspend` and this write is not lost.
    pub fn enter_d3hot(&mut self) {
        self.d3hot = true;
        self.interrupter.moderation.clear();
        for p in &mut self.ports {
            p.suspend_device();
        }
        if self.ports.iter().any(Port::wake_pending) {
            self.pme_request = true;
        }
        self.publish();
    }

    /// D3hot -> D0: devices the controller suspended resume (those whose
    /// link the guest put in U3 stay suspended). No_Soft_Reset: registers
    /// and rings are as they were. Runs in a NOIO scope.
    pub fn leave_d3hot(&mut self) {
        let _path = PmPath::enter("xhci D3hot -> D0");
        self.d3hot = false;
        for p in &mut self.ports {
            p.resume_unless_u3();
        }
        if self.running() {
            // Changes that happened while powered down.
            for i in 0..self.ports.len() {
                if self.ports[i].has_change() {
                    self.post_event(Trb::port_status_change(i as u8 + 1), true);
                }
            }
        }
        self.publish();
    }

    /// Whether a wake event asked for PME since the last call (the PCI
    /// function sets PME_Status for it).
    pub fn take_pme_request(&mut self) -> bool {
        std::mem::take(&mut self.pme_request)
    }

    /// A host-side wake request for the device on 1-based `port`: a
    /// device-initiated remote wake (section 4.15.2.2). Fails when the port
    /// has no device or its link is not in U3.
    pub fn remote_wake(&mut self, port: u8) -> Result<(), XhciError> {
        let p = self
            .ports
            .get_mut(usize::from(port).wrapping_sub(1))
            .ok_or(XhciError::InvalidPort(port))?;
        let _path = PmPath::enter(format!("xhci port {port} remote wake"));
        let event = p.remote_wake().ok_or(XhciError::NotSuspended(port))?;
        self.refresh_device_contexts(port);
        if event {
            self.port_event(port);
        } else if !self.running() {
            self.pme_request = true;
        }
        if let Some(p) = self.ports.get_mut(usize::from(port) - 1) {
            p.resume_device();
        }
        self.publish();
        Ok(())
    }

    /// Replaces how interrupter 0 is delivered (the PCI wrapper adds an
    /// INTx fallback to MSI-X once it knows the controller's pin wiring).
    pub fn set_interrupt(&mut self, irq: Arc<dyn Interrupt>) {
        self.irq = irq;
    }

    /// The interrupt-related state at this moment, for diagnostics.
    pub fn interrupt_state(&self) -> InterruptState {
        let ir = &self.interrupter;
        InterruptState {
            usbcmd: self.usbcmd,
            usbsts: self.usbsts,
            iman: ir.iman,
            erdp: ir.erdp,
            events_pending: ir.pending(),
            events_dropped: ir.dropped,
            asserted: self.interrupt_asserted(),
            deferred: ir.moderation.deadline().is_some(),
        }
    }

    /// Whether the interrupt line is asserted (for INTx: IMAN.IP && IE && INTE).
    pub fn interrupt_asserted(&self) -> bool {
        self.interrupter.asserted() && self.usbcmd & op::CMD_INTE != 0
    }

    /// Plugs `device` into 1-based `port` while the guest runs.
    pub fn attach(&mut self, port: u8, device: Box<dyn UsbDevice>) -> Result<(), XhciError> {
        let p = self
            .ports
            .get_mut(usize::from(port).wrapping_sub(1))
            .ok_or(XhciError::InvalidPort(port))?;
        if p.device.is_some() {
            return Err(XhciError::PortOccupied(port));
        }
        let event = p.connect(device);
        if event {
            self.port_event(port);
        }
        self.publish();
        Ok(())
    }

    /// Unplugs the device on 1-based `port`. TDs the device still held
    /// complete with USB Transaction Error; the slot stays until the guest
    /// disables it. The caller then calls [`UsbDevice::detach`] on the
    /// device it gets back, outside any lock around the controller.
    pub fn detach(&mut self, port: u8) -> Result<Box<dyn UsbDevice>, XhciError> {
        let p = self
            .ports
            .get_mut(usize::from(port).wrapping_sub(1))
            .ok_or(XhciError::InvalidPort(port))?;
        let generation = p.generation;
        let (dev, event) = p.disconnect();
        let dev = dev.ok_or(XhciError::PortEmpty(port))?;
        self.fail_pending_transfers(port, generation);
        if event {
            self.port_event(port);
        }
        self.publish();
        Ok(dev)
    }

    /// Posts a Port Status Change Event (when running) and sets USBSTS.PCD.
    pub(super) fn port_event(&mut self, port: u8) {
        self.usbsts |= op::STS_PCD;
        if self.running() {
            self.post_event(Trb::port_status_change(port), true);
        } else if self.port_ref(port).is_some_and(Port::wake_pending) {
            // Halted (suspended) or in D3hot: an armed wake asks for PME.
            self.pme_request = true;
        }
    }

    /// Turns on interrupt moderation: from now on an interrupt due before
    /// IMODC runs out is deferred, `timer` is armed for it and the owner
    /// calls [`Xhci::on_moderation_timer`] when it fires.
    pub fn set_moderation(&mut self, timer: Arc<dyn ModerationTimer>, clock: Arc<dyn Clock>) {
        self.moderation = Some(ModerationHooks {
            timer,
            clock,
            armed: None,
        });
    }

    fn clock(&self) -> Option<&dyn Clock> {
        self.moderation.as_ref().map(|m| m.clock.as_ref())
    }

    /// When a deferred (moderated) interrupt is due, if one is.
    pub fn next_interrupt_deadline(&self) -> Option<Instant> {
        self.interrupter.moderation.deadline()
    }

    /// Arms the moderation timer for a newly deferred interrupt.
    fn arm_moderation_timer(&mut self) {
        let deadline = self.interrupter.moderation.deadline();
        if let (Some(m), Some(at)) = (self.moderation.as_mut(), deadline) {
            if m.armed != Some(at) {
                log::debug!("xhci: interrupt deferred by moderation");
                m.armed = Some(at);
                m.timer.arm(at);
            }
        }
    }

    /// The moderation timer fired: delivers the deferred interrupt if it is
    /// due and still wanted (events pending, EHB clear, running), else arms
    /// the timer again for a deadline that moved.
    pub fn on_moderation_timer(&mut self) {
        let running = self.running();
        let Some(m) = self.moderation.as_mut() else {
            return;
        };
        m.armed = None;
        if !running {
            // A halted controller signals nothing: drop the deferred
            // interrupt instead of re-arming for its (past) deadline.
            self.interrupter.moderation.clear();
            self.publish();
            return;
        }
        if self.interrupter.moderation_expired(m.clock.as_ref()) {
            self.usbsts |= op::STS_EINT;
            self.signal();
        } else {
            // IP may have been asserted without a delivery (IE clear).
            self.publish();
        }
        self.arm_moderation_timer();
    }

    /// Posts an event on interrupter 0 and raises the interrupt if due.
    pub(super) fn post_event(&mut self, trb: Trb, raise: bool) {
        let mem = self.mem.memory();
        let clock = self.moderation.as_ref().map(|m| m.clock.as_ref());
        let posted = self.interrupter.post(&mem, trb, raise, clock);
        drop(mem);
        self.arm_moderation_timer();
        match posted {
            Posted::Written(irq) => {
                self.usbsts |= op::STS_EINT;
                if irq {
                    self.signal();
                }
            }
            Posted::Queued => {}
            Posted::NoRing => {
                log::warn!("xhci: no usable event ring; host system error");
                self.host_system_error();
            }
        }
    }

    /// Serves guest reads of the registers from `shadow` from now on (the
    /// VMM maps it read-only over the BAR).
    pub fn set_read_shadow(&mut self, shadow: Arc<dyn ReadShadow>) {
        for off in shadow::constant() {
            shadow.store(off, self.read_dword(off));
        }
        self.shadow = Some(shadow);
        self.publish();
    }

    /// Brings the read shadow up to date.
    fn publish(&self) {
        if let Some(s) = &self.shadow {
            for off in shadow::changing(self.ports.len()) {
                s.store(off, self.read_dword(off));
            }
        }
    }

    fn signal(&self) {
        // The handler reads the registers the shadow serves: publish first.
        self.publish();
        if self.d3hot {
            return;
        }
        if self.usbcmd & op::CMD_INTE != 0 && self.interrupter.asserted() {
            self.irq.trigger(INTERRUPTER_VECTOR);
        }
    }

    /// A fatal guest-caused error (section 4.10.2.6): HSE, controller halts.
    pub(super) fn host_system_error(&mut self) {
        self.usbsts |= op::STS_HSE | op::STS_HCH;
        self.usbcmd &= !op::CMD_RUN;
        self.cmd_running = false;
        // Halted, as after Run/Stop: no deferred interrupt.
        self.interrupter.moderation.clear();
        if self.usbcmd & op::CMD_HSEE != 0 {
            self.publish();
            self.irq.trigger(INTERRUPTER_VECTOR);
        }
    }

    pub(super) fn complete_command(&mut self, addr: u64, code: CompletionCode, slot: u8) {
        self.post_event(Trb::command_completion(addr, code, slot), true);
    }

    /// HCRST (section 4.2): everything back to power-on state; attached
    /// devices stay plugged in and are reset.
    fn hc_reset(&mut self) {
        self.usbcmd = 0;
        self.usbsts = op::STS_HCH;
        self.dnctrl = 0;
        self.crcr = 0;
        self.cmd_ring = RingCursor::default();
        self.cmd_running = false;
        self.dcbaap = 0;
        self.config_reg = 0;
        self.interrupter = Interrupter::new();
        self.slots = vec![Slot::default(); MAX_SLOTS];
        self.saved = None;
        for p in &mut self.ports {
            p.hc_reset();
        }
    }

    /// Save State (USBCMD.CSS, section 4.23.2), only while halted: keeps the
    /// event ring's producer state. Slot, endpoint and port state live in
    /// this struct and survive as they are, so the save completes at once
    /// (USBSTS.SSS is set and cleared inside the write).
    fn save_state(&mut self) {
        if self.usbsts & op::STS_HCH == 0 {
            log::debug!("xhci: CSS while running ignored");
            return;
        }
        self.saved = self.interrupter.save();
        log::debug!(
            "xhci: state saved (event ring valid: {})",
            self.saved.is_some()
        );
    }

    /// Restore State (USBCMD.CRS), only while halted: the event ring goes
    /// back to where Save State left it, after the guest's ERSTBA write-back
    /// reset it. With nothing valid saved (no CSS since power-on or HCRST,
    /// or another segment table now) USBSTS.SRE tells the guest to
    /// re-initialise.
    fn restore_state(&mut self) {
        if self.usbsts & op::STS_HCH == 0 {
            log::debug!("xhci: CRS while running ignored");
            return;
        }
        let ok = match self.saved.take() {
            Some(saved) => self.interrupter.restore(&saved),
            None => false,
        };
        if ok {
            log::debug!("xhci: state restored");
        } else {
            log::info!("xhci: nothing valid to restore: Save/Restore Error");
            self.usbsts |= op::STS_SRE;
        }
    }

    fn write_usbcmd(&mut self, value: u32) {
        if value & op::CMD_HCRST != 0 {
            self.hc_reset();
            return;
        }
        let was_running = self.usbcmd & op::CMD_RUN != 0;
        self.usbcmd = value & op::CMD_RW_MASK;
        let run = value & op::CMD_RUN != 0;
        if run && !was_running && self.usbsts & op::STS_HSE == 0 {
            self.usbsts &= !op::STS_HCH;
            // Report connections that happened while halted.
            for i in 0..self.ports.len() {
                if self.ports[i].has_change() {
                    self.post_event(Trb::port_status_change(i as u8 + 1), true);
                }
            }
        } else if !run {
            self.usbsts |= op::STS_HCH;
            self.cmd_running = false;
            // A halted controller signals nothing: no deferred interrupt.
            self.interrupter.moderation.clear();
        }
        if value & op::CMD_CSS != 0 {
            self.save_state();
        }
        if value & op::CMD_CRS != 0 {
            self.restore_state();
        }
        // Both operations complete inside this write: SSS/RSS read 0.
        self.usbsts &= !(op::STS_SSS | op::STS_RSS);
        self.signal();
    }

    fn write_crcr(&mut self, value: u64) {
        if self.cmd_running {
            // Only CS/CA act while the ring runs (section 5.4.5).
            if value & (op::CRCR_CA | op::CRCR_CS) != 0 {
                // Commands run to completion inside the doorbell write, so
                // nothing is mid-execution: both CA and CS just stop the ring
                // (section 4.6.1.2) and report where it stopped.
                self.cmd_running = false;
                let code = CompletionCode::CommandRingStopped;
                self.complete_command(self.cmd_ring.dequeue, code, 0);
            }
            return;
        }
        self.crcr = value;
        self.cmd_ring = RingCursor::new(value & op::CRCR_PTR_MASK, value & op::CRCR_RCS != 0);
    }

    fn read_crcr(&self) -> u64 {
        if self.cmd_running {
            op::CRCR_CRR
        } else {
            0
        }
    }

    /// A doorbell ring signalled outside the MMIO path (an ioeventfd on the
    /// doorbell register of `slot`, value `target`): the same work as the
    /// register write.
    pub fn ring_doorbell(&mut self, slot: u8, target: u8) {
        self.write_doorbell(usize::from(slot), u32::from(target));
        self.publish();
    }

    fn write_doorbell(&mut self, slot: usize, value: u32) {
        if !self.running() {
            return;
        }
        let target = (value & 0xff) as u8;
        if slot == 0 {
            if target == 0 {
                // Reset Device, Address Device, endpoint resets and
                // restarts after a resume run here: a reset path.
                let _path = PmPath::enter("xhci command ring");
                self.cmd_running = true;
                self.process_commands();
            }
            return;
        }
        // Control transfers (Bulk-Only reset, re-enumeration after a port
        // reset) are part of the reset paths too; bulk data is not.
        let _path = (target == 1).then(|| PmPath::enter("xhci default control endpoint"));
        self.ring_endpoint(slot as u8, target);
    }

    /// A PORTSC write. Resets (PR, WPR) and link resumes out of U3 are
    /// resume/reset paths (NOIO). A resume touches guest memory (the
    /// device's output context is brought up to date, the Port Status
    /// Change event is posted) before the device's volume flows again, as a
    /// resuming device restores its state before it takes I/O.
    fn write_portsc(&mut self, i: usize, value: u32) {
        let Some(p) = self.ports.get_mut(i) else {
            return;
        };
        let port = i as u8 + 1;
        let was_u3 = p.link_state() == regs::port::PLS_U3;
        let reset = value & (regs::port::PR | regs::port::WPR) != 0;
        let link = value & regs::port::LWS != 0;
        let _path = if reset {
            Some(PmPath::enter(format!("xhci port {port} reset")))
        } else if link && was_u3 {
            Some(PmPath::enter(format!("xhci port {port} resume from U3")))
        } else {
            None
        };
        let event = p.write_portsc(value);
        let woke = was_u3 && p.link_state() != regs::port::PLS_U3;
        if woke {
            self.refresh_device_contexts(port);
        }
        if event {
            self.port_event(port);
        }
        if woke {
            if let Some(p) = self.ports.get_mut(i) {
                p.resume_device();
            }
        }
    }

    /// Writes the slot and endpoint contexts of the device on `port` back
    /// to its output device context (resume: the guest reads them next).
    fn refresh_device_contexts(&mut self, port: u8) {
        let generation = self.port_ref(port).map(|p| p.generation);
        let mem = self.mem.memory();
        for slot in &mut self.slots {
            if slot.port != port || Some(slot.generation) != generation || slot.output == 0 {
                continue;
            }
            slot.write_slot_ctx(&mem);
            for dci in 1..=super::slot::NUM_DCI as u8 {
                if slot.ep(dci).is_some_and(|e| e.state != EpState::Disabled) {
                    slot.write_ep_ctx(&mem, dci);
                }
            }
        }
    }

    /// Whether a device on this controller sleeps (link in U3 or the
    /// controller in D3hot). Then every access to the controller is a NOIO
    /// path: the resume takes the same lock, so a holder that waited on
    /// backing I/O blocked by the sleeping device's quiesced volume would
    /// hold the resume up (the deadlock one step removed).
    pub fn device_sleeps(&self) -> bool {
        self.d3hot
            || self
                .ports
                .iter()
                .any(|p| p.device_suspended() == Some(true))
    }

    fn cap_read(&self, offset: u64) -> u32 {
        let ports = self.ports.len() as u32;
        match offset {
            cap::CAPLENGTH_HCIVERSION => (cap::HCIVERSION << 16) | regs::CAP_LENGTH as u32,
            // MaxSlots, MaxIntrs = 1, MaxPorts.
            cap::HCSPARAMS1 => MAX_SLOTS as u32 | (1 << 8) | (ports << 24),
            // IST = 0, ERST Max, no scratchpad buffers.
            cap::HCSPARAMS2 => cap::ERST_MAX_EXP << 4,
            cap::HCSPARAMS3 => 0,
            cap::HCCPARAMS1 => cap::HCCPARAMS1_AC64 | (((XECP_BASE / 4) as u32) << 16),
            cap::DBOFF => DB_BASE as u32,
            cap::RTSOFF => RT_BASE as u32,
            cap::HCCPARAMS2 => 0,
            _ => 0,
        }
    }

    /// Supported Protocol capabilities: USB 2 range, then USB 3 range (section 7.2).
    fn xcap_read(&self, offset: u64) -> u32 {
        let dw = (offset / 4) as u32;
        let per = regs::xcap::SUPPORTED_PROTOCOL_DWORDS;
        let (index, word) = (dw / per, dw % per);
        let n2 = u32::from(self.config.usb2_ports);
        let n3 = u32::from(self.config.usb3_ports);
        let ranges: Vec<(u32, u32, u32)> = [(2u32, 1u32, n2), (3, n2 + 1, n3)]
            .into_iter()
            .filter(|r| r.2 > 0)
            .collect();
        let Some(&(major, first, count)) = ranges.get(index as usize) else {
            return 0;
        };
        let next = if (index as usize) + 1 < ranges.len() {
            per
        } else {
            0
        };
        match word {
            0 => regs::xcap::ID_SUPPORTED_PROTOCOL | (next << 8) | (major << 24),
            1 => regs::xcap::NAME_USB,
            2 => first | (count << 8),
            _ => 0, // Protocol Slot Type 0
        }
    }

    fn read_dword(&self, offset: u64) -> u32 {
        match offset {
            o if o < OP_BASE => self.cap_read(o),
            o if (OP_BASE..PORT_BASE).contains(&o) => match o - OP_BASE {
                op::USBCMD => self.usbcmd,
                op::USBSTS => self.usbsts,
                op::PAGESIZE => op::PAGESIZE_4K,
                op::DNCTRL => self.dnctrl,
                op::CRCR_LO => self.read_crcr() as u32,
                op::CRCR_HI => (self.read_crcr() >> 32) as u32,
                op::DCBAAP_LO => self.dcbaap as u32,
                op::DCBAAP_HI => (self.dcbaap >> 32) as u32,
                op::CONFIG => self.config_reg,
                _ => 0,
            },
            o if (PORT_BASE..XECP_BASE).contains(&o) => {
                let i = ((o - PORT_BASE) / regs::PORT_STRIDE) as usize;
                match (self.ports.get(i), (o - PORT_BASE) % regs::PORT_STRIDE) {
                    (Some(p), regs::port::PORTSC) => p.portsc(),
                    _ => 0,
                }
            }
            o if (XECP_BASE..RT_BASE).contains(&o) => self.xcap_read(o - XECP_BASE),
            o if (RT_BASE..DB_BASE).contains(&o) => {
                let r = o - RT_BASE;
                let ir = &self.interrupter;
                match r {
                    rt::MFINDEX => {
                        // 125 us microframes, 14 bits.
                        ((self.started.elapsed().as_micros() / 125) & 0x3fff) as u32
                    }
                    _ if (rt::IR0..rt::IR0 + 0x20).contains(&r) => match r - rt::IR0 {
                        rt::IMAN => ir.iman,
                        rt::IMOD => ir.read_imod(self.clock().map(|c| c.now())),
                        rt::ERSTSZ => ir.erstsz,
                        rt::ERSTBA_LO => ir.erstba as u32,
                        rt::ERSTBA_HI => (ir.erstba >> 32) as u32,
                        rt::ERDP_LO => ir.erdp as u32,
                        rt::ERDP_HI => (ir.erdp >> 32) as u32,
                        _ => 0,
                    },
                    _ => 0,
                }
            }
            // Doorbells read as 0.
            _ => 0,
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            o if o < OP_BASE => {} // capability registers are read-only
            o if (OP_BASE..PORT_BASE).contains(&o) => match o - OP_BASE {
                op::USBCMD => {
                    let _path = match value {
                        v if v & op::CMD_HCRST != 0 => {
                            Some(PmPath::enter("xhci controller reset (HCRST)"))
                        }
                        v if v & op::CMD_CRS != 0 => {
                            Some(PmPath::enter("xhci restore state (CRS)"))
                        }
                        _ => None,
                    };
                    self.write_usbcmd(value)
                }
                op::USBSTS => self.usbsts &= !(value & op::STS_RW1C_MASK),
                op::DNCTRL => self.dnctrl = value & op::DNCTRL_RW_MASK,
                op::CRCR_LO => self.write_crcr(lo(self.crcr)),
                op::CRCR_HI => self.write_crcr(hi(self.crcr)),
                op::DCBAAP_LO => self.dcbaap = lo(self.dcbaap) & op::DCBAAP_MASK,
                op::DCBAAP_HI => self.dcbaap = hi(self.dcbaap) & op::DCBAAP_MASK,
                op::CONFIG => self.config_reg = value & op::CONFIG_RW_MASK,
                _ => {}
            },
            o if (PORT_BASE..XECP_BASE).contains(&o) => {
                let i = ((o - PORT_BASE) / regs::PORT_STRIDE) as usize;
                if (o - PORT_BASE) % regs::PORT_STRIDE == regs::port::PORTSC {
                    self.write_portsc(i, value);
                }
            }
            o if (RT_BASE..DB_BASE).contains(&o) => {
                let r = o - RT_BASE;
                if !(rt::IR0..rt::IR0 + 0x20).contains(&r) {
                    return;
                }
                let mem = self.mem.memory();
                let clock = self.moderation.as_ref().map(|m| m.clock.as_ref());
                let ir = &mut self.interrupter;
                let raise = match r - rt::IR0 {
                    rt::IMAN => ir.write_iman(value),
                    rt::IMOD => {
                        ir.write_imod(value, clock.map(|c| c.now()));
                        false
                    }
                    rt::ERSTSZ => {
                        ir.erstsz = value & rt::ERSTSZ_MASK;
                        false
                    }
                    rt::ERSTBA_LO => {
                        ir.erstba = lo(ir.erstba) & rt::ERSTBA_MASK;
                        ir.load_erst(&mem);
                        false
                    }
                    rt::ERSTBA_HI => {
                        ir.erstba = hi(ir.erstba) & rt::ERSTBA_MASK;
                        ir.load_erst(&mem);
                        false
                    }
                    rt::ERDP_LO => {
                        let v = lo(ir.erdp & !rt::ERDP_EHB) | (u64::from(value) & rt::ERDP_EHB);
                        ir.write_erdp(&mem, v, clock)
                    }
                    rt::ERDP_HI => {
                        let v = hi(ir.erdp) & !rt::ERDP_EHB;
                        ir.write_erdp(&mem, v, clock)
                    }
                    _ => false,
                };
                drop(mem);
                self.arm_moderation_timer();
                if raise {
                    // IP was asserted again (section 5.4.2: EINT follows IP).
                    self.usbsts |= op::STS_EINT;
                    self.signal();
                }
            }
            o if (DB_BASE..regs::MMIO_SIZE).contains(&o) => {
                self.write_doorbell(((o - DB_BASE) / 4) as usize, value);
            }
            _ => {}
        }
    }

    /// A read of `data.len()` bytes at `offset` within the BAR.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let aligned = offset & !3;
        let shift = (offset & 3) as usize;
        match data.len() {
            8 if shift == 0 => {
                let lo = u64::from(self.read_dword(aligned));
                let hi = u64::from(self.read_dword(aligned + 4));
                data.copy_from_slice(&(lo | (hi << 32)).to_le_bytes());
            }
            1 | 2 | 4 if shift + data.len() <= 4 => {
                let v = self.read_dword(aligned).to_le_bytes();
                data.copy_from_slice(&v[shift..shift + data.len()]);
            }
            _ => data.fill(0),
        }
    }

    /// A write of `data` at `offset` within the BAR (4- or 8-byte accesses;
    /// 8-byte ones act as low dword then high dword).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 {
            return;
        }
        match *data {
            [a, b, c, d] => self.write_dword(offset, u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => {
                self.write_dword(offset, u32::from_le_bytes([a, b, c, d]));
                self.write_dword(offset + 4, u32::from_le_bytes([e, f, g, h]));
            }
            _ => log::debug!("xhci: ignored {}-byte write at {offset:#x}", data.len()),
        }
        self.publish();
    }

    /// Slot `id` (1-based) if it exists.
    pub(super) fn slot_mut(&mut self, id: u8) -> Option<&mut Slot> {
        let max = self.max_slots_enabled();
        if id == 0 || usize::from(id) > max {
            return None;
        }
        self.slots.get_mut(usize::from(id) - 1)
    }

    /// CONFIG.MaxSlotsEn bounded by what we implement.
    pub(super) fn max_slots_enabled(&self) -> usize {
        ((self.config_reg & 0xff) as usize).min(MAX_SLOTS)
    }

    /// Slot state of `id` (for tests and diagnostics).
    pub fn slot_state(&self, id: u8) -> Option<super::slot::SlotState> {
        self.slots
            .get(usize::from(id).checked_sub(1)?)
            .map(|s| s.state)
    }

    /// Endpoint state of (`slot`, `dci`).
    pub fn endpoint_state(&self, slot: u8, dci: u8) -> Option<EpState> {
        let s = self.slots.get(usize::from(slot).checked_sub(1)?)?;
        s.endpoints
            .get(usize::from(dci).checked_sub(1)?)
            .map(|e| e.state)
    }
}

impl BusDevice for Xhci {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data);
    }
}
