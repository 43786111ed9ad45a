//! USB devices as a host controller sees them, independent of the controller.
//!
//! A [`UsbDevice`] answers control transfers on its default endpoint and bulk
//! transfers on its other endpoints. The controller (xHCI) owns the rings and
//! hands the device one whole transfer at a time as a [`TransferBuffer`]: a
//! scatter list over guest memory, so a 1 MiB bulk transfer is one call and
//! one copy. The mass-storage device (Bulk-Only Transport + SCSI) lives in
//! [`mass_storage`].

pub mod descriptor;
pub mod mass_storage;

use thiserror::Error;
use vm_memory::VolatileSlice;

/// Standard request codes (USB 3.2 section 9.4, table 9-5).
pub mod request {
    pub const GET_STATUS: u8 = 0x00;
    pub const CLEAR_FEATURE: u8 = 0x01;
    pub const SET_FEATURE: u8 = 0x03;
    pub const SET_ADDRESS: u8 = 0x05;
    pub const GET_DESCRIPTOR: u8 = 0x06;
    pub const SET_DESCRIPTOR: u8 = 0x07;
    pub const GET_CONFIGURATION: u8 = 0x08;
    pub const SET_CONFIGURATION: u8 = 0x09;
    pub const GET_INTERFACE: u8 = 0x0a;
    pub const SET_INTERFACE: u8 = 0x0b;
    pub const SET_SEL: u8 = 0x30;
    pub const SET_ISOCH_DELAY: u8 = 0x31;
}

/// Feature selectors (USB 3.2 section 9.4, table 9-7).
pub mod feature {
    pub const ENDPOINT_HALT: u16 = 0;
    pub const DEVICE_REMOTE_WAKEUP: u16 = 1;
    pub const FUNCTION_SUSPEND: u16 = 0;
    pub const U1_ENABLE: u16 = 48;
    pub const U2_ENABLE: u16 = 49;
    pub const LTM_ENABLE: u16 = 50;
}

/// Link speed of a device on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum UsbSpeed {
    /// 12 Mb/s (USB 1.1).
    Full,
    /// 480 Mb/s (USB 2.0).
    High,
    /// 5 Gb/s (USB 3.x Gen 1).
    Super,
}

/// Direction of a transfer's data stage (bit 7 of bmRequestType / endpoint address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host to device.
    Out,
    /// Device to host.
    In,
}

/// The 8-byte SETUP packet of a control transfer (USB 3.2 section 9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetupPacket {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

/// bmRequestType bits 6:5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Standard,
    Class,
    Vendor,
    Reserved,
}

/// bmRequestType bits 4:0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    Device,
    Interface,
    Endpoint,
    Other,
}

impl SetupPacket {
    /// Decodes the little-endian wire format.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Self {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub fn to_bytes(self) -> [u8; 8] {
        let v = self.value.to_le_bytes();
        let i = self.index.to_le_bytes();
        let l = self.length.to_le_bytes();
        [
            self.request_type,
            self.request,
            v[0],
            v[1],
            i[0],
            i[1],
            l[0],
            l[1],
        ]
    }

    pub fn direction(&self) -> Direction {
        if self.request_type & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }

    pub fn kind(&self) -> RequestKind {
        match (self.request_type >> 5) & 3 {
            0 => RequestKind::Standard,
            1 => RequestKind::Class,
            2 => RequestKind::Vendor,
            _ => RequestKind::Reserved,
        }
    }

    pub fn recipient(&self) -> Recipient {
        match self.request_type & 0x1f {
            0 => Recipient::Device,
            1 => Recipient::Interface,
            2 => Recipient::Endpoint,
            _ => Recipient::Other,
        }
    }
}

/// A transfer buffer could not be accessed (guest memory gone or out of range).
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
#[error("transfer buffer access at {offset:#x}+{len:#x} failed")]
pub struct BufferError {
    pub offset: usize,
    pub len: usize,
}

/// The data of one transfer: what the host offers (OUT) or provides room for (IN).
///
/// Offsets are relative to the start of the transfer; implementations may be
/// scattered over several guest memory ranges.
pub trait TransferBuffer {
    /// Total length in bytes.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes of OUT data starting at `offset` into `dst`.
    fn read_at(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), BufferError>;

    /// Copies `src` into the IN buffer at `offset`.
    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), BufferError>;

    /// `[offset, offset + len)` as slices of guest memory, for vectored
    /// image I/O straight into or out of the guest's buffers. `None` when the
    /// range is not all plain guest memory (immediate data, out of range):
    /// the caller then copies through [`read_at`](Self::read_at) /
    /// [`write_at`](Self::write_at), which report the error.
    fn guest_slices(&self, _offset: usize, _len: usize) -> Option<Vec<VolatileSlice<'_>>> {
        None
    }
}

