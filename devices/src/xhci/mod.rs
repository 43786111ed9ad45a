//! An xHCI host controller (eXtensible Host Controller Interface 1.2) as a
//! plain MMIO register space, ready to sit behind a PCI function's BAR.
//!
//! Split along the spec: [`regs`] (register map and masks), [`trb`] (TRB and
//! context ABI), [`ring`] (consumer side of TRB rings), [`event`]
//! (interrupter 0 and its event ring), [`port`] (root hub ports), [`slot`]
//! (device slots and endpoints), `command` (command ring), `transfer`
//! (transfer rings) and [`controller`] (the register file tying them together).
//!
//! Ring work runs when a doorbell is rung, with bounded work per doorbell:
//! on an event-loop thread when the VMM routes doorbell writes through
//! ioeventfds ([`doorbell`]), else synchronously inside the MMIO write. Every guest-supplied pointer is accessed
//! through vm-memory with bounds checks; a bad ring or context ends in the
//! protocol's error completion, a halted endpoint or (for a broken command
//! or event ring) Host System Error, never a panic or an endless loop.

mod command;
pub mod controller;
pub mod doorbell;
pub mod event;
pub mod moderation;
pub mod pci;
pub mod port;
pub mod regs;
pub mod ring;
pub mod shadow;
pub mod slot;
pub mod transfer;
pub mod trb;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
mod tests;

use thiserror::Error;

pub use controller::{link_state_name, InterruptState, PortPower, Xhci, INTERRUPTER_VECTOR};
pub use doorbell::{doorbell_events, DoorbellEvent, DoorbellWorker};
pub use moderation::{Clock, ModerationTimer, SystemClock};
pub use pci::{InterruptDelivery, XhciPci, XhciPciError};
pub use port::PortProtocol;
pub use regs::MMIO_SIZE;
pub use shadow::ReadShadow;

/// Errors of the host-side API (attach/detach/construction).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum XhciError {
    #[error("invalid controller configuration: {0}")]
    InvalidConfig(String),
    #[error("no root hub port {0}")]
    InvalidPort(u8),
    #[error("root hub port {0} already has a device")]
    PortOccupied(u8),
    #[error("root hub port {0} has no device")]
    PortEmpty(u8),
    #[error("the device on root hub port {0} is not suspended (link not in U3)")]
    NotSuspended(u8),
}

/// Why reading a TRB ring stopped.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum RingError {
    #[error("TRB at {0:#x} is outside guest memory")]
    Memory(u64),
    #[error("TRB budget exhausted at {0:#x} (looping ring?)")]
    Budget(u64),
}

/// Root hub layout. Ports 1..=usb2_ports speak USB 2, the next usb3_ports USB 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XhciConfig {
    pub usb2_ports: u8,
    pub usb3_ports: u8,
}

impl Default for XhciConfig {
    fn default() -> Self {
        Self {
            usb2_ports: 4,
            usb3_ports: 4,
        }
    }
}
