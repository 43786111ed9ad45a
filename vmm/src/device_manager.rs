//! PCI devices of the VM: the PCI bus behind ports 0xCF8-0xCFF, virtio-blk
//! disks and the virtio-balloon with their MSI-X routes and ioeventfds, the event loop that runs
//! their queues, and following the guest when it moves a BAR.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::block::{RawImage, Volume};
use devices::bus::Bus;
use devices::pci::{
    BarListener, BarMove, PciBarRegion, PciBus, PciConfigIo, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN,
};
use devices::virtio::balloon::{Balloon, BalloonHandle, BalloonOptions, BalloonSink};
use devices::virtio::block::{Block, BlockOptions};
use devices::virtio::{EventLoop, VirtioDevice, VirtioPciDevice, VirtioPciOptions, WorkerHost};
use devices::xhci::pci::XHCI_BAR;
use devices::xhci::regs::{DEFERRABLE_WRITES, MMIO_SIZE, READ_BACKED_START};
use devices::xhci::{doorbell_events, DoorbellWorker, XhciConfig, XhciPci};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IOAPIC_START, MMIO_HOLE_START};
use crate::arch::mptable;
use crate::config::{DiskConfig, UsbIo};
use crate::irq::{GsiRouting, KvmIrqLine, KvmMsiRouter};
use crate::read_slot::{ReadSlot, DEVICE_SLOT_BASE};

