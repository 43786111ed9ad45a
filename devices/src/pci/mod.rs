//! PCI: configuration space, capabilities (MSI-X, power management), a host
//! bridge on configuration mechanism #1, a bus that places functions at device
//! numbers, and BAR allocation inside a caller-given MMIO hole.
//!
//! Nothing here knows KVM. What the VMM supplies is expressed as traits:
//! [`msix::MsiRouter`] (program an MSI route for a vector and fire it:
//! `KVM_SET_GSI_ROUTING` + irqfd) and [`bus::BarListener`] (move a BAR's MMIO
//! registration when the guest reprograms it).
//!
//! Wiring in the VMM (see also `virtio::VirtioPciDevice`):
//! 1. `let pci = Arc::new(PciBus::new(hole_base, hole_size)?)` (host bridge at 00:00.0);
//!    `pio_bus.insert(Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
//!    PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN)`.
//! 2. Build a device (`VirtioPciDevice::new(...)`), wrap it in `Arc<Mutex<_>>`,
//!    `let (devnum, bars) = pci.attach(dev.clone())?`, and for each
//!    `BarAllocation` do `mmio_bus.insert(Arc::new(Mutex::new(b.region)), b.address, b.size)`.
//! 3. Implement [`MsiRouter`] per device (GSI per vector + irqfd) and
//!    [`BarListener`] (move MMIO ranges and ioeventfds when the guest moves a BAR).
//!
//! References: PCI Local Bus Specification 3.0 (§ numbers below), PCI Bus
//! Power Management Interface Specification 1.2 ("PM §").

pub mod bus;
pub mod config;
pub mod device;
pub mod function;
pub mod host_bridge;
pub mod intx;
pub mod msix;
pub mod pm;

pub use bus::{
    BarAllocation, BarListener, PciBarRegion, PciBus, PciConfigIo, PCI_CONFIG_IO_BASE,
    PCI_CONFIG_IO_LEN,
};
pub use config::{BarKind, BarSpec, Capability, PciConfig, PciIds};
pub use device::{PciDevice, SharedPciDevice};
pub use function::{BarMove, ConfigWriteEffects, PciFunction};
pub use host_bridge::HostBridge;
pub use intx::{IntxPin, IrqLevel, PciInterrupt};
pub use msix::{MsiMessage, MsiRouter, Msix};
pub use pm::{PmCapability, PmOptions, PowerState};

use thiserror::Error;

/// Size of conventional configuration space, all mechanism #1 can reach.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Device numbers on one bus (§3.2.2.3.1).
pub const MAX_DEVICES: usize = 32;
/// BARs in a type 0 header (§6.2.5.1).
pub const NUM_BARS: usize = 6;

// Type 0 header offsets (§6.1, figure 6-1).
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
/// First byte after the predefined header, where capabilities go (§6.7).
pub const CAP_START: usize = 0x40;

// Command register bits (§6.2.2).
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
pub const COMMAND_SERR_ENABLE: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits the guest may change.
pub const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;

// Status register bits (§6.2.3).
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Error bits that software clears by writing 1: master data parity error,
/// signaled/received target abort, received master abort, signaled system
/// error, detected parity error.
pub const STATUS_RW1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

// BAR low bits (§6.2.5.1).
pub const BAR_MEM_64BIT: u32 = 0b10 << 1;
pub const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;

// Capability IDs (PCI Code and ID Assignment spec §2).
pub const CAP_ID_POWER_MANAGEMENT: u8 = 0x01;
pub const CAP_ID_VENDOR_SPECIFIC: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR index {0} is out of range or would overlap a 64-bit BAR's upper half")]
    BarIndex(u8),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes (or too big for 32 bits)")]
    BarSize(u64),
    #[error("BAR {0} is already declared")]
    BarInUse(u8),
    #[error("address {addr:#x} does not fit BAR {index}")]
    BarAddress { index: u8, addr: u64 },
    #[error("capability masks must be empty or as long as the body")]
    CapabilityMask,
    #[error("no room left in configuration space for the capability")]
    CapabilitySpace,
    #[error("MSI-X table of {0} vectors is not between 1 and 2048")]
    MsixVectors(u16),
    #[error("device number {0} is out of range or already taken")]
    Slot(u8),
    #[error("the PCI bus is full")]
    BusFull,
    #[error("MMIO hole {base:#x}+{size:#x} is invalid")]
    Hole { base: u64, size: u64 },
    #[error("no room for a {size:#x}-byte BAR in the MMIO hole")]
    BarAllocation {
        size: u64,
        #[source]
        source: vm_allocator::Error,
    },
}
