//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! finds its CPUs, the IOAPIC and the routing of the legacy ISA IRQs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_START, LAPIC_START};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Linux looks PCI interrupts up by MP bus id = PCI bus number, so PCI bus
/// 0 takes id 0 and ISA the next one (as SeaBIOS lays it out).
const ISA_BUS_ID: u8 = 1;
/// The MP bus id of PCI bus 0.
const PCI_BUS_ID: u8 = 0;
/// PCI interrupts are level-triggered, active low (MP spec table 4-10:
/// polarity bits 1:0 = 11b, trigger bits 3:2 = 11b).
const IRQ_FLAGS_LEVEL_LOW: u16 = 0x000f;
/// PCI device numbers with an INTA# entry (device 0 is the host bridge).
const PCI_SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
/// First IOAPIC input for PCI INTx (16-23, above the ISA IRQs).
const FIRST_PCI_IRQ: u8 = 16;

/// The IOAPIC input that INTA# of PCI device `slot` is wired to: devices
/// share the eight inputs 16-23 round-robin, as on a PC chipset.
pub fn pci_intx_irq(slot: u8) -> u8 {
    FIRST_PCI_IRQ + slot % 8
}

/// Builds the floating pointer + configuration table for `cpus` CPUs, to be
/// placed at guest address `at`.
pub fn build(cpus: u8, at: u64) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC).
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, PCI_BUS_ID]);
    entries.extend_from_slice(b"PCI   ");
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 2;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n → IOAPIC pin n, conforming polarity/trigger (edge, high):
    // how KVM's default routing wires GSIs 0-15.
    for irq in 0..16u8 {
        let kind = INT_TYPE_INT;
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, ISA_BUS_ID, irq]);
        entries.extend_from_slice(&[ioapic_id, irq]);
        count += 1;
    }
    // INTA# of every PCI device (source bus irq = device << 2 | pin - 1).
    for slot in PCI_SLOTS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_LEVEL_LOW.to_le_bytes());
        entries.extend_from_slice(&[PCI_BUS_ID, slot << 2, ioapic_id, pci_intx_irq(slot)]);
        count += 1;
    }
    // LINT0 is the 8259 (ExtINT), LINT1 is NMI, on every local APIC.
    for (kind, pin) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0]);
        entries.extend_from_slice(&[0xff, pin]);
        count += 1;
    }

    const MPF_LEN: usize = 16;
    const MPC_HEADER_LEN: usize = 44;
    let table_addr = at + MPF_LEN as u64;
    let mut mpf = Vec::with_capacity(MPF_LEN);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let mut mpc = Vec::with_capacity(MPC_HEADER_LEN + entries.len());
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&((MPC_HEADER_LEN + entries.len()) as u16).to_le_bytes());
    mpc.extend_from_slice(&[MP_SPEC_REV, 0]);
    mpc.extend_from_slice(b"RUSTVMM ");
    mpc.extend_from_slice(b"MPTABLE 0001");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    mpc.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_LEN);
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    mpf.extend_from_slice(&mpc);
    mpf
}

/// The byte that makes the sum of `bytes` zero (the checksum field must be 0
/// when this is computed).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, &b| acc.wrapping_add(b))
        .wrapping_neg()
}

/// Writes the MP table for `cpus` CPUs at `at`.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, at: u64) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&build(cpus, at), GuestAddress(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let t = build(2, 0x9fc00);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
        assert_eq!(sum(&t[..16]), 0);
        let mpc = &t[16..];
        assert_eq!(&mpc[0..4], b"PCMP");
        let len = u16::from_le_bytes(mpc[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0);
    }

    #[test]
    fn lists_every_cpu_with_one_bsp_and_the_ioapic() {
        let cpus = 4;
        let t = build(cpus, 0x9fc00);
        let mpc = &t[16..];
        let count = u16::from_le_bytes(mpc[34..36].try_into().unwrap());
        assert_eq!(count as usize, cpus as usize + 2 + 1 + 16 + 31 + 2);
        let mut off = 44;
        let mut bsps = 0;
        for id in 0..cpus {
            assert_eq!(mpc[off], ENTRY_PROCESSOR);
            assert_eq!(mpc[off + 1], id);
            bsps += (mpc[off + 3] & CPU_BSP != 0) as u32;
            off += 20;
        }
        assert_eq!(bsps, 1);
        assert_eq!((mpc[off], mpc[off + 8]), (ENTRY_BUS, ENTRY_BUS));
        off += 16;
        assert_eq!(mpc[off], ENTRY_IOAPIC);
        assert_eq!(mpc[off + 1], cpus);
        assert_eq!(
            u32::from_le_bytes(mpc[off + 4..off + 8].try_into().unwrap()),
            IOAPIC_START as u32
        );
        off += 8;
        // IRQ 4 (COM1) goes to IOAPIC pin 4.
        let irq4 = &mpc[off + 4 * 8..off + 5 * 8];
        assert_eq!((irq4[0], irq4[5], irq4[7]), (ENTRY_IO_INTERRUPT, 4, 4));
    }

    #[test]
    fn pci_inta_of_each_device_goes_to_a_level_low_ioapic_input() {
        let t = build(1, 0x9fc00);
        let mpc = &t[16..];
        // One processor entry (20 bytes), then 8-byte entries.
        let entries = &mpc[44 + 20..];
        let bus = entries
            .chunks(8)
            .find(|e| e[0] == ENTRY_BUS && &e[2..8] == b"PCI   ")
            .expect("PCI bus entry");
        assert_eq!(bus[1], PCI_BUS_ID);
        let slot5: Vec<&[u8]> = entries
            .chunks(8)
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT && e[4] == PCI_BUS_ID && e[5] == 5 << 2)
            .collect();
        assert_eq!(slot5.len(), 1);
        let e = slot5[0];
        assert_eq!(u16::from_le_bytes([e[2], e[3]]), IRQ_FLAGS_LEVEL_LOW);
        assert_eq!((e[6], e[7]), (1, pci_intx_irq(5)));
        assert_eq!(pci_intx_irq(5), 21);
        assert!((16..24).contains(&pci_intx_irq(31)));
    }
}
