//! Bulk-Only Transport (USB Mass Storage Class Bulk-Only Transport 1.0).
//!
//! One command at a time: a 31-byte CBW on bulk OUT, an optional data phase,
//! a 13-byte CSW on bulk IN. The host's expectation (dCBWDataTransferLength
//! and direction) is compared with what the SCSI command wants (its [`Plan`])
//! following the "thirteen cases" of section 6.7; mismatches STALL the data
//! pipe and end in a CSW with Phase Error where the spec says so.

use super::scsi::{Disk, Plan};
use crate::usb::{TransferBuffer, TransferResult};

/// dCBWSignature (section 5.1).
pub const CBW_SIGNATURE: u32 = 0x4342_5355;
/// dCSWSignature (section 5.2).
pub const CSW_SIGNATURE: u32 = 0x5342_5355;
pub const CBW_LEN: usize = 31;
pub const CSW_LEN: usize = 13;
/// bCBWFlags bit 7: data-in.
const CBW_FLAG_IN: u8 = 0x80;
/// The largest CDB a CBW can carry (section 5.1, bCBWCBLength).
const MAX_CDB_LEN: usize = 16;
/// Largest piece of image data moved per host read/write call.
pub const CHUNK: usize = 1 << 20;

/// bCSWStatus values (section 5.2, table 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CswStatus {
    Passed = 0,
    Failed = 1,
    PhaseError = 2,
}

/// A parsed Command Block Wrapper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cbw {
    pub tag: u32,
    pub data_len: u32,
    pub data_in: bool,
    pub lun: u8,
    pub cdb: Vec<u8>,
}

impl Cbw {
    /// Validity checks of section 6.2.1: size, signature, LUN and CB length.
    pub fn parse(b: &[u8]) -> Option<Cbw> {
        if b.len() != CBW_LEN {
            return None;
        }
        let sig = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let cb_len = usize::from(b[14] & 0x1f);
        if sig != CBW_SIGNATURE || b[13] & 0xf0 != 0 || cb_len == 0 || cb_len > MAX_CDB_LEN {
            return None;
        }
        Some(Cbw {
            tag: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            data_len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            data_in: b[12] & CBW_FLAG_IN != 0,
            lun: b[13] & 0x0f,
            cdb: b[15..15 + cb_len].to_vec(),
        })
    }
}

/// A Command Status Wrapper waiting to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csw {
    pub tag: u32,
    pub residue: u32,
    pub status: CswStatus,
}

impl Csw {
    pub fn to_bytes(self) -> [u8; CSW_LEN] {
        let mut b = [0u8; CSW_LEN];
        b[..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.residue.to_le_bytes());
        b[12] = self.status as u8;
        b
    }
}

/// Where the device is in the command cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for a CBW.
    Idle,
    /// Moving `len` bytes of `plan` (bounded by dCBWDataTransferLength).
    Data {
        tag: u32,
        host_len: u32,
        plan: Plan,
        len: u64,
        moved: u64,
        /// CSW status once the data phase is over.
        status: CswStatus,
    },
    /// The CSW is ready for the next bulk IN transfer.
    Status(Csw),
}

/// Bulk-Only Transport state of the single LUN, with the bulk pipes' halts.
pub struct Bot {
    phase: Phase,
    halt_in: bool,
    halt_out: bool,
    /// Set by an invalid CBW (section 6.6.1): the pipes stay halted until the
    /// host runs Reset Recovery (Bulk-Only Mass Storage Reset, then
    /// CLEAR_FEATURE(ENDPOINT_HALT) on both pipes).
    needs_reset_recovery: bool,
    bounce: Vec<u8>,
}

impl Default for Bot {
    fn default() -> Self {
        Self::new()
    }
}

impl Bot {
    pub fn new() -> Self {
        Self {
            phase: Phase::Idle,
            halt_in: false,
            halt_out: false,
            needs_reset_recovery: false,
            bounce: Vec::new(),
        }
    }

    pub fn halted(&self, data_in: bool) -> bool {
        if data_in {
            self.halt_in
        } else {
            self.halt_out
        }
    }

    pub fn set_halt(&mut self, data_in: bool) {
        if data_in {
            self.halt_in = true;
        } else {
            self.halt_out = true;
        }
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT); ignored while Reset Recovery is due.
    pub fn clear_halt(&mut self, data_in: bool) {
        if self.needs_reset_recovery {
            return;
        }
        if data_in {
            self.halt_in = false;
        } else {
            self.halt_out = false;
        }
    }

    pub fn needs_reset_recovery(&self) -> bool {
        self.needs_reset_recovery
    }

