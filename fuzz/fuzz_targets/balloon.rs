//! virtio-balloon: a driver that puts any PFN lists on the inflate and
//! deflate queues, any statistics buffers on the stats queue and any
//! ranges on the free page reporting queue (plus every move on the split
//! rings), while the host resizes the balloon and asks for statistics.
//! Guest RAM has a hole, so PFNs land in RAM, in the hole and past the
//! end. What reaches the host must be whole pages inside one RAM region,
//! as `BalloonSink` promises.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use devices::virtio::balloon::*;
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use libfuzzer_sys::fuzz_target;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_fuzz::virtq::{QueueOp, Virtqueues, DATA, MAX_QUEUES, MEM_SIZE};
use vmm_fuzz::{Arbitrary, InlineWorkers};

/// Guest RAM: [0, 1 MiB) and [2 MiB, 3 MiB).
const RAM: [(u64, usize); 2] = [(0, MEM_SIZE), (2 * MEM_SIZE as u64, MEM_SIZE)];
const RAM_BYTES: u64 = 2 * MEM_SIZE as u64;
/// Every feature the device can offer; the driver acks any subset.
const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_BALLOON_F_STATS_VQ
    | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    | VIRTIO_BALLOON_F_REPORTING;

/// Checks what the device hands the host.
struct CheckingSink(GuestMemoryAtomic<GuestMemoryMmap>);

impl CheckingSink {
    fn check(&self, gpa: u64, len: u64) {
        assert!(len > 0, "an empty range");
        assert_eq!(gpa % BALLOON_PAGE_SIZE, 0, "gpa {gpa:#x}");
        assert_eq!(len % BALLOON_PAGE_SIZE, 0, "len {len:#x}");
        let mem = self.0.memory();
        let region = mem
            .find_region(GuestAddress(gpa))
            .unwrap_or_else(|| panic!("{gpa:#x}+{len:#x} is not RAM"));
        let end = gpa.checked_add(len).expect("the range wraps");
        let region_end = region.start_addr().0 + region.len();
        assert!(end <= region_end, "{gpa:#x}+{len:#x} leaves its region");
    }
}

impl BalloonSink for CheckingSink {
    fn discard(&self, gpa: u64, len: u64) -> std::io::Result<u64> {
        self.check(gpa, len);
        Ok(len / BALLOON_PAGE_SIZE)
    }

    fn reclaim(&self, gpa: u64, len: u64) {
        self.check(gpa, len);
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Queue(QueueOp),
    /// A PFN list (le32 each) in the data area.
    Pfns {
        at: u16,
        pfns: Vec<u32>,
    },
    /// Statistics entries (le16 tag, le64 value) in the data area.
    Stats {
        at: u16,
        entries: Vec<(u16, u64)>,
    },
    /// The host sets the balloon's size.
    SetSize(u64),
    /// The host asks for fresh statistics (without waiting).
    RequestStats,
    /// The driver writes `actual` in the configuration space.
    Actual(u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    size: u64,
    queue_size: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let ranges: Vec<_> = RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&ranges).unwrap());
    let mut balloon = Balloon::new(
        BalloonOptions {
            size: input.size % (RAM_BYTES + 1),
            ram_bytes: RAM_BYTES,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: None,
        },
        Arc::new(CheckingSink(mem.clone())),
    )
    .unwrap();
    let handle = balloon.handle();
    let mut vq = Virtqueues::in_memory(mem, MAX_QUEUES, u16::from(input.queue_size));
    let activation = vq.activation(input.features & FEATURES);
    let kicks: Vec<_> = activation
        .queues
        .iter()
        .map(|q| q.event.try_clone().unwrap())
        .collect();
    let workers = InlineWorkers::new();
    match balloon.activate(activation) {
        Ok(worker) => {
            workers.add(worker);
        }
        // Not with four queues and no missing role; but stay a fuzzer.
        Err(_) => return,
    }
    for op in input.ops {
        match op {
            Op::Queue(op) => vq.apply(op, false, &mut |slot| {
                kicks[slot].write(1).unwrap();
                workers.run();
                None
            }),
            Op::Pfns { at, pfns } => {
                let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
                let _ = vq
                    .mem
                    .memory()
                    .write(&bytes, GuestAddress(DATA + u64::from(at)));
            }
            Op::Stats { at, entries } => {
                let bytes: Vec<u8> = entries
                    .iter()
                    .flat_map(|(tag, val)| {
                        [tag.to_le_bytes().as_slice(), &val.to_le_bytes()].concat()
                    })
                    .collect();
                let _ = vq
                    .mem
                    .memory()
                    .write(&bytes, GuestAddress(DATA + u64::from(at)));
            }
            Op::SetSize(bytes) => {
                let _ = handle.set_size(bytes);
            }
            Op::RequestStats => {
                handle.request_stats(Duration::ZERO);
                workers.run();
            }
            Op::Actual(pages) => balloon.write_config(4, &pages.to_le_bytes()),
        }
    }
    let _ = handle.info();
});
