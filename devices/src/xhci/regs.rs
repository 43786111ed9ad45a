//! Register map of the controller's MMIO BAR (xHCI 1.2 chapter 5), with the
//! writable and write-1-to-clear masks declared next to each register.

/// Layout of the BAR: capability, operational (with port sets), extended
/// capabilities, runtime and doorbell registers.
pub const CAP_LENGTH: u64 = 0x40;
pub const OP_BASE: u64 = CAP_LENGTH;
/// Port register sets start at operational offset 0x400 (section 5.4.8).
pub const PORT_BASE: u64 = OP_BASE + 0x400;
pub const PORT_STRIDE: u64 = 0x10;
/// Extended capabilities (section 7), dword aligned.
pub const XECP_BASE: u64 = 0x800;
pub const RT_BASE: u64 = 0x1000;
pub const DB_BASE: u64 = 0x2000;
/// Size of the MMIO BAR (a power of two, covers 256 doorbells).
pub const MMIO_SIZE: u64 = 0x4000;
/// Most ports that fit between PORT_BASE and XECP_BASE.
pub const MAX_PORTS: usize = ((XECP_BASE - PORT_BASE) / PORT_STRIDE) as usize;
/// Device slots we implement (HCSPARAMS1.MaxSlots).
pub const MAX_SLOTS: usize = 32;

/// Capability registers (section 5.3), offsets from the BAR.
pub mod cap {
    pub const CAPLENGTH_HCIVERSION: u64 = 0x00;
    pub const HCSPARAMS1: u64 = 0x04;
    pub const HCSPARAMS2: u64 = 0x08;
    pub const HCSPARAMS3: u64 = 0x0c;
    pub const HCCPARAMS1: u64 = 0x10;
    pub const DBOFF: u64 = 0x14;
    pub const RTSOFF: u64 = 0x18;
    pub const HCCPARAMS2: u64 = 0x1c;
    /// Interface version 1.2.0.
    pub const HCIVERSION: u32 = 0x0120;
    /// HCCPARAMS1.AC64: 64-bit addressing. CSZ (bit 2) = 0: 32-byte contexts.
    pub const HCCPARAMS1_AC64: u32 = 1 << 0;
    /// HCSPARAMS2.ERST Max (bits 7:4) = 0: one event ring segment.
    pub const ERST_MAX_EXP: u32 = 0;
}

/// Operational registers (section 5.4), offsets from OP_BASE.
pub mod op {
    pub const USBCMD: u64 = 0x00;
    pub const USBSTS: u64 = 0x04;
    pub const PAGESIZE: u64 = 0x08;
    pub const DNCTRL: u64 = 0x14;
    pub const CRCR_LO: u64 = 0x18;
    pub const CRCR_HI: u64 = 0x1c;
    pub const DCBAAP_LO: u64 = 0x30;
    pub const DCBAAP_HI: u64 = 0x34;
    pub const CONFIG: u64 = 0x38;

    // USBCMD bits (section 5.4.1).
    pub const CMD_RUN: u32 = 1 << 0;
    pub const CMD_HCRST: u32 = 1 << 1;
    pub const CMD_INTE: u32 = 1 << 2;
    pub const CMD_HSEE: u32 = 1 << 3;
    pub const CMD_LHCRST: u32 = 1 << 7;
    pub const CMD_CSS: u32 = 1 << 8;
    pub const CMD_CRS: u32 = 1 << 9;
    pub const CMD_EWE: u32 = 1 << 10;
    pub const CMD_EU3S: u32 = 1 << 11;
    pub const CMD_CME: u32 = 1 << 13;
    /// Bits that read back as written.
    pub const CMD_RW_MASK: u32 = CMD_RUN | CMD_INTE | CMD_HSEE | CMD_EWE | CMD_EU3S | CMD_CME;

