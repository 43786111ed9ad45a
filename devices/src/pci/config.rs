//! Type 0 configuration space of one PCI function: registers, declared
//! write masks, BARs and the capability list.
//!
//! Every guest write goes through [`PciConfig::write`], which applies a
//! per-byte writable mask and a per-byte write-1-to-clear mask. Read-only bits
//! therefore stay read-only, and BAR writes are masked to the BAR size, which
//! is exactly what the BAR sizing protocol needs (PCI Local Bus 3.0 §6.2.5.1):
//! writing all-ones reads back `!(size - 1)` plus the read-only type bits.

use super::{
    PciError, BAR0, BAR_MEM_64BIT, BAR_MEM_PREFETCHABLE, CAPABILITIES_POINTER, CAP_START, COMMAND,
    COMMAND_WRITABLE, CONFIG_SPACE_SIZE, HEADER_TYPE, INTERRUPT_LINE, NUM_BARS, STATUS,
    STATUS_CAP_LIST, STATUS_RW1C,
};

/// What a BAR decodes. Only memory BARs are implemented (I/O BARs are not
/// needed by any device here and are legacy for PCI Express).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR; occupies this BAR index and the next.
    Mem64 { prefetchable: bool },
}

/// A BAR a function asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub index: u8,
    /// Power of two, at least 16 bytes (§6.2.5.1). Sizes below a page are
    /// rounded up by the allocator's alignment anyway.
    pub size: u64,
    pub kind: BarKind,
}

/// Identity of a function as it appears in the header (§6.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class code, sub-class and programming interface as `0xCCSSPP`.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// A capability body to place in the list.
pub struct Capability<'a> {
    /// Capability ID (PCI Code and ID Assignment spec).
    pub id: u8,
    /// Bytes after the ID and next-pointer bytes.
    pub body: &'a [u8],
    /// Writable mask for `body` (same length), or empty for all read-only.
    pub writable: &'a [u8],
    /// Write-1-to-clear mask for `body` (same length), or empty for none.
    pub rw1c: &'a [u8],
}

/// 256 bytes of type 0 configuration space with its write masks.
#[derive(Clone)]
pub struct PciConfig {
    regs: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    rw1c: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; NUM_BARS],
    /// Offset of the last capability in the list, 0 when the list is empty.
    last_cap: u8,
    next_cap: usize,
}

