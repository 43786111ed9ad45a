//! Mass-storage tests driven the way usb-storage drives the device.

use super::bot::{CswStatus, CSW_SIGNATURE};
use super::scsi::{opcode, Sense};
use super::*;
use crate::usb::TransferStatus;
use std::io::Write;
use std::path::PathBuf;

mod random_host;

pub(crate) use super::test_utils::{cbw, SCSI_OPCODES};

/// A throwaway image file removed on drop.
pub(crate) struct TempImage(pub PathBuf);

impl TempImage {
    pub(crate) fn new(sectors: usize) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "devices-usb-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut f = std::fs::File::create(&p).unwrap();
        // Sector i is filled with byte (i % 251) so reads can be checked.
        for i in 0..sectors {
            f.write_all(&[(i % 251) as u8; 512]).unwrap();
        }
        TempImage(p)
    }

    pub(crate) fn open(&self, readonly: bool) -> Arc<RawImage> {
        Arc::new(RawImage::open(&self.0, readonly, "usb-test").unwrap())
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn device(sectors: usize, readonly: bool, speed: UsbSpeed) -> (TempImage, MassStorage) {
    let img = TempImage::new(sectors);
    let cfg = MassStorageConfig {
        max_speed: speed,
        ..Default::default()
    };
    let mut dev = MassStorage::new(img.open(readonly), cfg);
    let r = control(
        &mut dev,
        0x00,
        request::SET_CONFIGURATION,
        1,
        0,
        &mut vec![],
    );
    assert_eq!(r.status, TransferStatus::Completed);
    (img, dev)
}

fn control(
    dev: &mut MassStorage,
    rt: u8,
    req: u8,
    value: u16,
    index: u16,
    data: &mut Vec<u8>,
) -> TransferResult {
    let setup = SetupPacket {
        request_type: rt,
        request: req,
        value,
        index,
        length: data.len() as u16,
    };
    dev.control(&setup, data)
}

/// (tag, residue, status) of a CSW.
fn parse_csw(b: &[u8]) -> (u32, u32, u8) {
    assert_eq!(b.len(), 13);
    assert_eq!(
        u32::from_le_bytes(b[..4].try_into().unwrap()),
        CSW_SIGNATURE
    );
    (
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        b[12],
    )
}

fn send_cbw(dev: &mut MassStorage, tag: u32, len: u32, data_in: bool, cdb: &[u8]) {
    let r = dev.bulk(BULK_OUT, &mut cbw(tag, len, data_in, cdb));
    assert_eq!(r, TransferResult::completed(31));
}

fn read_csw(dev: &mut MassStorage) -> (u32, u32, u8) {
    let mut b = vec![0u8; 13];
    let r = dev.bulk(BULK_IN, &mut b);
    assert_eq!(r, TransferResult::completed(13));
    parse_csw(&b)
}

/// A whole IN command: CBW, one data transfer of `len`, CSW.
fn cmd_in(dev: &mut MassStorage, cdb: &[u8], len: u32) -> (Vec<u8>, (u32, u32, u8)) {
    send_cbw(dev, 7, len, true, cdb);
    let mut data = vec![0u8; len as usize];
    let r = dev.bulk(BULK_IN, &mut data);
    assert_eq!(r.status, TransferStatus::Completed);
    data.truncate(r.actual);
    (data, read_csw(dev))
}

fn cmd_none(dev: &mut MassStorage, cdb: &[u8]) -> (u32, u32, u8) {
    send_cbw(dev, 9, 0, false, cdb);
    read_csw(dev)
}

fn sense(dev: &mut MassStorage) -> Sense {
    let (d, csw) = cmd_in(dev, &[opcode::REQUEST_SENSE, 0, 0, 0, 18, 0], 18);
    assert_eq!(csw.2, 0);
    assert_eq!(d[0], 0x70);
    Sense::new(d[2], d[12], d[13])
}

fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn superspeed_descriptors() {
    let (_i, mut dev) = device(64, false, UsbSpeed::Super);
    let mut d = vec![0u8; 18];
    control(&mut dev, 0x80, request::GET_DESCRIPTOR, 0x0100, 0, &mut d);
    assert_eq!(u16::from_le_bytes([d[2], d[3]]), 0x0300);
    assert_eq!(d[7], 9);
    let mut c = vec![0u8; 255];
    let r = control(&mut dev, 0x80, request::GET_DESCRIPTOR, 0x0200, 0, &mut c);
    assert_eq!(r.actual, 9 + 9 + 2 * 13);
    assert_eq!(&c[9 + 5..9 + 8], &INTERFACE_CLASS);
    // Endpoint IN 1024 bytes, then its companion with burst 15.
    assert_eq!(&c[18..25], &[7, 5, 0x81, 2, 0x00, 0x04, 0]);
    assert_eq!(&c[25..27], &[6, 48]);
    assert_eq!(c[27], 15);
    assert_eq!(c[33], 0x02);
    let mut bos = vec![0u8; 64];
    let r = control(&mut dev, 0x80, request::GET_DESCRIPTOR, 0x0f00, 0, &mut bos);
    assert_eq!(r.actual, 22);
    assert_eq!(bos[1], 15);
    // A truncated request gets exactly wLength bytes.
    let mut short = vec![0u8; 4];
    let r = control(
        &mut dev,
        0x80,
        request::GET_DESCRIPTOR,
        0x0200,
        0,
        &mut short,
    );
    assert_eq!(r.actual, 4);
    assert_eq!(u16::from_le_bytes([short[2], short[3]]), 44);
}

#[test]
fn high_speed_descriptors_and_no_bos() {
    let (_i, mut dev) = device(64, false, UsbSpeed::Super);
    dev.set_speed(UsbSpeed::High);
    let mut d = vec![0u8; 18];
    control(&mut dev, 0x80, request::GET_DESCRIPTOR, 0x0100, 0, &mut d);
    assert_eq!(u16::from_le_bytes([d[2], d[3]]), 0x0200);
    assert_eq!(d[7], 64);
    let mut c = vec![0u8; 255];
    let r = control(&mut dev, 0x80, request::GET_DESCRIPTOR, 0x0200, 0, &mut c);
    assert_eq!(r.actual, 32);
    assert_eq!(&c[18..25], &[7, 5, 0x81, 2, 0x00, 0x02, 0]);
    let mut bos = vec![0u8; 5];
    let r = control(&mut dev, 0x80, request::GET_DESCRIPTOR, 0x0f00, 0, &mut bos);
    assert_eq!(r.status, TransferStatus::Stall);
    let mut s = vec![0u8; 255];
    let r = control(
        &mut dev,
        0x80,
        request::GET_DESCRIPTOR,
        0x0303,
        0x409,
        &mut s,
    );
    assert_eq!(&s[..r.actual], &descriptor::string("0001")[..]);
}

#[test]
fn standard_and_class_requests() {
    let (_i, mut dev) = device(64, false, UsbSpeed::Super);
    let mut b = vec![0u8; 1];
    control(&mut dev, 0x80, request::GET_CONFIGURATION, 0, 0, &mut b);
    assert_eq!(b, [1]);
    let mut lun = vec![0xffu8; 1];
    let r = control(&mut dev, 0xa1, REQ_GET_MAX_LUN, 0, 0, &mut lun);
    assert_eq!((r.actual, lun[0]), (1, 0));
    // SET_FEATURE(ENDPOINT_HALT) shows in GET_STATUS and stalls the pipe.
    control(&mut dev, 0x02, request::SET_FEATURE, 0, 0x81, &mut vec![]);
    let mut st = vec![0u8; 2];
    control(&mut dev, 0x82, request::GET_STATUS, 0, 0x81, &mut st);
    assert_eq!(st, [1, 0]);
    assert_eq!(
        dev.bulk(BULK_IN, &mut vec![0; 13]).status,
        TransferStatus::Stall
    );
    control(&mut dev, 0x02, request::CLEAR_FEATURE, 0, 0x81, &mut vec![]);
    control(&mut dev, 0x82, request::GET_STATUS, 0, 0x81, &mut st);
    assert_eq!(st, [0, 0]);
    // Unknown requests and endpoints STALL.
    assert_eq!(
        control(&mut dev, 0x82, request::GET_STATUS, 0, 0x85, &mut st).status,
        TransferStatus::Stall
    );
    assert_eq!(
        control(&mut dev, 0xc0, 0x42, 0, 0, &mut vec![0; 4]).status,
        TransferStatus::Stall
    );
    assert_eq!(
        control(
            &mut dev,
            0x00,
            request::SET_CONFIGURATION,
            7,
            0,
            &mut vec![]
        )
        .status,
        TransferStatus::Stall
    );
    // Unconfigured: bulk pipes do not work.
    control(
        &mut dev,
        0x00,
        request::SET_CONFIGURATION,
        0,
        0,
        &mut vec![],
    );
    assert!(dev.endpoints().is_empty());
    assert_eq!(
        dev.bulk(BULK_OUT, &mut cbw(1, 0, false, &[0; 6])).status,
        TransferStatus::Stall
    );
}

#[test]
fn inquiry_capacity_and_unit_commands() {
    let (_i, mut dev) = device(100, false, UsbSpeed::Super);
    let (d, csw) = cmd_in(&mut dev, &[opcode::INQUIRY, 0, 0, 0, 36, 0], 36);
    assert_eq!(csw, (7, 0, 0));
    assert_eq!(d.len(), 36);
    assert_eq!(d[0], 0);
    assert_eq!(d[1] & 0x80, 0, "RMB must be 0");
    assert_eq!(&d[8..12], b"RVMM");
    let (d, csw) = cmd_in(
        &mut dev,
        &[opcode::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        8,
    );
    assert_eq!(csw.2, 0);
    assert_eq!(d, [0, 0, 0, 99, 0, 0, 2, 0]);
    let mut rc16 = [0u8; 16];
    rc16[0] = opcode::SERVICE_ACTION_IN_16;
    rc16[1] = opcode::SA_READ_CAPACITY_16;
    rc16[13] = 32;
    let (d, csw) = cmd_in(&mut dev, &rc16, 32);
    assert_eq!(csw.2, 0);
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 99);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 512);
    assert_eq!(
        cmd_none(&mut dev, &[opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]).2,
        0
    );
    assert_eq!(
        cmd_none(
            &mut dev,
            &[opcode::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0]
        )
        .2,
        0
    );
    assert!(dev.disk.prevent_removal());
    assert_eq!(
        cmd_none(&mut dev, &[opcode::START_STOP_UNIT, 0, 0, 0, 0, 0]).2,
        0
    );
    assert!(!dev.disk.started());
    assert_eq!(
        cmd_none(
            &mut dev,
            &[opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        )
        .2,
        0
    );
    let mut sync16 = [0u8; 16];
    sync16[0] = opcode::SYNCHRONIZE_CACHE_16;
    assert_eq!(cmd_none(&mut dev, &sync16).2, 0);
    // VPD page 0x80 carries the serial.
    let (d, _) = cmd_in(&mut dev, &[opcode::INQUIRY, 1, 0x80, 0, 64, 0], 64);
    assert_eq!(&d[4..], b"0001");
}

#[test]
fn mode_sense_reports_write_protect_and_caching() {
    let (_i, mut rw) = device(8, false, UsbSpeed::Super);
    let (d, csw) = cmd_in(&mut rw, &[opcode::MODE_SENSE_6, 0, 0x3f, 0, 192, 0], 192);
    assert_eq!(csw, (7, 192 - 24, 0));
    assert_eq!(d.len(), 24);
    assert_eq!(d[0], 23);
    assert_eq!(d[2] & 0x80, 0);
    assert_eq!((d[4], d[5], d[6] & 0x04), (0x08, 18, 0x04));
    let (_i2, mut ro) = device(8, true, UsbSpeed::Super);
    let (d, _) = cmd_in(&mut ro, &[opcode::MODE_SENSE_6, 0, 0x08, 0, 192, 0], 192);
    assert_eq!(d[2] & 0x80, 0x80);
    let (d, csw) = cmd_in(
        &mut ro,
        &[opcode::MODE_SENSE_10, 0, 0x08, 0, 0, 0, 0, 0, 64, 0],
        64,
    );
    assert_eq!(csw.2, 0);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(d[3] & 0x80, 0x80);
    assert_eq!(d[8], 0x08);
    // An unsupported page fails with INVALID FIELD IN CDB.
    send_cbw(
        &mut ro,
        3,
        64,
        true,
        &[opcode::MODE_SENSE_6, 0, 0x1c, 0, 64, 0],
    );
    assert_eq!(
        ro.bulk(BULK_IN, &mut vec![0; 64]).status,
        TransferStatus::Stall
    );
    ro.clear_halt(BULK_IN);
    assert_eq!(read_csw(&mut ro), (3, 64, 1));
    assert_eq!(sense(&mut ro), Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn write_then_read_back_through_bot_and_the_image() {
    let (img, mut dev) = device(4096, false, UsbSpeed::Super);
    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    send_cbw(
        &mut dev,
        1,
        payload.len() as u32,
        false,
        &rw10(opcode::WRITE_10, 10, 128),
    );
    let mut out = payload.clone();
    assert_eq!(
        dev.bulk(BULK_OUT, &mut out),
        TransferResult::completed(65536)
    );
    assert_eq!(read_csw(&mut dev), (1, 0, 0));
    // READ(16) of the same range, split across three IN transfers.
    send_cbw(&mut dev, 2, 65536, true, &rw16(opcode::READ_16, 10, 128));
    let mut got = Vec::new();
    for len in [512usize, 32768, 32256] {
        let mut b = vec![0u8; len];
        assert_eq!(dev.bulk(BULK_IN, &mut b), TransferResult::completed(len));
        got.extend_from_slice(&b);
    }
    assert_eq!(read_csw(&mut dev), (2, 0, 0));
    assert_eq!(got, payload);
    // The image file itself holds the data; neighbours are untouched.
    let raw = std::fs::read(&img.0).unwrap();
    assert_eq!(&raw[10 * 512..138 * 512], &payload[..]);
    assert!(raw[9 * 512..10 * 512].iter().all(|&b| b == 9));
    assert!(raw[138 * 512..139 * 512].iter().all(|&b| b == 138));
    // A 2 MiB read spans more than one bounce chunk.
    let (d, csw) = cmd_in(&mut dev, &rw10(opcode::READ_10, 0, 4096), 2 << 20);
    assert_eq!(csw.2, 0);
    assert!(d[300 * 512..301 * 512]
        .iter()
        .all(|&b| b == (300 % 251) as u8));
}

#[test]
fn errors_set_the_right_sense() {
    let (_i, mut ro) = device(16, true, UsbSpeed::Super);
    // Unknown opcode, no data expected.
    assert_eq!(cmd_none(&mut ro, &[0xc7, 0, 0, 0, 0, 0]).2, 1);
    assert_eq!(sense(&mut ro), Sense::INVALID_OPCODE);
    // Sense is cleared after it was read.
    assert_eq!(sense(&mut ro), Sense::NONE);
    // LBA out of range (READ(16) with an absurd length must not overflow).
    assert_eq!(
        cmd_none(&mut ro, &rw16(opcode::READ_16, u64::MAX - 1, u32::MAX)).2,
        1
    );
    assert_eq!(sense(&mut ro), Sense::LBA_OUT_OF_RANGE);
    send_cbw(&mut ro, 5, 1024, true, &rw10(opcode::READ_10, 15, 2));
    assert_eq!(
        ro.bulk(BULK_IN, &mut vec![0; 1024]).status,
        TransferStatus::Stall
    );
    ro.clear_halt(BULK_IN);
    assert_eq!(read_csw(&mut ro), (5, 1024, 1));
    assert_eq!(sense(&mut ro), Sense::LBA_OUT_OF_RANGE);
    // Write to a read-only disk: DATA PROTECT, nothing accepted.
    send_cbw(&mut ro, 6, 512, false, &rw10(opcode::WRITE_10, 0, 1));
    assert_eq!(
        ro.bulk(BULK_OUT, &mut vec![0; 512]).status,
        TransferStatus::Stall
    );
    ro.clear_halt(BULK_OUT);
    assert_eq!(read_csw(&mut ro), (6, 512, 1));
    assert_eq!(sense(&mut ro), Sense::WRITE_PROTECTED);
    // A truncated CDB is an invalid field.
    assert_eq!(cmd_none(&mut ro, &[opcode::READ_10, 0, 0]).2, 1);
    assert_eq!(sense(&mut ro), Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn thirteen_cases() {
    let (_i, mut dev) = device(64, false, UsbSpeed::Super);
    let inquiry = [opcode::INQUIRY, 0, 0, 0, 36, 0];
    let tur = [opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0];
    let write1 = rw10(opcode::WRITE_10, 0, 1);
    // Case 1 Hn = Dn.
    assert_eq!(cmd_none(&mut dev, &tur), (9, 0, 0));
    // Case 2 Hn < Di, case 3 Hn < Do: phase error, no data.
    assert_eq!(cmd_none(&mut dev, &inquiry).2, CswStatus::PhaseError as u8);
    assert_eq!(cmd_none(&mut dev, &write1).2, CswStatus::PhaseError as u8);
    // Case 4 Hi > Dn: STALL IN, residue = Hi.
    send_cbw(&mut dev, 4, 100, true, &tur);
    assert_eq!(
        dev.bulk(BULK_IN, &mut vec![0; 100]).status,
        TransferStatus::Stall
    );
    dev.clear_halt(BULK_IN);
    assert_eq!(read_csw(&mut dev), (4, 100, 0));
    // Case 5 Hi > Di: short data, residue.
    let (d, csw) = cmd_in(&mut dev, &inquiry, 100);
    assert_eq!((d.len(), csw), (36, (7, 64, 0)));
    // Case 6 Hi = Di.
    assert_eq!(cmd_in(&mut dev, &inquiry, 36).1, (7, 0, 0));
    // Case 7 Hi < Di: Hi bytes, then phase error.
    let (d, csw) = cmd_in(&mut dev, &rw10(opcode::READ_10, 0, 2), 512);
    assert_eq!((d.len(), csw.2), (512, 2));
    // Case 8 Hi <> Do.
    send_cbw(&mut dev, 8, 512, true, &write1);
    assert_eq!(
        dev.bulk(BULK_IN, &mut vec![0; 512]).status,
        TransferStatus::Stall
    );
    dev.clear_halt(BULK_IN);
    assert_eq!(read_csw(&mut dev), (8, 512, 2));
    // Case 9 Ho > Dn: STALL OUT.
    send_cbw(&mut dev, 9, 512, false, &tur);
    assert_eq!(
        dev.bulk(BULK_OUT, &mut vec![0; 512]).status,
        TransferStatus::Stall
    );
    dev.clear_halt(BULK_OUT);
    assert_eq!(read_csw(&mut dev), (9, 512, 0));
    // Case 10 Ho <> Di.
    send_cbw(&mut dev, 10, 36, false, &inquiry);
    assert_eq!(
        dev.bulk(BULK_OUT, &mut vec![0; 36]).status,
        TransferStatus::Stall
    );
    dev.clear_halt(BULK_OUT);
    assert_eq!(read_csw(&mut dev), (10, 36, 2));
    // Case 11 Ho > Do: Do bytes taken, then STALL, residue Ho - Do.
    send_cbw(&mut dev, 11, 1024, false, &write1);
    assert_eq!(
        dev.bulk(BULK_OUT, &mut vec![0xee; 1024]),
        TransferResult::stall(512)
    );
    dev.clear_halt(BULK_OUT);
    assert_eq!(read_csw(&mut dev), (11, 512, 0));
    // Case 12 Ho = Do.
    send_cbw(&mut dev, 12, 512, false, &write1);
    assert_eq!(
        dev.bulk(BULK_OUT, &mut vec![0xdd; 512]),
        TransferResult::completed(512)
    );
    assert_eq!(read_csw(&mut dev), (12, 0, 0));
    // Case 13 Ho < Do: refused, phase error, image keeps case 12's data.
    send_cbw(&mut dev, 13, 512, false, &rw10(opcode::WRITE_10, 0, 2));
    assert_eq!(
        dev.bulk(BULK_OUT, &mut vec![0xcc; 512]).status,
        TransferStatus::Stall
    );
    dev.clear_halt(BULK_OUT);
    assert_eq!(read_csw(&mut dev), (13, 512, 2));
    let (d, _) = cmd_in(&mut dev, &rw10(opcode::READ_10, 0, 1), 512);
    assert!(d.iter().all(|&b| b == 0xdd));
}

#[test]
fn invalid_cbw_needs_reset_recovery_and_out_of_order_naks() {
    let (_i, mut dev) = device(64, false, UsbSpeed::Super);
    // IN before any CBW: not ready.
    assert_eq!(dev.bulk(BULK_IN, &mut vec![0; 13]), TransferResult::nak());
    let mut bad = cbw(1, 0, false, &[0; 6]);
    bad[0] ^= 1;
    assert_eq!(dev.bulk(BULK_OUT, &mut bad).status, TransferStatus::Stall);
    assert!(dev.halted(BULK_IN) && dev.halted(BULK_OUT));
    // CLEAR_FEATURE alone does not unhalt.
    control(&mut dev, 0x02, request::CLEAR_FEATURE, 0, 0x81, &mut vec![]);
    assert!(dev.halted(BULK_IN));
    // Reset Recovery: BOMSR, then clear both halts.
    control(&mut dev, 0x21, REQ_MASS_STORAGE_RESET, 0, 0, &mut vec![]);
    control(&mut dev, 0x02, request::CLEAR_FEATURE, 0, 0x81, &mut vec![]);
    control(&mut dev, 0x02, request::CLEAR_FEATURE, 0, 0x02, &mut vec![]);
    assert!(!dev.halted(BULK_IN) && !dev.halted(BULK_OUT));
    assert_eq!(
        cmd_none(&mut dev, &[opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]).2,
        0
    );
    // Wrong CBW length and a LUN other than 0 are invalid too.
    assert_eq!(
        dev.bulk(BULK_OUT, &mut vec![0; 32]).status,
        TransferStatus::Stall
    );
    dev.reset();
    control(
        &mut dev,
        0x00,
        request::SET_CONFIGURATION,
        1,
        0,
        &mut vec![],
    );
    let mut lun1 = cbw(1, 0, false, &[0; 6]);
    lun1[13] = 1;
    assert_eq!(dev.bulk(BULK_OUT, &mut lun1).status, TransferStatus::Stall);
    // A CBW during a data phase is not accepted (NAK) until the CSW is read.
    dev.reset();
    control(
        &mut dev,
        0x00,
        request::SET_CONFIGURATION,
        1,
        0,
        &mut vec![],
    );
    send_cbw(&mut dev, 2, 36, true, &[opcode::INQUIRY, 0, 0, 0, 36, 0]);
    assert!(dev.command_in_progress());
    assert_eq!(
        dev.bulk(BULK_OUT, &mut cbw(3, 0, false, &[0; 6])),
        TransferResult::nak()
    );
    // BOMSR abandons the command.
    control(&mut dev, 0x21, REQ_MASS_STORAGE_RESET, 0, 0, &mut vec![]);
    assert!(!dev.command_in_progress());
}

#[test]
fn a_device_dropped_while_suspended_resumes_its_volume() {
    let (_img, mut dev) = device(64, false, UsbSpeed::Super);
    let volume = dev.disk.image().volume().clone();
    dev.suspend();
    assert!(volume.is_quiesced(), "suspend quiesces the volume");
    drop(dev);
    assert!(
        !volume.is_quiesced(),
        "a dropped device left its volume quiesced"
    );
}
