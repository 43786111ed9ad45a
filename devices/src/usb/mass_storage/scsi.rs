//! The SCSI block commands a Linux guest sends to a USB disk (SPC-4, SBC-3),
//! planned from the CDB before any data moves.
//!
//! [`Disk::plan`] parses a CDB completely and answers what the command wants
//! to do: send a small response, read or write a byte range of the image, or
//! nothing. Errors become CHECK CONDITION with sense data that the next
//! REQUEST SENSE returns.

use std::sync::Arc;

use crate::block::{RawImage, RawImageError, SECTOR_SIZE};
use vm_memory::VolatileSlice;

/// SCSI operation codes (SPC-4 / SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// Service action of SERVICE ACTION IN(16) for READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// Sense keys (SPC-4 table 48).
pub mod sense_key {
    pub const NO_SENSE: u8 = 0x0;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const DATA_PROTECT: u8 = 0x7;
}

/// Sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const NONE: Sense = Sense::new(sense_key::NO_SENSE, 0, 0);
    pub const INVALID_OPCODE: Sense = Sense::new(sense_key::ILLEGAL_REQUEST, 0x20, 0);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(sense_key::ILLEGAL_REQUEST, 0x21, 0);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(sense_key::ILLEGAL_REQUEST, 0x24, 0);
    pub const WRITE_PROTECTED: Sense = Sense::new(sense_key::DATA_PROTECT, 0x27, 0);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(sense_key::MEDIUM_ERROR, 0x11, 0);
    pub const WRITE_ERROR: Sense = Sense::new(sense_key::MEDIUM_ERROR, 0x0c, 0);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq }
    }

    /// Fixed-format sense data (SPC-4 section 4.5.3), 18 bytes.
    pub fn fixed_format(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70; // current error, fixed format
        b[2] = self.key & 0x0f;
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

/// Length of the standard INQUIRY data we return.
pub const INQUIRY_LEN: usize = 36;
/// MODE SENSE page codes (SBC-3 section 6.4).
const PAGE_CACHING: u8 = 0x08;
const PAGE_ALL: u8 = 0x3f;
/// Caching mode page length including its 2-byte header (SBC-3 table 183).
const CACHING_PAGE_LEN: usize = 20;

/// What a parsed command wants to do (its side of the Bulk-Only "13 cases").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No data phase; the command already ran and succeeded.
    NoData,
    /// Sends this response (already cut to the allocation length).
    DataIn(Vec<u8>),
    /// Reads `len` bytes of the image at byte `offset` to the host.
    Read { offset: u64, len: u64 },
    /// Writes `len` bytes from the host to the image at byte `offset`.
    Write { offset: u64, len: u64 },
    /// CHECK CONDITION with no data phase; the sense is already recorded.
    Failed,
}

impl Plan {
    /// Bytes the device intends to send (positive) or receive.
    pub fn data_len(&self) -> u64 {
        match self {
            Plan::DataIn(v) => v.len() as u64,
            Plan::Read { len, .. } | Plan::Write { len, .. } => *len,
            Plan::NoData | Plan::Failed => 0,
        }
    }
}

/// Identification strings of the disk.
#[derive(Debug, Clone)]
pub struct Identity {
    pub vendor: String,
    pub product: String,
    pub revision: String,
    pub serial: String,
}

/// One logical unit backed by a raw image.
pub struct Disk {
    image: Arc<RawImage>,
    identity: Identity,
    sense: Sense,
    prevent_removal: bool,
    started: bool,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Copies `s` into `dst`, space padded (SPC-4 ASCII data fields).
fn ascii_field(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst
        .iter_mut()
        .zip(s.bytes().filter(|c| c.is_ascii_graphic() || *c == b' '))
    {
        *d = c;
    }
}

/// The CDB length a supported opcode needs (SPC-4 section 4.2.5.1 groups);
/// `None` for opcodes we do not implement.
fn cdb_len(op: u8) -> Option<usize> {
    use opcode::*;
    match op {
        TEST_UNIT_READY
        | REQUEST_SENSE
        | INQUIRY
        | MODE_SENSE_6
        | START_STOP_UNIT
        | PREVENT_ALLOW_MEDIUM_REMOVAL => Some(6),
        READ_CAPACITY_10 | READ_10 | WRITE_10 | SYNCHRONIZE_CACHE_10 | MODE_SENSE_10 => Some(10),
        READ_16 | WRITE_16 | SYNCHRONIZE_CACHE_16 | SERVICE_ACTION_IN_16 => Some(16),
        _ => None,
    }
}

impl Disk {
    pub fn new(image: Arc<RawImage>, identity: Identity) -> Self {
        Self {
            image,
            identity,
            sense: Sense::NONE,
            prevent_removal: false,
            started: true,
        }
    }

