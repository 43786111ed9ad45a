//! A read shadow of the runtime registers (xHCI 1.2 section 5.5).
//!
//! When the VMM maps the runtime registers page read-only into the guest
//! (see [`READ_BACKED_START`](super::regs::READ_BACKED_START)), guest reads
//! there never reach [`Xhci::mmio_read`](super::Xhci::mmio_read): they read
//! what the controller last published through [`ReadShadow`]. The
//! controller publishes after every register write and doorbell, after
//! attach/detach, and before it signals an interrupt, so a guest that reads
//! IMAN/ERDP in its interrupt handler sees the state that raised it.
//!
//! The one register that changes on its own is MFINDEX (the microframe
//! index): in the shadow it advances only when something is published.
//! Linux reads it for isochronous scheduling and frame numbers, which the
//! mass-storage devices here never use. Likewise IMOD's down-counter
//! (IMODC, see `moderation.rs`) shows its value at the last publish; Linux
//! reads IMOD only at initialisation, before any interrupt loads it.

use super::regs::{rt, RT_BASE};

/// Where the guest's reads of the shadowed registers come from.
pub trait ReadShadow: Send + Sync {
    /// Stores what a guest read of the dword register at BAR offset
    /// `offset` returns from now on.
    fn store(&self, offset: u64, value: u32);
}

/// The non-zero registers of the runtime page: MFINDEX and interrupter 0
/// (MaxIntrs = 1; every other offset of the page reads 0).
pub const SHADOWED: [u64; 8] = [
    RT_BASE + rt::MFINDEX,
    RT_BASE + rt::IR0 + rt::IMAN,
    RT_BASE + rt::IR0 + rt::IMOD,
    RT_BASE + rt::IR0 + rt::ERSTSZ,
    RT_BASE + rt::IR0 + rt::ERSTBA_LO,
    RT_BASE + rt::IR0 + rt::ERSTBA_HI,
    RT_BASE + rt::IR0 + rt::ERDP_LO,
    RT_BASE + rt::IR0 + rt::ERDP_HI,
];
