//! The xHCI controller as a PCI function (xHCI 1.2 section 5.2: PCI
//! configuration registers).
//!
//! | BAR | size   | contents                                      |
//! |-----|--------|-----------------------------------------------|
//! | 0   | 16 KiB | the xHCI register space ([`Xhci::mmio_read`]) |
//! | 1   | 4 KiB  | MSI-X table (0x000) and PBA (0x800)           |
//!
//! One MSI-X vector serves interrupter 0. With [`XhciPci::add_intx`] the
//! controller also has an INTA# pin, used while the guest leaves MSI-X off
//! (`pci=nomsi`, or a driver without MSI-X): the pin follows the
//! interrupter's condition (IMAN.IP && IMAN.IE && USBCMD.INTE) and drops
//! when the guest acknowledges it. Without it the interrupt pin reads 0. A PCI power
//! management capability advertises D3hot with PME from D3hot and
//! No_Soft_Reset, which Linux needs before it runtime-suspends the function
//! (see `shared/reference/linux-guest-usb-pm.md`); the controller keeps its
//! state across D3hot (no DMA or interrupts while there, its devices
//! suspended), and a wake event the guest armed a port for (connect with
//! WCE, disconnect with WDE, a device's remote wake) while the controller is
//! halted or in D3hot sets PME_Status, which the guest polls.

use std::sync::Arc;

use thiserror::Error;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::{Xhci, XhciConfig, XhciError, MMIO_SIZE};
use crate::noio::PmPath;
use crate::pci::msix::MsixLayout;
use crate::pci::{
    BarKind, BarSpec, IntxPin, IrqLevel, MsiRouter, Msix, PciConfig, PciDevice, PciError,
    PciFunction, PciIds, PciInterrupt, PmOptions, PowerState,
};
use crate::usb::UsbDevice;

/// BAR holding the xHCI registers (xHCI 1.2 section 5.2.1: MBAR at 0x10).
pub const XHCI_BAR: u8 = 0;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0;
const MSIX_PBA_OFFSET: u64 = 0x800;
/// One vector: interrupter 0 (the controller has MaxIntrs = 1).
const MSIX_VECTORS: u16 = 1;

/// Red Hat's QEMU device ids: 1b36:000d is QEMU's `qemu-xhci`. Linux 6.1
/// xhci-pci binds by class and applies no vendor quirk to this id, so the
/// guest treats the controller as a plain xHCI 1.2 host.
pub const XHCI_VENDOR_ID: u16 = 0x1b36;
pub const XHCI_DEVICE_ID: u16 = 0x000d;
pub const XHCI_REVISION: u8 = 0x01;
/// Serial bus controller (0x0C), USB (0x03), xHCI programming interface
/// (0x30) (xHCI 1.2 section 5.2.1).
pub const XHCI_CLASS_CODE: u32 = 0x0c_03_30;
/// Serial Bus Release Number register: USB 3.0 (xHCI 1.2 section 5.2.3).
const SBRN_OFFSET: usize = 0x60;
const SBRN_USB30: u8 = 0x30;
/// Frame Length Adjustment register default (xHCI 1.2 section 5.2.4).
const FLADJ_OFFSET: usize = 0x61;
const FLADJ_DEFAULT: u8 = 0x20;

#[derive(Debug, Error)]
pub enum XhciPciError {
    #[error("PCI configuration")]
    Pci(#[from] PciError),
    #[error("xHCI controller")]
    Xhci(#[from] XhciError),
}

/// How the controller's interrupt reaches the guest (see
/// [`XhciPci::delivery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptDelivery {
    Msix,
    Intx { asserted: bool },
    None,
}

/// An xHCI controller on PCI.
pub struct XhciPci {
    function: PciFunction,
    xhci: Xhci,
    msix: Msix,
    intx: Option<Arc<IntxPin>>,
}

impl XhciPci {
    /// A controller with `config`'s ports whose interrupter 0 fires MSI-X
    /// vector 0 through `msi_router`.
    pub fn new(
        config: XhciConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        msi_router: Arc<dyn MsiRouter>,
    ) -> Result<Self, XhciPciError> {
        let mut pci = PciConfig::new(PciIds {
            vendor_id: XHCI_VENDOR_ID,
            device_id: XHCI_DEVICE_ID,
            revision: XHCI_REVISION,
            class_code: XHCI_CLASS_CODE,
            subsystem_vendor_id: XHCI_VENDOR_ID,
            subsystem_id: 0x1100,
        });
        pci.add_bar(BarSpec {
            index: XHCI_BAR,
            size: MMIO_SIZE,
            kind: BarKind::Mem32,
        })?;
        pci.add_bar(BarSpec {
            index: MSIX_BAR,
            size: MSIX_BAR_SIZE,
            kind: BarKind::Mem32,
        })?;
        pci.set_interrupt_pin(0);
        pci.set_bytes(SBRN_OFFSET, &[SBRN_USB30, FLADJ_DEFAULT]);
        debug_assert_eq!(FLADJ_OFFSET, SBRN_OFFSET + 1);
        let msix = Msix::new(
            MsixLayout {
                vectors: MSIX_VECTORS,
                table_bar: MSIX_BAR,
                table_offset: MSIX_TABLE_OFFSET,
                pba_bar: MSIX_BAR,
                pba_offset: MSIX_PBA_OFFSET,
            },
            msi_router,
        )?;
        let mut function = PciFunction::new(pci);
        function.add_msix(msix.clone())?;
        function.add_power_management(PmOptions {
            pme: true,
            no_soft_reset: true,
        })?;
        let xhci = Xhci::new(config, mem, msix.interrupt())?;
        Ok(Self {
            function,
            xhci,
            msix,
            intx: None,
        })
    }

