//! A host that sends random Bulk-Only commands: seeded CBWs (valid, not
//! meaningful, or not CBWs at all) with random CDBs, data phases of random
//! length in the direction the CBW names, CSW reads, and the recovery steps
//! the Bulk-Only spec gives the host (clear a stalled pipe, Reset
//! Recovery). The device must answer every valid CBW with a well-formed
//! CSW (its signature, the CBW's tag, a status of 0-2, a residue no larger
//! than the transfer length) or STALL, and after Reset Recovery it must
//! work again: INQUIRY answers and a read-only disk reads its data.

use super::*;
use crate::test_rng::Rng;

/// Seeds and commands per seed: every opcode and most BOT cases many
/// times, well under a second in a debug build.
const SEEDS: u64 = 24;
const COMMANDS: usize = 300;
/// Bytes a host moves in one data phase before it gives up on it (with
/// Reset Recovery): a device may accept a huge dCBWDataTransferLength.
const DATA_PHASE_CAP: usize = 1 << 20;
/// Sector the read-only disk is checked with after each recovery.
const CHECK_SECTOR: u32 = 5;

/// How one command ended, for the coverage assertion.
#[derive(Debug, Default)]
struct Outcomes {
    passed: u32,
    failed: u32,
    phase_errors: u32,
    stalls: u32,
    recoveries: u32,
}

/// CLEAR_FEATURE(ENDPOINT_HALT) on bulk endpoint `ep`.
fn clear_halt(dev: &mut MassStorage, ep: u8) {
    let r = control(
        dev,
        0x02,
        request::CLEAR_FEATURE,
        0,
        u16::from(ep),
        &mut vec![],
    );
    assert_eq!(r.status, TransferStatus::Completed, "clear halt {ep:#x}");
}

/// Bulk-Only Mass Storage Reset, then CLEAR_FEATURE(ENDPOINT_HALT) on both
/// bulk endpoints (BOT 1.0 section 5.3.4).
fn reset_recovery(dev: &mut MassStorage) {
    let r = control(dev, 0x21, REQ_MASS_STORAGE_RESET, 0, 0, &mut vec![]);
    assert_eq!(r.status, TransferStatus::Completed, "Bulk-Only reset");
    clear_halt(dev, BULK_IN);
    clear_halt(dev, BULK_OUT);
}

/// The device works after recovery: INQUIRY answers, and a read-only
/// disk (whose data the random commands cannot change) reads its pattern.
fn works(dev: &mut MassStorage, readonly: bool, seed: u64) {
    let (d, csw) = cmd_in(dev, &[opcode::INQUIRY, 0, 0, 0, 36, 0], 36);
    assert_eq!((csw.2, &d[8..12]), (0, &b"RVMM"[..]), "seed {seed}");
    if readonly {
        let (d, csw) = cmd_in(dev, &rw10(opcode::READ_10, CHECK_SECTOR, 1), 512);
        assert_eq!(csw.2, 0, "seed {seed}");
        assert!(
            d.iter().all(|&b| u32::from(b) == CHECK_SECTOR % 251),
            "seed {seed}: sector {CHECK_SECTOR} reads {:x?}",
            &d[..16]
        );
    }
}

/// A CDB: a known opcode with random or plausible fields, or noise.
fn random_cdb(rng: &mut Rng) -> Vec<u8> {
    let mut cdb = rng.bytes(16);
    if rng.chance(70) {
        cdb[0] = rng.pick(SCSI_OPCODES);
        if rng.chance(50) {
            // A small LBA and length, so reads and writes often succeed.
            cdb[1..9].fill(0);
            cdb[5] = rng.below(80) as u8;
            cdb[8] = rng.below(4) as u8;
            cdb[13] = rng.below(4) as u8;
        }
    }
    let len = match rng.below(10) {
        0 => rng.below(18) as usize,
        1..=4 => 10,
        5..=6 => 16,
        _ => 6,
    };
    cdb.truncate(len.min(16));
    cdb.resize(len, 0);
    cdb
}

