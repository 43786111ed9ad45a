//! USB mass storage, Bulk-Only Transport: a host that sends CBWs with any
//! CDB (aimed at the implemented opcodes), raw bulk-OUT blocks, bulk-IN
//! reads of any length, control requests (standard and class), halt
//! clearing, resets and suspend, in any order, to a disk that is read-write
//! or read-only.

#![no_main]

use std::sync::Arc;

use devices::usb::mass_storage::test_utils::{cbw, SCSI_OPCODES};
use devices::usb::mass_storage::{MassStorage, MassStorageConfig, BULK_IN, BULK_OUT};
use devices::usb::{SetupPacket, UsbDevice, UsbSpeed};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{scratch_disk, Arbitrary, FuzzLen, Pick};

#[derive(Arbitrary, Debug)]
enum Endpoint {
    In,
    Out,
    Raw(u8),
}

impl Endpoint {
    fn address(&self) -> u8 {
        match self {
            Endpoint::In => BULK_IN,
            Endpoint::Out => BULK_OUT,
            Endpoint::Raw(a) => *a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A well-formed CBW (LUN 0, flags only the direction bit).
    Command {
        tag: u32,
        len: FuzzLen,
        data_in: bool,
        opcode: Pick<u8>,
        cdb: [u8; 16],
        cdb_len: u8,
    },
    /// Any bytes on a bulk endpoint: data phases, or broken CBWs.
    BulkOut {
        endpoint: Endpoint,
        data: Vec<u8>,
    },
    /// A bulk-IN transfer with room for `len` bytes.
    BulkIn {
        endpoint: Endpoint,
        len: u16,
    },
    /// A control transfer; the buffer may disagree with wLength.
    Control {
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        length: u16,
        data: Vec<u8>,
    },
    ClearHalt(Endpoint),
    Reset,
    Suspend,
    Resume,
    Detach,
}

#[derive(Arbitrary, Debug)]
struct Input {
    readonly: bool,
    speed: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let speed = [UsbSpeed::Full, UsbSpeed::High, UsbSpeed::Super][usize::from(input.speed % 3)];
    let config = MassStorageConfig {
        max_speed: speed,
        ..Default::default()
    };
    let mut dev = MassStorage::new(Arc::new(scratch_disk(input.readonly)), config);
    for op in input.ops {
        match op {
            Op::Command {
                tag,
                len,
                data_in,
                opcode,
                mut cdb,
                cdb_len,
            } => {
                cdb[0] = opcode.get(SCSI_OPCODES);
                let cdb = &cdb[..usize::from(cdb_len % 16) + 1];
                dev.bulk(BULK_OUT, &mut cbw(tag, len.get(), data_in, cdb));
            }
            Op::BulkOut { endpoint, mut data } => {
                dev.bulk(endpoint.address(), &mut data);
            }
            Op::BulkIn { endpoint, len } => {
                dev.bulk(endpoint.address(), &mut vec![0u8; usize::from(len)]);
            }
            Op::Control {
                request_type,
                request,
                value,
                index,
                length,
                mut data,
            } => {
                let setup = SetupPacket {
                    request_type,
                    request,
                    value,
                    index,
                    length,
                };
                dev.control(&setup, &mut data);
            }
            Op::ClearHalt(endpoint) => dev.clear_halt(endpoint.address()),
            Op::Reset => dev.reset(),
            Op::Suspend => dev.suspend(),
            Op::Resume => dev.resume(),
            Op::Detach => dev.detach(),
        }
    }
});
