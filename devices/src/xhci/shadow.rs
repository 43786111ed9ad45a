//! A read shadow of the register space (xHCI 1.2 sections 5.3 to 5.5).
//!
//! When the VMM maps the BAR read-only into the guest (see
//! [`READ_BACKED_START`](super::regs::READ_BACKED_START)), guest reads of
//! the capability, operational (with the port register sets), extended
//! capability and runtime registers never reach
//! [`Xhci::mmio_read`](super::Xhci::mmio_read): they read what the
//! controller last published through [`ReadShadow`]. Writes still trap.
//!
//! The controller publishes the registers that can change ([`changing`])
//! after every register write and doorbell, after attach/detach and the
//! moderation timer, and before it signals an interrupt, so a guest that
//! reads USBSTS, PORTSC, IMAN or ERDP in its interrupt handler sees the state
//! that raised it. Every change of those registers happens inside one of
//! those entry points (HCH/HSE/EINT/PCD, CRCR.CRR, PORTSC on the doorbell
//! worker, hotplug on the control thread, HCRST and Run/Stop in a USBCMD
//! write). The capability registers and the Supported Protocol extended
//! capabilities ([`constant`]) never change and are published once. The
//! extended capabilities have no USB Legacy Support capability, so there is
//! no BIOS/OS ownership semaphore the guest could write. Every other offset
//! reads 0, as the zero-filled shadow does.
//!
//! Two registers change on their own: MFINDEX (the microframe index) and
//! IMOD's down-counter (IMODC, see `moderation.rs`). In the shadow they
//! advance only when something is published. Linux reads MFINDEX for
//! isochronous scheduling and frame numbers, which the mass-storage devices
//! here never use, and IMOD only at initialisation, before any interrupt
//! loads the counter.

use super::regs::{cap, op, port, rt, xcap, CAP_LENGTH, OP_BASE, PORT_BASE, PORT_STRIDE};
use super::regs::{RT_BASE, XECP_BASE};

/// Where the guest's reads of the shadowed registers come from.
pub trait ReadShadow: Send + Sync {
    /// Stores what a guest read of the dword register at BAR offset
    /// `offset` returns from now on.
    fn store(&self, offset: u64, value: u32);
}

/// Operational registers that can change (offsets from OP_BASE; PAGESIZE
/// is constant).
const OPERATIONAL: [u64; 8] = [
    op::USBCMD,
    op::USBSTS,
    op::DNCTRL,
    op::CRCR_LO,
    op::CRCR_HI,
    op::DCBAAP_LO,
    op::DCBAAP_HI,
    op::CONFIG,
];

/// The non-zero registers of the runtime page: MFINDEX and interrupter 0
/// (MaxIntrs = 1; every other offset of the page reads 0), from RT_BASE.
const RUNTIME: [u64; 8] = [
    rt::MFINDEX,
    rt::IR0 + rt::IMAN,
    rt::IR0 + rt::IMOD,
    rt::IR0 + rt::ERSTSZ,
    rt::IR0 + rt::ERSTBA_LO,
    rt::IR0 + rt::ERSTBA_HI,
    rt::IR0 + rt::ERDP_LO,
    rt::IR0 + rt::ERDP_HI,
];

/// Dwords of the extended capabilities: one Supported Protocol capability
/// per protocol (USB 2, USB 3).
const XECP_DWORDS: u64 = 2 * xcap::SUPPORTED_PROTOCOL_DWORDS as u64;

/// BAR offsets of the registers that never change: the capability
/// registers, PAGESIZE and the extended capabilities.
pub fn constant() -> impl Iterator<Item = u64> {
    const { assert!(cap::HCCPARAMS2 < CAP_LENGTH) };
    (0..CAP_LENGTH)
        .step_by(4)
        .chain(std::iter::once(OP_BASE + op::PAGESIZE))
        .chain((0..XECP_DWORDS).map(|i| XECP_BASE + 4 * i))
}

/// BAR offsets of the registers that can change, for a root hub of
/// `ports` ports: the operational registers, each PORTSC (PORTPMSC, PORTLI
/// and PORTHLPMC read 0) and the runtime registers.
pub fn changing(ports: usize) -> impl Iterator<Item = u64> {
    OPERATIONAL
        .iter()
        .map(|o| OP_BASE + o)
        .chain((0..ports as u64).map(|i| PORT_BASE + i * PORT_STRIDE + port::PORTSC))
        .chain(RUNTIME.iter().map(|r| RT_BASE + r))
}