impl PciConfig {
    /// A type 0 header with the given identity. Command, status, interrupt
    /// line and cache line size get their masks; everything else is read-only.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            regs: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            rw1c: [0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_cap: CAP_START,
        };
        c.set_u16(0x00, ids.vendor_id);
        c.set_u16(0x02, ids.device_id);
        c.regs[0x08] = ids.revision;
        c.regs[0x09] = ids.class_code as u8;
        c.regs[0x0a] = (ids.class_code >> 8) as u8;
        c.regs[0x0b] = (ids.class_code >> 16) as u8;
        c.regs[HEADER_TYPE] = 0; // type 0, single function
        c.set_u16(0x2c, ids.subsystem_vendor_id);
        c.set_u16(0x2e, ids.subsystem_id);
        c.set_mask_u16(COMMAND, COMMAND_WRITABLE, 0);
        c.set_mask_u16(STATUS, 0, STATUS_RW1C);
        c.writable[0x0c] = 0xff; // cache line size: scratch register
        c.writable[INTERRUPT_LINE] = 0xff; // written by firmware/OS, no effect
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, off: usize, v: u32) {
        self.regs[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_mask_u16(&mut self, off: usize, writable: u16, rw1c: u16) {
        self.writable[off..off + 2].copy_from_slice(&writable.to_le_bytes());
        self.rw1c[off..off + 2].copy_from_slice(&rw1c.to_le_bytes());
    }

    fn set_mask_u32(&mut self, off: usize, writable: u32) {
        self.writable[off..off + 4].copy_from_slice(&writable.to_le_bytes());
    }

    /// Sets the interrupt pin register (1 = INTA#; 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.regs[0x3d] = pin;
    }

    /// Declares a BAR. Its address starts at 0 (unassigned).
    pub fn add_bar(&mut self, bar: BarSpec) -> Result<(), PciError> {
        let idx = bar.index as usize;
        let slots = match bar.kind {
            BarKind::Mem32 => 1,
            BarKind::Mem64 { .. } => 2,
        };
        if idx + slots > NUM_BARS {
            return Err(PciError::BarIndex(bar.index));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 {
            return Err(PciError::BarSize(bar.size));
        }
        if bar.kind == BarKind::Mem32 && bar.size > 1 << 31 {
            return Err(PciError::BarSize(bar.size));
        }
        if self.bars[idx..idx + slots].iter().any(Option::is_some)
            || (idx > 0
                && matches!(
                    self.bars[idx - 1],
                    Some(BarSpec {
                        kind: BarKind::Mem64 { .. },
                        ..
                    })
                ))
        {
            return Err(PciError::BarInUse(bar.index));
        }
        let off = BAR0 + 4 * idx;
        let size_mask = !(bar.size - 1);
        let flags = match bar.kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 { prefetchable } => {
                BAR_MEM_64BIT
                    | if prefetchable {
                        BAR_MEM_PREFETCHABLE
                    } else {
                        0
                    }
            }
        };
        self.set_u32(off, flags);
        self.set_mask_u32(off, size_mask as u32 & !0xf);
        if slots == 2 {
            self.set_u32(off + 4, 0);
            self.set_mask_u32(off + 4, (size_mask >> 32) as u32);
        }
        self.bars[idx] = Some(bar);
        Ok(())
    }

    /// The BARs declared on this function.
    pub fn bars(&self) -> impl Iterator<Item = BarSpec> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The declared BAR at `index`, if any.
    pub fn bar(&self, index: u8) -> Option<BarSpec> {
        self.bars.get(index as usize).copied().flatten()
    }

    /// The address currently programmed into BAR `index`.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = BAR0 + 4 * index as usize;
        let lo = u64::from(self.read_u32(off) & !0xf);
        Some(match bar.kind {
            BarKind::Mem32 => lo,
            BarKind::Mem64 { .. } => lo | (u64::from(self.read_u32(off + 4)) << 32),
        })
    }

    /// True while BAR `index` holds the all-ones sizing pattern rather than an
    /// address (every writable bit set).
    pub fn bar_is_sizing(&self, index: u8) -> bool {
        let Some(bar) = self.bar(index) else {
            return false;
        };
        let Some(addr) = self.bar_address(index) else {
            return false;
        };
        let mask = match bar.kind {
            BarKind::Mem32 => u64::from(u32::MAX) & !(bar.size - 1) & !0xf,
            BarKind::Mem64 { .. } => !(bar.size - 1) & !0xf,
        };
        addr & mask == mask
    }

    /// Programs BAR `index` to `addr` (host-side allocation, not a guest write).
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        let bar = self.bar(index).ok_or(PciError::BarIndex(index))?;
        if addr & (bar.size - 1) != 0 || (bar.kind == BarKind::Mem32 && addr > u64::from(u32::MAX))
        {
            return Err(PciError::BarAddress { index, addr });
        }
        let off = BAR0 + 4 * index as usize;
        let flags = self.read_u32(off) & 0xf;
        self.set_u32(off, addr as u32 | flags);
        if let BarKind::Mem64 { .. } = bar.kind {
            self.set_u32(off + 4, (addr >> 32) as u32);
        }
        Ok(())
    }

    /// Appends a capability to the list and returns its offset.
    pub fn add_capability(&mut self, cap: &Capability<'_>) -> Result<u8, PciError> {
        let len = 2 + cap.body.len();
        let check = |m: &[u8]| m.is_empty() || m.len() == cap.body.len();
        if !check(cap.writable) || !check(cap.rw1c) {
            return Err(PciError::CapabilityMask);
        }
        let off = self.next_cap;
        let end = off + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpace);
        }
        self.regs[off] = cap.id;
        self.regs[off + 1] = 0;
        self.regs[off + 2..end].copy_from_slice(cap.body);
        if !cap.writable.is_empty() {
            self.writable[off + 2..end].copy_from_slice(cap.writable);
        }
        if !cap.rw1c.is_empty() {
            self.rw1c[off + 2..end].copy_from_slice(cap.rw1c);
        }
        // off < 256, checked above.
        let off8 = off as u8;
        if self.last_cap == 0 {
            self.regs[CAPABILITIES_POINTER] = off8;
        } else {
            self.regs[self.last_cap as usize + 1] = off8;
        }
        self.last_cap = off8;
        let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, status);
        // Capabilities are DWORD aligned (§6.7).
        self.next_cap = (end + 3) & !3;
        Ok(off8)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Applies a guest write: writable bits take the new value, RW1C bits
    /// written as 1 clear, everything else is unchanged. Bytes past the end
    /// are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                return;
            };
            let wm = self.writable[o];
            let mut new = (self.regs[o] & !wm) | (v & wm);
            new &= !(v & self.rw1c[o]);
            self.regs[o] = new;
        }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Host-side update of bits the guest cannot write (a device setting
    /// PME_Status, say). Only bytes inside the space are touched.
    pub fn set_bits_u16(&mut self, offset: usize, set: u16, clear: u16) {
        if offset + 2 <= CONFIG_SPACE_SIZE {
            let v = (self.read_u16(offset) & !clear) | set;
            self.set_u16(offset, v);
        }
    }

    /// Host-side write of raw bytes, ignoring the guest masks (a device
    /// filling a data window, say). Bytes past the end are dropped.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(r) = offset.checked_add(i).and_then(|o| self.regs.get_mut(o)) {
                *r = v;
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: 0x01_80_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 2,
        })
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut c = cfg();
        c.write(0, &[0xff; 4]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        c.write(0x08, &[0; 4]);
        assert_eq!(c.read_u32(0x08), 0x0180_0001);
        // Command: only the declared bits stick.
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        // Interrupt line is a scratch register, pin is read-only.
        c.write(0x3c, &[0x0b, 0x04]);
        assert_eq!(c.read_u16(0x3c), 0x000b);
        // Expansion ROM BAR absent: sizing reads back 0.
        c.write(0x30, &[0xff; 4]);
        assert_eq!(c.read_u32(0x30), 0);
        // Outside config space reads all-ones.
        let mut b = [0u8; 4];
        c.read(254, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut c = cfg();
        c.set_bits_u16(STATUS, 0x8000 | 0x2000, 0);
        // Writing 0 leaves them; writing 1 to one clears only that one.
        c.write(STATUS, &0u16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS) & 0xa000, 0xa000);
        c.write(STATUS, &0x2000u16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS) & 0xa000, 0x8000);
        // The capabilities bit is not RW1C and cannot be set by the guest.
        c.write(STATUS, &STATUS_CAP_LIST.to_le_bytes());
        assert_eq!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
    }

    #[test]
    fn bar_sizing_protocol_and_masked_writes() {
        let mut c = cfg();
        c.add_bar(BarSpec {
            index: 0,
            size: 0x4000,
            kind: BarKind::Mem32,
        })
        .unwrap();
        c.add_bar(BarSpec {
            index: 2,
            size: 0x1_0000_0000,
            kind: BarKind::Mem64 { prefetchable: true },
        })
        .unwrap();
        c.set_bar_address(0, 0xc000_0000).unwrap();
        // Sizing: write all-ones, read !(size-1) with type bits intact.
        c.write(0x10, &[0xff; 4]);
        assert_eq!(c.read_u32(0x10), 0xffff_c000);
        assert!(c.bar_is_sizing(0));
        // An unaligned address is masked down to the size.
        c.write(0x10, &0xd000_1234u32.to_le_bytes());
        assert_eq!(c.read_u32(0x10), 0xd000_0000);
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        // 64-bit prefetchable BAR of 4 GiB: low dword only type bits.
        c.write(0x18, &[0xff; 4]);
        c.write(0x1c, &[0xff; 4]);
        assert_eq!(c.read_u32(0x18), 0x0000_000c);
        assert_eq!(c.read_u32(0x1c), 0xffff_ffff);
        // Unused BAR slots read 0 and ignore sizing.
        c.write(0x14, &[0xff; 4]);
        assert_eq!(c.read_u32(0x14), 0);
        // Bad declarations are refused.
        assert!(c
            .add_bar(BarSpec {
                index: 3,
                size: 0x1000,
                kind: BarKind::Mem32
            })
            .is_err());
        assert!(c
            .add_bar(BarSpec {
                index: 5,
                size: 0x1000,
                kind: BarKind::Mem64 {
                    prefetchable: false
                }
            })
            .is_err());
        assert!(c
            .add_bar(BarSpec {
                index: 4,
                size: 0x1001,
                kind: BarKind::Mem32
            })
            .is_err());
        assert!(c.set_bar_address(0, 0x1000).is_err());
    }

    #[test]
    fn capability_list_is_linked_and_masked() {
        let mut c = cfg();
        let a = c
            .add_capability(&Capability {
                id: 0x09,
                body: &[1, 2, 3],
                writable: &[],
                rw1c: &[],
            })
            .unwrap();
        let b = c
            .add_capability(&Capability {
                id: 0x01,
                body: &[0, 0, 0, 0x80],
                writable: &[0, 0, 0x03, 0],
                rw1c: &[0, 0, 0, 0x80],
            })
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.read_u16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        let mut p = [0u8; 1];
        c.read(CAPABILITIES_POINTER, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x48);
        c.read(0x49, &mut p);
        assert_eq!(p[0], 0);
        // Guest cannot rewrite ID or next pointer.
        c.write(0x48, &[0xff, 0xff]);
        assert_eq!(c.read_u16(0x48), 0x0001);
        assert_eq!(c.read_u16(0x4c), 0x8000);
        c.write(0x4c, &[0x01, 0x00]);
        assert_eq!(
            c.read_u16(0x4c),
            0x8001,
            "writing 0 must not clear an RW1C bit"
        );
        c.write(0x4c, &[0xff, 0xff]);
        assert_eq!(
            c.read_u16(0x4c),
            0x0003,
            "only masked bits written, RW1C cleared"
        );
        assert!(c
            .add_capability(&Capability {
                id: 1,
                body: &[0; 300],
                writable: &[],
                rw1c: &[]
            })
            .is_err());
    }
}