    // USBSTS bits (section 5.4.2).
    pub const STS_HCH: u32 = 1 << 0;
    pub const STS_HSE: u32 = 1 << 2;
    pub const STS_EINT: u32 = 1 << 3;
    pub const STS_PCD: u32 = 1 << 4;
    pub const STS_SSS: u32 = 1 << 8;
    pub const STS_RSS: u32 = 1 << 9;
    pub const STS_SRE: u32 = 1 << 10;
    pub const STS_CNR: u32 = 1 << 11;
    pub const STS_HCE: u32 = 1 << 12;
    pub const STS_RW1C_MASK: u32 = STS_HSE | STS_EINT | STS_PCD | STS_SRE;

    // CRCR bits (section 5.4.5).
    pub const CRCR_RCS: u64 = 1 << 0;
    pub const CRCR_CS: u64 = 1 << 1;
    pub const CRCR_CA: u64 = 1 << 2;
    pub const CRCR_CRR: u64 = 1 << 3;
    pub const CRCR_PTR_MASK: u64 = !0x3f;

    /// PAGESIZE: 4 KiB pages only.
    pub const PAGESIZE_4K: u32 = 1;
    /// DCBAAP pointer bits (section 5.4.6).
    pub const DCBAAP_MASK: u64 = !0x3f;
    /// CONFIG.MaxSlotsEn (bits 7:0) plus U3E/CIE (bits 8, 9).
    pub const CONFIG_RW_MASK: u32 = 0x3ff;
    /// DNCTRL: notification enables (bits 15:0).
    pub const DNCTRL_RW_MASK: u32 = 0xffff;
}

/// Port register set (section 5.4.8-5.4.11), offsets inside one set.
pub mod port {
    pub const PORTSC: u64 = 0x0;
    pub const PORTPMSC: u64 = 0x4;
    pub const PORTLI: u64 = 0x8;
    pub const PORTHLPMC: u64 = 0xc;

    pub const CCS: u32 = 1 << 0;
    pub const PED: u32 = 1 << 1;
    pub const OCA: u32 = 1 << 3;
    pub const PR: u32 = 1 << 4;
    pub const PLS_SHIFT: u32 = 5;
    pub const PLS_MASK: u32 = 0xf << PLS_SHIFT;
    pub const PP: u32 = 1 << 9;
    pub const SPEED_SHIFT: u32 = 10;
    pub const SPEED_MASK: u32 = 0xf << SPEED_SHIFT;
    pub const PIC_MASK: u32 = 3 << 14;
    pub const LWS: u32 = 1 << 16;
    pub const CSC: u32 = 1 << 17;
    pub const PEC: u32 = 1 << 18;
    pub const WRC: u32 = 1 << 19;
    pub const OCC: u32 = 1 << 20;
    pub const PRC: u32 = 1 << 21;
    pub const PLC: u32 = 1 << 22;
    pub const CEC: u32 = 1 << 23;
    pub const CAS: u32 = 1 << 24;
    pub const WCE: u32 = 1 << 25;
    pub const WDE: u32 = 1 << 26;
    pub const WOE: u32 = 1 << 27;
    pub const DR: u32 = 1 << 30;
    pub const WPR: u32 = 1 << 31;
    /// The RW1C change bits; an event fires when their OR goes 0 -> 1.
    pub const CHANGE_MASK: u32 = CSC | PEC | WRC | OCC | PRC | PLC | CEC;
    /// RWS bits stored as written.
    pub const RWS_MASK: u32 = PIC_MASK | WCE | WDE | WOE;

    /// Port link states (PLS values, section 5.4.8 table 5-27).
    pub const PLS_U0: u32 = 0;
    pub const PLS_U2: u32 = 2;
    pub const PLS_U3: u32 = 3;
    pub const PLS_DISABLED: u32 = 4;
    pub const PLS_RX_DETECT: u32 = 5;
    pub const PLS_POLLING: u32 = 7;
    pub const PLS_RESUME: u32 = 15;

    /// Default Protocol Speed IDs (section 7.2.2.1.1).
    pub const SPEED_FULL: u32 = 1;
    pub const SPEED_HIGH: u32 = 3;
    pub const SPEED_SUPER: u32 = 4;
}

