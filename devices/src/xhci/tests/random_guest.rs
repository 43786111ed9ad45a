//! A guest that writes garbage: seeded pseudo-random register writes, TRBs,
//! contexts, CBWs and memory scribbles, interleaved with hot-plug. Every
//! access must return within a bound (no hang, no unbounded ring walk),
//! nothing may panic (debug builds also trap integer overflow), and after
//! an HCRST the controller must enumerate a disk again and read its data
//! correctly: garbage leaves no state behind that a reset does not clear.

use std::time::{Duration, Instant};

use super::*;
use crate::test_rng::Rng;
use crate::usb::mass_storage::tests::SCSI_OPCODES;
use crate::xhci::regs::PORT_STRIDE;

/// Seeds, resets per seed and random steps after each reset: enough to
/// reach every command and endpoint state many times over, a few seconds
/// in a debug build.
const SEEDS: u64 = 40;
const EPOCHS: usize = 8;
const STEPS_PER_EPOCH: usize = 50;
/// Bound on one guest access (a doorbell may walk a whole ring and do
/// disk I/O; a debug build on a loaded CI machine is slow).
const ACCESS_BOUND: Duration = Duration::from_secs(5);
/// Sector the final check reads (its bytes are all `SECTOR % 251`).
const CHECK_SECTOR: u32 = 7;

/// A guest address: usually inside memory (sometimes unaligned), else
/// anywhere, including past the end and near 2^64.
fn random_addr(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0 => rng.next(),
        1 => MEM_SIZE as u64 - rng.below(64),
        2..=4 => rng.below(MEM_SIZE as u64),
        _ => rng.below(MEM_SIZE as u64) & !0xf,
    }
}

/// A TRB, usually of a type in `types`, with fields that are often
/// plausible (pointers into memory, lengths up to 128 KiB).
fn random_trb(rng: &mut Rng, types: std::ops::RangeInclusive<u32>) -> Trb {
    let t = if rng.chance(90) {
        *types.start() + rng.below(u64::from(types.end() - types.start() + 1)) as u32
    } else {
        rng.below(64) as u32
    };
    let control = (rng.u32() & !(0x3f << 10)) | (t << 10);
    Trb {
        parameter: if rng.chance(70) {
            random_addr(rng)
        } else {
            rng.next()
        },
        status: if rng.chance(60) {
            rng.u32() & 0x1_ffff
        } else {
            rng.u32()
        },
        control,
    }
}

/// Runs `f` and fails the test if it took longer than [`ACCESS_BOUND`].
fn bounded<T>(what: &str, seed: u64, step: usize, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    assert!(
        took < ACCESS_BOUND,
        "seed {seed} step {step}: {what} took {took:?}"
    );
    r
}

/// What the garbage reached, from the events the controller posted: the
/// test asserts it went past the parsers into the command and transfer
/// handlers.
#[derive(Debug, Default)]
struct Reached {
    commands_ok: u32,
    commands_failed: u32,
    transfers_ok: u32,
    transfers_failed: u32,
    port_changes: u32,
}

impl Reached {
    fn count(&mut self, events: &[Trb]) {
        let ok = CompletionCode::Success as u8;
        for e in events {
            match (e.trb_type(), e.completion_code() == ok) {
                (trb_type::COMMAND_COMPLETION, true) => self.commands_ok += 1,
                (trb_type::COMMAND_COMPLETION, false) => self.commands_failed += 1,
                (trb_type::TRANSFER_EVENT, true) => self.transfers_ok += 1,
                (trb_type::TRANSFER_EVENT, false) => self.transfers_failed += 1,
                (trb_type::PORT_STATUS_CHANGE, _) => self.port_changes += 1,
                _ => {}
            }
        }
    }
}

