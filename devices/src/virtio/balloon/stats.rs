//! The guest's memory statistics (§5.5.6.3): packed `{le16 tag; le64 val}`
//! entries. Unknown tags are skipped; a trailing partial entry is ignored.

use serde::Serialize;

use super::*;

/// The last statistics the guest sent. Memory values are in bytes, the
/// others are event counts since the guest booted; a field the guest did
/// not send is `None`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct GuestStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
}

/// What a statistics buffer held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedStats {
    pub stats: GuestStats,
    /// Entries with a known tag.
    pub known: usize,
    /// Entries with an unknown tag (skipped).
    pub unknown: usize,
    /// Bytes after the last whole entry (ignored).
    pub trailing: usize,
}

/// Parses up to [`MAX_STAT_ENTRIES`] entries of `buf`.
pub fn parse_stats(buf: &[u8]) -> ParsedStats {
    let mut out = ParsedStats::default();
    let entries = buf.chunks_exact(STAT_ENTRY_LEN);
    out.trailing = entries.remainder().len();
    for e in entries.take(MAX_STAT_ENTRIES) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..]);
        let val = u64::from_le_bytes(v);
        let s = &mut out.stats;
        let slot = match tag {
            VIRTIO_BALLOON_S_SWAP_IN => &mut s.swap_in,
            VIRTIO_BALLOON_S_SWAP_OUT => &mut s.swap_out,
            VIRTIO_BALLOON_S_MAJFLT => &mut s.major_faults,
            VIRTIO_BALLOON_S_MINFLT => &mut s.minor_faults,
            VIRTIO_BALLOON_S_MEMFREE => &mut s.free_memory,
            VIRTIO_BALLOON_S_MEMTOT => &mut s.total_memory,
            VIRTIO_BALLOON_S_AVAIL => &mut s.available_memory,
            VIRTIO_BALLOON_S_CACHES => &mut s.disk_caches,
            VIRTIO_BALLOON_S_HTLB_PGALLOC => &mut s.hugetlb_allocations,
            VIRTIO_BALLOON_S_HTLB_PGFAIL => &mut s.hugetlb_failures,
            _ => {
                out.unknown += 1;
                continue;
            }
        };
        *slot = Some(val);
        out.known += 1;
    }
    out
}
