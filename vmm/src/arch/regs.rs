//! Register state for entering a 64-bit Linux kernel directly: flat GDT,
//! identity-mapped page tables, long mode, boot MSRs and FPU defaults.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_2M: u64 = 0x80;

/// GDT: null, null, code (__BOOT_CS = 0x10), data (__BOOT_DS = 0x18), TSS,
/// as the Linux 64-bit boot protocol asks.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const BOOT_CS_INDEX: usize = 2;
const BOOT_DS_INDEX: usize = 3;
const TSS_INDEX: usize = 4;

/// A GDT descriptor from its flags (access byte + flags nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The kvm_segment KVM wants for GDT entry `index`.
fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    let base = ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000);
    let limit_raw = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 0x3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the first GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + (i * 8) as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    mem.write_obj(PDPTE_START | PAGE_PRESENT_RW, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PAGE_PRESENT_RW, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        let entry = (i << 21) | PAGE_2M | PAGE_PRESENT_RW;
        mem.write_obj(entry, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

/// Special registers for long mode with the tables above.
pub fn sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(BOOT_CS_INDEX);
    let data = segment(BOOT_DS_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_INDEX);
    // Set CR0 outright: OR-ing into the reset value would keep CD/NW set and
    // run the guest with caches disabled.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers: entry point, boot_params in RSI, a stack.
pub fn regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs set at boot.
pub fn boot_msrs() -> Msrs {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    // The list is far below KVM_MAX_MSR_ENTRIES, so this cannot fail.
    Msrs::from_entries(&entries).expect("boot MSR list fits a kvm_msrs")
}

/// Local APIC register offsets and the delivery modes of LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets LINT0 to ExtINT and LINT1 to NMI in a local APIC register page.
pub fn set_lint(regs: &mut [i8]) {
    let mut set = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = regs[off + i] as u8;
        }
        let value = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, v) in value.to_le_bytes().iter().enumerate() {
            regs[off + i] = *v as i8;
        }
    };
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_flat_long_mode() {
        let cs = segment(BOOT_CS_INDEX);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s),
            (0x10, 1, 0, 1, 1)
        );
        assert_eq!(
            (cs.base, cs.limit, cs.g, cs.type_),
            (0, 0xffff_ffff, 1, 0xb)
        );
        let ds = segment(BOOT_DS_INDEX);
        assert_eq!(
            (ds.selector, ds.db, ds.type_, ds.limit),
            (0x18, 1, 0x3, 0xffff_ffff)
        );
        let tr = segment(TSS_INDEX);
        assert_eq!((tr.type_, tr.s, tr.selector), (0xb, 0, 0x20));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pd5: u64 = mem.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pd5, (5 << 21) | 0x83);
        let s = sregs(kvm_sregs::default());
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.efer, 0x500);
    }

    #[test]
    fn lint_modes() {
        let mut page = [0i8; 1024];
        page[APIC_LVT0] = 0x10; // a vector bit that must survive
        set_lint(&mut page);
        assert_eq!(page[APIC_LVT0] as u8, 0x10);
        assert_eq!(page[APIC_LVT0 + 1] as u8 & 7, 7);
        assert_eq!(page[APIC_LVT1 + 1] as u8 & 7, 4);
    }
}
