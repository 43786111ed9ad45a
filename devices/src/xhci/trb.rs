//! Guest-visible structures (xHCI 1.2 sections 6.2-6.5): TRBs, contexts and
//! event ring segment table entries, with their sizes asserted at compile time.

use vm_memory::ByteValued;

/// A Transfer Request Block (section 4.11.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trb {
    pub parameter: u64,
    pub status: u32,
    pub control: u32,
}
const _: () = assert!(std::mem::size_of::<Trb>() == 16);
// SAFETY: Trb is repr(C), made of integers only, has no padding (asserted
// 16 bytes = 8 + 4 + 4) and every bit pattern is valid.
unsafe impl ByteValued for Trb {}

/// TRB type codes (section 6.4.6, table 6-91).
pub mod trb_type {
    pub const NORMAL: u32 = 1;
    pub const SETUP_STAGE: u32 = 2;
    pub const DATA_STAGE: u32 = 3;
    pub const STATUS_STAGE: u32 = 4;
    pub const ISOCH: u32 = 5;
    pub const LINK: u32 = 6;
    pub const EVENT_DATA: u32 = 7;
    pub const NOOP: u32 = 8;
    pub const ENABLE_SLOT: u32 = 9;
    pub const DISABLE_SLOT: u32 = 10;
    pub const ADDRESS_DEVICE: u32 = 11;
    pub const CONFIGURE_ENDPOINT: u32 = 12;
    pub const EVALUATE_CONTEXT: u32 = 13;
    pub const RESET_ENDPOINT: u32 = 14;
    pub const STOP_ENDPOINT: u32 = 15;
    pub const SET_TR_DEQUEUE: u32 = 16;
    pub const RESET_DEVICE: u32 = 17;
    pub const NOOP_COMMAND: u32 = 23;
    pub const TRANSFER_EVENT: u32 = 32;
    pub const COMMAND_COMPLETION: u32 = 33;
    pub const PORT_STATUS_CHANGE: u32 = 34;
}

/// Completion codes (section 6.4.5, table 6-90).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CompletionCode {
    Success = 1,
    DataBufferError = 2,
    UsbTransactionError = 4,
    TrbError = 5,
    StallError = 6,
    NoSlotsAvailable = 9,
    SlotNotEnabled = 11,
    EndpointNotEnabled = 12,
    ShortPacket = 13,
    ParameterError = 17,
    ContextStateError = 19,
    CommandRingStopped = 24,
    CommandAborted = 25,
    Stopped = 26,
}

// Control dword bits shared by several TRB types (section 6.4).
pub const CYCLE: u32 = 1 << 0;
/// Link TRB: Toggle Cycle.
pub const LINK_TC: u32 = 1 << 1;
/// Transfer TRBs: Evaluate Next TRB, Interrupt on Short Packet, Chain, IOC, Immediate Data.
pub const ENT: u32 = 1 << 1;
pub const ISP: u32 = 1 << 2;
pub const CHAIN: u32 = 1 << 4;
pub const IOC: u32 = 1 << 5;
pub const IDT: u32 = 1 << 6;
pub const BEI: u32 = 1 << 9;
/// Data/Status Stage: direction IN (bit 16).
pub const DIR_IN: u32 = 1 << 16;
/// Setup Stage: Transfer Type (bits 17:16; 2 = OUT data, 3 = IN data).
pub const TRT_SHIFT: u32 = 16;
/// Address Device: Block Set Address Request; Configure Endpoint: Deconfigure.
pub const BSR: u32 = 1 << 9;
pub const DC: u32 = 1 << 9;
/// Stop Endpoint: Suspend.
pub const SP: u32 = 1 << 23;
/// Transfer Event: Event Data flag.
pub const EVENT_DATA_FLAG: u32 = 1 << 2;

impl Trb {
    pub fn trb_type(&self) -> u32 {
        (self.control >> 10) & 0x3f
    }

    pub fn cycle(&self) -> bool {
        self.control & CYCLE != 0
    }

    pub fn has(&self, flag: u32) -> bool {
        self.control & flag != 0
    }

    /// TRB Transfer Length (bits 16:0 of the status dword).
    pub fn transfer_length(&self) -> u32 {
        self.status & 0x1_ffff
    }

    /// Slot ID of a command (bits 31:24 of control).
    pub fn slot_id(&self) -> u8 {
        (self.control >> 24) as u8
    }

    /// Endpoint ID (DCI) of a command (bits 20:16 of control).
    pub fn endpoint_id(&self) -> u8 {
        ((self.control >> 16) & 0x1f) as u8
    }

    pub fn with_type(mut self, t: u32) -> Self {
        self.control = (self.control & !(0x3f << 10)) | (t << 10);
        self
    }

    /// A Transfer Event (section 6.4.2.1).
    pub fn transfer_event(
        trb_addr: u64,
        residual: u32,
        code: CompletionCode,
        event_data: bool,
        slot: u8,
        dci: u8,
    ) -> Self {
        let ed = if event_data { EVENT_DATA_FLAG } else { 0 };
        Trb {
            parameter: trb_addr,
            status: (residual & 0xff_ffff) | ((code as u32) << 24),
            control: ed | (u32::from(dci) << 16) | (u32::from(slot) << 24),
        }
        .with_type(trb_type::TRANSFER_EVENT)
    }

