//! What the fuzz targets share: the scratch disk images, the guest address
//! vocabulary, and a driver for split virtqueues whose every move comes
//! from the fuzz input.
//!
//! A target is a hostile guest: it builds descriptors, rings, TRBs and
//! contexts in guest memory from the input and hands them to a device
//! model the way the VMM does. Whatever it writes, the model must not
//! panic, hang, or walk memory without bound.

pub mod virtq;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub use arbitrary::{Arbitrary, Unstructured};
use devices::block::RawImage;

/// Sectors of the scratch disks: small, so that every sector number the
/// fuzzer tries is near an edge.
pub const DISK_SECTORS: u64 = 64;

/// A raw image of [`DISK_SECTORS`] sectors, made once per process and
/// shared by every run: only its bytes change between runs, and no model
/// branches on disk contents. Made on tmpfs when there is one (a flush is
/// then free), and unlinked as soon as it is open, so nothing is left
/// behind.
pub fn scratch_disk(readonly: bool) -> Arc<RawImage> {
    static RW: OnceLock<Arc<RawImage>> = OnceLock::new();
    static RO: OnceLock<Arc<RawImage>> = OnceLock::new();
    let cell = if readonly { &RO } else { &RW };
    cell.get_or_init(|| {
        static N: AtomicU64 = AtomicU64::new(0);
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "vmm-fuzz-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        // Sector i holds the byte i: misplaced I/O would show in a debugger.
        let bytes: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&path, bytes).expect("write the scratch disk");
        let image = RawImage::open(&path, readonly, "fuzz").expect("open the scratch disk");
        std::fs::remove_file(&path).expect("unlink the scratch disk");
        Arc::new(image)
    })
    .clone()
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