    /// True while no command is in progress.
    pub fn idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// Bulk-Only Mass Storage Reset (section 3.1): ready for the next CBW;
    /// the halts stay until cleared by the host.
    pub fn mass_storage_reset(&mut self) {
        self.phase = Phase::Idle;
        self.needs_reset_recovery = false;
    }

    /// A bus reset or a new configuration: everything back to the start.
    pub fn reset(&mut self) {
        self.phase = Phase::Idle;
        self.halt_in = false;
        self.halt_out = false;
        self.needs_reset_recovery = false;
    }

    /// Frees the bounce buffer (the device is going to sleep).
    pub fn release_buffers(&mut self) {
        self.bounce = Vec::new();
    }

    /// Takes the reusable bounce buffer, at least `len` bytes long; the
    /// caller puts it back so large transfers allocate once.
    fn take_bounce(&mut self, len: usize) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.bounce);
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }

    /// A transfer on the bulk OUT pipe.
    pub fn transfer_out(
        &mut self,
        disk: &mut Disk,
        buf: &mut dyn TransferBuffer,
    ) -> TransferResult {
        if self.halt_out {
            return TransferResult::stall(0);
        }
        match &self.phase {
            Phase::Idle => self.command(disk, buf),
            Phase::Data {
                plan: Plan::Write { .. },
                ..
            } => self.data_out(disk, buf),
            // Not ready for another CBW until the CSW has been read.
            _ => TransferResult::nak(),
        }
    }

    /// A transfer on the bulk IN pipe.
    pub fn transfer_in(&mut self, disk: &mut Disk, buf: &mut dyn TransferBuffer) -> TransferResult {
        if self.halt_in {
            return TransferResult::stall(0);
        }
        match &self.phase {
            Phase::Status(csw) => {
                let bytes = csw.to_bytes();
                let n = bytes.len().min(buf.len());
                if buf.write_at(0, &bytes[..n]).is_err() {
                    return TransferResult::error(0);
                }
                self.phase = Phase::Idle;
                TransferResult::completed(n)
            }
            Phase::Data {
                plan: Plan::Read { .. } | Plan::DataIn(_),
                ..
            } => self.data_in(disk, buf),
            _ => TransferResult::nak(),
        }
    }

    /// Receives a CBW and decides the data phase (section 6.7).
    fn command(&mut self, disk: &mut Disk, buf: &mut dyn TransferBuffer) -> TransferResult {
        let mut raw = [0u8; CBW_LEN];
        let cbw = if buf.len() == CBW_LEN && buf.read_at(0, &mut raw).is_ok() {
            Cbw::parse(&raw)
        } else {
            None
        };
        let Some(cbw) = cbw.filter(|c| c.lun == 0) else {
            // Section 6.6.1: not a valid/meaningful CBW.
            log::debug!("usb-storage: invalid CBW ({} bytes)", buf.len());
            self.halt_in = true;
            self.halt_out = true;
            self.needs_reset_recovery = true;
            return TransferResult::stall(0);
        };
        let plan = disk.plan(&cbw.cdb);
        let host = u64::from(cbw.data_len);
        let status = if plan == Plan::Failed {
            CswStatus::Failed
        } else {
            CswStatus::Passed
        };
        let dev = plan.data_len();
        let dev_in = matches!(plan, Plan::DataIn(_) | Plan::Read { .. });
        let csw = |status, residue| {
            Phase::Status(Csw {
                tag: cbw.tag,
                residue,
                status,
            })
        };
        self.phase = if host == 0 {
            // Cases 1-3: Hn.
            if dev == 0 {
                csw(status, 0)
            } else {
                csw(CswStatus::PhaseError, 0)
            }
        } else if dev == 0 {
            // Case 4 (Hi > Dn) and case 9 (Ho > Dn): STALL the data pipe.
            self.set_halt(cbw.data_in);
            csw(status, cbw.data_len)
        } else if cbw.data_in != dev_in {
            // Case 8 (Hi <> Do) and case 10 (Ho <> Di).
            self.set_halt(cbw.data_in);
            csw(CswStatus::PhaseError, cbw.data_len)
        } else if !dev_in && dev > host {
            // Case 13 (Ho < Do): refuse the data rather than write part of it.
            self.halt_out = true;
            csw(CswStatus::PhaseError, cbw.data_len)
        } else {
            // Cases 5-7, 11, 12. Case 7 (Hi < Di) sends Hi bytes, then Phase Error.
            let status = if dev > host {
                CswStatus::PhaseError
            } else {
                status
            };
            Phase::Data {
                tag: cbw.tag,
                host_len: cbw.data_len,
                plan,
                len: dev.min(host),
                moved: 0,
                status,
            }
        };
        TransferResult::completed(CBW_LEN)
    }

    /// Ends the data phase after `moved` bytes.
    fn finish_data(&mut self, tag: u32, host_len: u32, moved: u64, status: CswStatus) {
        let residue = u64::from(host_len).saturating_sub(moved) as u32;
        self.phase = Phase::Status(Csw {
            tag,
            residue,
            status,
        });
    }

    fn data_in(&mut self, disk: &mut Disk, buf: &mut dyn TransferBuffer) -> TransferResult {
        let Phase::Data {
            tag,
            host_len,
            plan,
            len,
            moved,
            status,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return TransferResult::error(0);
        };
        let want = (len - moved).min(buf.len() as u64) as usize;
        let mut done = 0usize;
        let mut status = status;
        let mut buffer_failed = false;
        match &plan {
            Plan::DataIn(data) => {
                let start = moved as usize;
                match buf.write_at(0, &data[start..start + want]) {
                    Ok(()) => done = want,
                    Err(_) => buffer_failed = true,
                }
            }
            Plan::Read { offset, .. } => {
                // Straight from the image into the guest's buffers when they
                // are plain guest memory; else through the bounce buffer.
                if let Some(slices) = buf.guest_slices(0, want) {
                    match disk.read_vectored(&slices, offset + moved) {
                        Ok(()) => done = want,
                        Err(_) => status = CswStatus::Failed,
                    }
                }
                while done < want && status != CswStatus::Failed {
                    let n = (want - done).min(CHUNK);
                    let pos = offset + moved + done as u64;
                    let mut chunk = self.take_bounce(n);
                    let r = disk.read(&mut chunk[..n], pos);
                    let w = r.is_ok() && buf.write_at(done, &chunk[..n]).is_ok();
                    self.bounce = chunk;
                    if r.is_err() {
                        status = CswStatus::Failed;
                        break;
                    }
                    if !w {
                        buffer_failed = true;
                        break;
                    }
                    done += n;
                }
            }
            _ => {}
        }
        let moved = moved + done as u64;
        if buffer_failed {
            // The host side failed; the command is lost, report it in the CSW.
            self.finish_data(tag, host_len, moved, CswStatus::Failed);
            return TransferResult::error(done);
        }
        if status == CswStatus::Failed || moved == len {
            self.finish_data(tag, host_len, moved, status);
            // Case 5 (Hi > Di) ended by a full-size transfer: STALL so the
            // host's next data read ends instead of eating the CSW.
            if done == buf.len() && moved < u64::from(host_len) {
                self.halt_in = true;
            }
        } else {
            self.phase = Phase::Data {
                tag,
                host_len,
                plan,
                len,
                moved,
                status,
            };
        }
        TransferResult::completed(done)
    }

    fn data_out(&mut self, disk: &mut Disk, buf: &mut dyn TransferBuffer) -> TransferResult {
        let Phase::Data {
            tag,
            host_len,
            plan,
            len,
            moved,
            status,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return TransferResult::error(0);
        };
        let Plan::Write { offset, .. } = plan else {
            return TransferResult::error(0);
        };
        let want = (len - moved).min(buf.len() as u64) as usize;
        let mut done = 0usize;
        let mut status = status;
        let mut buffer_failed = false;
        if let Some(slices) = buf.guest_slices(0, want) {
            match disk.write_vectored(&slices, offset + moved) {
                Ok(()) => done = want,
                Err(_) => status = CswStatus::Failed,
            }
        }
        while done < want && status != CswStatus::Failed {
            let n = (want - done).min(CHUNK);
            let mut chunk = self.take_bounce(n);
            let read = buf.read_at(done, &mut chunk[..n]);
            let written = read
                .is_ok()
                .then(|| disk.write(&chunk[..n], offset + moved + done as u64));
            self.bounce = chunk;
            match written {
                None => {
                    buffer_failed = true;
                    break;
                }
                Some(Err(_)) => {
                    status = CswStatus::Failed;
                    break;
                }
                Some(Ok(())) => done += n,
            }
        }
        let moved = moved + done as u64;
        if buffer_failed {
            self.finish_data(tag, host_len, moved, CswStatus::Failed);
            return TransferResult::error(done);
        }
        if status == CswStatus::Failed || moved == len {
            self.finish_data(tag, host_len, moved, status);
            if done < buf.len() {
                // Case 11 (Ho > Do): the device takes Do bytes, then STALLs.
                self.halt_out = true;
                return TransferResult::stall(done);
            }
        } else {
            self.phase = Phase::Data {
                tag,
                host_len,
                plan: Plan::Write { offset, len },
                len,
                moved,
                status,
            };
        }
        TransferResult::completed(done)
    }
}
