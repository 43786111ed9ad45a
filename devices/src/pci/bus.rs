//! PCI bus 0: functions at device numbers, configuration mechanism #1 on
//! ports 0xCF8..0xCFF, BAR allocation in an MMIO hole, and the MMIO bus
//! adapter for BARs.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::{BarMove, HostBridge, PciError, SharedPciDevice, MAX_DEVICES};
use crate::bus::BusDevice;

/// I/O port of CONFIG_ADDRESS; CONFIG_DATA follows at +4 (§3.2.2.3.2).
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
/// Ports covered by [`PciConfigIo`]: 0xCF8..0xCFF.
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// CONFIG_ADDRESS Enable bit (§3.2.2.3.2).
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits software can set: enable, bus, device, function,
/// register; bits 30:24 and 1:0 are reserved (read-only 0).
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;
/// BARs are placed at least page aligned, so each gets its own MMIO page.
const MIN_BAR_ALIGN: u64 = 0x1000;

/// Where a BAR was placed, with the region to register on the MMIO bus.
pub struct BarAllocation {
    pub device_number: u8,
    pub index: u8,
    pub address: u64,
    pub size: u64,
    /// Register this on the MMIO bus at `[address, address + size)`.
    pub region: PciBarRegion,
}

/// Told when the guest moves a BAR, so the VMM moves the MMIO registration
/// (and any ioeventfds inside the BAR).
pub trait BarListener: Send + Sync {
    /// `region` is a fresh adapter for the new range.
    fn bar_moved(&self, device_number: u8, bar_move: BarMove, region: PciBarRegion);
}

/// Bus 0 of PCI segment 0.
pub struct PciBus {
    slots: RwLock<Vec<Option<SharedPciDevice>>>,
    allocator: Mutex<AddressAllocator>,
    listener: RwLock<Option<Arc<dyn BarListener>>>,
}

impl PciBus {
    /// A bus with the host bridge at device 0, allocating BARs inside the
    /// 32-bit MMIO hole `[hole_base, hole_base + hole_size)`.
    pub fn new(hole_base: u64, hole_size: u64) -> Result<Self, PciError> {
        let hole_err = || PciError::Hole {
            base: hole_base,
            size: hole_size,
        };
        let end = hole_base.checked_add(hole_size).ok_or_else(hole_err)?;
        if hole_size == 0 || end > 1 << 32 {
            return Err(hole_err());
        }
        let allocator = AddressAllocator::new(hole_base, hole_size).map_err(|_| hole_err())?;
        let mut slots = vec![None; MAX_DEVICES];
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        slots[0] = Some(bridge);
        Ok(Self {
            slots: RwLock::new(slots),
            allocator: Mutex::new(allocator),
            listener: RwLock::new(None),
        })
    }

    /// Installs the listener told about guest BAR moves.
    pub fn set_bar_listener(&self, listener: Arc<dyn BarListener>) {
        *self.listener.write().unwrap_or_else(|e| e.into_inner()) = Some(listener);
    }

