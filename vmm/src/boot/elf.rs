//! Checks an uncompressed x86-64 kernel (`vmlinux`, an ELF executable)
//! before it is loaded, so a damaged file fails with a reason instead of a
//! guest that never starts.
//!
//! Booting the ELF skips the bzImage's own decompressor, which under nested
//! paging is most of the boot time (see BENCHMARKS.md). The kernel is
//! entered at its ELF entry point (`startup_64`, a physical address) in
//! 64-bit mode with `boot_params` in RSI, exactly as the bzImage's 64-bit
//! entry is; the segments go to their physical load addresses.

use std::io::{Read, Seek, SeekFrom};

use crate::arch::layout::HIMEM_START;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EI_CLASS: usize = 4;
const ELFCLASS64: u8 = 2;
const EI_DATA: usize = 5;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
/// A kernel has a handful of program headers; more means a damaged file.
const MAX_PHDRS: usize = 64;

/// Where an ELF kernel goes and where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfKernel {
    /// Physical entry point (`e_entry`).
    pub entry: u64,
    /// First byte past the highest loaded segment (including its bss).
    pub end: u64,
}

/// Whether `head` (the file's first bytes) starts an ELF file.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(ELF_MAGIC)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

/// Reads and checks the ELF header and program headers of `file`
/// (`file_len` bytes long). The error says what is wrong.
pub fn probe<F: Read + Seek>(file: &mut F, file_len: u64) -> Result<ElfKernel, &'static str> {
    let mut ehdr = [0u8; EHDR_SIZE];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut ehdr))
        .map_err(|_| "file too short for an ELF header")?;
    if !is_elf(&ehdr) {
        return Err("no ELF magic");
    }
    if ehdr[EI_CLASS] != ELFCLASS64 || ehdr[EI_DATA] != ELFDATA2LSB {
        return Err("not a 64-bit little-endian ELF");
    }
    if u16_at(&ehdr, 18) != EM_X86_64 {
        return Err("ELF for another machine than x86-64");
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = usize::from(u16_at(&ehdr, 56));
    if phentsize != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err("bad ELF program header table");
    }
    let mut phdrs = vec![0u8; PHDR_SIZE * phnum];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|_| "ELF program headers past the end of the file")?;

    let mut end = 0u64;
    let mut entry_loaded = false;
    for ph in phdrs.chunks_exact(PHDR_SIZE) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, paddr) = (u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        let seg_end = paddr.checked_add(memsz).ok_or("ELF segment overflows")?;
        if filesz > memsz || offset.checked_add(filesz).is_none_or(|e| e > file_len) {
            return Err("ELF segment larger than the file");
        }
        if paddr < HIMEM_START {
            return Err("ELF segment below 1 MiB (not a Linux kernel)");
        }
        entry_loaded |= (paddr..seg_end).contains(&entry);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err("ELF without loadable segments");
    }
    if !entry_loaded {
        return Err("ELF entry point outside its loaded segments");
    }
    Ok(ElfKernel { entry, end })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal x86-64 ELF with one PT_LOAD of `filesz`/`memsz` bytes at
    /// physical 16 MiB, entered at its start.
    pub(crate) fn fake_vmlinux(filesz: u64, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        f[..4].copy_from_slice(ELF_MAGIC);
        f[EI_CLASS] = ELFCLASS64;
        f[EI_DATA] = ELFDATA2LSB;
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[EHDR_SIZE..];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&((EHDR_SIZE + PHDR_SIZE) as u64).to_le_bytes());
        ph[16..24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        f.resize(f.len() + filesz as usize, 0x90);
        f
    }

    fn probe_bytes(b: &[u8]) -> Result<ElfKernel, &'static str> {
        probe(&mut Cursor::new(b), b.len() as u64)
    }

    #[test]
    fn finds_entry_and_end_including_bss() {
        let k = probe_bytes(&fake_vmlinux(4096, 3 << 20)).unwrap();
        assert_eq!(
            k,
            ElfKernel {
                entry: 0x100_0000,
                end: 0x100_0000 + (3 << 20)
            }
        );
    }

    #[test]
    fn rejects_damaged_files() {
        let good = fake_vmlinux(4096, 8192);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..40].to_vec(), "too short"),
            (good[..EHDR_SIZE + 10].to_vec(), "program headers"),
            (good[..good.len() - 1].to_vec(), "larger than the file"),
            (
                {
                    let mut b = good.clone();
                    b[18] = 3; // EM_386
                    b
                },
                "another machine",
            ),
            (
                {
                    let mut b = good.clone();
                    b[24..32].copy_from_slice(&0x200_0000u64.to_le_bytes());
                    b
                },
                "entry point outside",
            ),
            (
                {
                    let mut b = good.clone();
                    b[EHDR_SIZE + 40..EHDR_SIZE + 48].copy_from_slice(&u64::MAX.to_le_bytes());
                    b
                },
                "overflows",
            ),
            (
                {
                    let mut b = good.clone();
                    b[56..58].copy_from_slice(&1000u16.to_le_bytes());
                    b
                },
                "program header table",
            ),
        ];
        for (bytes, want) in cases {
            let e = probe_bytes(&bytes).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }
}