/// A [`TransferBuffer`] in host memory (tests, control requests).
impl TransferBuffer for Vec<u8> {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read_at(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), BufferError> {
        let src = offset
            .checked_add(dst.len())
            .and_then(|end| self.get(offset..end))
            .ok_or(BufferError {
                offset,
                len: dst.len(),
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), BufferError> {
        let dst = offset
            .checked_add(src.len())
            .and_then(|end| self.get_mut(offset..end))
            .ok_or(BufferError {
                offset,
                len: src.len(),
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// How a transfer ended, from the device's side of the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStatus {
    /// Data moved; `actual < buffer.len()` means a short packet ended it.
    Completed,
    /// The endpoint answered STALL (a functional halt on bulk endpoints, a
    /// protocol stall on the default control pipe).
    Stall,
    /// The device is not ready for this transfer yet (NAK); the controller
    /// keeps the transfer and retries it later. Nothing was moved.
    Nak,
    /// The device did not answer (transaction error) or the buffer failed.
    Error,
}

/// The result of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferResult {
    pub status: TransferStatus,
    /// Bytes moved before the transfer ended.
    pub actual: usize,
}

impl TransferResult {
    pub fn completed(actual: usize) -> Self {
        Self {
            status: TransferStatus::Completed,
            actual,
        }
    }

    pub fn stall(actual: usize) -> Self {
        Self {
            status: TransferStatus::Stall,
            actual,
        }
    }

    pub fn nak() -> Self {
        Self {
            status: TransferStatus::Nak,
            actual: 0,
        }
    }

    pub fn error(actual: usize) -> Self {
        Self {
            status: TransferStatus::Error,
            actual,
        }
    }
}

/// Transfer type of a non-default endpoint (bmAttributes bits 1:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointType {
    Control,
    Isochronous,
    Bulk,
    Interrupt,
}

/// What a controller needs to know about one endpoint of the current configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointInfo {
    /// bEndpointAddress (bit 7 set for IN).
    pub address: u8,
    pub kind: EndpointType,
    pub max_packet_size: u16,
    /// SuperSpeed bMaxBurst (0 = one packet per burst).
    pub max_burst: u8,
}

/// A USB device attached to a root-hub port.
///
/// Endpoint numbers are endpoint addresses (`0x81` = EP1 IN). All methods are
/// called with guest-controlled arguments and must not panic.
pub trait UsbDevice: Send {
    /// The fastest speed the device supports.
    fn max_speed(&self) -> UsbSpeed;

    /// Sets the speed the device was connected at (its descriptors follow it).
    fn set_speed(&mut self, speed: UsbSpeed);

    /// The speed the device is connected at.
    fn speed(&self) -> UsbSpeed;

    /// A bus (port) reset: back to the Default state, unconfigured, no halts.
    fn reset(&mut self);

    /// Runs a control transfer on the default endpoint. `data` is the data
    /// stage (empty when wLength is 0) and is at most wLength long.
    fn control(&mut self, setup: &SetupPacket, data: &mut dyn TransferBuffer) -> TransferResult;

    /// Runs one bulk transfer on `endpoint` (an endpoint address).
    fn bulk(&mut self, endpoint: u8, data: &mut dyn TransferBuffer) -> TransferResult;

    /// Whether `endpoint` is halted (answers every transfer with STALL).
    fn halted(&self, endpoint: u8) -> bool;

    /// Clears the halt of `endpoint` and resets its data toggle / sequence
    /// (what CLEAR_FEATURE(ENDPOINT_HALT) does).
    fn clear_halt(&mut self, endpoint: u8);

    /// Endpoints of the active configuration (empty while unconfigured).
    fn endpoints(&self) -> Vec<EndpointInfo>;

    /// The device has been unplugged: finish or abandon host I/O it holds.
    /// The owner calls this after taking the device out of its controller,
    /// outside the controller's lock (it may flush to the backing store).
    fn detach(&mut self) {}

    /// The link entered U3 or the controller went to D3hot: stop host I/O,
    /// release buffers, quiesce the backing store. Idempotent.
    fn suspend(&mut self) {}

    /// Back from [`suspend`](Self::suspend): the backing store flows again.
    /// Called in a NOIO scope. Idempotent; a no-op when not suspended.
    fn resume(&mut self) {}

    /// Whether the device is suspended.
    fn suspended(&self) -> bool {
        false
    }

    /// Whether the host armed remote wakeup (SET_FEATURE(DEVICE_REMOTE_WAKEUP)).
    fn remote_wakeup_enabled(&self) -> bool {
        false
    }
}