    /// A Command Completion Event (section 6.4.2.2).
    pub fn command_completion(cmd_addr: u64, code: CompletionCode, slot: u8) -> Self {
        Trb {
            parameter: cmd_addr,
            status: (code as u32) << 24,
            control: u32::from(slot) << 24,
        }
        .with_type(trb_type::COMMAND_COMPLETION)
    }

    /// A Port Status Change Event (section 6.4.2.3); `port` is 1-based.
    pub fn port_status_change(port: u8) -> Self {
        Trb {
            parameter: u64::from(port) << 24,
            status: (CompletionCode::Success as u32) << 24,
            control: 0,
        }
        .with_type(trb_type::PORT_STATUS_CHANGE)
    }

    /// Completion code of an event.
    pub fn completion_code(&self) -> u8 {
        (self.status >> 24) as u8
    }
}

/// A 32-byte context (HCCPARAMS1.CSZ = 0) as eight dwords.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context(pub [u32; 8]);
const _: () = assert!(std::mem::size_of::<Context>() == CONTEXT_SIZE);
// SAFETY: Context is repr(C) over a u32 array: no padding, any bit pattern valid.
unsafe impl ByteValued for Context {}

/// Size of one context entry.
pub const CONTEXT_SIZE: usize = 32;
/// A device context: the slot context and 31 endpoint contexts.
pub const DEVICE_CONTEXT_SIZE: usize = 32 * CONTEXT_SIZE;
/// An input context: the input control context plus a device context.
pub const INPUT_CONTEXT_SIZE: usize = 33 * CONTEXT_SIZE;

/// Slot states in the slot context (section 6.2.2, dword 3 bits 31:27).
pub mod slot_ctx_state {
    pub const DISABLED_ENABLED: u32 = 0;
    pub const DEFAULT: u32 = 1;
    pub const ADDRESSED: u32 = 2;
    pub const CONFIGURED: u32 = 3;
}

/// Endpoint types (section 6.2.3, table 6-9).
pub mod ep_type {
    pub const CONTROL: u32 = 4;
}

/// Slot context accessors (section 6.2.2).
impl Context {
    pub fn route_string(&self) -> u32 {
        self.0[0] & 0xf_ffff
    }
    pub fn context_entries(&self) -> u32 {
        self.0[0] >> 27
    }
    pub fn set_context_entries(&mut self, n: u32) {
        self.0[0] = (self.0[0] & !(0x1f << 27)) | ((n & 0x1f) << 27);
    }
    pub fn set_speed(&mut self, speed: u32) {
        self.0[0] = (self.0[0] & !(0xf << 20)) | ((speed & 0xf) << 20);
    }
    pub fn root_hub_port(&self) -> u8 {
        (self.0[1] >> 16) as u8
    }
    pub fn set_slot_state(&mut self, state: u32, address: u8) {
        self.0[3] = (state << 27) | u32::from(address);
    }
    pub fn slot_state(&self) -> u32 {
        self.0[3] >> 27
    }
    pub fn device_address(&self) -> u8 {
        self.0[3] as u8
    }
}

/// Endpoint context accessors (section 6.2.3).
impl Context {
    pub fn ep_state(&self) -> u32 {
        self.0[0] & 7
    }
    pub fn set_ep_state(&mut self, state: u32) {
        self.0[0] = (self.0[0] & !7) | (state & 7);
    }
    pub fn ep_type(&self) -> u32 {
        (self.0[1] >> 3) & 7
    }
    pub fn max_packet_size(&self) -> u16 {
        (self.0[1] >> 16) as u16
    }
    pub fn set_max_packet_size(&mut self, mps: u16) {
        self.0[1] = (self.0[1] & 0xffff) | (u32::from(mps) << 16);
    }
    /// TR Dequeue Pointer and Dequeue Cycle State.
    pub fn dequeue(&self) -> (u64, bool) {
        let raw = u64::from(self.0[2]) | (u64::from(self.0[3]) << 32);
        (raw & !0xf, raw & 1 != 0)
    }
    pub fn set_dequeue(&mut self, ptr: u64, cycle: bool) {
        let raw = (ptr & !0xf) | u64::from(cycle);
        self.0[2] = raw as u32;
        self.0[3] = (raw >> 32) as u32;
    }
}

/// Input control context accessors (section 6.2.5.1).
impl Context {
    pub fn drop_flags(&self) -> u32 {
        self.0[0]
    }
    pub fn add_flags(&self) -> u32 {
        self.0[1]
    }
}

/// An Event Ring Segment Table entry (section 6.5).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErstEntry {
    pub base: u64,
    pub size: u32,
    pub reserved: u32,
}
const _: () = assert!(std::mem::size_of::<ErstEntry>() == 16);
// SAFETY: ErstEntry is repr(C), integers only, no padding (8 + 4 + 4 = 16).
unsafe impl ByteValued for ErstEntry {}
