//! The virtio-pci transport, modern interface only (§4.1): one PCI function
//! per virtio device, its structures in BAR 0, MSI-X table and PBA in BAR 1.
//!
//! BAR 0 layout:
//!
//! | offset  | structure                          |
//! |---------|------------------------------------|
//! | 0x0000  | common configuration (§4.1.4.3)    |
//! | 0x1000  | ISR status (§4.1.4.5)              |
//! | 0x2000  | device configuration (§4.1.4.6)    |
//! | 0x3000  | notifications, 4 bytes per queue (§4.1.4.4) |
//!
//! The VMM should register one ioeventfd per queue at the notify addresses
//! from [`VirtioPciDevice::ioeventfds`]; a notify write that reaches the BAR
//! instead (no ioeventfd) signals the same eventfd, so both paths behave alike.

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common_cfg::{Action, CommonCfg, QueueConfig, COMMON_CFG_LEN};
use super::{
    ActivateError, ActivatedQueue, Activation, VirtioDevice, VirtioInterrupt, WorkerHost, WorkerId,
    STATUS_DEVICE_NEEDS_RESET, VIRTIO_RING_F_EVENT_IDX,
};
use crate::pci::msix::MsixLayout;
use crate::pci::{
    BarKind, BarSpec, Capability, ConfigWriteEffects, MsiRouter, Msix, PciConfig, PciDevice,
    PciError, PciFunction, PciIds, CAP_ID_VENDOR_SPECIFIC,
};

/// BAR holding the virtio structures.
pub const VIRTIO_BAR: u8 = 0;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;
const VIRTIO_BAR_SIZE: u64 = 0x4000;
const COMMON_CFG_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 4;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Queue `n` notifies at `NOTIFY_OFFSET + n * NOTIFY_OFF_MULTIPLIER` (§4.1.4.4).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0;
const MSIX_PBA_OFFSET: u64 = 0x800;
/// Vectors that fit the table area (0x800 / 16): one per queue plus config.
const MAX_VECTORS: u16 = 128;
/// At most this many queues, all notify offsets inside the notify area.
const MAX_QUEUES: usize = (DEVICE_CFG_LEN / NOTIFY_OFF_MULTIPLIER as u64) as usize;

/// Red Hat, Inc., the virtio PCI vendor (§4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + device type (§4.1.2).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Revision 1: a modern-only device (§4.1.2.1).
pub const VIRTIO_PCI_REVISION: u8 = 1;

// Virtio PCI capability cfg_type values (§4.1.4).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// struct virtio_pci_cap is 16 bytes; the notify cap adds a multiplier.
const VIRTIO_PCI_CAP_LEN: u8 = 16;
/// Offsets inside the VIRTIO_PCI_CAP_PCI_CFG capability (§4.1.4.9).
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

