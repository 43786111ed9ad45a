//! What the fuzz targets share: the scratch disk images, the guest address
//! vocabulary, a driver for split virtqueues whose every move comes from
//! the fuzz input, and an event loop that runs device workers inline.
//!
//! A target is a hostile guest: it builds descriptors, rings, TRBs and
//! contexts in guest memory from the input and hands them to a device
//! model the way the VMM does. Whatever it writes, the model must not
//! panic, hang, or walk memory without bound.

pub mod virtq;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

pub use arbitrary::{Arbitrary, Unstructured};
use devices::block::RawImage;
use devices::pci::IrqLevel;
use devices::virtio::{Worker, WorkerError, WorkerHost, WorkerId};
use event_manager::{EventManager, SubscriberOps};

/// Sectors of the scratch disks: small, so that every sector number the
/// fuzzer tries is near an edge.
pub const DISK_SECTORS: u64 = 64;

/// A file that exists only while the process does: made on tmpfs when
/// there is one, unlinked at once, and reopened by path through
/// `/proc/self/fd` (so code that takes a path can read it, and nothing is
/// left behind when a fuzzer is killed).
pub struct ScratchFile(File);

impl ScratchFile {
    pub fn new(name: &str) -> Self {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("vmm-fuzz-{}-{name}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create a scratch file");
        std::fs::remove_file(&path).expect("unlink the scratch file");
        Self(file)
    }

    /// A path that opens the file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }

    /// Makes `bytes` the whole file; returns its path.
    pub fn set(&self, bytes: &[u8]) -> PathBuf {
        self.0.set_len(0).expect("truncate a scratch file");
        self.0.write_all_at(bytes, 0).expect("write a scratch file");
        self.path()
    }
}

/// A raw image of [`DISK_SECTORS`] sectors with a volume of its own,
/// opened afresh for each run (a device may leave its volume quiesced),
/// over one [`ScratchFile`] per process and `readonly`.
pub fn scratch_disk(readonly: bool) -> RawImage {
    static RW: OnceLock<ScratchFile> = OnceLock::new();
    static RO: OnceLock<ScratchFile> = OnceLock::new();
    let file = if readonly { &RO } else { &RW }.get_or_init(|| {
        let file = ScratchFile::new(if readonly { "ro.img" } else { "rw.img" });
        // Sector i holds the byte i: misplaced I/O would show in a debugger.
        let bytes: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect();
        file.set(&bytes);
        file
    });
    // Forget the volumes of earlier runs (the list only prunes when read).
    drop(devices::block::all_volumes());
    RawImage::open(&file.path(), readonly, "fuzz").expect("open the scratch disk")
}

/// Where a guest buffer is: in a target's data area (most of the time, so
/// that the fuzzer reaches past the address checks), or anywhere in the
/// 64-bit space (outside memory, straddling its end, wrapping).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzAddr {
    Data(u16),
    Raw(u64),
}

impl FuzzAddr {
    /// The guest address, with data-area offsets taken from `data`.
    pub fn resolve(self, data: u64) -> u64 {
        match self {
            FuzzAddr::Data(off) => data + u64::from(off),
            FuzzAddr::Raw(a) => a,
        }
    }
}

/// A buffer length: whole sectors (what drivers send), a few bytes (what
/// headers and status bytes are), or any 32-bit value.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzLen {
    Sectors(u8),
    Bytes(u8),
    Raw(u32),
}

impl FuzzLen {
    pub fn get(self) -> u32 {
        match self {
            FuzzLen::Sectors(n) => u32::from(n) * 512,
            FuzzLen::Bytes(n) => u32::from(n),
            FuzzLen::Raw(n) => n,
        }
    }
}

/// An opcode or type field: one the model implements (from its list), or
/// any value.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Pick<T> {
    Known(u8),
    Raw(T),
}

impl<T: Copy> Pick<T> {
    /// The value, taking `Known` from `known` (which must not be empty).
    pub fn get(self, known: &[T]) -> T {
        match self {
            Pick::Known(i) => known[usize::from(i) % known.len()],
            Pick::Raw(v) => v,
        }
    }
}

/// Runs device workers on the fuzzing thread: the transport starts and
/// stops them as the event loop would, and [`InlineWorkers::run`] handles
/// whatever their eventfds have pending (queue notifications), so a run
/// is deterministic.
pub struct InlineWorkers(Mutex<EventManager<Worker>>);

impl InlineWorkers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(
            EventManager::new().expect("an epoll instance"),
        )))
    }

    /// Adds a worker, as `start` does.
    pub fn add(&self, worker: Worker) -> WorkerId {
        self.0.lock().unwrap().add_subscriber(worker)
    }

    /// One pass over the ready events, without waiting.
    pub fn run(&self) {
        let mut manager = self.0.lock().unwrap();
        manager.run_with_timeout(0).expect("epoll_wait");
    }
}

impl WorkerHost for InlineWorkers {
    fn start(&self, worker: Worker) -> Result<WorkerId, WorkerError> {
        Ok(self.add(worker))
    }

    fn stop(&self, id: WorkerId) -> Result<(), WorkerError> {
        let mut manager = self.0.lock().unwrap();
        manager
            .remove_subscriber(id)
            .map(drop)
            .map_err(WorkerError::from)
    }
}

/// An INTx line that goes nowhere.
pub struct NoLine;

impl IrqLevel for NoLine {
    fn set_level(&self, _asserted: bool) {}
}
