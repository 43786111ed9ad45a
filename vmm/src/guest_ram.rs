//! Guest RAM: anonymous host mappings placed on 2 MiB boundaries.
//!
//! KVM maps guest memory with 2 MiB entries in its nested page tables only
//! where the guest-physical and the host-virtual address agree modulo 2 MiB
//! and the host backs the range with a transparent huge page. `mmap` returns
//! addresses aligned to 4 KiB only (Linux 6.1 does not align large anonymous
//! mappings), so a plain mapping leaves every guest page to be faulted into
//! the nested page tables 4 KiB at a time: one exit per first touch and a
//! deeper two-dimensional page walk on every TLB miss. QEMU aligns its RAM
//! blocks the same way.
//!
//! The mappings are never unmapped: the VMM runs one VM per process, and a
//! device or pager thread that touched guest memory after an early unmap
//! would fault instead of failing cleanly. They go with the process.

use std::io;
use std::ptr::null_mut;

use thiserror::Error;
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionCollectionError, GuestRegionMmap};

use crate::memory::madvise_hugepage;

/// The huge-page size guest RAM is aligned to.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

#[derive(Debug, Error)]
pub enum GuestRamError {
    #[error("cannot map {len} bytes of guest RAM: {source}")]
    Map {
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("guest RAM region at {0:#x} is empty or overflows")]
    InvalidRegion(u64),
    #[error("guest RAM mapping rejected: {0}")]
    Region(#[from] MmapRegionError),
    #[error("guest RAM regions overlap or are unsorted: {0}")]
    Collection(#[from] GuestRegionCollectionError),
}

/// Maps each `(guest address, length)` range at a host address congruent to
/// its guest address modulo [`HUGE_PAGE_SIZE`]. `huge_pages` also asks the
/// host for transparent huge pages (`MADV_HUGEPAGE`), which matters where
/// THP is in `madvise` mode; leave it off for memory the pager manages.
pub fn map(
    ranges: &[(GuestAddress, usize)],
    huge_pages: bool,
) -> Result<GuestMemoryMmap, GuestRamError> {
    if huge_pages && host_thp_disabled() {
        log::warn!(
            "transparent huge pages are disabled on this host ({THP_ENABLED}: never): \
             guest RAM is mapped in 4 KiB pages, which makes guests slower"
        );
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for &(base, len) in ranges {
        if len == 0 || base.0.checked_add(len as u64).is_none() {
            return Err(GuestRamError::InvalidRegion(base.0));
        }
        let offset = (base.0 % HUGE_PAGE_SIZE as u64) as usize;
        let host = map_aligned(len, offset)?;
        if huge_pages {
            // Advice only: without it the mapping still works, in 4 KiB pages.
            if let Err(e) = madvise_hugepage(host as usize, len) {
                log::debug!("guest RAM: MADV_HUGEPAGE: {e}");
            }
        }
        // SAFETY: `host` starts a private anonymous read-write mapping of
        // exactly `len` bytes made by `map_aligned`, which is never unmapped
        // (see the module comment), so it outlives the region.
        let region = unsafe {
            MmapRegionBuilder::new(len)
                .with_mmap_prot(PROT)
                .with_mmap_flags(FLAGS)
                .with_raw_mmap_pointer(host)
        }
        .build()?;
        let region =
            GuestRegionMmap::new(region, base).ok_or(GuestRamError::InvalidRegion(base.0))?;
        regions.push(region);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Where Linux shows the host's transparent huge page mode.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// Whether the host refuses transparent huge pages even on request.
pub(crate) fn host_thp_disabled() -> bool {
    std::fs::read_to_string(THP_ENABLED).is_ok_and(|mode| thp_mode_is_never(&mode))
}

/// `mode` as the kernel shows it, the active choice in brackets:
/// "always [madvise] never".
fn thp_mode_is_never(mode: &str) -> bool {
    mode.split_whitespace().any(|m| m == "[never]")
}

/// Maps `len` bytes whose start is `offset` bytes past a 2 MiB boundary:
/// maps `len` plus one huge page, then unmaps the slack on both sides.
fn map_aligned(len: usize, offset: usize) -> Result<*mut u8, GuestRamError> {
    let map_err = |source| GuestRamError::Map { len, source };
    let reserve = len
        .checked_add(HUGE_PAGE_SIZE)
        .ok_or_else(|| map_err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses;
    // no existing memory is affected.
    let addr = unsafe { libc::mmap(null_mut(), reserve, PROT, FLAGS, -1, 0) };
    if addr == libc::MAP_FAILED {
        return Err(map_err(io::Error::last_os_error()));
    }
    let addr = addr as usize;
    let start = align_start(addr, offset);
    let head = start - addr;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the mapping made above and outside
    // `start..start + len`; nothing refers to them yet.
    unsafe {
        if head > 0 {
            libc::munmap(addr as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    Ok(start as *mut u8)
}

/// The first address at or after `addr` that lies `offset` bytes past a
/// [`HUGE_PAGE_SIZE`] boundary (`addr` page-aligned, `offset` below 2 MiB).
fn align_start(addr: usize, offset: usize) -> usize {
    let start = (addr & !(HUGE_PAGE_SIZE - 1)) + offset;
    if start >= addr {
        start
    } else {
        start + HUGE_PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const MIB: usize = 1 << 20;

    #[test]
    fn start_is_the_first_congruent_address_in_the_reservation() {
        let hp = HUGE_PAGE_SIZE;
        assert_eq!(align_start(hp, 0), hp);
        assert_eq!(align_start(hp + 4096, 0), 2 * hp);
        assert_eq!(align_start(hp - 4096, 0), hp);
        assert_eq!(align_start(hp + 4096, 8192), hp + 8192);
        assert_eq!(align_start(hp + 8192, 4096), 2 * hp + 4096);
        for addr in (0..3 * hp).step_by(4096).map(|a| a + 64 * hp) {
            for offset in [0, 4096, hp - 4096] {
                let s = align_start(addr, offset);
                assert!(s >= addr && s - addr < hp, "{addr:#x} {offset:#x}");
                assert_eq!(s % hp, offset);
            }
        }
    }

    #[test]
    fn regions_are_congruent_to_their_guest_addresses_and_usable() {
        let ranges = [
            (GuestAddress(0), 6 * MIB),
            (GuestAddress(4 << 30), 3 * MIB),
            (GuestAddress((5 << 30) + 4096), MIB),
        ];
        let mem = map(&ranges, true).unwrap();
        assert_eq!(mem.num_regions(), 3);
        for (region, &(base, len)) in mem.iter().zip(&ranges) {
            assert_eq!(region.start_addr(), base);
            assert_eq!(region.len(), len as u64);
            let host = region.as_ptr() as u64;
            assert_eq!(host % HUGE_PAGE_SIZE as u64, base.0 % HUGE_PAGE_SIZE as u64);
            // Every byte is ours: write the first and last pages, read back.
            let last = base.unchecked_add(len as u64 - 8);
            mem.write_obj(0x1122_3344_5566_7788u64, base).unwrap();
            mem.write_obj(!0u64 - base.0, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(base).unwrap(), 0x1122_3344_5566_7788);
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), !0u64 - base.0);
        }
        // Fresh anonymous memory reads as zero.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MIB as u64)).unwrap(), 0);
    }

    #[test]
    fn only_the_bracketed_never_mode_counts_as_disabled() {
        assert!(thp_mode_is_never("always madvise [never]\n"));
        assert!(!thp_mode_is_never("[always] madvise never\n"));
        assert!(!thp_mode_is_never("always [madvise] never\n"));
        assert!(!thp_mode_is_never(""));
    }

    #[test]
    fn empty_and_overflowing_ranges_are_refused() {
        assert!(matches!(
            map(&[(GuestAddress(0), 0)], false),
            Err(GuestRamError::InvalidRegion(0))
        ));
        assert!(matches!(
            map(&[(GuestAddress(u64::MAX - 4095), 8192)], false),
            Err(GuestRamError::InvalidRegion(_))
        ));
    }
}