    /// Gives the controller an INTA# pin wired to interrupt input `irq`
    /// through `line` (the INTx fallback; see the module docs).
    pub fn add_intx(&mut self, irq: u8, line: Arc<dyn IrqLevel>) {
        let pin = self.function.add_intx(irq, line);
        self.xhci
            .set_interrupt(PciInterrupt::new(self.msix.clone(), Some(pin.clone())));
        self.intx = Some(pin);
    }

    /// Drives the INTx pin from the interrupter's condition after a register
    /// write may have changed it (IMAN.IP acknowledged, INTE cleared).
    fn sync_intx(&self) {
        if let Some(pin) = &self.intx {
            if !self.msix.enabled() {
                pin.set_pending(self.xhci.interrupt_asserted());
            }
        }
    }

    /// How interrupter 0 is delivered right now: MSI-X, or the INTx pin
    /// and its level (`None` without a pin: nothing is delivered).
    pub fn delivery(&self) -> InterruptDelivery {
        match &self.intx {
            _ if self.msix.enabled() => InterruptDelivery::Msix,
            Some(pin) => InterruptDelivery::Intx {
                asserted: pin.asserted(),
            },
            None => InterruptDelivery::None,
        }
    }

    pub fn xhci(&self) -> &Xhci {
        &self.xhci
    }

    pub fn xhci_mut(&mut self) -> &mut Xhci {
        &mut self.xhci
    }

    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// Serves guest reads of the registers from `shadow` (see
    /// [`crate::xhci::shadow`]).
    pub fn set_read_shadow(&mut self, shadow: Arc<dyn super::ReadShadow>) {
        self.xhci.set_read_shadow(shadow);
    }

    /// Turns on interrupt moderation (see [`crate::xhci::moderation`]).
    pub fn set_moderation(
        &mut self,
        timer: Arc<dyn super::ModerationTimer>,
        clock: Arc<dyn super::Clock>,
    ) {
        self.xhci.set_moderation(timer, clock);
    }

    /// The moderation timer fired: deliver a deferred interrupt.
    pub fn on_moderation_timer(&mut self) {
        let _noio = self.noio_while_a_device_sleeps();
        self.xhci.on_moderation_timer();
        self.sync_intx();
    }

    /// A doorbell write that arrived by ioeventfd: dropped, as the BAR write
    /// would be, while the function does not decode memory (D3hot, Memory
    /// Space disabled).
    pub fn doorbell(&mut self, slot: u8, target: u8) {
        let _noio = self.noio_while_a_device_sleeps();
        if self.function.bar_access_allowed() {
            self.xhci.ring_doorbell(slot, target);
        }
    }

    /// A NOIO path for as long as a device on the controller sleeps (see
    /// [`Xhci::device_sleeps`]).
    fn noio_while_a_device_sleeps(&self) -> Option<PmPath> {
        self.xhci
            .device_sleeps()
            .then(|| PmPath::enter("xhci access while a device sleeps"))
    }

    /// Plugs `device` into 1-based root hub `port` (hotplug).
    pub fn attach(&mut self, port: u8, device: Box<dyn UsbDevice>) -> Result<(), XhciError> {
        let _noio = self.noio_while_a_device_sleeps();
        self.xhci.attach(port, device)?;
        self.signal_pme();
        Ok(())
    }

    /// Unplugs the device on 1-based root hub `port` (hot-unplug). The
    /// caller calls [`UsbDevice::detach`] on it once it has let go of the
    /// controller's lock.
    pub fn detach(&mut self, port: u8) -> Result<Box<dyn UsbDevice>, XhciError> {
        let _noio = self.noio_while_a_device_sleeps();
        let dev = self.xhci.detach(port)?;
        self.signal_pme();
        Ok(dev)
    }

    /// A host-side wake request for the suspended device on `port` (see
    /// [`Xhci::remote_wake`]); PME when the controller is not running.
    pub fn remote_wake(&mut self, port: u8) -> Result<(), XhciError> {
        self.xhci.remote_wake(port)?;
        self.signal_pme();
        self.sync_intx();
        Ok(())
    }

    /// PMCSR as diagnostics show it: (PME_En, PME_Status).
    pub fn pme_bits(&self) -> (bool, bool) {
        self.function.pme_bits()
    }

