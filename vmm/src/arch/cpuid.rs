//! CPUID for each vCPU: KVM's supported set with the fix-ups Linux needs to
//! see a consistent topology (one thread per core, `cpus` cores, one socket).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY_EXT: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits of APIC id needed to number `cpus` cores.
fn core_bits(cpus: u8) -> u32 {
    u32::from(cpus.max(1)).next_power_of_two().trailing_zeros()
}

/// Applies the per-vCPU fix-ups in place.
pub fn fixup(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, cpus: u8) {
    let apic_id = u32::from(vcpu_id);
    let cpus32 = u32::from(cpus.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (cpus32 << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing
            // this cache - 1 (a core's own cache: 0 more threads). Type 0
            // (EAX[4:0]) ends the list and stays as it is.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x3fff) | ((cpus32 - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPOLOGY_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits(cpus);
                        e.ebx = cpus32;
                        e.ecx = (TOPOLOGY_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[15:12] APIC id size, ECX[7:0] number of cores - 1.
                e.ecx = (core_bits(cpus) << 12) | (cpus32 - 1);
            }
            LEAF_AMD_TOPOLOGY_EXT => {
                // Extended APIC id, core id with one thread per core, node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x1,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_counts_follow_the_vcpu() {
        let mut e = vec![entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        fixup(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!(
            (e[2].eax, e[2].ebx, e[2].ecx >> 8),
            (2, 4, TOPOLOGY_LEVEL_CORE)
        );
        assert_eq!(e[3].ecx >> 8, 0, "invalid level ends the enumeration");
    }

    #[test]
    fn single_cpu_has_no_htt_and_amd_core_count() {
        let mut e = vec![entry(1, 0), entry(0x8000_0008, 0)];
        e[0].edx = EDX_HTT;
        fixup(&mut e, 0, 1);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].ecx & 0xff, 0);
        let mut e = vec![entry(0x8000_0008, 0)];
        fixup(&mut e, 0, 3);
        assert_eq!((e[0].ecx & 0xff, e[0].ecx >> 12), (2, 2));
    }
}
