//! Block storage backends shared by every storage device (virtio-blk, USB
//! mass storage) and by the pager's swap store.
//!
//! All backing I/O goes through a [`Volume`]: the host-side I/O queue of one
//! storage backend. A volume can be quiesced (its device is runtime-suspended
//! or being reset); ordinary I/O then waits, while callers that must never wait
//! (NOIO) use the non-blocking entry and take another path.

mod raw;
mod volume;

pub use raw::{lock_file, sync_all_images, RawImage, RawImageError};
pub use volume::{all_volumes, IoGuard, Volume, VolumeInfo, VolumeWaiter};

/// Logical sector size every device model exposes.
pub const SECTOR_SIZE: u64 = 512;