    /// Sets PME_Status (PM 1.2 section 3.2.4) for a wake event the
    /// controller reported; the guest polls it while the function sleeps.
    fn signal_pme(&mut self) {
        if self.xhci.take_pme_request() && self.function.request_pme() {
            log::debug!("xhci: PME signalled ({:?})", self.function.power_state());
        }
    }
}

impl PciDevice for XhciPci {
    fn function(&self) -> &PciFunction {
        &self.function
    }

    fn function_mut(&mut self) -> &mut PciFunction {
        &mut self.function
    }

    fn power_transition(&mut self, from: PowerState, to: PowerState) {
        // No_Soft_Reset: the register file and rings stay as they are.
        log::debug!("xhci: PCI power state {from:?} -> {to:?}");
        match to {
            PowerState::D3Hot => self.xhci.enter_d3hot(),
            PowerState::D0 => self.xhci.leave_d3hot(),
        }
        self.signal_pme();
        self.sync_intx();
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        match index {
            XHCI_BAR if offset < MMIO_SIZE => self.xhci.mmio_read(offset, data),
            MSIX_BAR if self.msix.bar_read(index, offset, data) => {}
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        match index {
            XHCI_BAR if offset < MMIO_SIZE => {
                let _noio = self.noio_while_a_device_sleeps();
                self.xhci.mmio_write(offset, data);
                self.signal_pme();
                self.sync_intx();
            }
            MSIX_BAR => {
                self.msix.bar_write(index, offset, data);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::msix::test_router::RecordingRouter;
    use crate::pci::msix::MSIX_CTRL_ENABLE;
    use crate::pci::pm::{PMCSR_NO_SOFT_RESET, PMCSR_PME_STATUS, PMC_PME_D3HOT, PM_PMC, PM_PMCSR};
    use crate::pci::{
        CAPABILITIES_POINTER, CAP_ID_MSIX, CAP_ID_POWER_MANAGEMENT, COMMAND, COMMAND_BUS_MASTER,
        COMMAND_MEMORY_SPACE,
    };
    use crate::usb::mass_storage::tests::TempImage;
    use crate::usb::mass_storage::{MassStorage, MassStorageConfig};
    use crate::xhci::regs::{cap, op, rt, OP_BASE, PORT_BASE, RT_BASE};
    use crate::xhci::trb::{trb_type, ErstEntry, Trb};

    const PORTSC_PP: u32 = 1 << 9;
    const PORTSC_CSC: u32 = 1 << 17;
    const ERST: u64 = 0x3000;
    const EVENT_RING: u64 = 0x4000;

    fn device() -> (XhciPci, Arc<RecordingRouter>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let router = Arc::new(RecordingRouter::default());
        let dev = XhciPci::new(
            XhciConfig {
                usb2_ports: 2,
                usb3_ports: 2,
            },
            GuestMemoryAtomic::new(mem.clone()),
            router.clone(),
        )
        .unwrap();
        (dev, router, mem)
    }

    fn cfg16(d: &mut XhciPci, off: usize) -> u16 {
        let mut b = [0u8; 2];
        d.config_read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn cfg32(d: &mut XhciPci, off: usize) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn bar_r32(d: &mut XhciPci, bar: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn bar_w32(d: &mut XhciPci, bar: u8, off: u64, v: u32) {
        d.bar_write(bar, off, &v.to_le_bytes());
    }

    /// Finds capability `id` by walking the list as the guest does.
    fn find_cap(d: &mut XhciPci, id: u8) -> Option<usize> {
        let mut p = usize::from(cfg16(d, CAPABILITIES_POINTER) as u8);
        for _ in 0..48 {
            if p == 0 {
                return None;
            }
            let hdr = cfg16(d, p);
            if hdr as u8 == id {
                return Some(p);
            }
            p = usize::from((hdr >> 8) as u8);
        }
        None
    }

    #[test]
    fn config_space_identity_class_and_capabilities() {
        let (mut d, _, _) = device();
        assert_eq!(cfg32(&mut d, 0), 0x000d_1b36);
        // Revision in byte 8, class code 0C0330 above it.
        assert_eq!(cfg32(&mut d, 0x08), 0x0c03_3001);
        assert_eq!(cfg16(&mut d, 0x3c) >> 8, 0, "no INTx pin");
        let mut sbrn = [0u8; 1];
        d.config_read(SBRN_OFFSET, &mut sbrn);
        assert_eq!(sbrn[0], SBRN_USB30);
        // Both BARs are sized as declared.
        d.config_write(0x10, &[0xff; 4]);
        assert_eq!(cfg32(&mut d, 0x10), !(MMIO_SIZE as u32 - 1));
        d.config_write(0x14, &[0xff; 4]);
        assert_eq!(cfg32(&mut d, 0x14), !(MSIX_BAR_SIZE as u32 - 1));
        // MSI-X: one vector, table and PBA in BAR 1.
        let m = find_cap(&mut d, CAP_ID_MSIX).expect("MSI-X capability");
        assert_eq!(cfg16(&mut d, m + 2) & 0x7ff, MSIX_VECTORS - 1);
        assert_eq!(cfg32(&mut d, m + 4), MSIX_TABLE_OFFSET as u32 | 1);
        assert_eq!(cfg32(&mut d, m + 8), MSIX_PBA_OFFSET as u32 | 1);
        // PM: D3hot with PME from D3hot, No_Soft_Reset.
        let p = find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).expect("PM capability");
        assert_ne!(cfg16(&mut d, p + PM_PMC) & PMC_PME_D3HOT, 0);
        assert_ne!(cfg16(&mut d, p + PM_PMCSR) & PMCSR_NO_SOFT_RESET, 0);
    }

    #[test]
    fn bar0_reaches_the_registers_and_other_offsets_do_not() {
        let (mut d, _, _) = device();
        let v = bar_r32(&mut d, XHCI_BAR, cap::CAPLENGTH_HCIVERSION);
        assert_eq!(v, 0x0120_0040, "HCIVERSION 1.2, CAPLENGTH 0x40");
        let hcs1 = bar_r32(&mut d, XHCI_BAR, cap::HCSPARAMS1);
        assert_eq!(hcs1 >> 24, 4, "MaxPorts");
        // A register write through the BAR sticks.
        bar_w32(&mut d, XHCI_BAR, OP_BASE + op::CONFIG, 5);
        assert_eq!(bar_r32(&mut d, XHCI_BAR, OP_BASE + op::CONFIG), 5);
        assert!(!d.xhci().running());
        // Past the register space and on unknown BARs: reads 0, writes dropped.
        assert_eq!(bar_r32(&mut d, XHCI_BAR, MMIO_SIZE), 0);
        assert_eq!(bar_r32(&mut d, 3, 0), 0);
        bar_w32(&mut d, 3, 0, 0xffff_ffff);
        // BAR 1 is the MSI-X table: vector 0 starts masked.
        assert_eq!(bar_r32(&mut d, MSIX_BAR, 12), 1);
        bar_w32(&mut d, MSIX_BAR, 8, 0x4021);
        assert_eq!(bar_r32(&mut d, MSIX_BAR, 8), 0x4021);
    }

    /// Enables MSI-X vector 0 and the controller with a one-segment event ring.
    fn start(d: &mut XhciPci, mem: &GuestMemoryMmap) {
        start_with(d, mem, true)
    }

    /// Programs the controller as Linux does, with MSI-X or (`msix` false)
    /// leaving it off as `pci=nomsi` does.
    fn start_with(d: &mut XhciPci, mem: &GuestMemoryMmap, msix: bool) {
        let cmd = COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;
        d.config_write(COMMAND, &cmd.to_le_bytes());
        if msix {
            let m = find_cap(d, CAP_ID_MSIX).unwrap();
            d.config_write(m + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
            bar_w32(d, MSIX_BAR, 0, 0xfee0_0000);
            bar_w32(d, MSIX_BAR, 8, 0x41);
            bar_w32(d, MSIX_BAR, 12, 0); // unmask
        }
        let entry = ErstEntry {
            base: EVENT_RING,
            size: 16,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(ERST)).unwrap();
        bar_w32(d, XHCI_BAR, RT_BASE + rt::IR0 + rt::ERSTSZ, 1);
        d.bar_write(
            XHCI_BAR,
            RT_BASE + rt::IR0 + rt::ERDP_LO,
            &EVENT_RING.to_le_bytes(),
        );
        d.bar_write(
            XHCI_BAR,
            RT_BASE + rt::IR0 + rt::ERSTBA_LO,
            &ERST.to_le_bytes(),
        );
        bar_w32(d, XHCI_BAR, RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE);
        bar_w32(
            d,
            XHCI_BAR,
            OP_BASE + op::USBCMD,
            op::CMD_RUN | op::CMD_INTE,
        );
        assert!(d.xhci().running());
    }

    /// The interrupt handler's IMAN write: IP acknowledged (RW1C), IE kept.
    fn ack_interrupt(d: &mut XhciPci) {
        bar_w32(
            d,
            XHCI_BAR,
            RT_BASE + rt::IR0 + rt::IMAN,
            rt::IMAN_IE | rt::IMAN_IP,
        );
    }

    /// The driver consumes the first event (ERDP past it, EHB cleared) and
    /// acknowledges port 3's connect change (PP kept, CSC cleared), so a
    /// disconnect raises a new change.
    fn consume_event_and_ack_port_3(d: &mut XhciPci) {
        d.bar_write(
            XHCI_BAR,
            RT_BASE + rt::IR0 + rt::ERDP_LO,
            &((EVENT_RING + 16) | rt::ERDP_EHB).to_le_bytes(),
        );
        bar_w32(d, XHCI_BAR, PORT_BASE + 2 * 0x10, PORTSC_PP | PORTSC_CSC);
    }

    #[test]
    fn intx_pin_follows_the_interrupter_when_msix_is_off() {
        use crate::pci::intx::tests::RecordingLine;
        use crate::pci::intx::PIN_INTA;
        let (mut d, router, mem) = device();
        let line = Arc::new(RecordingLine::default());
        d.add_intx(18, line.clone());
        let mut pin = [0u8; 2];
        d.config_read(crate::pci::INTERRUPT_LINE, &mut pin);
        assert_eq!(pin, [18, PIN_INTA]);
        start_with(&mut d, &mem, false);
        let img = TempImage::new(64);
        let disk = MassStorage::new(img.open(false), MassStorageConfig::default());
        d.attach(3, Box::new(disk)).unwrap();
        assert!(router.take_fired().is_empty(), "no MSI-X while it is off");
        assert_eq!(
            *line.0.lock().unwrap(),
            vec![true],
            "port change asserts INTA#"
        );
        let status = cfg16(&mut d, crate::pci::STATUS);
        assert_ne!(status & crate::pci::intx::STATUS_INTERRUPT, 0);
        // What a hang report shows at this point: the line up, IP and EHB
        // set, the port change event not consumed.
        assert_eq!(d.delivery(), InterruptDelivery::Intx { asserted: true });
        let st = d.xhci().interrupt_state();
        assert!(st.asserted && st.events_pending && !st.deferred, "{st:?}");
        assert_eq!(st.iman & 3, 3, "IP and IE: {st:?}");
        assert_ne!(st.erdp & 8, 0, "EHB: {st:?}");
        // The handler acknowledges IMAN.IP (RW1C): the pin drops.
        ack_interrupt(&mut d);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        assert_eq!(d.delivery(), InterruptDelivery::Intx { asserted: false });
        assert!(!d.xhci().interrupt_state().asserted);
        consume_event_and_ack_port_3(&mut d);
        // Command.Interrupt Disable holds the next one back until cleared.
        let cmd = COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;
        d.config_write(
            COMMAND,
            &(cmd | crate::pci::COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        d.detach(3).unwrap();
        assert_eq!(line.0.lock().unwrap().len(), 2, "disabled: no edge");
        d.config_write(COMMAND, &cmd.to_le_bytes());
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true]);
    }

    #[test]
    fn moderation_timer_of_the_worker_delivers_a_deferred_intx_interrupt() {
        use crate::pci::intx::tests::RecordingLine;
        let (mut d, _router, mem) = device();
        let line = Arc::new(RecordingLine::default());
        d.add_intx(18, line.clone());
        start_with(&mut d, &mem, false);
        // The longest interval (16.4 ms), so the test runs well inside it.
        bar_w32(&mut d, XHCI_BAR, RT_BASE + rt::IR0 + rt::IMOD, 0xffff);
        let dev = Arc::new(std::sync::Mutex::new(d));
        let events = crate::xhci::doorbell_events(1).unwrap();
        let mut worker = crate::xhci::DoorbellWorker::new(dev.clone(), events).unwrap();
        let img = TempImage::new(64);
        let disk = MassStorage::new(img.open(false), MassStorageConfig::default());
        dev.lock().unwrap().attach(3, Box::new(disk)).unwrap();
        assert_eq!(*line.0.lock().unwrap(), vec![true], "first one at once");
        {
            let mut d = dev.lock().unwrap();
            ack_interrupt(&mut d);
            consume_event_and_ack_port_3(&mut d);
            d.detach(3).unwrap();
            assert!(d.xhci().next_interrupt_deadline().is_some(), "deferred");
        }
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        // Before the deadline the timer has not fired: reading it does not
        // block and nothing is delivered.
        worker.moderation_timer();
        assert_eq!(line.0.lock().unwrap().len(), 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        worker.moderation_timer();
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true]);
        assert_eq!(dev.lock().unwrap().xhci().next_interrupt_deadline(), None);
    }

    #[test]
    fn hotplug_event_fires_msix_vector_0() {
        let (mut d, router, mem) = device();
        assert_eq!(d.delivery(), InterruptDelivery::None, "no MSI-X, no pin");
        start(&mut d, &mem);
        assert_eq!(d.delivery(), InterruptDelivery::Msix);
        assert!(router.take_fired().is_empty());
        let img = TempImage::new(64);
        let disk = MassStorage::new(img.open(false), MassStorageConfig::default());
        d.attach(3, Box::new(disk)).unwrap();
        assert_eq!(router.take_fired(), vec![0], "one MSI-X message");
        let routes = router.routes.lock().unwrap().clone();
        assert_eq!(routes.last().map(|r| (r.0, r.1.data)), Some((0, 0x41)));
        // The event on the ring is a Port Status Change for port 3.
        let ev: Trb = mem.read_obj(GuestAddress(EVENT_RING)).unwrap();
        assert_eq!(ev.trb_type(), trb_type::PORT_STATUS_CHANGE);
        assert_eq!(ev.parameter >> 24, 3);
        let portsc = bar_r32(&mut d, XHCI_BAR, PORT_BASE + 2 * 0x10);
        assert_eq!(portsc & 1, 1, "CCS on port 3");
        // Masked vector: the next event sets the pending bit instead.
        bar_w32(&mut d, MSIX_BAR, 12, 1);
        ack_interrupt(&mut d);
        consume_event_and_ack_port_3(&mut d);
        d.detach(3).unwrap();
        assert!(router.take_fired().is_empty());
        assert_eq!(bar_r32(&mut d, MSIX_BAR, MSIX_PBA_OFFSET) & 1, 1);
        bar_w32(&mut d, MSIX_BAR, 12, 0);
        assert_eq!(
            router.take_fired(),
            vec![0],
            "unmask delivers the pending vector"
        );
    }

    const PORTSC_WCE: u32 = 1 << 25;
    const PORTSC_WDE: u32 = 1 << 26;
    const PMCSR_PME_EN: u16 = 1 << 8;

    fn portsc_offset(port: u8) -> u64 {
        PORT_BASE + (u64::from(port) - 1) * 0x10
    }

    /// What Linux does on the way to D3hot: halt the controller (R/S
    /// cleared), arm the ports' wake bits, then pci_pme_active (PME_En set,
    /// PME_Status cleared in the same write), then PowerState = D3hot.
    fn runtime_suspend(d: &mut XhciPci, wake_bits: u32, pm: usize) {
        bar_w32(d, XHCI_BAR, OP_BASE + op::USBCMD, op::CMD_INTE);
        for port in 1..=4 {
            bar_w32(d, XHCI_BAR, portsc_offset(port), PORTSC_PP | wake_bits);
        }
        d.config_write(pm, &(PMCSR_PME_EN | PMCSR_PME_STATUS).to_le_bytes());
        d.config_write(pm, &(PMCSR_PME_EN | 3).to_le_bytes());
    }

    fn disk(img: &TempImage) -> Box<MassStorage> {
        Box::new(MassStorage::new(
            img.open(false),
            MassStorageConfig::default(),
        ))
    }

    #[test]
    fn pme_status_follows_the_ports_wake_bits() {
        let img = TempImage::new(64);
        // (wake bits, connect?) -> PME expected.
        let cases = [
            (0, true, false),
            (PORTSC_WCE, true, true),
            (PORTSC_WDE, true, false),
            (0, false, false),
            (PORTSC_WDE, false, true),
            (PORTSC_WCE, false, false),
            (PORTSC_WCE | PORTSC_WDE, true, true),
            (PORTSC_WCE | PORTSC_WDE, false, true),
        ];
        for (bits, connect, pme) in cases {
            let (mut d, router, mem) = device();
            start(&mut d, &mem);
            let p = find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).unwrap() + PM_PMCSR;
            if !connect {
                d.attach(3, disk(&img)).unwrap();
                bar_w32(&mut d, XHCI_BAR, portsc_offset(3), PORTSC_PP | PORTSC_CSC);
            }
            runtime_suspend(&mut d, bits, p);
            assert!(!d.function().bar_access_allowed(), "no decoding in D3hot");
            assert_eq!(cfg16(&mut d, p) & PMCSR_PME_STATUS, 0);
            router.take_fired();
            if connect {
                d.attach(3, disk(&img)).unwrap();
            } else {
                let mut dev = d.detach(3).unwrap();
                dev.detach();
            }
            let got = cfg16(&mut d, p) & PMCSR_PME_STATUS != 0;
            assert_eq!(got, pme, "wake bits {bits:#x}, connect {connect}");
            assert!(router.take_fired().is_empty(), "no interrupt from D3hot");
            // Back to D0 (No_Soft_Reset): the state is kept and the change
            // waits in the port for the guest's resume.
            d.config_write(p, &PMCSR_PME_STATUS.to_le_bytes());
            assert_eq!(cfg16(&mut d, p) & (PMCSR_PME_STATUS | 3), 0);
            assert_eq!(d.xhci().portsc(3).unwrap() & 1, u32::from(connect));
            assert_ne!(d.xhci().portsc(3).unwrap() & PORTSC_CSC, 0);
        }
    }

    #[test]
    fn a_connect_while_halted_in_d0_is_signalled_again_in_d3hot() {
        let (mut d, _router, mem) = device();
        start(&mut d, &mem);
        let p = find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).unwrap() + PM_PMCSR;
        // xhci_suspend has halted the controller and armed WCE...
        bar_w32(&mut d, XHCI_BAR, OP_BASE + op::USBCMD, op::CMD_INTE);
        bar_w32(&mut d, XHCI_BAR, portsc_offset(3), PORTSC_PP | PORTSC_WCE);
        // ...a disk is plugged in before the D3hot write: PME_Status in D0.
        let img = TempImage::new(64);
        d.attach(3, disk(&img)).unwrap();
        assert_ne!(cfg16(&mut d, p) & PMCSR_PME_STATUS, 0);
        // pci_pme_active clears it; entering D3hot signals the armed,
        // still unseen connect again, so the guest's PME poll finds it.
        d.config_write(p, &(PMCSR_PME_EN | PMCSR_PME_STATUS).to_le_bytes());
        assert_eq!(cfg16(&mut d, p) & PMCSR_PME_STATUS, 0);
        d.config_write(p, &(PMCSR_PME_EN | 3).to_le_bytes());
        assert_ne!(cfg16(&mut d, p) & PMCSR_PME_STATUS, 0);
    }

    #[test]
    fn d3hot_suspends_attached_devices_and_d0_resumes_them() {
        let (mut d, router, mem) = device();
        start(&mut d, &mem);
        let p = find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).unwrap() + PM_PMCSR;
        let img = TempImage::new(64);
        let image = img.open(false);
        let vol = image.volume().clone();
        let dev = MassStorage::new(image, MassStorageConfig::default());
        d.attach(3, Box::new(dev)).unwrap();
        runtime_suspend(&mut d, PORTSC_WDE, p);
        router.take_fired();
        assert!(d.xhci().in_d3hot());
        assert!(vol.is_quiesced(), "D3hot quiesces the device's volume");
        assert_eq!(d.xhci().port_power()[2].device_suspended, Some(true));
        assert_eq!(d.pme_bits(), (true, false));
        // A host wake request for a device the guest did not suspend (its
        // link is in U0) is refused; the controller stays asleep.
        assert!(d.remote_wake(3).is_err());
        d.config_write(p, &0u16.to_le_bytes());
        assert!(!d.xhci().in_d3hot());
        assert!(!vol.is_quiesced(), "D0 resumes it");
        assert_eq!(d.xhci().port_power()[2].device_suspended, Some(false));
        assert!(router.take_fired().is_empty());
    }

    #[test]
    fn remote_wake_from_d3hot_sets_pme_status() {
        let (mut d, _router, mem) = device();
        start(&mut d, &mem);
        let p = find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).unwrap() + PM_PMCSR;
        let img = TempImage::new(64);
        d.attach(3, disk(&img)).unwrap();
        // The guest suspends the link (U3), then the controller.
        let u3 = PORTSC_PP | PORTSC_CSC | (1 << 16) | (3 << 5);
        bar_w32(&mut d, XHCI_BAR, portsc_offset(3), u3);
        assert_eq!((d.xhci().portsc(3).unwrap() >> 5) & 0xf, 3);
        runtime_suspend(&mut d, PORTSC_WDE, p);
        assert_eq!(cfg16(&mut d, p) & PMCSR_PME_STATUS, 0);
        d.remote_wake(3).unwrap();
        assert_ne!(cfg16(&mut d, p) & PMCSR_PME_STATUS, 0);
        assert_eq!((d.xhci().portsc(3).unwrap() >> 5) & 0xf, 15, "PLS = Resume");
        assert_eq!(d.xhci().port_power()[2].device_suspended, Some(false));
    }

    /// Records whether each MSI-X message was sent from a NOIO scope.
    #[derive(Default)]
    struct NoioRouter(std::sync::Mutex<Vec<bool>>);
    impl MsiRouter for NoioRouter {
        fn set_route(&self, _: u16, _: crate::pci::MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
        fn fire(&self, _: u16) -> std::io::Result<()> {
            self.0.lock().unwrap().push(crate::noio::is_noio());
            Ok(())
        }
    }

    #[test]
    fn every_register_write_is_a_noio_path_while_a_device_sleeps() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let router = Arc::new(NoioRouter::default());
        let cfg = XhciConfig {
            usb2_ports: 2,
            usb3_ports: 2,
        };
        let mut d = XhciPci::new(cfg, GuestMemoryAtomic::new(mem.clone()), router.clone()).unwrap();
        start(&mut d, &mem);
        let img = TempImage::new(64);
        d.attach(3, disk(&img)).unwrap();
        // The guest acknowledges the interrupt, then re-enables it with IP
        // pending again: the write delivers the interrupt.
        let ack_and_reenable = |d: &mut XhciPci| {
            bar_w32(d, XHCI_BAR, RT_BASE + rt::IR0 + rt::IMAN, 0);
            bar_w32(d, XHCI_BAR, RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE);
        };
        router.0.lock().unwrap().clear();
        ack_and_reenable(&mut d);
        assert_eq!(
            *router.0.lock().unwrap(),
            vec![false],
            "nothing sleeps: ordinary"
        );
        // Port 3's link to U3: its device sleeps.
        let u3 = PORTSC_PP | PORTSC_CSC | (1 << 16) | (3 << 5);
        bar_w32(&mut d, XHCI_BAR, portsc_offset(3), u3);
        assert!(d.xhci().device_sleeps());
        router.0.lock().unwrap().clear();
        ack_and_reenable(&mut d);
        assert_eq!(
            *router.0.lock().unwrap(),
            vec![true],
            "a device sleeps: NOIO"
        );
        assert!(!crate::noio::is_noio(), "the scope ended with the write");
    }

    const CMD_RING: u64 = 0x5000;

    /// Queues a No Op command (cycle 1) and points CRCR at it.
    fn queue_noop_command(d: &mut XhciPci, mem: &GuestMemoryMmap) {
        let trb = Trb {
            parameter: 0,
            status: 0,
            control: 1,
        }
        .with_type(trb_type::NOOP_COMMAND);
        mem.write_obj(trb, GuestAddress(CMD_RING)).unwrap();
        d.bar_write(
            XHCI_BAR,
            OP_BASE + op::CRCR_LO,
            &(CMD_RING | op::CRCR_RCS).to_le_bytes(),
        );
    }

    fn first_event(mem: &GuestMemoryMmap) -> Trb {
        mem.read_obj(GuestAddress(EVENT_RING)).unwrap()
    }

    #[test]
    fn doorbell_eventfd_runs_the_command_ring_on_the_worker() {
        let (mut d, router, mem) = device();
        start(&mut d, &mem);
        queue_noop_command(&mut d, &mem);
        let dev = Arc::new(std::sync::Mutex::new(d));
        let events = crate::xhci::doorbell_events(4).unwrap();
        assert_eq!(events.len(), 1 + 4 * 31);
        let cmd = events
            .iter()
            .position(|e| e.slot == 0 && e.target == 0)
            .unwrap();
        assert_eq!(events[cmd].bar_offset(), crate::xhci::regs::DB_BASE);
        assert_eq!(events[5].bar_offset(), crate::xhci::regs::DB_BASE + 4);
        assert_eq!(events[5].datamatch(), 5);
        events[cmd].fd.write(1).unwrap();
        let mut worker = crate::xhci::DoorbellWorker::new(dev.clone(), events.clone()).unwrap();
        worker.ring(cmd);
        let ev = first_event(&mem);
        assert_eq!(ev.trb_type(), trb_type::COMMAND_COMPLETION);
        assert_eq!(ev.parameter, CMD_RING);
        assert_eq!(ev.completion_code(), 1, "Success");
        assert_eq!(router.take_fired(), vec![0], "interrupt from the worker");
        // The eventfd was reset: a second read finds nothing.
        assert!(events[cmd].fd.read().is_err());
        // Out-of-range index: ignored.
        worker.ring(usize::MAX);
    }

    #[test]
    fn doorbell_eventfd_is_dropped_while_the_function_is_in_d3hot() {
        let (mut d, router, mem) = device();
        start(&mut d, &mem);
        queue_noop_command(&mut d, &mem);
        let p = find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).unwrap() + PM_PMCSR;
        d.config_write(p, &3u16.to_le_bytes());
        d.doorbell(0, 0);
        assert_eq!(first_event(&mem).control & 1, 0, "no event in D3hot");
        assert!(router.take_fired().is_empty());
        d.config_write(p, &0u16.to_le_bytes());
        d.doorbell(0, 0);
        assert_eq!(first_event(&mem).trb_type(), trb_type::COMMAND_COMPLETION);
    }

