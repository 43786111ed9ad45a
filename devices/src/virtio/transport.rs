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
/// Where the notification area starts in the virtio BAR.
pub const NOTIFY_OFFSET: u64 = 0x3000;
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
        // A reset path must never wait on backing I/O of guest memory: this
        // runs on a vCPU thread, and the disk being reset may carry the swap.
        // It waits for the worker's current batch, so the worker's thread
        // is NOIO for that long too (the scope travels with the wait).
        let _path = crate::noio::PmPath::enter("virtio-pci reset");
        let _loan = self.workers.lend_noio();
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
        // Re-activation after a reset is the other half of the reset path.
        let _path = crate::noio::PmPath::enter("virtio-pci activation");
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::block::RawImage;
    use crate::pci::msix::test_router::RecordingRouter;
    use crate::pci::msix::MSIX_CTRL_ENABLE;
    use crate::pci::{
        CAPABILITIES_POINTER, CAP_ID_MSIX, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE,
    };
    use crate::virtio::block::{
        Block, BlockOptions, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use crate::virtio::common_cfg::*;
    use crate::virtio::test_utils::{guest_memory, TempImage, TestRing};
    use crate::virtio::{EventLoop, *};

    const MEM: usize = 16 << 20;

    struct Driver {
        dev: VirtioPciDevice,
        router: Arc<RecordingRouter>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        _image: TempImage,
        _el: Arc<EventLoop>,
    }

    fn driver(num_queues: u16) -> Driver {
        let image = TempImage::new(64 * 1024);
        let disk = RawImage::open(&image.0, false, "t").unwrap();
        let block = Block::new(
            disk,
            BlockOptions {
                id: "vda".into(),
                num_queues,
                queue_size: 64,
            },
        )
        .unwrap();
        let el = EventLoop::spawn("test-virtio").unwrap();
        let router = Arc::new(RecordingRouter::default());
        let mem = guest_memory(MEM);
        let dev = VirtioPciDevice::new(
            Box::new(block),
            VirtioPciOptions {
                mem: mem.clone(),
                msi_router: router.clone(),
                workers: el.clone(),
            },
        )
        .unwrap();
        Driver {
            dev,
            router,
            mem,
            _image: image,
            _el: el,
        }
    }

    impl Driver {
        fn w(&mut self, off: u64, v: u64, len: usize) {
            self.dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
        }
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.bar_read(VIRTIO_BAR, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn status(&mut self) -> u8 {
            self.r(DEVICE_STATUS, 1) as u8
        }
        fn set_status(&mut self, s: u8) {
            self.w(DEVICE_STATUS, u64::from(s), 1);
        }
        fn features(&mut self) -> u64 {
            self.w(DEVICE_FEATURE_SELECT, 0, 4);
            let lo = self.r(DEVICE_FEATURE, 4);
            self.w(DEVICE_FEATURE_SELECT, 1, 4);
            lo | self.r(DEVICE_FEATURE, 4) << 32
        }
        fn ack(&mut self, f: u64) {
            self.w(DRIVER_FEATURE_SELECT, 0, 4);
            self.w(DRIVER_FEATURE, f & 0xffff_ffff, 4);
            self.w(DRIVER_FEATURE_SELECT, 1, 4);
            self.w(DRIVER_FEATURE, f >> 32, 4);
        }
        fn acked(&mut self) -> u64 {
            self.w(DRIVER_FEATURE_SELECT, 0, 4);
            let lo = self.r(DRIVER_FEATURE, 4);
            self.w(DRIVER_FEATURE_SELECT, 1, 4);
            lo | self.r(DRIVER_FEATURE, 4) << 32
        }
        /// PCI command + MSI-X enable with every vector unmasked.
        fn enable_msix(&mut self) {
            self.dev.config_write(
                COMMAND,
                &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
            );
            let vectors = self.dev.msix().layout().vectors;
            for v in 0..u64::from(vectors) {
                let mut e = [0u8; 16];
                e[0..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
                e[8..12].copy_from_slice(&(0x30 + v as u32).to_le_bytes());
                for k in 0..4 {
                    self.dev.bar_write(
                        MSIX_BAR,
                        v * 16 + 4 * k,
                        &e[4 * k as usize..4 * k as usize + 4],
                    );
                }
            }
            let cap = find_cap(&mut self.dev, CAP_ID_MSIX, None).unwrap();
            self.dev
                .config_write(cap + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
        }
        /// The Linux driver's sequence up to DRIVER_OK with queue 0 on `ring`.
        fn bring_up(&mut self, ring: &TestRing) {
            self.set_status(STATUS_ACKNOWLEDGE);
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            let f = self.features();
            self.ack(f);
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            assert_ne!(self.status() & STATUS_FEATURES_OK, 0);
            self.w(CONFIG_MSIX_VECTOR, 0, 2);
            self.w(QUEUE_SELECT, 0, 2);
            self.w(QUEUE_SIZE, u64::from(ring.size), 2);
            self.w(QUEUE_MSIX_VECTOR, 1, 2);
            self.w(QUEUE_DESC, ring.desc, 4);
            self.w(QUEUE_DESC + 4, ring.desc >> 32, 4);
            self.w(QUEUE_DRIVER, ring.avail, 8);
            self.w(QUEUE_DEVICE, ring.used, 8);
            self.w(QUEUE_ENABLE, 1, 2);
            self.set_status(
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            );
        }
        fn notify(&mut self, q: u64) {
            self.w(NOTIFY_OFFSET + q * u64::from(NOTIFY_OFF_MULTIPLIER), q, 2);
        }
        fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
            self.mem.memory()
        }
    }

    /// Walks the capability list; `cfg_type` selects a virtio capability.
    fn find_cap(dev: &mut VirtioPciDevice, id: u8, cfg_type: Option<u8>) -> Option<usize> {
        let mut p = [0u8; 1];
        dev.config_read(CAPABILITIES_POINTER, &mut p);
        let mut off = usize::from(p[0]);
        for _ in 0..48 {
            if off == 0 {
                return None;
            }
            let mut hdr = [0u8; 4];
            dev.config_read(off, &mut hdr);
            if hdr[0] == id && cfg_type.is_none_or(|t| t == hdr[3]) {
                return Some(off);
            }
            off = usize::from(hdr[1]);
        }
        None
    }

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    const HDR: u64 = 0x20_0000;
    const DATA: u64 = 0x30_0000;
    const STATUS: u64 = 0x40_0000;

    fn read_request(d: &Driver, ring: &mut TestRing, sector: u64, status: u64) {
        let m = d.m();
        m.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(status)).unwrap();
        ring.add(
            &m,
            &[(HDR, 16, false), (DATA, 512, true), (status, 1, true)],
        );
    }

    #[test]
    fn pci_identity_and_virtio_capabilities() {
        let mut d = driver(2);
        let mut id = [0u8; 4];
        d.dev.config_read(0, &mut id);
        assert_eq!(
            u32::from_le_bytes(id),
            0x1042_1af4,
            "modern virtio-blk 0x1042"
        );
        d.dev.config_read(8, &mut id);
        assert_eq!(id[0], 1, "revision 1");
        for t in 1..=5 {
            assert!(
                find_cap(&mut d.dev, CAP_ID_VENDOR_SPECIFIC, Some(t)).is_some(),
                "cfg_type {t}"
            );
        }
        let notify = find_cap(
            &mut d.dev,
            CAP_ID_VENDOR_SPECIFIC,
            Some(VIRTIO_PCI_CAP_NOTIFY_CFG),
        )
        .unwrap();
        let mut b = [0u8; 20];
        d.dev.config_read(notify, &mut b);
        assert_eq!(b[2], 20, "cap_len");
        assert_eq!(b[4], VIRTIO_BAR);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x3000);
        assert_eq!(
            u32::from_le_bytes(b[12..16].try_into().unwrap()),
            8,
            "2 queues x 4"
        );
        assert_eq!(
            u32::from_le_bytes(b[16..20].try_into().unwrap()),
            NOTIFY_OFF_MULTIPLIER
        );
        let msix = find_cap(&mut d.dev, CAP_ID_MSIX, None).unwrap();
        let mut ctrl = [0u8; 2];
        d.dev.config_read(msix + 2, &mut ctrl);
        assert_eq!(
            u16::from_le_bytes(ctrl) & 0x7ff,
            2,
            "3 vectors: config + 2 queues"
        );
        let fds = d.dev.ioeventfds(0xc000_0000).unwrap();
        let addrs: Vec<u64> = fds.iter().map(|(a, _)| *a).collect();
        assert_eq!(addrs, vec![0xc000_3000, 0xc000_3004]);
        // The VIRTIO_PCI_CAP_PCI_CFG window reads num_queues from BAR 0.
        let win = find_cap(
            &mut d.dev,
            CAP_ID_VENDOR_SPECIFIC,
            Some(VIRTIO_PCI_CAP_PCI_CFG),
        )
        .unwrap();
        d.dev.config_write(win + 4, &[VIRTIO_BAR]);
        d.dev
            .config_write(win + 8, &(NUM_QUEUES as u32).to_le_bytes());
        d.dev.config_write(win + 12, &2u32.to_le_bytes());
        let mut data = [0u8; 2];
        d.dev.config_read(win + 16, &mut data);
        assert_eq!(u16::from_le_bytes(data), 2);
    }

    #[test]
    fn feature_negotiation_drops_unoffered_bits_and_requires_version_1() {
        let mut d = driver(1);
        let offered = d.features();
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        // Features cannot be written before DRIVER.
        d.ack(offered);
        assert_eq!(d.acked(), 0);
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        d.ack(u64::MAX);
        assert_eq!(d.acked(), offered, "unoffered bits dropped");
        // Without VERSION_1 the device refuses FEATURES_OK.
        d.ack(offered & !VIRTIO_F_VERSION_1);
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(d.status() & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK is refused too.
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        d.ack(offered);
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(d.status() & STATUS_FEATURES_OK, 0);
        // Frozen after FEATURES_OK; clearing status bits is ignored.
        d.ack(VIRTIO_F_VERSION_1);
        assert_eq!(d.acked(), offered);
        d.set_status(STATUS_ACKNOWLEDGE);
        assert_ne!(d.status() & STATUS_FEATURES_OK, 0);
        // A garbage feature select reads 0.
        d.w(DEVICE_FEATURE_SELECT, 7, 4);
        assert_eq!(d.r(DEVICE_FEATURE, 4), 0);
    }

    #[test]
    fn queue_registers_validate_what_the_driver_writes() {
        let mut d = driver(2);
        assert_eq!(d.r(NUM_QUEUES, 2), 2);
        d.w(QUEUE_SELECT, 1, 2);
        assert_eq!(d.r(QUEUE_SIZE, 2), 64);
        d.w(QUEUE_SIZE, 100, 2);
        assert_eq!(d.r(QUEUE_SIZE, 2), 64, "not a power of two");
        d.w(QUEUE_SIZE, 128, 2);
        assert_eq!(d.r(QUEUE_SIZE, 2), 64, "above the maximum");
        d.w(QUEUE_SIZE, 16, 2);
        assert_eq!(d.r(QUEUE_SIZE, 2), 16);
        assert_eq!(d.r(QUEUE_NOTIFY_OFF, 2), 1);
        d.w(QUEUE_DESC, 0x1234_5678_9abc_d000, 8);
        assert_eq!(d.r(QUEUE_DESC + 4, 4), 0x1234_5678);
        assert_eq!(d.r(QUEUE_DESC, 4), 0x9abc_d000);
        // MSI-X vectors: in range sticks, out of range reads NO_VECTOR.
        d.w(QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(d.r(QUEUE_MSIX_VECTOR, 2), 2);
        d.w(QUEUE_MSIX_VECTOR, 3, 2);
        assert_eq!(d.r(QUEUE_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        d.w(CONFIG_MSIX_VECTOR, 500, 2);
        assert_eq!(d.r(CONFIG_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        // Enabled queues are frozen.
        d.w(QUEUE_ENABLE, 1, 2);
        d.w(QUEUE_SIZE, 32, 2);
        assert_eq!(d.r(QUEUE_SIZE, 2), 16);
        d.w(QUEUE_ENABLE, 0, 2);
        assert_eq!(d.r(QUEUE_ENABLE, 2), 1, "writing 0 is ignored");
        // A nonexistent queue reads size 0 and ignores writes.
        d.w(QUEUE_SELECT, 9, 2);
        assert_eq!(d.r(QUEUE_SIZE, 2), 0);
        d.w(QUEUE_ENABLE, 1, 2);
        assert_eq!(d.r(QUEUE_ENABLE, 2), 0);
        // Odd-sized accesses read 0 and do nothing.
        assert_eq!(d.r(NUM_QUEUES, 4), 0);
        d.w(DEVICE_STATUS, 0xff, 4);
        assert_eq!(d.status(), 0);
        // Device config through BAR 0: capacity = 128 sectors.
        assert_eq!(d.r(DEVICE_CFG_OFFSET, 8), 128);
    }

    #[test]
    fn guest_driver_reads_the_disk_with_msix_interrupts() {
        let mut d = driver(1);
        d.enable_msix();
        let mut ring = TestRing::new(0x1000, 16);
        d.bring_up(&ring);
        assert!(d.dev.is_active(), "status {:#x}", d.status());
        read_request(&d, &mut ring, 3, STATUS);
        d.notify(0);
        let m = d.mem.clone();
        assert!(
            wait_for(|| ring.used_idx(&m.memory()) == 1),
            "request not completed"
        );
        let mm = d.m();
        assert_eq!(
            mm.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(mm.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 3);
        drop(mm);
        assert!(
            wait_for(|| d.router.fired().contains(&1)),
            "queue vector 1 not fired"
        );
        assert_eq!(d.router.fired(), vec![1]);
        // ISR shows the queue bit and clears on read.
        assert_eq!(d.r(ISR_OFFSET, 1), u64::from(ISR_QUEUE));
        assert_eq!(d.r(ISR_OFFSET, 1), 0);
    }

    #[test]
    fn reset_with_queued_requests_stops_the_worker_and_allows_a_new_setup() {
        let mut d = driver(1);
        d.enable_msix();
        let mut ring = TestRing::new(0x1000, 16);
        d.bring_up(&ring);
        let fds = d.dev.ioeventfds(0).unwrap();
        // A burst of requests, kicked, then an immediate reset.
        for i in 0..8 {
            read_request(&d, &mut ring, i, STATUS + 0x10 * i);
        }
        fds[0].1.write(1).unwrap();
        d.set_status(0);
        assert!(!d.dev.is_active());
        assert_eq!(d.status(), 0);
        let after_reset = ring.used_idx(&d.m());
        // More work and kicks after the reset: nothing may touch the ring.
        read_request(&d, &mut ring, 9, STATUS + 0x100);
        fds[0].1.write(1).unwrap();
        d.notify(0);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            ring.used_idx(&d.m()),
            after_reset,
            "used ring written after reset"
        );
        // Everything is back to reset values.
        assert_eq!(d.acked(), 0);
        d.w(QUEUE_SELECT, 0, 2);
        assert_eq!(d.r(QUEUE_ENABLE, 2), 0);
        assert_eq!(d.r(QUEUE_SIZE, 2), 64);
        assert_eq!(d.r(QUEUE_DESC, 8), 0);
        assert_eq!(d.r(QUEUE_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(d.r(CONFIG_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        // A fresh setup on a new ring works, through the ioeventfd path.
        let mut ring2 = TestRing::new(0x8000, 16);
        d.bring_up(&ring2);
        assert!(d.dev.is_active());
        read_request(&d, &mut ring2, 5, STATUS);
        fds[0].1.write(1).unwrap();
        let m = d.mem.clone();
        assert!(wait_for(|| ring2.used_idx(&m.memory()) == 1));
        assert_eq!(d.m().read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
        assert_eq!(ring.used_idx(&d.m()), after_reset, "old ring untouched");
    }

    #[test]
    fn activation_with_rings_outside_memory_sets_needs_reset() {
        let mut d = driver(1);
        d.enable_msix();
        let ring = TestRing::new(MEM as u64 - 0x100, 16);
        d.bring_up(&ring);
        assert!(!d.dev.is_active());
        assert_ne!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(d.router.fired(), vec![0], "config change interrupt");
        assert_eq!(d.r(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        // Reset recovers.
        d.set_status(0);
        assert_eq!(d.status(), 0);
        let ring = TestRing::new(0x1000, 16);
        d.bring_up(&ring);
        assert!(d.dev.is_active());
    }

    #[test]
    fn write_then_read_through_the_transport() {
        let mut d = driver(1);
        d.enable_msix();
        let mut ring = TestRing::new(0x1000, 16);
        d.bring_up(&ring);
        let m = d.m();
        m.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HDR)).unwrap();
        m.write_obj(7u64, GuestAddress(HDR + 8)).unwrap();
        m.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        ring.add(
            &m,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        drop(m);
        d.notify(0);
        let mem = d.mem.clone();
        assert!(wait_for(|| ring.used_idx(&mem.memory()) == 1));
        assert_eq!(d._image.bytes()[7 * 512..8 * 512], [0x77; 512]);
    }
}
