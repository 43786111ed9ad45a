//! The swap store: a file of page-sized slots whose I/O goes through a volume.
//!
//! Slots are handed out in runs (next fit over an allocation bitmap), so a
//! batch of pages written together lands in consecutive slots: one `pwritev`
//! writes it and one `pread` reads it back around a fault.
//!
//! Writes always go through [`Volume::begin_io`] and so wait while the volume
//! is quiesced. Reads have three entries: waiting (ordinary faults), trying
//! (the fault handler, which must not block), and the NOIO read, which does
//! not wait for a quiesced volume. A NOIO swap-in has no I/O-free source for
//! the page's contents; like the PM requests Linux lets through a queue that
//! is runtime-suspended or resuming, it reads the slot past the quiesce.
//! That is safe here: a read of the pager's own file changes no state the
//! quiesce protects (the disk image beside it, or write ordering).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::block::Volume;
use thiserror::Error;

use super::PAGE_SIZE;

/// Slots of waste a merged read-around accepts between two runs.
pub const MERGE_GAP: u32 = 16;
/// How long a blocked swap I/O sleeps between checks of the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Most buffers one `pwritev` takes (`IOV_MAX`, POSIX `<limits.h>`; 1024 on Linux).
const IOV_MAX: usize = 1024;

#[derive(Debug, Error)]
pub enum SwapError {
    #[error("cannot open swap file {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("swap store is full ({slots} slots of {PAGE_SIZE} bytes)")]
    Full { slots: u32 },
    #[error("swap {op} of slot {slot} failed")]
    Io {
        op: &'static str,
        slot: u32,
        #[source]
        source: io::Error,
    },
    #[error("swap I/O abandoned: the pager is stopping")]
    Stopped,
}

#[derive(Debug)]
struct Slots {
    /// Where the next-fit search for a free slot starts.
    cursor: u32,
    used: u32,
    /// One bit per slot: allocated. Also catches double frees.
    allocated: Vec<u64>,
}

impl Slots {
    fn is_free(&self, slot: u32) -> bool {
        self.allocated[slot as usize / 64] & (1 << (slot % 64)) == 0
    }

    fn set(&mut self, slot: u32) {
        self.allocated[slot as usize / 64] |= 1 << (slot % 64);
    }

    /// The first run of `want` free consecutive slots at or after `from`
    /// (wrapping), else the start of the longest run seen: a batch written
    /// together should land in consecutive slots even when earlier frees
    /// left the bitmap fragmented, so that it reads back with one `pread`.
    fn find_run(&self, from: u32, total: u32, want: u32) -> Option<u32> {
        let mut run: Option<(u32, u32)> = None;
        let mut best: Option<(u32, u32)> = None;
        let mut k = 0;
        while k < total {
            let slot = (from + k) % total;
            if slot == 0 {
                run = None; // wrapping breaks adjacency
            }
            // Whole allocated words are skipped at once.
            if slot.is_multiple_of(64) && self.allocated[slot as usize / 64] == u64::MAX {
                run = None;
                k += 64.min(total - slot);
                continue;
            }
            if self.is_free(slot) {
                let (start, len) = run.map_or((slot, 1), |(s, l)| (s, l + 1));
                if len >= want {
                    return Some(start);
                }
                run = Some((start, len));
                if best.is_none_or(|(_, l)| len > l) {
                    best = Some((start, len));
                }
            } else {
                run = None;
            }
            k += 1;
        }
        best.map(|(start, _)| start)
    }
}

#[derive(Debug)]
pub struct SwapStore {
    file: File,
    volume: Arc<Volume>,
    total: u32,
    slots: Mutex<Slots>,
}

