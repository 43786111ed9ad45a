//! Split virtqueues driven by the fuzz input: the guest memory, the rings
//! (the devices crate's own test ring), the activation a device's worker
//! is built from, and the moves a driver can make on them.

use std::sync::Arc;

use devices::virtio::chains::ProcessStats;
use devices::virtio::test_utils::{activation, guest_memory, CountingInterrupt, TestRing};
use devices::virtio::Activation;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::{Arbitrary, FuzzAddr, FuzzLen};

/// Guest RAM of a virtio target.
pub const MEM_SIZE: usize = 1 << 20;
/// Queue `i`'s descriptor table is at `RING_BASE + i * RING_STRIDE`, its
/// rings right after (room for 256 entries).
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x1_0000;
/// Most queues a target sets up (the rings end below [`DATA`]).
pub const MAX_QUEUES: u16 = 4;
/// The data area: headers, payloads, PFN lists, status bytes
/// ([`FuzzAddr::Data`] offsets are from here).
pub const DATA: u64 = 0x8_0000;

/// One move of the driver.
#[derive(Arbitrary, Debug)]
pub enum QueueOp {
    /// A chain laid out as drivers lay them out (consecutive descriptors,
    /// NEXT on all but the last), published.
    Chain {
        queue: u8,
        bufs: Vec<(FuzzAddr, FuzzLen, bool)>,
    },
    /// One descriptor with any flags (NEXT, WRITE, INDIRECT) and any next.
    Desc {
        queue: u8,
        idx: u16,
        addr: FuzzAddr,
        len: FuzzLen,
        flags: u8,
        next: u16,
    },
    /// Publishes any head index.
    Publish { queue: u8, head: u16 },
    /// Sets the available index (far ahead or behind the device).
    AvailIdx { queue: u8, idx: u16 },
    /// Sets used_event (EVENT_IDX).
    UsedEvent { queue: u8, idx: u16 },
    /// Writes bytes anywhere: buffer contents, or over the rings.
    Write { addr: FuzzAddr, bytes: Vec<u8> },
    /// Notifies the queue: the device processes it.
    Process { queue: u8 },
}

/// The guest side of a device's queues.
pub struct Virtqueues {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub rings: Vec<TestRing>,
    pub irq: Arc<CountingInterrupt>,
}

impl Virtqueues {
    /// `num` queues of `size` entries each (`size` made a power of two in
    /// 2..=256, `num` 1..=[`MAX_QUEUES`]).
    pub fn new(num: u16, size: u16) -> Self {
        Self::in_memory(guest_memory(MEM_SIZE), num, size)
    }

    /// The same in `mem`, whose first [`MEM_SIZE`] bytes must be RAM.
    pub fn in_memory(mem: GuestMemoryAtomic<GuestMemoryMmap>, num: u16, size: u16) -> Self {
        let num = num.clamp(1, MAX_QUEUES);
        let size = size.clamp(2, 256).next_power_of_two().min(256);
        let rings = (0..num)
            .map(|i| TestRing::new(RING_BASE + u64::from(i) * RING_STRIDE, size))
            .collect();
        Self {
            mem,
            rings,
            irq: Arc::new(CountingInterrupt::default()),
        }
    }

    /// What the transport hands the device at DRIVER_OK: every queue
    /// enabled, each with its own MSI-X vector.
    pub fn activation(&self, acked_features: u64) -> Activation {
        activation(&self.mem, self.irq.clone(), &self.rings, acked_features)
    }

    fn slot(&self, queue: u8) -> usize {
        usize::from(queue) % self.rings.len()
    }

    /// Applies one move; `Process` calls `process(slot)`, the device's
    /// queue processing, which says what it did when it knows. When
    /// `returns_all` (a device that holds no buffer), every chain the
    /// device reports completed must be in the used ring, with a head
    /// inside the ring.
    pub fn apply(
        &mut self,
        op: QueueOp,
        returns_all: bool,
        process: &mut dyn FnMut(usize) -> Option<ProcessStats>,
    ) {
        let mem = self.mem.memory();
        match op {
            QueueOp::Chain { queue, bufs } => {
                let slot = self.slot(queue);
                let bufs: Vec<_> = bufs
                    .into_iter()
                    .map(|(a, l, w)| (a.resolve(DATA), l.get(), w))
                    .collect();
                if !bufs.is_empty() {
                    self.rings[slot].add(&mem, &bufs);
                }
            }
            QueueOp::Desc {
                queue,
                idx,
                addr,
                len,
                flags,
                next,
            } => {
                let ring = &self.rings[self.slot(queue)];
                let idx = idx % ring.size;
                let (addr, len) = (addr.resolve(DATA), len.get());
                ring.write_desc(&mem, idx, addr, len, u16::from(flags), next);
            }
            QueueOp::Publish { queue, head } => {
                let slot = self.slot(queue);
                self.rings[slot].publish(&mem, head);
            }
            QueueOp::AvailIdx { queue, idx } => {
                let ring = &self.rings[self.slot(queue)];
                mem.write_obj(idx, GuestAddress(ring.avail + 2))
                    .expect("the avail ring is in memory");
            }
            QueueOp::UsedEvent { queue, idx } => {
                self.rings[self.slot(queue)].set_used_event(&mem, idx);
            }
            QueueOp::Write { addr, bytes } => {
                // Partly or wholly outside memory: whatever fits is written.
                let _ = mem.write(&bytes, GuestAddress(addr.resolve(DATA)));
            }
            QueueOp::Process { queue } => {
                let slot = self.slot(queue);
                let ring = &self.rings[slot];
                let before = ring.used_idx(&mem);
                let Some(stats) = process(slot) else {
                    return;
                };
                assert!(
                    stats.completed <= u32::from(ring.size),
                    "one pass completed {} chains on a ring of {}",
                    stats.completed,
                    ring.size
                );
                if returns_all {
                    let after = ring.used_idx(&mem);
                    assert_eq!(
                        after.wrapping_sub(before),
                        stats.completed as u16,
                        "used index vs completed chains"
                    );
                    for i in 0..stats.completed as u16 {
                        let (id, _) = ring.used_elem(&mem, before.wrapping_add(i));
                        assert!(id < u32::from(ring.size), "used id {id} not a ring index");
                    }
                }
            }
        }
    }
}