/// Runtime registers (section 5.5), offsets from RT_BASE.
pub mod rt {
    pub const MFINDEX: u64 = 0x00;
    /// Interrupter register set 0.
    pub const IR0: u64 = 0x20;
    pub const IMAN: u64 = 0x00;
    pub const IMOD: u64 = 0x04;
    pub const ERSTSZ: u64 = 0x08;
    pub const ERSTBA_LO: u64 = 0x10;
    pub const ERSTBA_HI: u64 = 0x14;
    pub const ERDP_LO: u64 = 0x18;
    pub const ERDP_HI: u64 = 0x1c;

    pub const IMAN_IP: u32 = 1 << 0;
    pub const IMAN_IE: u32 = 1 << 1;
    pub const ERSTSZ_MASK: u32 = 0xffff;
    pub const ERSTBA_MASK: u64 = !0x3f;
    pub const ERDP_DESI_MASK: u64 = 0x7;
    pub const ERDP_EHB: u64 = 1 << 3;
    pub const ERDP_PTR_MASK: u64 = !0xf;
}

/// Extended capability: Supported Protocol (section 7.2).
pub mod xcap {
    pub const ID_SUPPORTED_PROTOCOL: u32 = 2;
    /// "USB " as the little-endian Name String.
    pub const NAME_USB: u32 = 0x2042_5355;
    /// Length of one Supported Protocol capability without PSIs, in dwords.
    pub const SUPPORTED_PROTOCOL_DWORDS: u32 = 4;
}

/// Registers whose guest writes may take effect late, as BAR offsets of
/// 4-byte registers: the VMM may batch them with KVM coalesced MMIO, so the
/// write costs no exit to userspace and is applied, in order, before the
/// guest's next trapped access (any vCPU exit drains the batch first). Each
/// entry is safe because nothing but the guest itself observes the write,
/// and the guest does not read the register again before a trapped access
/// applies the write (reads may be served from the read shadow, see
/// `shadow.rs`, which shows the value before the write until then):
///
/// - USBSTS (section 5.4.2) only has RW1C bits to write (HCH, SSS, RSS, CNR
///   are read-only). Linux's interrupt handler reads it once (first thing),
///   writes it once to acknowledge EINT, then writes ERDP low (trapped, so
///   the acknowledgement is applied there, and the shadow republished) and
///   only then can the next interrupt come (EHB blocks it until that ERDP
///   write). Its other USBSTS reads (halt, reset, suspend handshakes) follow
///   a trapped USBCMD write. An event the controller posts between the
///   USBSTS write and the ERDP write either is consumed by that handler or
///   is still pending when ERDP is written, and that write re-raises the
///   interrupt and sets EINT again (see the ERDP handling in
///   `controller.rs`), so no interrupt is ever seen without EINT. The
///   controller never bases a decision on EINT/PCD/SRE, and HSE is checked
///   only in a USBCMD write (trapped).
/// - ERDP high dword (section 5.5.2.3.3): Linux writes ERDP as low dword
///   then high dword. The low write (trapped) moves the dequeue pointer and
///   clears EHB, which is what re-arms interrupts; the high dword is the
///   same on every write once the event ring is set up (a segment never
///   crosses a 4 GiB boundary), so applying it late changes nothing the
///   controller relies on; it is set up before USBCMD.Run (trapped).
///
/// Not deferrable: doorbells (they start work; they go by ioeventfd),
/// USBCMD, CRCR, PORTSC, IMAN, ERDP low (they take effect at once).
pub const DEFERRABLE_WRITES: [u64; 2] = [OP_BASE + op::USBSTS, RT_BASE + rt::IR0 + rt::ERDP_HI];

/// Start of the part of the BAR whose guest reads a VMM may serve from a
/// read-only memory mapping instead of trapping them (writes still trap):
/// all of it. The capability, operational and runtime registers are kept
/// current through [`ReadShadow`](super::shadow::ReadShadow); the Doorbell
/// Array (section 5.6: "reads of a Doorbell Register return 0") and the
/// unused space always read 0. Linux reads USBSTS and ERDP (two dwords) in
/// every interrupt and reads each doorbell back after writing it; served
/// from memory, those reads cost no exit.
pub const READ_BACKED_START: u64 = 0;
