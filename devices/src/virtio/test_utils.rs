//! Test helpers shared by the virtio tests: guest memory, a split-ring
//! writer acting as the driver, a counting interrupt and scratch images.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::Interrupt;
use crate::virtio::{ActivatedQueue, Activation, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

pub fn guest_memory(size: usize) -> GuestMemoryAtomic<GuestMemoryMmap> {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap())
}

/// One buffer of a chain: (address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// A split virtqueue written the way a driver writes it (§2.7).
pub struct TestRing {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl TestRing {
    /// Places the ring at `base` (descriptor table, avail ring, used ring on
    /// the next 4 KiB boundary).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
        Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device side of this ring, as the transport hands it over at
    /// DRIVER_OK: queue `index`, enabled, with EVENT_IDX as negotiated.
    pub fn activated_queue(&self, index: u16, event_idx: bool) -> ActivatedQueue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        ActivatedQueue {
            index,
            queue: q,
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Writes the descriptors of a chain without publishing it.
    pub fn write_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            let next = (idx + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        head
    }

    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = self.desc + 16 * u64::from(idx);
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes and publishes a chain; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.write_chain(mem, bufs);
        self.publish(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (descriptor id, length) of used element `i`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let e = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    /// Writes used_event (the avail ring's last field, EVENT_IDX only).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        mem.write_obj(v, GuestAddress(self.avail + 4 + 2 * u64::from(self.size)))
            .unwrap();
    }
}

/// What the transport hands a device at DRIVER_OK when the driver enabled
/// every ring of `rings`: queue `i` on MSI-X vector `i + 1`, configuration
/// changes on vector 0, EVENT_IDX as `acked_features` say.
pub fn activation(
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    irq: Arc<dyn Interrupt>,
    rings: &[TestRing],
    acked_features: u64,
) -> Activation {
    let interrupt = VirtioInterrupt::new(irq, rings.len());
    interrupt.set_config_vector(0);
    let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
    let queues = (0u16..)
        .zip(rings)
        .map(|(i, ring)| {
            interrupt.set_queue_vector(i, i + 1);
            ring.activated_queue(i, event_idx)
        })
        .collect();
    Activation {
        mem: mem.clone(),
        interrupt,
        queues,
        acked_features,
    }
}

/// Counts triggers per vector.
#[derive(Default)]
pub struct CountingInterrupt {
    pub vectors: Mutex<Vec<u16>>,
    pub count: AtomicU64,
}

impl CountingInterrupt {
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingInterrupt {
    fn trigger(&self, vector: u16) {
        self.vectors.lock().unwrap().push(vector);
        self.count.fetch_add(1, Ordering::SeqCst);
    }
}

/// A scratch file removed on drop.
pub struct TempImage(pub PathBuf);

impl TempImage {
    /// A file of `len` bytes where byte `i` is `(i / 512) as u8` (each sector
    /// tagged with its number), so misplaced I/O shows.
    pub fn new(len: usize) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "devices-virtio-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, data).unwrap();
        TempImage(p)
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