/// One random guest (or host hot-plug) action.
fn step(
    d: &mut Driver,
    rng: &mut Rng,
    reached: &mut Reached,
    img: &TempImage,
    rw_port: u8,
    (seed, n): (u64, usize),
) {
    match rng.below(100) {
        // A command, valid type or not, on the command ring.
        0..=19 => {
            let mut trb = random_trb(rng, trb_type::ENABLE_SLOT..=trb_type::NOOP_COMMAND);
            trb.control = (trb.control & 0x00ff_ffff) | ((rng.below(8) as u32) << 24);
            let mem = d.mem.clone();
            d.cmd.push(&mem, trb);
            bounded("command doorbell", seed, n, || d.w32(DB_BASE, 0));
        }
        // A transfer TRB on one of the rings of slots 1-4.
        20..=39 => {
            let slot = 1 + rng.below(4) as u8;
            let dci = match rng.below(4) {
                0 => 1 + rng.below(31) as u8,
                1 => 1,
                2 => DCI_IN,
                _ => DCI_OUT,
            };
            let trb = random_trb(rng, trb_type::NORMAL..=trb_type::NOOP);
            d.push(slot, dci, trb);
            if rng.chance(70) {
                bounded("transfer doorbell", seed, n, || d.doorbell(slot, dci));
            }
        }
        // A CBW with random CDB bytes (a real opcode half the time), then
        // a data TD of random size and direction and the CSW read.
        40..=54 => {
            let slot = 1 + rng.below(4) as u8;
            let mut cdb = rng.bytes(16);
            if rng.chance(50) {
                cdb[0] = rng.pick(SCSI_OPCODES);
            }
            let cdb_len = rng.below(18) as usize;
            let len = match rng.below(3) {
                0 => rng.u32(),
                1 => rng.below(64 * 1024) as u32,
                _ => rng.below(4) as u32 * 512,
            };
            let data_in = rng.chance(50);
            let mut block = cbw(rng.u32(), len, data_in, &cdb[..cdb_len.min(16)]);
            if rng.chance(10) {
                block.truncate(rng.below(31) as usize);
            }
            d.mem.write_slice(&block, GuestAddress(DATA)).unwrap();
            d.queue_bulk(slot, DCI_OUT, DATA, block.len().max(1), 64);
            bounded("CBW doorbell", seed, n, || d.doorbell(slot, DCI_OUT));
            let piece = 1 + rng.below(64 * 1024) as usize;
            let data_len = (len as usize).clamp(1, 256 * 1024);
            let dci = if data_in { DCI_IN } else { DCI_OUT };
            d.queue_bulk(slot, dci, 0x40_0000, data_len, piece);
            bounded("data doorbell", seed, n, || d.doorbell(slot, dci));
            d.queue_bulk(slot, DCI_IN, DATA + 0x100, 13, 13);
            bounded("CSW doorbell", seed, n, || d.doorbell(slot, DCI_IN));
        }
        // A register write: a known register or any offset.
        55..=69 => {
            let off = if rng.chance(80) {
                rng.pick(REGISTERS)
            } else if rng.chance(50) {
                PORT_BASE + rng.below(8) * PORT_STRIDE + rng.below(4) * 4
            } else {
                rng.below(MMIO_SIZE) & !3
            };
            let v = rng.u32();
            bounded("register write", seed, n, || {
                if rng.chance(20) {
                    d.w64(off & !7, u64::from(v) << 32 | u64::from(rng.u32()))
                } else {
                    d.w32(off, v)
                }
            });
        }
        // A read anywhere in the BAR, any width.
        70..=74 => {
            let off = rng.below(MMIO_SIZE + 8);
            let mut buf = [0u8; 8];
            let width = [1usize, 2, 4, 8][rng.below(4) as usize];
            bounded("register read", seed, n, || {
                d.xhci.mmio_read(off, &mut buf[..width])
            });
        }
        // Scribbles over guest memory: contexts, DCBAA, ERST, rings.
        75..=84 => {
            let at = match rng.below(4) {
                0 => DCBAA + rng.below(0x100),
                1 => OUTPUT_CTX + rng.below(5 * 0x1000),
                2 => ERST + rng.below(32),
                _ => rng.below(MEM_SIZE as u64 - 64),
            };
            let n = 1 + rng.below(48) as usize;
            let bytes = rng.bytes(n);
            let _ = d.mem.write_slice(&bytes, GuestAddress(at));
        }
        // The interrupt handler.
        85..=92 => {
            let events = bounded("event drain", seed, n, || d.drain());
            reached.count(&events);
        }
        // A doorbell register with any value.
        93..=96 => {
            let slot = rng.below(64);
            let v = rng.u32();
            bounded("doorbell write", seed, n, || d.w32(DB_BASE + 4 * slot, v));
        }
        // Hot-unplug or replug of the read-write disk.
        _ => {
            if d.xhci.detach(rw_port).is_err() {
                d.attach_disk(rw_port, img, false);
            }
        }
    }
}

