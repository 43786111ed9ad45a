//! The swap store: a file of page-sized slots whose I/O goes through a volume.
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
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::block::Volume;
use thiserror::Error;

use super::PAGE_SIZE;

/// How long a blocked swap I/O sleeps between checks of the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

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
    /// Slots freed and ready for reuse.
    free: Vec<u32>,
    /// Slots `[next, total)` were never used.
    next: u32,
    used: u32,
    /// One bit per slot: allocated. Catches double frees.
    allocated: Vec<u64>,
}

#[derive(Debug)]
pub struct SwapStore {
    file: File,
    volume: Arc<Volume>,
    total: u32,
    slots: Mutex<Slots>,
}

impl SwapStore {
    /// Creates (or truncates) the swap file at `path` with `slots` slots.
    pub fn create(path: &Path, slots: u32, volume: Arc<Volume>) -> Result<Self, SwapError> {
        let open_err = |source| SwapError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(open_err)?;
        file.set_len(u64::from(slots) * PAGE_SIZE as u64)
            .map_err(open_err)?;
        Ok(Self {
            file,
            volume,
            total: slots,
            slots: Mutex::new(Slots {
                free: Vec::new(),
                next: 0,
                used: 0,
                allocated: vec![0; (slots as usize).div_ceil(64)],
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
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
        let mut s = self.lock();
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None if s.next < self.total => {
                s.next += 1;
                s.next - 1
            }
            None => return Err(SwapError::Full { slots: self.total }),
        };
        s.allocated[slot as usize / 64] |= 1 << (slot % 64);
        s.used += 1;
        Ok(slot)
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
        s.free.push(slot);
    }

    fn offset(slot: u32) -> u64 {
        u64::from(slot) * PAGE_SIZE as u64
    }

    fn pread(&self, slot: u32, buf: &mut [u8]) -> Result<(), SwapError> {
        self.file
            .read_exact_at(buf, Self::offset(slot))
            .map_err(|source| SwapError::Io {
                op: "read",
                slot,
                source,
            })
    }

    /// Writes a page to `slot`, waiting while the volume is quiesced.
    pub fn write(&self, slot: u32, buf: &[u8], stop: &AtomicBool) -> Result<(), SwapError> {
        let _io = self.begin_io_stoppable(stop)?;
        self.file
            .write_all_at(buf, Self::offset(slot))
            .map_err(|source| SwapError::Io {
                op: "write",
                slot,
                source,
            })
    }

    /// Reads `slot`, waiting while the volume is quiesced.
    pub fn read_wait(&self, slot: u32, buf: &mut [u8], stop: &AtomicBool) -> Result<(), SwapError> {
        let _io = self.begin_io_stoppable(stop)?;
        self.pread(slot, buf)
    }

    /// Reads `slot` if the volume takes I/O right now; `Ok(false)` if quiesced.
    pub fn try_read(&self, slot: u32, buf: &mut [u8]) -> Result<bool, SwapError> {
        match self.volume.try_begin_io() {
            Some(_io) => self.pread(slot, buf).map(|()| true),
            None => Ok(false),
        }
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
        loop {
            if let Some(io) = self.volume.begin_io_timeout(STOP_POLL) {
                return Ok(io);
            }
            if stop.load(Ordering::SeqCst) {
                return Err(SwapError::Stopped);
            }
        }
    }
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
    fn quiesced_volume_blocks_reads_but_not_noio_reads() {
        let (s, path) = store(2);
        let stop = AtomicBool::new(false);
        let page = vec![0x5au8; PAGE_SIZE];
        s.write(1, &page, &stop).unwrap();
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
}