/// One command from the host's side; returns how it ended.
fn command(dev: &mut MassStorage, rng: &mut Rng, out: &mut Outcomes, seed: u64, n: usize) {
    let tag = rng.u32();
    let len: u32 = match rng.below(4) {
        0 => 0,
        1 => rng.below(64 * 1024) as u32,
        2 => rng.below(8) as u32 * 512,
        _ => rng.u32(),
    };
    let data_in = rng.chance(50);
    let cdb = random_cdb(rng);
    let mut block = cbw(tag, len, data_in, &cdb[..cdb.len().min(16)]);
    block[14] = cdb.len() as u8;
    let valid = match rng.below(20) {
        0 => {
            block[0] ^= 0xff;
            false
        }
        1 => {
            block.truncate(rng.below(31) as usize);
            false
        }
        2 => {
            block.push(0);
            false
        }
        _ => true,
    };
    let r = dev.bulk(BULK_OUT, &mut block);
    if r.status == TransferStatus::Stall || !valid {
        // Not a valid CBW (BOT 6.6.1): the device stalls; the host recovers.
        out.stalls += u32::from(r.status == TransferStatus::Stall);
        reset_recovery(dev);
        out.recoveries += 1;
        return;
    }
    assert_eq!(r, TransferResult::completed(31), "seed {seed} cmd {n}");
    // The data phase, in the CBW's direction, until it ends.
    let ep = if data_in { BULK_IN } else { BULK_OUT };
    let mut moved = 0usize;
    while moved < len as usize {
        if moved >= DATA_PHASE_CAP {
            reset_recovery(dev);
            out.recoveries += 1;
            return;
        }
        let want = (len as usize - moved).min(1 + rng.below(128 * 1024) as usize);
        let mut buf = rng.bytes(want);
        let r = dev.bulk(ep, &mut buf);
        match r.status {
            TransferStatus::Completed => {
                assert!(r.actual <= want, "seed {seed} cmd {n}: {r:?}");
                moved += r.actual;
                if r.actual < want {
                    break; // a short packet ends the phase
                }
            }
            TransferStatus::Stall => {
                out.stalls += 1;
                clear_halt(dev, ep);
                break;
            }
            // Neither a NAK (the disk is idle) nor an error (host memory).
            other => panic!("seed {seed} cmd {n}: data transfer ended {other:?}"),
        }
    }
    // The CSW; a stalled IN pipe is cleared and read once more (BOT 6.7.2).
    let mut csw = vec![0u8; 13];
    let mut r = dev.bulk(BULK_IN, &mut csw);
    if r.status == TransferStatus::Stall {
        out.stalls += 1;
        clear_halt(dev, BULK_IN);
        r = dev.bulk(BULK_IN, &mut csw);
    }
    if r.status != TransferStatus::Completed {
        reset_recovery(dev);
        out.recoveries += 1;
        return;
    }
    assert_eq!(
        r.actual, 13,
        "seed {seed} cmd {n}: CSW of {} bytes",
        r.actual
    );
    let (csw_tag, residue, status) = parse_csw(&csw);
    assert_eq!(csw_tag, tag, "seed {seed} cmd {n}: CSW tag");
    assert!(
        residue <= len,
        "seed {seed} cmd {n}: residue {residue} > {len}"
    );
    match status {
        0 => out.passed += 1,
        1 => out.failed += 1,
        2 => {
            out.phase_errors += 1;
            reset_recovery(dev);
            out.recoveries += 1;
        }
        s => panic!("seed {seed} cmd {n}: CSW status {s}"),
    }
}

#[test]
fn random_commands_get_well_formed_answers_and_recovery_always_works() {
    let mut out = Outcomes::default();
    for seed in 0..SEEDS {
        let readonly = seed % 2 == 0;
        let speed = if seed % 4 < 2 {
            UsbSpeed::Super
        } else {
            UsbSpeed::High
        };
        let (_img, mut dev) = device(100, readonly, speed);
        let mut rng = Rng::new(seed);
        for n in 0..COMMANDS {
            command(&mut dev, &mut rng, &mut out, seed, n);
            if n % 25 == 24 {
                reset_recovery(&mut dev);
                works(&mut dev, readonly, seed);
            }
        }
    }
    eprintln!("{out:?}");
    for (what, count) in [
        ("passed", out.passed),
        ("failed", out.failed),
        ("phase errors", out.phase_errors),
        ("stalls", out.stalls),
    ] {
        assert!(count > 20, "too few commands {what}: {out:?}");
    }
}
