//! The Linux "zero page" (boot_params) and its e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::*;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;

/// The e820 map for a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        // EBDA + video/BIOS area: the MP table lives at its start.
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        entry(HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if mem_size > low_end {
        map.push(entry(MMIO_HOLE_END, mem_size - low_end, E820_RAM));
    }
    map
}

/// Where the initramfs goes and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Fills boot_params from the kernel's setup header.
pub fn build(
    hdr: setup_header,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> boot_params {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_the_hole() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].r#type),
            (0, 0x9fc00, E820_RAM)
        );
        let t = map[1].r#type;
        assert_eq!(t, E820_RESERVED);
        assert_eq!(map[2].addr + map[2].size, 512 << 20);
        let big = e820_map(6 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, MMIO_HOLE_START);
        assert_eq!((big[3].addr, big[3].size), (1 << 32, 3 << 30));
        let ram: u64 = big
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn boot_params_point_at_cmdline_and_initrd() {
        let hdr = setup_header {
            version: 0x20f,
            ..Default::default()
        };
        let p = build(
            hdr,
            256 << 20,
            42,
            Some(InitrdPlacement {
                addr: 0x0f00_0000,
                size: 0x12345,
            }),
        );
        // Copy out of the packed struct before comparing.
        let (ptr, size, img, rsz) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!((ptr, size), (CMDLINE_START as u32, 42));
        assert_eq!((img, rsz), (0x0f00_0000, 0x12345));
        let (flag, magic, loader) = (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader);
        assert_eq!((flag, magic, loader), (0xaa55, 0x5372_6448, 0xff));
        assert_eq!(p.e820_entries, 3);
    }
}
