//! Test helpers for hosts that drive the device: the CBW layout and the
//! opcodes worth aiming random CDBs at (also used by the xHCI tests and the
//! fuzz crate in ../fuzz).

use super::bot::CBW_SIGNATURE;

/// Opcodes the device implements (and a few it does not), so that random
/// CDBs reach the SCSI handlers.
pub const SCSI_OPCODES: &[u8] = &[
    0x00, 0x03, 0x12, 0x1a, 0x1b, 0x1e, 0x23, 0x25, 0x28, 0x2a, 0x2f, 0x35, 0x5a, 0x88, 0x8a, 0x91,
    0x9e, 0xa0,
];

/// A Command Block Wrapper (BOT 1.0 section 5.1) on LUN 0 with `cdb`
/// (at most 16 bytes).
pub fn cbw(tag: u32, len: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 31];
    b[..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
    b[4..8].copy_from_slice(&tag.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12] = if data_in { 0x80 } else { 0 };
    b[14] = cdb.len() as u8;
    b[15..15 + cdb.len()].copy_from_slice(cdb);
    b
}
