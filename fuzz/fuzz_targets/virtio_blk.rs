//! virtio-blk: a driver that writes any descriptors, chains, heads and
//! request headers into the split rings of a one- to four-queue device
//! on a small disk (read-write or read-only), and notifies any queue.

#![no_main]

use std::sync::Arc;

use devices::virtio::block::*;
use devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_fuzz::virtq::{QueueOp, Virtqueues, DATA};
use vmm_fuzz::{scratch_disk, Arbitrary, Pick};

/// Every feature the device can offer; the driver acks any subset.
const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_RO
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES;

const TYPES: [u32; 6] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
];

#[derive(Arbitrary, Debug)]
enum Op {
    Queue(QueueOp),
    /// A request header (struct virtio_blk_req's first 16 bytes) in the
    /// data area.
    Header {
        at: u16,
        kind: Pick<u32>,
        sector: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    readonly: bool,
    features: u64,
    queues: u8,
    queue_size: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mut vq = Virtqueues::new(u16::from(input.queues), u16::from(input.queue_size));
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    id[..4].copy_from_slice(b"fuzz");
    let mut worker = BlockWorker::new(
        Arc::new(scratch_disk(input.readonly)),
        id,
        vq.activation(input.features & FEATURES),
    );
    for op in input.ops {
        match op {
            Op::Queue(op) => vq.apply(op, true, &mut |slot| Some(worker.process_queue(slot))),
            Op::Header { at, kind, sector } => {
                let kind = kind.get(&TYPES);
                let at = DATA + u64::from(at);
                let mem = vq.mem.memory();
                mem.write_obj(kind, GuestAddress(at)).unwrap();
                mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
                mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
            }
        }
    }
});