impl SwapStore {
    /// Creates the swap file at `path` with `slots` slots after a one-page
    /// header holding [`crate::swapfile::MAGIC`]. An existing file is reused
    /// only when it is empty or one of ours (see `crate::swapfile`); a
    /// symbolic link is never followed. The file is locked (exclusive OFD
    /// lock) for the store's lifetime, so it cannot be attached as a disk.
    pub fn create(path: &Path, slots: u32, volume: Arc<Volume>) -> Result<Self, SwapError> {
        use crate::swapfile::{reusable, HEADER_LEN, MAGIC};
        use std::os::unix::fs::OpenOptionsExt;
        let open_err = |source| SwapError::Open {
            path: path.display().to_string(),
            source,
        };
        let refuse = |what: &str| {
            open_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{what}; refusing to use it as swap"),
            ))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    refuse("it is a symbolic link")
                } else {
                    open_err(e)
                }
            })?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.file_type().is_file() {
            return Err(refuse("it is not a regular file"));
        }
        devices::block::lock_file(&file, true).map_err(open_err)?;
        if !reusable(&mut file, meta.len()).map_err(open_err)? {
            return Err(refuse("it holds data that is not a swap file of this VMM"));
        }
        // Old slots are stale: drop them, then size the file afresh (sparse).
        file.set_len(0).map_err(open_err)?;
        file.set_len(HEADER_LEN + u64::from(slots) * PAGE_SIZE as u64)
            .map_err(open_err)?;
        file.write_all_at(MAGIC, 0).map_err(open_err)?;
        Ok(Self {
            file,
            volume,
            total: slots,
            slots: Mutex::new(Slots {
                cursor: 0,
                used: 0,
                allocated: vec![0; (slots as usize).div_ceil(64)],
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn total_slots(&self) -> u32 {
        self.total
    }

    pub fn used_slots(&self) -> u32 {
        self.lock().used
    }

    pub fn alloc(&self) -> Result<u32, SwapError> {
        self.alloc_run(1).map(|(slot, _)| slot)
    }

    /// Allocates up to `max` (at least one) consecutive slots: `(first, count)`.
    pub fn alloc_run(&self, max: u32) -> Result<(u32, u32), SwapError> {
        let mut s = self.lock();
        let first = s
            .find_run(s.cursor, self.total, max.max(1))
            .ok_or(SwapError::Full { slots: self.total })?;
        let mut count = 0;
        while count < max.max(1) && first + count < self.total && s.is_free(first + count) {
            s.set(first + count);
            count += 1;
        }
        s.used += count;
        s.cursor = (first + count) % self.total;
        Ok((first, count))
    }

    /// Allocates up to `max` consecutive slots starting exactly at `home`,
    /// if `home` is free: `(home, count)`. Page `i` uses slot `i` as its
    /// home when it can (the swap file holds as many slots as guest RAM has
    /// pages by default), so neighbours in memory are neighbours on swap
    /// whatever order they were written in, and read back together.
    pub fn alloc_at(&self, home: u32, max: u32) -> Option<(u32, u32)> {
        let mut s = self.lock();
        if home >= self.total || !s.is_free(home) {
            return None;
        }
        let mut count = 0;
        while count < max.max(1) && home + count < self.total && s.is_free(home + count) {
            s.set(home + count);
            count += 1;
        }
        s.used += count;
        Some((home, count))
    }

    pub fn free(&self, slot: u32) {
        let mut s = self.lock();
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if slot >= self.total || s.allocated[word] & bit == 0 {
            log::error!("pager: swap slot {slot} freed twice or never allocated");
            return;
        }
        s.allocated[word] &= !bit;
        s.used -= 1;
    }

    fn offset(slot: u32) -> u64 {
        crate::swapfile::HEADER_LEN + u64::from(slot) * PAGE_SIZE as u64
    }

    /// Reads `buf.len()` bytes (whole pages) from consecutive slots from `slot` on.
    fn pread(&self, slot: u32, buf: &mut [u8]) -> Result<(), SwapError> {
        self.file
            .read_exact_at(buf, Self::offset(slot))
            .map_err(|source| SwapError::Io {
                op: "read",
                slot,
                source,
            })
    }

    /// Writes `pages` (each one page) to the consecutive slots from `first`
    /// on, in as few `pwritev` calls as `IOV_MAX` allows, waiting while the
    /// volume is quiesced. Returns the number of `pwritev` calls.
    pub fn write_run(
        &self,
        first: u32,
        pages: &[&[u8]],
        stop: &AtomicBool,
    ) -> Result<u64, SwapError> {
        let _io = self.begin_io_stoppable(stop)?;
        let mut calls = 0;
        for (n, chunk) in pages.chunks(IOV_MAX).enumerate() {
            let slot = first + (n * IOV_MAX) as u32;
            calls += pwritev_all(&self.file, Self::offset(slot), chunk).map_err(|source| {
                SwapError::Io {
                    op: "write",
                    slot,
                    source,
                }
            })?;
        }
        Ok(calls)
    }

    /// Reads `slot`, waiting while the volume is quiesced.
    #[cfg(test)]
    pub fn read_wait(&self, slot: u32, buf: &mut [u8], stop: &AtomicBool) -> Result<(), SwapError> {
        self.read_wait_unless(slot, buf, || stop.load(Ordering::SeqCst))
    }

    /// [`SwapStore::read_wait`] that stops waiting (`Stopped`) once
    /// `give_up` is true.
    pub fn read_wait_unless(
        &self,
        slot: u32,
        buf: &mut [u8],
        give_up: impl Fn() -> bool,
    ) -> Result<(), SwapError> {
        let _io = self
            .volume
            .begin_io_unless(STOP_POLL, give_up)
            .ok_or(SwapError::Stopped)?;
        self.pread(slot, buf)
    }

    /// Reads `slot` if the volume takes I/O right now; `Ok(false)` if quiesced.
    pub fn try_read(&self, slot: u32, buf: &mut [u8]) -> Result<bool, SwapError> {
        self.try_read_runs(buf, &[(slot, 0, buf.len())])
    }

    /// Reads several runs of consecutive slots into `buf` under one volume
    /// entry, if the volume takes I/O right now (`Ok(false)` if quiesced).
    /// Each run is `(first slot, offset in buf, bytes)`, whole pages.
    pub fn try_read_runs(
        &self,
        buf: &mut [u8],
        runs: &[(u32, usize, usize)],
    ) -> Result<bool, SwapError> {
        let Some(_io) = self.volume.try_begin_io() else {
            return Ok(false);
        };
        for &(slot, off, len) in runs {
            let dst = off
                .checked_add(len)
                .and_then(|end| buf.get_mut(off..end))
                .ok_or_else(|| SwapError::Io {
                    op: "read",
                    slot,
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                })?;
            self.pread(slot, dst)?;
        }
        Ok(true)
    }

    /// Like [`SwapStore::try_read_runs`], in as few `pread` calls as
    /// bounded waste allows: runs whose slots lie at most [`MERGE_GAP`]
    /// slots apart are read as one span (through a scratch buffer) and
    /// scattered. Returns the `pread` calls made, `None` if quiesced.
    pub fn try_read_merged(
        &self,
        buf: &mut [u8],
        runs: &[(u32, usize, usize)],
    ) -> Result<Option<u64>, SwapError> {
        let Some(_io) = self.volume.try_begin_io() else {
            return Ok(None);
        };
        let mut sorted = runs.to_vec();
        sorted.sort_unstable_by_key(|r| r.0);
        let mut calls = 0;
        let mut i = 0;
        while i < sorted.len() {
            let first = sorted[i].0;
            let mut end = first + (sorted[i].2 / PAGE_SIZE) as u32;
            let mut j = i + 1;
            while j < sorted.len() && sorted[j].0 <= end + MERGE_GAP {
                end = end.max(sorted[j].0 + (sorted[j].2 / PAGE_SIZE) as u32);
                j += 1;
            }
            if j == i + 1 {
                let (slot, off, len) = sorted[i];
                let dst = buf.get_mut(off..off + len).ok_or(SwapError::Io {
                    op: "read",
                    slot,
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                })?;
                self.pread(slot, dst)?;
            } else {
                let mut span = vec![0u8; (end - first) as usize * PAGE_SIZE];
                self.pread(first, &mut span)?;
                for &(slot, off, len) in &sorted[i..j] {
                    let from = (slot - first) as usize * PAGE_SIZE;
                    let dst = buf.get_mut(off..off + len).ok_or(SwapError::Io {
                        op: "read",
                        slot,
                        source: io::Error::from(io::ErrorKind::InvalidInput),
                    })?;
                    dst.copy_from_slice(&span[from..from + len]);
                }
            }
            calls += 1;
            i = j;
        }
        Ok(Some(calls))
    }

    /// The NOIO read: through the volume when it flows, past the quiesce when
    /// not (see the module comment). Returns whether it went past the quiesce.
    pub fn read_noio(&self, slot: u32, buf: &mut [u8]) -> Result<bool, SwapError> {
        if self.try_read(slot, buf)? {
            return Ok(false);
        }
        self.pread(slot, buf).map(|()| true)
    }

    fn begin_io_stoppable(&self, stop: &AtomicBool) -> Result<devices::block::IoGuard, SwapError> {
        self.volume
            .begin_io_unless(STOP_POLL, || stop.load(Ordering::SeqCst))
            .ok_or(SwapError::Stopped)
    }

    /// Writes one page to `slot` whether or not the volume is quiesced: the
    /// control API's evict test aid pushes pages out while a device sleeps.
    pub fn write_past_quiesce(&self, slot: u32, page: &[u8]) -> Result<(), SwapError> {
        pwritev_all(&self.file, Self::offset(slot), &[page])
            .map(drop)
            .map_err(|source| SwapError::Io {
                op: "write",
                slot,
                source,
            })
    }
}

/// `pwritev` of `bufs` at `offset`, continuing after short writes; the
/// number of calls made.
fn pwritev_all(file: &File, mut offset: u64, bufs: &[&[u8]]) -> io::Result<u64> {
    let mut iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut done = 0;
    let mut calls = 0;
    while done < iovs.len() {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let rest = &iovs[done..];
        // SAFETY: every iovec points into a slice of `bufs`, alive and
        // unchanged for the call (the kernel only reads them); `rest.len()`
        // is at most IOV_MAX (the caller chunks) and fits in a c_int.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                rest.as_ptr(),
                rest.len() as libc::c_int,
                off,
            )
        };
        calls += 1;
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        // Skip what was written; a partly written buffer is trimmed in place.
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && done < iovs.len() {
            let iov = &mut iovs[done];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                done += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside
                // the same buffer.
                iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(slots: u32) -> (SwapStore, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("vmm-swap-unit-{}-{slots}", std::process::id()));
        (
            SwapStore::create(&path, slots, Volume::new("swap")).unwrap(),
            path,
        )
    }

    #[test]
    fn slots_are_allocated_freed_and_exhausted() {
        let (s, path) = store(3);
        let a = s.alloc().unwrap();
        let b = s.alloc().unwrap();
        let c = s.alloc().unwrap();
        assert_eq!(s.used_slots(), 3);
        assert!(matches!(s.alloc(), Err(SwapError::Full { slots: 3 })));
        s.free(b);
        s.free(b); // logged, ignored
        assert_eq!(s.used_slots(), 2);
        assert_eq!(s.alloc().unwrap(), b);
        assert_ne!(a, c);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn runs_are_consecutive_and_stop_at_used_slots() {
        let (s, path) = store(200);
        assert_eq!(s.alloc_run(64).unwrap(), (0, 64));
        assert_eq!(s.alloc_run(64).unwrap(), (64, 64));
        s.free(10);
        s.free(11);
        // Next fit continues after the last run, then wraps to the hole.
        assert_eq!(s.alloc_run(100).unwrap(), (128, 72));
        assert_eq!(s.alloc_run(5).unwrap(), (10, 2));
        assert!(matches!(
            s.alloc_run(1),
            Err(SwapError::Full { slots: 200 })
        ));
        assert_eq!(s.used_slots(), 200);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn vectored_writes_read_back_as_one_run() {
        let (s, path) = store(8);
        let stop = AtomicBool::new(false);
        let pages: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; PAGE_SIZE]).collect();
        let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
        assert_eq!(s.write_run(2, &refs, &stop).unwrap(), 1);
        let mut buf = vec![0u8; 6 * PAGE_SIZE];
        // Slots 2..5 into pages 0..3 of buf, slot 6 into page 5.
        assert!(s
            .try_read_runs(
                &mut buf,
                &[(2, 0, 4 * PAGE_SIZE), (6, 5 * PAGE_SIZE, PAGE_SIZE)]
            )
            .unwrap());
        for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
            let want = match i {
                0..=3 => i as u8 + 1,
                4 => 0,
                _ => 5,
            };
            assert!(page.iter().all(|&b| b == want), "page {i}");
        }
        assert!(s
            .try_read_runs(&mut buf, &[(7, 5 * PAGE_SIZE, 2 * PAGE_SIZE)])
            .is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn merged_reads_cover_near_runs_in_one_call_and_scatter_them() {
        let (s, path) = store(64);
        let page = |b: u8| vec![b; PAGE_SIZE];
        for slot in 0..64u32 {
            s.write_run(slot, &[&page(slot as u8)], &AtomicBool::new(false))
                .unwrap();
        }
        // Runs at slots 10, 12-13 and 40 into buffer positions 0, 1-2, 3.
        let mut buf = vec![0u8; 4 * PAGE_SIZE];
        let runs = [
            (12, PAGE_SIZE, 2 * PAGE_SIZE),
            (10, 0, PAGE_SIZE),
            (40, 3 * PAGE_SIZE, PAGE_SIZE),
        ];
        let calls = s.try_read_merged(&mut buf, &runs).unwrap();
        assert_eq!(calls, Some(2), "10 and 12-13 merge; 40 is too far");
        for (i, want) in [10u8, 12, 13, 40].into_iter().enumerate() {
            assert!(
                buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .iter()
                    .all(|&b| b == want),
                "page {i}"
            );
        }
        s.volume().quiesce();
        assert_eq!(s.try_read_merged(&mut buf, &runs).unwrap(), None);
        s.volume().resume();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn quiesced_volume_blocks_reads_but_not_noio_reads() {
        let (s, path) = store(2);
        let stop = AtomicBool::new(false);
        let page = vec![0x5au8; PAGE_SIZE];
        s.write_run(1, &[&page], &stop).unwrap();
        s.volume().quiesce();
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(!s.try_read(1, &mut buf).unwrap());
        assert!(
            s.read_noio(1, &mut buf).unwrap(),
            "should bypass the quiesce"
        );
        assert_eq!(buf, page);
        stop.store(true, Ordering::SeqCst);
        assert!(matches!(
            s.read_wait(1, &mut buf, &stop),
            Err(SwapError::Stopped)
        ));
        s.volume().resume();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_swap_file_has_the_magic_is_locked_and_never_overwrites_data() {
        let (s, path) = store(5); // a size no other test uses: its own file
        let head = std::fs::read(&path).unwrap();
        assert_eq!(&head[..16], crate::swapfile::MAGIC);
        assert_eq!(
            head.len() as u64,
            crate::swapfile::HEADER_LEN + 5 * PAGE_SIZE as u64
        );
        // Locked: no disk can open it while the store lives.
        for readonly in [false, true] {
            assert!(matches!(
                devices::block::RawImage::open(&path, readonly, "x"),
                Err(devices::block::RawImageError::Locked { .. })
            ));
        }
        drop(s);
        // Reused once closed (ours), emptied and sized afresh.
        let again = SwapStore::create(&path, 2, Volume::new("swap")).unwrap();
        drop(again);
        // Data that is not ours is refused, untouched.
        std::fs::write(&path, b"precious data").unwrap();
        let e = SwapStore::create(&path, 2, Volume::new("swap")).unwrap_err();
        assert!(format!("{e:?}").contains("not a swap file"), "{e:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious data");
        std::fs::remove_file(path).unwrap();
    }
}
