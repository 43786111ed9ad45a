//! xHCI: a driver that writes any registers, commands, transfer TRBs,
//! contexts and memory, rings any doorbell and drains the event ring, on
//! a controller that is halted, running, or running with a USB disk
//! already enumerated (slot configured, bulk endpoints running); the disk
//! can be unplugged and replugged.

#![no_main]

use std::sync::Arc;

use devices::usb::mass_storage::test_utils::{cbw, SCSI_OPCODES};
use devices::usb::mass_storage::{MassStorage, MassStorageConfig};
use devices::xhci::regs::{DB_BASE, MMIO_SIZE, PORT_BASE, PORT_STRIDE};
use devices::xhci::test_utils::*;
use devices::xhci::trb::{trb_type, Trb};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{scratch_disk, Arbitrary, FuzzAddr, FuzzLen, Pick};

/// The driver's slots (and so its rings) are 1..=SLOTS.
const SLOTS: u8 = 4;
/// Ports 1-2 are USB 2, 3-4 USB 3.
const PORTS: u8 = 4;

/// A TRB pointer: a buffer, the input context, a transfer ring, or any
/// address.
#[derive(Arbitrary, Debug)]
enum Param {
    Data(FuzzAddr),
    InputContext,
    Ring { slot: u8, dci: u8 },
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct FuzzTrb {
    kind: Pick<u8>,
    param: Param,
    status: u32,
    /// Flags and the slot/endpoint fields; the type and cycle bits are
    /// set from `kind` and by the ring.
    control: u32,
}

/// Where a memory write goes: the structures the controller reads.
#[derive(Arbitrary, Debug)]
enum Area {
    Dcbaa,
    InputContext,
    OutputContexts,
    Erst,
    EventRing,
    Data,
    Anywhere(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A command TRB, then the command doorbell.
    Command(FuzzTrb),
    /// A transfer TRB on a ring, with or without its doorbell.
    Transfer {
        slot: u8,
        dci: u8,
        trb: FuzzTrb,
        ring: bool,
    },
    /// A Bulk-Only command on the bulk-OUT ring: a CBW TD, doorbell.
    Cbw {
        slot: u8,
        tag: u32,
        len: FuzzLen,
        data_in: bool,
        opcode: Pick<u8>,
        cdb: [u8; 16],
        cdb_len: u8,
    },
    /// A bulk TD of NORMAL TRBs (a data phase or a CSW read), doorbell.
    Bulk {
        slot: u8,
        data_in: bool,
        addr: FuzzAddr,
        len: u16,
        pieces: u8,
    },
    /// A register write, 32 or 64 bits.
    Register {
        reg: Pick<u64>,
        value: u64,
        wide: bool,
    },
    PortWrite {
        port: u8,
        reg: u8,
        value: u32,
    },
    Read {
        offset: u16,
        width: u8,
    },
    /// Any doorbell register, any value.
    Doorbell {
        target: u8,
        value: u32,
    },
    Memory {
        area: Area,
        offset: u16,
        bytes: Vec<u8>,
    },
    /// The interrupt handler: consume events, write ERDP.
    Drain,
    /// Unplug the disk, or plug it back.
    Replug,
    Suspend,
    Resume,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 0: halted; 1: running; else running with the disk enumerated.
    prelude: u8,
    usb3: bool,
    readonly: bool,
    ops: Vec<Op>,
}

/// Command and transfer TRB types, so that most TRBs reach a handler.
const TRB_TYPES: &[u8] = &[
    trb_type::NORMAL as u8,
    trb_type::SETUP_STAGE as u8,
    trb_type::DATA_STAGE as u8,
    trb_type::STATUS_STAGE as u8,
    trb_type::LINK as u8,
    trb_type::EVENT_DATA as u8,
    trb_type::NOOP as u8,
    trb_type::ENABLE_SLOT as u8,
    trb_type::DISABLE_SLOT as u8,
    trb_type::ADDRESS_DEVICE as u8,
    trb_type::CONFIGURE_ENDPOINT as u8,
    trb_type::EVALUATE_CONTEXT as u8,
    trb_type::RESET_ENDPOINT as u8,
    trb_type::STOP_ENDPOINT as u8,
    trb_type::SET_TR_DEQUEUE as u8,
    trb_type::RESET_DEVICE as u8,
    trb_type::NOOP_COMMAND as u8,
];

fn slot(s: u8) -> u8 {
    1 + s % SLOTS
}

fn trb(t: FuzzTrb) -> Trb {
    let parameter = match t.param {
        Param::Data(a) => a.resolve(DATA),
        Param::InputContext => INPUT_CTX,
        Param::Ring { slot: s, dci } => ring_base(slot(s), dci % 32),
        Param::Raw(a) => a,
    };
    Trb {
        parameter,
        status: t.status,
        control: t.control,
    }
    .with_type(u32::from(t.kind.get(TRB_TYPES)) & 0x3f)
}

fn attach(d: &mut Driver, port: u8, readonly: bool) {
    let disk = MassStorage::new(
        Arc::new(scratch_disk(readonly)),
        MassStorageConfig::default(),
    );
    d.xhci
        .attach(port, Box::new(disk))
        .expect("the port is free");
}

fuzz_target!(|input: Input| {
    let mut d = Driver::new(2, 2);
    let port = if input.usb3 { 3 } else { 1 };
    attach(&mut d, port, input.readonly);
    if input.prelude > 0 {
        d.start();
        if input.prelude > 1 {
            d.enumerate(port);
        }
    }
    for op in input.ops {
        match op {
            Op::Command(t) => {
                let mem = d.mem.clone();
                d.cmd.push(&mem, trb(t));
                d.w32(DB_BASE, 0);
            }
            Op::Transfer {
                slot: s,
                dci,
                trb: t,
                ring,
            } => {
                let (s, dci) = (slot(s), dci % 32);
                d.push(s, dci, trb(t));
                if ring {
                    d.doorbell(s, dci);
                }
            }
            Op::Cbw {
                slot: s,
                tag,
                len,
                data_in,
                opcode,
                mut cdb,
                cdb_len,
            } => {
                cdb[0] = opcode.get(SCSI_OPCODES);
                let block = cbw(
                    tag,
                    len.get(),
                    data_in,
                    &cdb[..usize::from(cdb_len % 16) + 1],
                );
                d.mem.write_slice(&block, GuestAddress(DATA)).unwrap();
                let s = slot(s);
                d.queue_bulk(s, DCI_OUT, DATA, block.len(), 64);
                d.doorbell(s, DCI_OUT);
            }
            Op::Bulk {
                slot: s,
                data_in,
                addr,
                len,
                pieces,
            } => {
                let s = slot(s);
                let dci = if data_in { DCI_IN } else { DCI_OUT };
                let len = usize::from(len).max(1);
                let piece = len.div_ceil(usize::from(pieces % 8) + 1);
                d.queue_bulk(s, dci, addr.resolve(DATA), len, piece);
                d.doorbell(s, dci);
            }
            Op::Register { reg, value, wide } => {
                let off = reg.get(REGISTERS) % MMIO_SIZE;
                if wide {
                    d.w64(off & !7, value);
                } else {
                    d.w32(off & !3, value as u32);
                }
            }
            Op::PortWrite { port, reg, value } => {
                let off =
                    PORT_BASE + u64::from(port % PORTS) * PORT_STRIDE + u64::from(reg % 4) * 4;
                d.w32(off, value);
            }
            Op::Read { offset, width } => {
                let mut buf = [0u8; 8];
                let width = 1 << (width % 4);
                d.xhci
                    .mmio_read(u64::from(offset) % (MMIO_SIZE + 8), &mut buf[..width]);
            }
            Op::Doorbell { target, value } => {
                d.w32(DB_BASE + 4 * u64::from(target % 64), value);
            }
            Op::Memory {
                area,
                offset,
                bytes,
            } => {
                let base = match area {
                    Area::Dcbaa => DCBAA,
                    Area::InputContext => INPUT_CTX,
                    Area::OutputContexts => OUTPUT_CTX,
                    Area::Erst => ERST,
                    Area::EventRing => EVENT_RING,
                    Area::Data => DATA,
                    Area::Anywhere(a) => u64::from(a),
                };
                // Partly or wholly outside memory: whatever fits is written.
                let _ = d.mem.write(&bytes, GuestAddress(base + u64::from(offset)));
            }
            Op::Drain => {
                d.drain();
            }
            Op::Replug => {
                if d.xhci.detach(port).is_err() {
                    attach(&mut d, port, input.readonly);
                }
            }
            Op::Suspend => d.xhci.enter_d3hot(),
            Op::Resume => d.xhci.leave_d3hot(),
        }
    }
});
