//! Virtio 1.x devices over one shared virtio-pci transport (modern only).
//!
//! A device implements [`VirtioDevice`]: its type, features, configuration
//! space, `activate` (which returns the worker that processes its queues) and
//! `reset`. The transport ([`VirtioPciDevice`]) does everything else: feature
//! negotiation, queue setup, notifications, MSI-X vectors, the status state
//! machine, and starting/stopping the worker on an event loop
//! ([`WorkerHost`], implemented by [`EventLoop`]). Workers never run on vCPU
//! threads.
//!
//! Spec references are to "Virtual I/O Device (VIRTIO) Version 1.2" (§).

pub mod balloon;
pub mod block;
pub mod chains;
mod common_cfg;
mod interrupt;
mod transport;
mod worker;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

/// Field offsets of the common configuration structure (§4.1.4.3), for
/// drivers in tests and the fuzz crate.
#[cfg(any(test, feature = "test-utils"))]
pub mod common_cfg_offsets {
    pub use super::common_cfg::{
        CONFIG_MSIX_VECTOR, DEVICE_FEATURE, DEVICE_FEATURE_SELECT, DEVICE_STATUS, DRIVER_FEATURE,
        DRIVER_FEATURE_SELECT, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_ENABLE,
        QUEUE_MSIX_VECTOR, QUEUE_SELECT, QUEUE_SIZE,
    };
}

pub use interrupt::VirtioInterrupt;
pub use transport::{
    VirtioPciDevice, VirtioPciError, VirtioPciOptions, MSIX_BAR, NOTIFY_OFFSET,
    NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR,
};
pub use worker::{EventLoop, WorkerError, WorkerHost, WorkerId};

use event_manager::MutEventSubscriber;
use thiserror::Error;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Device types (§5).
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_BALLOON: u32 = 5;

// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
pub const STATUS_FAILED: u8 = 128;

// Reserved feature bits (§6).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// "No vector" in the MSI-X vector registers (§4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// ISR status bits (§4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// A queue handed to a device at activation.
pub struct ActivatedQueue {
    /// Index of the queue on the device.
    pub index: u16,
    pub queue: virtio_queue::Queue,
    /// Written by the guest's notification (ioeventfd or the notify region).
    pub event: EventFd,
}

/// Everything a device needs to start processing its queues.
pub struct Activation {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub interrupt: VirtioInterrupt,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActivatedQueue>,
    /// Features both offered and acknowledged.
    pub acked_features: u64,
}

/// A device's queue processing, run by an event loop.
pub type Worker = Box<dyn MutEventSubscriber + Send>;

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("the driver enabled no usable queue")]
    NoQueues,
    #[error("queue {0} is not usable: {1}")]
    BadQueue(u16, String),
    #[error("cannot duplicate a queue eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the device worker")]
    Worker(#[source] WorkerError),
}

/// A virtio device behind the shared transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (§5).
    fn device_type(&self) -> u32;
    /// PCI class code `0xCCSSPP` for the function.
    fn pci_class(&self) -> u32 {
        0xff_00_00
    }
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered, including [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;
    /// Reads the device configuration space; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: returns the worker the transport runs on the
    /// event loop. Called on DRIVER_OK.
    fn activate(&mut self, activation: Activation) -> Result<Worker, ActivateError>;
    /// Forgets activation state. The transport has already stopped the
    /// worker (so no request is in flight) when this runs.
    fn reset(&mut self);
}
