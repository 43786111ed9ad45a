//! virtio-blk (§5.2) on a raw image file.
//!
//! `device.rs` is the [`crate::virtio::VirtioDevice`] (features, config
//! space), `request.rs` parses and executes one request, `worker.rs` runs the
//! queues on the event loop.

mod device;
mod request;
mod worker;

pub use crate::virtio::chains::ProcessStats;
pub use device::{Block, BlockError, BlockOptions};
pub use request::{Request, RequestError, RequestKind};
pub use worker::BlockWorker;

// Feature bits (§5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

// Request types (§5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

// Status values (§5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// write_zeroes flag: the device may deallocate (§5.2.6).
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Length of the GET_ID string (§5.2.6).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Request header: type, reserved/ioprio, sector (§5.2.6).
pub const REQUEST_HEADER_LEN: u64 = 16;
/// One discard/write-zeroes segment (§5.2.6).
pub const DISCARD_SEGMENT_LEN: u64 = 16;

/// Segments per discard or write-zeroes request we advertise.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per discard or write-zeroes segment we advertise (4 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

#[cfg(test)]
mod tests;