#[derive(Debug, Error)]
pub enum VirtioPciError {
    #[error("PCI configuration")]
    Pci(#[from] PciError),
    #[error("{0} queues is more than the transport supports")]
    TooManyQueues(usize),
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
}

/// What the transport needs from the VMM.
pub struct VirtioPciOptions {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Delivers this function's MSI-X vectors.
    pub msi_router: Arc<dyn MsiRouter>,
    /// Runs the device's worker (an [`super::EventLoop`]).
    pub workers: Arc<dyn WorkerHost>,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    function: PciFunction,
    device: Box<dyn VirtioDevice>,
    msix: Msix,
    interrupt: VirtioInterrupt,
    common: CommonCfg,
    events: Vec<EventFd>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    workers: Arc<dyn WorkerHost>,
    worker: Option<WorkerId>,
    pci_cfg_cap: usize,
}

fn virtio_cap(cfg_type: u8, bar: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // Bytes after cap_vndr and cap_next (§4.1.4).
    let mut body = vec![
        VIRTIO_PCI_CAP_LEN + extra.len() as u8,
        cfg_type,
        bar,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciDevice {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        opts: VirtioPciOptions,
    ) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes();
        let n = sizes.len();
        if n == 0 || n > MAX_QUEUES || n + 1 > usize::from(MAX_VECTORS) {
            return Err(VirtioPciError::TooManyQueues(n));
        }
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            revision: VIRTIO_PCI_REVISION,
            class_code: device.pci_class(),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        config.add_bar(BarSpec {
            index: VIRTIO_BAR,
            size: VIRTIO_BAR_SIZE,
            kind: BarKind::Mem32,
        })?;
        config.add_bar(BarSpec {
            index: MSIX_BAR,
            size: MSIX_BAR_SIZE,
            kind: BarKind::Mem32,
        })?;
        let notify_len = n as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        let caps: [(u8, u64, u64, Vec<u8>); 4] = [
            (
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_LEN,
                vec![],
            ),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, vec![]),
            (
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_LEN,
                vec![],
            ),
            (
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                NOTIFY_OFF_MULTIPLIER.to_le_bytes().to_vec(),
            ),
        ];
        for (t, off, len, extra) in caps {
            let body = virtio_cap(t, VIRTIO_BAR, off, len, &extra);
            config.add_capability(&Capability {
                id: CAP_ID_VENDOR_SPECIFIC,
                body: &body,
                writable: &[],
                rw1c: &[],
            })?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and data are writable.
        let body = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, &[0; 4]);
        let mut writable = vec![0u8; body.len()];
        writable[PCI_CFG_BAR - 2] = 0xff;
        writable[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_cap = usize::from(config.add_capability(&Capability {
            id: CAP_ID_VENDOR_SPECIFIC,
            body: &body,
            writable: &writable,
            rw1c: &[],
        })?);

        let msix = Msix::new(
            MsixLayout {
                vectors: n as u16 + 1,
                table_bar: MSIX_BAR,
                table_offset: MSIX_TABLE_OFFSET,
                pba_bar: MSIX_BAR,
                pba_offset: MSIX_PBA_OFFSET,
            },
            opts.msi_router,
        )?;
        let mut function = PciFunction::new(config);
        function.add_msix(msix.clone())?;
        let interrupt = VirtioInterrupt::new(msix.interrupt(), n);
        let events = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        let common = CommonCfg::new(device.device_features(), &sizes);
        Ok(Self {
            function,
            device,
            msix,
            interrupt,
            common,
            events,
            mem: opts.mem,
            workers: opts.workers,
            worker: None,
            pci_cfg_cap,
        })
    }

    /// (guest physical address, eventfd) per queue, given where BAR 0 is.
    /// Register each with KVM_IOEVENTFD (MMIO, any length, no datamatch).
    pub fn ioeventfds(&self, bar0_address: u64) -> io::Result<Vec<(u64, EventFd)>> {
        self.events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let addr =
                    bar0_address + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                Ok((addr, e.try_clone()?))
            })
            .collect()
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    /// Features negotiated with the driver.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features
    }

    /// Whether a worker is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// Device reset (§2.4): stop the worker (waits for it), let the device
    /// drop its state, and return every register to its initial value.
    fn reset(&mut self) {
        if let Some(id) = self.worker.take() {
            if let Err(e) = self.workers.stop(id) {
                log::error!("virtio-pci: cannot stop worker: {e}");
            }
        }
        self.device.reset();
        self.common.reset();
        self.interrupt.reset();
        // Stale notifications must not wake the next activation's worker
        // with old work; the eventfds are nonblocking, so this cannot hang.
        for e in &self.events {
            let _ = e.read();
        }
    }

    fn build_queue(
        &self,
        index: usize,
        cfg: &QueueConfig,
    ) -> Result<ActivatedQueue, ActivateError> {
        let bad = |e: virtio_queue::Error| ActivateError::BadQueue(index as u16, e.to_string());
        let mut q = Queue::new(cfg.max_size).map_err(bad)?;
        q.try_set_size(cfg.size).map_err(bad)?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(bad)?;
        q.try_set_avail_ring_address(GuestAddress(cfg.driver))
            .map_err(bad)?;
        q.try_set_used_ring_address(GuestAddress(cfg.device))
            .map_err(bad)?;
        q.set_event_idx(self.common.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        q.set_ready(true);
        if !q.is_valid(&*self.mem.memory()) {
            return Err(ActivateError::BadQueue(
                index as u16,
                "rings outside guest memory".into(),
            ));
        }
        let event = self.events[index]
            .try_clone()
            .map_err(ActivateError::EventFd)?;
        Ok(ActivatedQueue {
            index: index as u16,
            queue: q,
            event,
        })
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let mut queues = Vec::new();
        for (i, cfg) in self.common.queues.iter().enumerate() {
            if cfg.enabled {
                queues.push(self.build_queue(i, cfg)?);
            }
        }
        if queues.is_empty() {
            return Err(ActivateError::NoQueues);
        }
        let worker = self.device.activate(Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            acked_features: self.common.acked_features,
        })?;
        let id = self.workers.start(worker).map_err(ActivateError::Worker)?;
        self.worker = Some(id);
        Ok(())
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        match self.common.write(offset, data, &self.interrupt, &self.msix) {
            Action::None => {}
            Action::Reset => self.reset(),
            Action::Activate => {
                if let Err(e) = self.activate() {
                    // §2.1.2: tell the driver the device needs a reset.
                    log::error!("virtio-pci: activation failed: {e}");
                    self.device.reset();
                    self.common.status |= STATUS_DEVICE_NEEDS_RESET;
                    self.interrupt.signal_config();
                }
            }
        }
    }

    fn notify(&self, offset: u64) {
        let q = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Some(e) = self.events.get(q as usize) {
            if let Err(err) = e.write(1) {
                log::error!("virtio-pci: notify queue {q}: {err}");
            }
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window (§4.1.4.9): (bar, offset, length)
    /// when it names a valid access.
    fn pci_cfg_window(&self) -> Option<(u8, u64, usize)> {
        let c = self.function.config();
        let base = self.pci_cfg_cap;
        let mut bar = [0u8; 1];
        c.read(base + PCI_CFG_BAR, &mut bar);
        let offset = u64::from(c.read_u32(base + PCI_CFG_OFFSET));
        let len = c.read_u32(base + PCI_CFG_LENGTH) as usize;
        matches!(len, 1 | 2 | 4).then_some((bar[0], offset, len))
    }

    fn touches_pci_cfg_data(&self, offset: usize, len: usize) -> bool {
        let d = self.pci_cfg_cap + PCI_CFG_DATA;
        offset < d + 4 && d < offset.saturating_add(len)
    }
}

impl PciDevice for VirtioPciDevice {
    fn function(&self) -> &PciFunction {
        &self.function
    }

    fn function_mut(&mut self) -> &mut PciFunction {
        &mut self.function
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                let mut window = [0u8; 4];
                self.bar_read(bar, off, &mut window[..len]);
                let at = self.pci_cfg_cap + PCI_CFG_DATA;
                self.function.config_mut().set_bytes(at, &window);
            }
        }
        self.function.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigWriteEffects {
        let effects = self.function.write(offset, data);
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                let mut window = [0u8; 4];
                self.function
                    .config()
                    .read(self.pci_cfg_cap + PCI_CFG_DATA, &mut window);
                self.bar_write(bar, off, &window[..len]);
            }
        }
        effects
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match index {
            VIRTIO_BAR => match offset {
                o if o < COMMON_CFG_OFFSET + COMMON_CFG_LEN => {
                    self.common
                        .read(o - COMMON_CFG_OFFSET, data, &self.interrupt)
                }
                ISR_OFFSET => {
                    if let Some(b) = data.first_mut() {
                        *b = self.interrupt.take_isr();
                    }
                }
                o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                    self.device.read_config(o - DEVICE_CFG_OFFSET, data)
                }
                _ => {}
            },
            MSIX_BAR => {
                self.msix.bar_read(index, offset, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        match index {
            VIRTIO_BAR => match offset {
                o if o < COMMON_CFG_OFFSET + COMMON_CFG_LEN => {
                    self.write_common(o - COMMON_CFG_OFFSET, data)
                }
                o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                    self.device.write_config(o - DEVICE_CFG_OFFSET, data)
                }
                o if (NOTIFY_OFFSET..VIRTIO_BAR_SIZE).contains(&o) => {
                    self.notify(o - NOTIFY_OFFSET)
                }
                _ => {}
            },
            MSIX_BAR => {
                self.msix.bar_write(index, offset, data);
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if let Some(id) = self.worker.take() {
            let _ = self.workers.stop(id);
        }
    }
}