    /// Attaches `device` at the first free device number, allocates its
    /// BARs and programs them. Returns the device number and the BARs to
    /// register on the MMIO bus.
    pub fn attach(&self, device: SharedPciDevice) -> Result<(u8, Vec<BarAllocation>), PciError> {
        let n = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            slots
                .iter()
                .position(Option::is_none)
                .ok_or(PciError::BusFull)?
        };
        // n < MAX_DEVICES = 32.
        let n = n as u8;
        let bars = self.attach_at(n, device)?;
        Ok((n, bars))
    }

    /// Attaches `device` at device number `n`.
    pub fn attach_at(
        &self,
        n: u8,
        device: SharedPciDevice,
    ) -> Result<Vec<BarAllocation>, PciError> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get(usize::from(n)) {
            Some(None) => {}
            _ => return Err(PciError::Slot(n)),
        }
        let mut out = Vec::new();
        {
            let mut dev = lock(&device);
            let specs: Vec<_> = dev.function().config().bars().collect();
            let mut alloc = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
            for spec in specs {
                let block = spec.size.max(MIN_BAR_ALIGN);
                let range = alloc
                    .allocate(block, block, AllocPolicy::FirstMatch)
                    .map_err(|source| PciError::BarAllocation {
                        size: spec.size,
                        source,
                    })?;
                dev.function_mut()
                    .set_bar_address(spec.index, range.start())?;
                out.push(BarAllocation {
                    device_number: n,
                    index: spec.index,
                    address: range.start(),
                    size: spec.size,
                    region: PciBarRegion::new(device.clone(), spec.index),
                });
            }
        }
        slots[usize::from(n)] = Some(device);
        Ok(out)
    }

    /// The function at device number `n`.
    pub fn device(&self, n: u8) -> Option<SharedPciDevice> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(n)).cloned().flatten()
    }

    /// Configuration read of bus 0; absent functions read all-ones.
    pub fn config_read(&self, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.device(device).filter(|_| function == 0) {
            Some(d) => lock(&d).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write of bus 0; writes to absent functions are dropped.
    pub fn config_write(&self, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(d) = self.device(device).filter(|_| function == 0) else {
            return;
        };
        let effects = lock(&d).config_write(offset, data);
        if effects.bar_moves.is_empty() {
            return;
        }
        let listener = self
            .listener
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for m in effects.bar_moves {
            log::info!(
                "pci: device {device} BAR{} moved {:#x} -> {:#x}",
                m.index,
                m.old,
                m.new
            );
            match &listener {
                Some(l) => l.bar_moved(device, m, PciBarRegion::new(d.clone(), m.index)),
                None => log::warn!("pci: BAR move with no listener; MMIO stays at the old address"),
            }
        }
    }
}

fn lock(d: &SharedPciDevice) -> MutexGuard<'_, dyn super::PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configuration mechanism #1 (§3.2.2.3.2) as a port I/O device on
/// `PCI_CONFIG_IO_BASE..+PCI_CONFIG_IO_LEN`.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// Decodes CONFIG_ADDRESS for a data access at byte `port_offset` (0..4)
    /// of CONFIG_DATA: (device, function, register offset), or None when the
    /// access goes nowhere (disabled, other bus).
    fn target(&self, port_offset: u64) -> Option<(u8, u8, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        if a & CONFIG_ADDRESS_ENABLE == 0 || bus != 0 {
            return None;
        }
        let device = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        let register = (a & 0xfc) as usize + port_offset as usize;
        Some((device, function, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            // CONFIG_ADDRESS is DWORD-only; other sizes are not claimed.
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset - 4 + data.len() as u64 <= 4 => match self.target(offset - 4) {
                Some((dev, func, reg)) => self.bus.config_read(dev, func, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address = v & CONFIG_ADDRESS_MASK;
            }
            4..=7 if offset - 4 + data.len() as u64 <= 4 => {
                if let Some((dev, func, reg)) = self.target(offset - 4) {
                    self.bus.config_write(dev, func, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// One BAR of one function on the MMIO bus. Accesses are dropped (reads
/// all-ones) while the function's Memory Space bit is clear or it is not in D0.
#[derive(Clone)]
pub struct PciBarRegion {
    device: SharedPciDevice,
    index: u8,
}

impl PciBarRegion {
    pub fn new(device: SharedPciDevice, index: u8) -> Self {
        Self { device, index }
    }
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut d = lock(&self.device);
        if d.function().bar_access_allowed() {
            d.bar_read(self.index, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut d = lock(&self.device);
        if d.function().bar_access_allowed() {
            d.bar_write(self.index, offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::pci::{
        BarKind, BarSpec, PciConfig, PciDevice, PciFunction, PciIds, COMMAND, COMMAND_MEMORY_SPACE,
    };

    /// A function with one 4 KiB BAR of scratch registers.
    struct Scratch {
        function: PciFunction,
        regs: [u8; 16],
    }

    impl Scratch {
        fn new(size: u64) -> Self {
            let mut c = PciConfig::new(PciIds {
                vendor_id: 0x1234,
                device_id: 0x5678,
                class_code: 0xff_00_00,
                ..Default::default()
            });
            c.add_bar(BarSpec {
                index: 0,
                size,
                kind: BarKind::Mem32,
            })
            .unwrap();
            Self {
                function: PciFunction::new(c),
                regs: [0; 16],
            }
        }
    }

    impl PciDevice for Scratch {
        fn function(&self) -> &PciFunction {
            &self.function
        }
        fn function_mut(&mut self) -> &mut PciFunction {
            &mut self.function
        }
        fn bar_read(&mut self, _i: u8, offset: u64, data: &mut [u8]) {
            for (k, b) in data.iter_mut().enumerate() {
                *b = self.regs.get(offset as usize + k).copied().unwrap_or(0);
            }
        }
        fn bar_write(&mut self, _i: u8, offset: u64, data: &[u8]) {
            for (k, b) in data.iter().enumerate() {
                if let Some(r) = self.regs.get_mut(offset as usize + k) {
                    *r = *b;
                }
            }
        }
    }

    fn pio() -> (Bus, Arc<PciBus>) {
        let pci = Arc::new(PciBus::new(0xc000_0000, 0x1000_0000).unwrap());
        let io = Bus::new();
        io.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            PCI_CONFIG_IO_BASE,
            PCI_CONFIG_IO_LEN,
        )
        .unwrap();
        (io, pci)
    }

    fn cfg_addr(dev: u32, func: u32, reg: u32) -> u32 {
        0x8000_0000 | dev << 11 | func << 8 | reg
    }

    fn cfg_read32(io: &Bus, addr: u32) -> u32 {
        io.write(0xcf8, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mechanism1_finds_host_bridge_and_absent_functions_read_ones() {
        let (io, _pci) = pio();
        // Linux's type 1 probe: DWORD write/read of CONFIG_ADDRESS.
        io.write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        // A byte write to 0xCFB does not disturb CONFIG_ADDRESS.
        io.write(0xcfb, &[0x01]);
        io.read(0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        // Reserved bits read back 0.
        io.write(0xcf8, &0xffff_ffffu32.to_le_bytes());
        io.read(0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        // Host bridge at 00:00.0, class 0x0600.
        assert_eq!(cfg_read32(&io, cfg_addr(0, 0, 0)), 0x0008_1b36);
        assert_eq!(cfg_read32(&io, cfg_addr(0, 0, 8)) >> 16, 0x0600);
        // Empty slot, other function, other bus, disabled: all-ones.
        assert_eq!(cfg_read32(&io, cfg_addr(5, 0, 0)), 0xffff_ffff);
        assert_eq!(cfg_read32(&io, cfg_addr(0, 1, 0)), 0xffff_ffff);
        assert_eq!(cfg_read32(&io, cfg_addr(0, 0, 0) | 1 << 16), 0xffff_ffff);
        assert_eq!(
            cfg_read32(&io, cfg_addr(0, 0, 0) & !0x8000_0000),
            0xffff_ffff
        );
        // Byte and word accesses at 0xCFD/0xCFE address the right bytes.
        io.write(0xcf8, &cfg_addr(0, 0, 0).to_le_bytes());
        let mut w = [0u8; 2];
        io.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        let mut one = [0u8; 1];
        io.read(0xcfd, &mut one);
        assert_eq!(one[0], 0x1b);
        // An access that would run past 0xCFF is not claimed.
        io.read(0xcfe, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn attach_allocates_bars_in_the_hole_and_bar_region_honours_memory_enable() {
        let (io, pci) = pio();
        let dev = Arc::new(Mutex::new(Scratch::new(0x4000)));
        let (n, bars) = pci.attach(dev.clone()).unwrap();
        assert_eq!(n, 1);
        assert_eq!(bars.len(), 1);
        let bar = &bars[0];
        assert!(bar.address >= 0xc000_0000 && bar.address + bar.size <= 0xd000_0000);
        assert_eq!(bar.address % 0x4000, 0);
        assert_eq!(cfg_read32(&io, cfg_addr(1, 0, 0x10)), bar.address as u32);
        let dev2 = Arc::new(Mutex::new(Scratch::new(0x100)));
        let (n2, bars2) = pci.attach(dev2).unwrap();
        assert_eq!(n2, 2);
        assert!(
            bars2[0].address >= bar.address + bar.size || bars2[0].address + 0x1000 <= bar.address
        );
        assert!(pci
            .attach_at(1, Arc::new(Mutex::new(Scratch::new(0x100))))
            .is_err());

        let mmio = Bus::new();
        mmio.insert(
            Arc::new(Mutex::new(bar.region.clone())),
            bar.address,
            bar.size,
        )
        .unwrap();
        // Memory Space disabled: writes dropped, reads all-ones.
        mmio.write(bar.address + 4, &[0xaa]);
        let mut b = [0u8; 1];
        mmio.read(bar.address + 4, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(dev.lock().unwrap().regs[4], 0);
        io.write(0xcf8, &cfg_addr(1, 0, COMMAND as u32).to_le_bytes());
        io.write(0xcfc, &COMMAND_MEMORY_SPACE.to_le_bytes());
        mmio.write(bar.address + 4, &[0xaa]);
        mmio.read(bar.address + 4, &mut b);
        assert_eq!(b[0], 0xaa);
    }

    #[test]
    fn hole_exhaustion_and_bad_holes_are_errors() {
        assert!(
            PciBus::new(0xf000_0000, 0x2000_0000).is_err(),
            "beyond 4 GiB"
        );
        assert!(PciBus::new(0xc000_0000, 0).is_err());
        let pci = PciBus::new(0xc000_0000, 0x2000).unwrap();
        pci.attach(Arc::new(Mutex::new(Scratch::new(0x2000))))
            .unwrap();
        assert!(matches!(
            pci.attach(Arc::new(Mutex::new(Scratch::new(0x1000)))),
            Err(PciError::BarAllocation { .. })
        ));
    }

    #[derive(Default)]
    struct Moves(Mutex<Vec<(u8, BarMove)>>);
    impl BarListener for Moves {
        fn bar_moved(&self, n: u8, m: BarMove, _region: PciBarRegion) {
            self.0.lock().unwrap().push((n, m));
        }
    }

    #[test]
    fn guest_bar_reprogramming_reaches_the_listener_but_sizing_does_not() {
        let (io, pci) = pio();
        let moves = Arc::new(Moves::default());
        pci.set_bar_listener(moves.clone());
        let (n, bars) = pci
            .attach(Arc::new(Mutex::new(Scratch::new(0x1000))))
            .unwrap();
        let base = bars[0].address;
        let a = cfg_addr(u32::from(n), 0, 0x10);
        io.write(0xcf8, &a.to_le_bytes());
        io.write(0xcfc, &[0xff; 4]);
        assert_eq!(cfg_read32(&io, a), 0xffff_f000);
        io.write(0xcfc, &(base as u32).to_le_bytes());
        assert!(moves.0.lock().unwrap().is_empty());
        io.write(0xcfc, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            moves.0.lock().unwrap().as_slice(),
            &[(
                n,
                BarMove {
                    index: 0,
                    old: base,
                    new: 0xd000_0000,
                    size: 0x1000
                }
            )]
        );
    }
}
