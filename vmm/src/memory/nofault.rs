//! Reads of guest RAM that never wait on the pager.
//!
//! The reclaim thread and the evict test aid copy pages they hold locked
//! and believe mapped. A page zapped from outside the pager (a `madvise` by
//! someone else) is missing all the same, and a plain copy of it would
//! raise a userfault whose resolution needs the very page lock the copier
//! holds: a deadlock. Reading through `/proc/self/mem` instead goes through
//! `access_remote_vm`, whose page lookup cannot retry, so userfaultfd fails
//! it (`SIGBUS` inside the kernel, an error here) instead of waiting.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `/proc/self/mem`, opened once.
pub struct NoFaultReader(File);

impl NoFaultReader {
    pub fn open() -> io::Result<Self> {
        File::open("/proc/self/mem").map(Self)
    }

    /// Copies `buf.len()` bytes at host address `addr` into `buf`; an error
    /// (usually `EIO`) when any page of the range is not mapped.
    pub fn read(&self, addr: usize, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(buf, addr as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mapped_memory_and_fails_on_unmapped() {
        let r = NoFaultReader::open().unwrap();
        let src = vec![0x5au8; 8192];
        let mut dst = vec![0u8; 8192];
        r.read(src.as_ptr() as usize, &mut dst).unwrap();
        assert_eq!(src, dst);
        // Page 0 is never mapped in a Rust process.
        assert!(r.read(0x10, &mut dst[..16]).is_err());
    }
}