    pub fn image(&self) -> &Arc<RawImage> {
        &self.image
    }

    /// The sense data the next REQUEST SENSE would return.
    pub fn sense(&self) -> Sense {
        self.sense
    }

    pub fn prevent_removal(&self) -> bool {
        self.prevent_removal
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// Records a failure found while the data phase ran.
    pub fn set_sense(&mut self, sense: Sense) {
        self.sense = sense;
    }

    fn fail(&mut self, sense: Sense) -> Plan {
        self.sense = sense;
        Plan::Failed
    }

    /// Parses and, for commands without a bulk data phase, executes `cdb`.
    pub fn plan(&mut self, cdb: &[u8]) -> Plan {
        let Some(&op) = cdb.first() else {
            return self.fail(Sense::INVALID_OPCODE);
        };
        if op != opcode::REQUEST_SENSE {
            self.sense = Sense::NONE;
        }
        match cdb_len(op) {
            None => return self.fail(Sense::INVALID_OPCODE),
            Some(n) if cdb.len() < n => return self.fail(Sense::INVALID_FIELD_IN_CDB),
            Some(_) => {}
        }
        match op {
            opcode::TEST_UNIT_READY => Plan::NoData,
            opcode::REQUEST_SENSE => {
                let data = self.sense.fixed_format();
                self.sense = Sense::NONE;
                Self::cut(&data, usize::from(cdb[4]))
            }
            opcode::INQUIRY => self.inquiry(cdb),
            opcode::MODE_SENSE_6 => self.mode_sense(cdb[1], cdb[2], usize::from(cdb[4]), false),
            opcode::MODE_SENSE_10 => {
                self.mode_sense(cdb[1], cdb[2], usize::from(be16(&cdb[7..])), true)
            }
            opcode::START_STOP_UNIT => {
                // Bit 0 START, bit 1 LOEJ: there is no medium to eject (RMB = 0).
                self.started = cdb[4] & 1 != 0;
                Plan::NoData
            }
            opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                self.prevent_removal = cdb[4] & 3 != 0;
                Plan::NoData
            }
            opcode::READ_CAPACITY_10 => {
                let last = self.image.sectors().saturating_sub(1);
                let last32 = u32::try_from(last).unwrap_or(u32::MAX);
                let mut d = Vec::with_capacity(8);
                d.extend_from_slice(&last32.to_be_bytes());
                d.extend_from_slice(&(SECTOR_SIZE as u32).to_be_bytes());
                Plan::DataIn(d)
            }
            opcode::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == opcode::SA_READ_CAPACITY_16 => {
                let mut d = vec![0u8; 32];
                let last = self.image.sectors().saturating_sub(1);
                d[..8].copy_from_slice(&last.to_be_bytes());
                d[8..12].copy_from_slice(&(SECTOR_SIZE as u32).to_be_bytes());
                Self::cut(&d, be32(&cdb[10..]) as usize)
            }
            opcode::READ_10 => self.rw(
                u64::from(be32(&cdb[2..])),
                u64::from(be16(&cdb[7..])),
                false,
            ),
            opcode::READ_16 => self.rw(be64(&cdb[2..]), u64::from(be32(&cdb[10..])), false),
            opcode::WRITE_10 => {
                self.rw(u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])), true)
            }
            opcode::WRITE_16 => self.rw(be64(&cdb[2..]), u64::from(be32(&cdb[10..])), true),
            opcode::SYNCHRONIZE_CACHE_10 | opcode::SYNCHRONIZE_CACHE_16 => {
                match self.image.flush() {
                    Ok(()) => Plan::NoData,
                    Err(e) => {
                        log::warn!("usb-storage: flush failed: {e}");
                        self.fail(Sense::WRITE_ERROR)
                    }
                }
            }
            _ => self.fail(Sense::INVALID_OPCODE),
        }
    }

    fn cut(data: &[u8], alloc: usize) -> Plan {
        Plan::DataIn(data[..data.len().min(alloc)].to_vec())
    }

    fn inquiry(&mut self, cdb: &[u8]) -> Plan {
        let alloc = usize::from(be16(&cdb[3..]));
        if cdb[1] & 1 != 0 {
            // EVPD: supported pages and unit serial number (SPC-4 section 7.8).
            let data = match cdb[2] {
                0x00 => vec![0, 0x00, 0, 2, 0x00, 0x80],
                0x80 => {
                    let serial: Vec<u8> = self
                        .identity
                        .serial
                        .bytes()
                        .filter(u8::is_ascii_graphic)
                        .take(64)
                        .collect();
                    let mut d = vec![0, 0x80, 0, serial.len() as u8];
                    d.extend_from_slice(&serial);
                    d
                }
                _ => return self.fail(Sense::INVALID_FIELD_IN_CDB),
            };
            return Self::cut(&data, alloc);
        }
        if cdb[2] != 0 {
            return self.fail(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut d = [0u8; INQUIRY_LEN];
        d[0] = 0x00; // connected direct-access block device
        d[1] = 0x00; // RMB = 0: not removable
        d[2] = 0x06; // SPC-4
        d[3] = 0x02; // response data format 2
        d[4] = (INQUIRY_LEN - 5) as u8;
        ascii_field(&mut d[8..16], &self.identity.vendor);
        ascii_field(&mut d[16..32], &self.identity.product);
        ascii_field(&mut d[32..36], &self.identity.revision);
        Self::cut(&d, alloc)
    }

    /// MODE SENSE(6/10) with the caching page (SBC-3 section 6.4.5).
    fn mode_sense(&mut self, _byte1: u8, byte2: u8, alloc: usize, ten: bool) -> Plan {
        let page_control = byte2 >> 6;
        let page = byte2 & 0x3f;
        if page != PAGE_CACHING && page != PAGE_ALL {
            return self.fail(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut caching = [0u8; CACHING_PAGE_LEN];
        caching[0] = PAGE_CACHING;
        caching[1] = (CACHING_PAGE_LEN - 2) as u8;
        if page_control != 1 {
            // Current/default/saved values: write cache enabled (WCE, bit 2);
            // writes land in the host page cache until SYNCHRONIZE CACHE.
            caching[2] = 0x04;
        }
        // Device-specific parameter: WP (bit 7).
        let dsp = if self.image.readonly() { 0x80 } else { 0 };
        let mut d = Vec::with_capacity(8 + CACHING_PAGE_LEN);
        if ten {
            let len = (6 + CACHING_PAGE_LEN) as u16;
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&[0, dsp, 0, 0, 0, 0]);
        } else {
            d.extend_from_slice(&[(3 + CACHING_PAGE_LEN) as u8, 0, dsp, 0]);
        }
        d.extend_from_slice(&caching);
        Self::cut(&d, alloc)
    }

    fn rw(&mut self, lba: u64, blocks: u64, write: bool) -> Plan {
        let in_range = lba
            .checked_add(blocks)
            .is_some_and(|end| end <= self.image.sectors());
        if !in_range {
            return self.fail(Sense::LBA_OUT_OF_RANGE);
        }
        if write && self.image.readonly() {
            return self.fail(Sense::WRITE_PROTECTED);
        }
        // Cannot overflow: blocks <= sectors and sectors * 512 is the image size.
        let (offset, len) = (lba * SECTOR_SIZE, blocks * SECTOR_SIZE);
        if len == 0 {
            return Plan::NoData;
        }
        if write {
            Plan::Write { offset, len }
        } else {
            Plan::Read { offset, len }
        }
    }

    /// Reads image bytes for a planned READ; an error sets MEDIUM ERROR sense.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), RawImageError> {
        self.image.read_at(buf, offset).inspect_err(|e| {
            log::warn!("usb-storage: read at {offset:#x} failed: {e}");
            self.sense = Sense::UNRECOVERED_READ_ERROR;
        })
    }

    /// [`read`](Self::read) straight into guest memory (vectored, no copy).
    pub fn read_vectored(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), RawImageError> {
        self.image.read_vectored_at(bufs, offset).inspect_err(|e| {
            log::warn!("usb-storage: read at {offset:#x} failed: {e}");
            self.sense = Sense::UNRECOVERED_READ_ERROR;
        })
    }

    /// [`write`](Self::write) straight from guest memory (vectored, no copy).
    pub fn write_vectored(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), RawImageError> {
        let r = self.image.write_vectored_at(bufs, offset);
        self.note_write(r, offset)
    }

    /// Writes image bytes for a planned WRITE; an error sets MEDIUM ERROR sense.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), RawImageError> {
        let r = self.image.write_at(buf, offset);
        self.note_write(r, offset)
    }

    fn note_write(
        &mut self,
        r: Result<(), RawImageError>,
        offset: u64,
    ) -> Result<(), RawImageError> {
        r.inspect_err(|e| {
            log::warn!("usb-storage: write at {offset:#x} failed: {e}");
            self.sense = match e {
                RawImageError::ReadOnly => Sense::WRITE_PROTECTED,
                _ => Sense::WRITE_ERROR,
            };
        })
    }
}