/// The driver forgets everything (as after its own reset) and starts over:
/// HCRST, enumeration of the disk on `port`, a READ(10) of one sector.
fn recovers(d: &mut Driver, port: u8, seed: u64) {
    d.mem
        .write_slice(&vec![0u8; 0x80_0000], GuestAddress(0))
        .unwrap();
    d.cmd = Producer::new(CMD_RING);
    d.ev_index = 0;
    d.ev_cycle = true;
    d.rings.clear();
    d.backlog.clear();
    d.start();
    let slot = d.enumerate(port);
    let lba = CHECK_SECTOR.to_be_bytes();
    let read10 = [0x28, 0, lba[0], lba[1], lba[2], lba[3], 0, 0, 1, 0];
    let (code, csw) = d.bot(slot, &read10, 512, true);
    assert_eq!(code, CompletionCode::Success as u8, "seed {seed}");
    assert_eq!(csw[12], 0, "seed {seed}: CSW status {csw:x?}");
    let mut data = [0u8; 512];
    d.mem
        .read_slice(&mut data, GuestAddress(0x40_0000))
        .unwrap();
    assert!(
        data.iter().all(|&b| u32::from(b) == CHECK_SECTOR % 251),
        "seed {seed}: sector {CHECK_SECTOR} reads {:x?}",
        &data[..16]
    );
}

#[test]
fn random_guest_input_never_panics_or_hangs_and_a_reset_recovers() {
    let mut reached = Reached::default();
    for seed in 0..SEEDS {
        let mut d = Driver::new(2, 2);
        let rw = TempImage::new(64);
        let ro = TempImage::new(64);
        let usb3 = (1..=4)
            .find(|&p| d.xhci.port_protocol(p) == Some(PortProtocol::Usb3))
            .unwrap();
        let usb2 = (1..=4)
            .find(|&p| d.xhci.port_protocol(p) == Some(PortProtocol::Usb2))
            .unwrap();
        d.attach_disk(usb2, &rw, false);
        d.attach_disk(usb3, &ro, true);
        let mut rng = Rng::new(seed);
        // Epochs: a reset and a working device (slot 1, endpoints
        // running), then garbage on top of it; the next epoch's reset must
        // recover from whatever the garbage left.
        for epoch in 0..EPOCHS {
            recovers(&mut d, usb3, seed);
            for n in 0..STEPS_PER_EPOCH {
                let at = (seed, epoch * STEPS_PER_EPOCH + n);
                step(&mut d, &mut rng, &mut reached, &rw, usb2, at);
            }
        }
        recovers(&mut d, usb3, seed);
    }
    eprintln!("{reached:?}");
    assert!(reached.commands_ok > 100, "{reached:?}");
    assert!(reached.commands_failed > 100, "{reached:?}");
    assert!(reached.transfers_ok > 100, "{reached:?}");
    assert!(reached.transfers_failed > 100, "{reached:?}");
    assert!(reached.port_changes > 10, "{reached:?}");
}
