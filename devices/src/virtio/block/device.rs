//! The virtio-blk device: features and configuration space (§5.2.3, §5.2.4).

use std::sync::Arc;

use thiserror::Error;

use super::*;
use crate::block::RawImage;
use crate::virtio::{
    ActivateError, Activation, VirtioDevice, Worker, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Descriptors one request may use (bounds a chain even through an
/// indirect table, which can hold up to 65535).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Queues a device may have.
pub const MAX_QUEUES: u16 = 64;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// PCI class: mass storage (0x01), other (0x80).
const PCI_CLASS_STORAGE_OTHER: u32 = 0x01_80_00;

// Configuration space layout, struct virtio_blk_config (§5.2.4).
const CFG_CAPACITY: usize = 0;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;
const CFG_NUM_QUEUES: usize = 34;
const CFG_MAX_DISCARD_SECTORS: usize = 36;
const CFG_MAX_DISCARD_SEG: usize = 40;
const CFG_DISCARD_SECTOR_ALIGNMENT: usize = 44;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CFG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CFG_WRITE_ZEROES_MAY_UNMAP: usize = 56;
/// Up to and including unused1[3] after write_zeroes_may_unmap.
pub const CONFIG_LEN: usize = 60;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("number of queues must be 1..={MAX_QUEUES}, not {0}")]
    NumQueues(u16),
    #[error("queue size must be a power of two in 2..=32768, not {0}")]
    QueueSize(u16),
    #[error("disk id is {0} bytes; at most {VIRTIO_BLK_ID_BYTES}")]
    IdTooLong(usize),
}

/// Options of one virtio-blk device.
#[derive(Debug, Clone)]
pub struct BlockOptions {
    /// Serial returned by GET_ID (at most 20 bytes).
    pub id: String,
    /// Request queues (VIRTIO_BLK_F_MQ when more than one).
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Default for BlockOptions {
    fn default() -> Self {
        Self {
            id: String::new(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// virtio-blk on a raw image.
pub struct Block {
    disk: Arc<RawImage>,
    options: BlockOptions,
    features: u64,
    config: [u8; CONFIG_LEN],
    id: [u8; VIRTIO_BLK_ID_BYTES],
}

impl Block {
    pub fn new(disk: RawImage, options: BlockOptions) -> Result<Self, BlockError> {
        if options.num_queues == 0 || options.num_queues > MAX_QUEUES {
            return Err(BlockError::NumQueues(options.num_queues));
        }
        if !options.queue_size.is_power_of_two() || options.queue_size < 2 {
            return Err(BlockError::QueueSize(options.queue_size));
        }
        if options.id.len() > VIRTIO_BLK_ID_BYTES {
            return Err(BlockError::IdTooLong(options.id.len()));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        id[..options.id.len()].copy_from_slice(options.id.as_bytes());

        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            // Honest: FLUSH is fdatasync of the image, so the guest knows
            // completed writes are only durable after a flush.
            | VIRTIO_BLK_F_FLUSH;
        if options.num_queues > 1 {
            features |= VIRTIO_BLK_F_MQ;
        }
        if disk.readonly() {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let mut config = [0u8; CONFIG_LEN];
        let mut put32 = |off: usize, v: u32| config[off..off + 4].copy_from_slice(&v.to_le_bytes());
        // Linux reserves two descriptors per request for header and status.
        put32(CFG_SEG_MAX, u32::from(options.queue_size) - 2);
        put32(CFG_BLK_SIZE, crate::block::SECTOR_SIZE as u32);
        put32(CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS);
        put32(CFG_MAX_DISCARD_SEG, MAX_DISCARD_SEG);
        put32(CFG_DISCARD_SECTOR_ALIGNMENT, 1);
        put32(CFG_MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS);
        put32(CFG_MAX_WRITE_ZEROES_SEG, MAX_DISCARD_SEG);
        config[CFG_CAPACITY..CFG_CAPACITY + 8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[CFG_NUM_QUEUES..CFG_NUM_QUEUES + 2]
            .copy_from_slice(&options.num_queues.to_le_bytes());
        config[CFG_WRITE_ZEROES_MAY_UNMAP] = 1;

        Ok(Self {
            disk: Arc::new(disk),
            options,
            features,
            config,
            id,
        })
    }

    pub fn disk(&self) -> &Arc<RawImage> {
        &self.disk
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS_STORAGE_OTHER
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.options.queue_size; usize::from(self.options.num_queues)]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE,
        // which is not offered.
        log::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, activation: Activation) -> Result<Worker, ActivateError> {
        Ok(Box::new(BlockWorker::new(
            self.disk.clone(),
            self.id,
            activation,
        )))
    }

    fn reset(&mut self) {
        log::debug!("virtio-blk {}: reset", self.disk.path().display());
    }
}
