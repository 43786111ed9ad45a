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
const ISA_BUS_ID: u8 = 0;

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
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
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
        assert_eq!(count as usize, cpus as usize + 1 + 1 + 16 + 2);
        let mut off = 44;
        let mut bsps = 0;
        for id in 0..cpus {
            assert_eq!(mpc[off], ENTRY_PROCESSOR);
            assert_eq!(mpc[off + 1], id);
            bsps += (mpc[off + 3] & CPU_BSP != 0) as u32;
            off += 20;
        }
        assert_eq!(bsps, 1);
        assert_eq!(mpc[off], ENTRY_BUS);
        off += 8;
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
}