/// Virtqueue size offered for disks.
const DISK_QUEUE_SIZE: u16 = 256;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("PCI")]
    Pci(#[from] devices::pci::PciError),
    #[error("cannot start the device event loop")]
    EventLoop(#[from] devices::virtio::WorkerError),
    #[error("disk {id}")]
    Disk {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{name}: virtio-pci transport")]
    Virtio {
        name: String,
        #[source]
        source: devices::virtio::VirtioPciError,
    },
    #[error("virtio-balloon")]
    Balloon(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("USB controller")]
    Usb(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("bus registration")]
    Bus(#[from] devices::bus::BusError),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One KVM ioeventfd on a device's BAR 0, kept so it can follow a BAR move.
struct Ioeventfd {
    addr: u64,
    fd: Arc<EventFd>,
    /// `None`: any write to `addr` signals; `Some(v)`: only a 4-byte write of `v`.
    datamatch: Option<u32>,
}

impl Ioeventfd {
    fn register(&self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        let addr = IoEventAddress::Mmio(self.addr);
        match self.datamatch {
            None => vm.register_ioevent(&self.fd, &addr, NoDatamatch),
            Some(v) => vm.register_ioevent(&self.fd, &addr, v),
        }
    }

    fn unregister(&self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        let addr = IoEventAddress::Mmio(self.addr);
        match self.datamatch {
            None => vm.unregister_ioevent(&self.fd, &addr, NoDatamatch),
            Some(v) => vm.unregister_ioevent(&self.fd, &addr, v),
        }
    }
}

/// BAR 0 ioeventfds of the PCI devices, by PCI device number.
type BarIoeventfds = Arc<Mutex<BTreeMap<u8, Vec<Ioeventfd>>>>;
/// BAR 0 coalesced MMIO zones (address, size) by PCI device number.
type BarCoalesced = Arc<Mutex<BTreeMap<u8, Vec<(u64, u32)>>>>;
/// Size of every coalesced register (the xHCI's are dwords).
const COALESCED_REG_SIZE: u32 = 4;
/// Read-only memory slots over BAR 0 by PCI device number.
type BarReadSlots = Arc<Mutex<BTreeMap<u8, Arc<ReadSlot>>>>;

/// What this KVM offers that the device manager can use to save exits.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvmFeatures {
    /// KVM_CAP_COALESCED_MMIO: batch writes that may take effect late.
    pub coalesced_mmio: bool,
    /// KVM_CAP_READONLY_MEM: serve register reads from memory.
    pub readonly_mem: bool,
}

pub struct DeviceManager {
    vm: Arc<VmFd>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    routing: Arc<GsiRouting>,
    pci: Arc<PciBus>,
    event_loop: Arc<EventLoop>,
    /// I/O volumes of the disks, by disk id (`swap_volume=ID` shares one).
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
    /// BAR 0 ioeventfds (virtio queue notifies, xHCI doorbells) by PCI
    /// device number.
    ioeventfds: BarIoeventfds,
    /// Coalesced MMIO zones on BAR 0, when KVM has coalesced MMIO.
    coalesced: Option<BarCoalesced>,
    /// Read-only memory over BAR 0 ranges whose reads the device answers
    /// ahead of time, when KVM has read-only memory slots.
    read_slots: Option<BarReadSlots>,
    /// The event loop running the xHCI controller's doorbell work.
    xhci_loop: Mutex<Option<Arc<EventLoop>>>,
    /// Which thread runs the xHCI controller's transfers.
    usb_io: UsbIo,
}

impl DeviceManager {
    /// Puts the PCI bus on `pio` and BAR moves on `mmio`. With
    /// `kvm.coalesced_mmio`, registers whose writes may be applied late are
    /// batched through KVM's coalesced MMIO ring (the vCPUs drain it); with
    /// `kvm.readonly_mem`, reads of the xHCI registers and doorbells are
    /// served from memory. `usb_io` decides whether xHCI doorbells become
    /// ioeventfds.
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        pio: &Bus,
        mmio: Arc<Bus>,
        kvm: KvmFeatures,
        usb_io: UsbIo,
    ) -> Result<Self, DeviceError> {
        // BARs go between the start of the hole and the IOAPIC.
        let pci = Arc::new(PciBus::new(
            MMIO_HOLE_START,
            IOAPIC_START - MMIO_HOLE_START,
        )?);
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            PCI_CONFIG_IO_BASE,
            PCI_CONFIG_IO_LEN,
        )?;
        let ioeventfds = Arc::new(Mutex::new(BTreeMap::new()));
        let coalesced = kvm
            .coalesced_mmio
            .then(|| Arc::new(Mutex::new(BTreeMap::new())));
        let read_slots = kvm
            .readonly_mem
            .then(|| Arc::new(Mutex::new(BTreeMap::new())));
        pci.set_bar_listener(Arc::new(BarMover {
            vm: vm.clone(),
            mmio: mmio.clone(),
            ioeventfds: ioeventfds.clone(),
            coalesced: coalesced.clone(),
            read_slots: read_slots.clone(),
        }));
        Ok(Self {
            routing: Arc::new(GsiRouting::new(vm.clone())),
            vm,
            mem,
            pci,
            event_loop: EventLoop::spawn("virtio")?,
            volumes: Mutex::new(BTreeMap::new()),
            ioeventfds,
            coalesced,
            read_slots,
            xhci_loop: Mutex::new(None),
            usb_io,
        })
    }

    /// Adds a virtio-blk disk; its queues default to one per vCPU.
    pub fn add_disk(&self, cfg: &DiskConfig, mmio: &Bus, cpus: u8) -> Result<(), DeviceError> {
        let disk_err = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::Disk {
            id: cfg.id.clone(),
            source,
        };
        let image =
            RawImage::open(&cfg.path, cfg.readonly, &cfg.id).map_err(|e| disk_err(e.into()))?;
        let volume = image.volume().clone();
        volume.set_owner(format!("virtio-blk disk '{}'", cfg.id));
        let num_queues = cfg.queues.unwrap_or(u16::from(cpus.max(1)));
        let block = Block::new(
            image,
            BlockOptions {
                id: cfg.id.clone(),
                num_queues,
                queue_size: DISK_QUEUE_SIZE,
            },
        )
        .map_err(|e| disk_err(e.into()))?;
        let devnum = self
            .attach_virtio(Box::new(block), &format!("disk {}", cfg.id), mmio)
            .map_err(|e| disk_err(e.into()))?;
        lock(&self.volumes).insert(cfg.id.clone(), volume);
        log::info!(
            "disk {}: {} ({}) on PCI 00:{devnum:02x}.0, {num_queues} queue(s)",
            cfg.id,
            cfg.path.display(),
            if cfg.readonly {
                "read-only"
            } else {
                "read-write"
            },
        );
        Ok(())
    }

    /// Puts a virtio device on the PCI bus: MSI-X routes (one vector for
    /// configuration changes, one per queue), its BARs on `mmio`, one
    /// ioeventfd per queue. Returns its PCI device number.
    fn attach_virtio(
        &self,
        device: Box<dyn VirtioDevice>,
        name: &str,
        mmio: &Bus,
    ) -> Result<u8, DeviceError> {
        let queues = device.queue_max_sizes().len() as u16;
        let router =
            KvmMsiRouter::new(&self.vm, self.routing.clone(), queues + 1).map_err(|source| {
                DeviceError::Io {
                    what: "MSI-X routes",
                    source,
                }
            })?;
        let dev = VirtioPciDevice::new(
            device,
            VirtioPciOptions {
                mem: self.mem.clone(),
                msi_router: Arc::new(router),
                workers: self.event_loop.clone(),
            },
        )
        .map_err(|source| DeviceError::Virtio {
            name: name.to_string(),
            source,
        })?;
        let dev = Arc::new(Mutex::new(dev));
        let (devnum, bars) = self.pci.attach(dev.clone())?;
        let mut bar0 = None;
        for b in bars {
            if b.index == 0 {
                bar0 = Some(b.address);
            }
            mmio.insert(Arc::new(Mutex::new(b.region)), b.address, b.size)?;
        }
        if let Some(addr) = bar0 {
            let fds = lock(&dev)
                .ioeventfds(addr)
                .map_err(|source| DeviceError::Io {
                    what: "ioeventfds",
                    source,
                })?
                .into_iter()
                .map(|(addr, fd)| Ioeventfd {
                    addr,
                    fd: Arc::new(fd),
                    datamatch: None,
                })
                .collect();
            self.add_ioeventfds(devnum, fds)?;
        }
        Ok(devnum)
    }

    /// Adds the virtio-balloon device; its queues run on the device event
    /// loop, where `sink` discards pages (never a pager thread).
    pub fn add_balloon(
        &self,
        options: BalloonOptions,
        sink: Arc<dyn BalloonSink>,
        mmio: &Bus,
    ) -> Result<BalloonHandle, DeviceError> {
        let balloon = Balloon::new(options, sink).map_err(|e| DeviceError::Balloon(e.into()))?;
        let handle = balloon.handle();
        let devnum = self.attach_virtio(Box::new(balloon), "balloon", mmio)?;
        log::info!("virtio-balloon on PCI 00:{devnum:02x}.0");
        Ok(handle)
    }

    /// The I/O volume of the disk with this id.
    pub fn volume(&self, id: &str) -> Option<Arc<Volume>> {
        lock(&self.volumes).get(id).cloned()
    }

    /// Adds the xHCI controller (one MSI-X vector) and returns it with its
    /// PCI device number.
    pub fn add_xhci(
        &self,
        config: XhciConfig,
        mmio: &Bus,
    ) -> Result<(Arc<Mutex<XhciPci>>, u8), DeviceError> {
        let router = KvmMsiRouter::new(&self.vm, self.routing.clone(), 1).map_err(|source| {
            DeviceError::Io {
                what: "MSI-X routes",
                source,
            }
        })?;
        let dev = XhciPci::new(config, self.mem.clone(), Arc::new(router))
            .map_err(|e| DeviceError::Usb(e.into()))?;
        let dev = Arc::new(Mutex::new(dev));
        let (devnum, bars) = self.pci.attach(dev.clone())?;
        // INTx fallback for guests that leave MSI-X off: INTA# on the IOAPIC
        // input the MP table names for this device number.
        let irq = mptable::pci_intx_irq(devnum);
        let line = KvmIrqLine::new(self.vm.clone(), u32::from(irq));
        lock(&dev).add_intx(irq, Arc::new(line));
        let mut bar0 = None;
        for b in bars {
            if b.index == XHCI_BAR {
                bar0 = Some(b.address);
            }
            mmio.insert(Arc::new(Mutex::new(b.region)), b.address, b.size)?;
        }
        if let Some(bar0) = bar0 {
            self.start_doorbell_worker(&dev, devnum, bar0, config)?;
            let zones: Vec<_> = DEFERRABLE_WRITES
                .iter()
                .map(|off| (bar0 + off, COALESCED_REG_SIZE))
                .collect();
            self.add_coalesced(devnum, zones)?;
            if let Some(slot) = self.add_read_slot(devnum, bar0, READ_BACKED_START, MMIO_SIZE) {
                lock(&dev).set_read_shadow(slot);
            }
        }
        log::info!("xHCI controller on PCI 00:{devnum:02x}.0");
        Ok((dev, devnum))
    }

    /// Starts the controller's event loop (its worker also runs the
    /// interrupt moderation timer, in both modes) and, with `--usb-io
    /// thread`, routes its doorbell writes through ioeventfds to a worker on
    /// that loop, so ring work leaves the vCPU thread (doorbells of slots
    /// past one per root port keep the synchronous MMIO path). With
    /// `--usb-io vcpu` (the default, departing from DESIGN section 4's
    /// event-loop queue work on measurement) the doorbell write exits to the
    /// vCPU thread, which runs the rings there: Bulk-Only storage runs one
    /// transfer at a time and the guest waits for each, so finishing it
    /// before the guest resumes saves the guest an idle cycle (HLT, timer
    /// reprogramming, wake-up) and L1 a thread switch per transfer.
    fn start_doorbell_worker(
        &self,
        dev: &Arc<Mutex<XhciPci>>,
        devnum: u8,
        bar0: u64,
        config: XhciConfig,
    ) -> Result<(), DeviceError> {
        let io = |what| move |source| DeviceError::Io { what, source };
        let slots = config.usb2_ports.saturating_add(config.usb3_ports);
        let events = doorbell_events(slots).map_err(io("doorbell eventfds"))?;
        let fds = events
            .iter()
            .map(|e| Ioeventfd {
                addr: bar0 + e.bar_offset(),
                fd: e.fd.clone(),
                datamatch: Some(e.datamatch()),
            })
            .collect();
        let event_loop = EventLoop::spawn("xhci")?;
        let worker =
            DoorbellWorker::new(dev.clone(), events).map_err(io("xhci moderation timer"))?;
        event_loop.start(Box::new(worker))?;
        *lock(&self.xhci_loop) = Some(event_loop);
        match self.usb_io {
            UsbIo::Thread => self.add_ioeventfds(devnum, fds),
            UsbIo::Vcpu => Ok(()),
        }
    }

    /// Registers coalesced MMIO `zones` (when KVM has coalesced MMIO) and
    /// remembers them for BAR moves.
    fn add_coalesced(&self, devnum: u8, zones: Vec<(u64, u32)>) -> Result<(), DeviceError> {
        let Some(all) = &self.coalesced else {
            return Ok(());
        };
        for &(addr, size) in &zones {
            self.vm
                .register_coalesced_mmio(IoEventAddress::Mmio(addr), size)
                .map_err(|e| DeviceError::Io {
                    what: "KVM_REGISTER_COALESCED_MMIO",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
        }
        lock(all).entry(devnum).or_default().extend(zones);
        Ok(())
    }

    /// Maps `[bar0 + start, bar0 + end)` read-only from memory (when KVM
    /// can), so guest reads there cost no exit; the device keeps the memory
    /// current through the returned slot. Optional: on failure the reads keep
    /// going through the MMIO path.
    fn add_read_slot(&self, devnum: u8, bar0: u64, start: u64, end: u64) -> Option<Arc<ReadSlot>> {
        let all = self.read_slots.as_ref()?;
        let mut all = lock(all);
        let slot = DEVICE_SLOT_BASE + all.len() as u32;
        let made = ReadSlot::new(slot, start, (end - start) as usize).and_then(|s| {
            s.map_at(&self.vm, bar0 + start)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            Ok(Arc::new(s))
        });
        match made {
            Ok(s) => {
                all.insert(devnum, s.clone());
                Some(s)
            }
            Err(e) => {
                log::warn!("PCI 00:{devnum:02x}.0: no read-only register slot: {e}");
                None
            }
        }
    }

    /// Registers `fds` with KVM and remembers them for BAR moves.
    fn add_ioeventfds(&self, devnum: u8, fds: Vec<Ioeventfd>) -> Result<(), DeviceError> {
        for f in &fds {
            f.register(&self.vm).map_err(|e| DeviceError::Io {
                what: "KVM_IOEVENTFD",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        lock(&self.ioeventfds)
            .entry(devnum)
            .or_default()
            .extend(fds);
        Ok(())
    }

    /// Stops the device event loop (after the vCPUs have stopped).
    pub fn shutdown(&self) {
        self.event_loop.shutdown();
        if let Some(l) = lock(&self.xhci_loop).take() {
            l.shutdown();
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Follows the guest when it reprograms a BAR: moves the MMIO range and the
/// ioeventfds of BAR 0 (virtio queue notifies, xHCI doorbells).
struct BarMover {
    vm: Arc<VmFd>,
    mmio: Arc<Bus>,
    ioeventfds: BarIoeventfds,
    coalesced: Option<BarCoalesced>,
    read_slots: Option<BarReadSlots>,
}

impl BarMover {
    fn move_read_slot(&self, devnum: u8, mv: &BarMove) {
        let Some(all) = &self.read_slots else { return };
        let all = lock(all);
        let Some(slot) = all.get(&devnum) else {
            return;
        };
        let at = mv.new + slot.bar_offset();
        if let Err(e) = slot.map_at(&self.vm, at) {
            // Reads there then exit as ordinary MMIO.
            log::warn!("cannot move the read-only register slot to {at:#x}: {e}");
        }
    }

    fn move_coalesced(&self, devnum: u8, mv: &BarMove) {
        let Some(all) = &self.coalesced else { return };
        let mut all = lock(all);
        let Some(zones) = all.get_mut(&devnum) else {
            return;
        };
        for (addr, size) in zones.iter_mut() {
            let _ = self
                .vm
                .unregister_coalesced_mmio(IoEventAddress::Mmio(*addr), *size);
            *addr = *addr - mv.old + mv.new;
            if let Err(e) = self
                .vm
                .register_coalesced_mmio(IoEventAddress::Mmio(*addr), *size)
            {
                // Writes there then exit as ordinary MMIO.
                log::warn!("cannot move coalesced MMIO zone to {:#x}: {e}", *addr);
            }
        }
    }
}

impl BarListener for BarMover {
    fn bar_moved(&self, devnum: u8, mv: BarMove, region: PciBarRegion) {
        log::info!(
            "PCI 00:{devnum:02x}.0 BAR{} moved {:#x} -> {:#x}",
            mv.index,
            mv.old,
            mv.new
        );
        if self.mmio.remove(mv.old).is_err() {
            log::debug!("BAR{} had no MMIO range at {:#x}", mv.index, mv.old);
        }
        if let Err(e) = self
            .mmio
            .insert(Arc::new(Mutex::new(region)), mv.new, mv.size)
        {
            log::error!("cannot map moved BAR{} at {:#x}: {e}", mv.index, mv.new);
            return;
        }
        if mv.index != 0 {
            return;
        }
        self.move_coalesced(devnum, &mv);
        self.move_read_slot(devnum, &mv);
        let mut all = lock(&self.ioeventfds);
        let Some(fds) = all.get_mut(&devnum) else {
            return;
        };
        for f in fds.iter_mut() {
            let _ = f.unregister(&self.vm);
            f.addr = f.addr - mv.old + mv.new;
            if let Err(e) = f.register(&self.vm) {
                // The write still reaches the BAR's MMIO path, just slower.
                log::warn!("cannot move ioeventfd to {:#x}: {e}", f.addr);
            }
        }
    }
}