    /// Seeded random configuration and BAR accesses of every width and
    /// offset (power states, command bits, BAR moves, MSI-X table and PBA,
    /// INTx): nothing panics, the read-only identity stays, the capability
    /// list still ends, and BAR sizing still reports the BAR sizes.
    #[test]
    fn random_config_and_bar_accesses_leave_a_sane_function() {
        use crate::pci::{BAR0, INTERRUPT_LINE};
        use crate::test_rng::Rng;
        let line = Arc::new(crate::pci::intx::tests::RecordingLine::default());
        for seed in 0..20 {
            let (mut d, _router, _mem) = device();
            d.add_intx(18, line.clone());
            let mut rng = Rng::new(seed);
            for _ in 0..2000 {
                let width = rng.pick(&[1usize, 2, 4, 8]);
                match rng.below(4) {
                    0 => {
                        let off = rng.below(260) as usize;
                        let v = rng.bytes(width);
                        d.config_write(off, &v);
                    }
                    1 => {
                        let off = rng.below(260) as usize;
                        d.config_read(off, &mut vec![0; width]);
                    }
                    2 => {
                        let bar = rng.below(3) as u8;
                        let off = rng.below(MMIO_SIZE + 16);
                        let v = rng.bytes(width);
                        d.bar_write(bar, off, &v);
                    }
                    _ => {
                        let bar = rng.below(3) as u8;
                        let off = rng.below(MMIO_SIZE + 16);
                        d.bar_read(bar, off, &mut vec![0; width]);
                    }
                }
            }
            assert_eq!(cfg32(&mut d, 0), 0x000d_1b36, "seed {seed}");
            assert_eq!(cfg32(&mut d, 0x08), 0x0c03_3001, "seed {seed}");
            assert!(find_cap(&mut d, CAP_ID_MSIX).is_some(), "seed {seed}");
            assert!(
                find_cap(&mut d, CAP_ID_POWER_MANAGEMENT).is_some(),
                "seed {seed}"
            );
            for (bar, size) in [(XHCI_BAR, MMIO_SIZE), (MSIX_BAR, MSIX_BAR_SIZE)] {
                let off = BAR0 + 4 * usize::from(bar);
                d.config_write(off, &u32::MAX.to_le_bytes());
                let mask = cfg32(&mut d, off) & !0xf;
                assert_eq!(mask, !(size as u32 - 1), "seed {seed} BAR {bar}");
            }
            // The interrupt line register is plain read-write storage.
            d.config_write(INTERRUPT_LINE, &[0x5a]);
            assert_eq!(cfg16(&mut d, INTERRUPT_LINE) as u8, 0x5a, "seed {seed}");
        }
    }
}
