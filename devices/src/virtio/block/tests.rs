//! virtio-blk driven as the Linux driver drives it: requests written into a
//! split ring in guest memory, then the worker's queue processing called
//! directly.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::*;
use crate::block::RawImage;
use crate::virtio::test_utils::{
    activation, guest_memory, Buf, CountingInterrupt, TempImage, TestRing,
};
use crate::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};

mod random_driver;

const MEM_SIZE: usize = 16 << 20;
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
const IMAGE_SECTORS: u64 = 128;
const QSIZE: u16 = 16;
const ALL: u64 = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;

struct Fixture {
    mem: vm_memory::GuestMemoryAtomic<GuestMemoryMmap>,
    rings: Vec<TestRing>,
    worker: BlockWorker,
    image: TempImage,
    irq: Arc<CountingInterrupt>,
}

fn fixture_with(readonly: bool, features: u64, queues: u16) -> Fixture {
    let image = TempImage::new((IMAGE_SECTORS * 512) as usize);
    let disk = RawImage::open(&image.0, readonly, "t").unwrap();
    let mem = guest_memory(MEM_SIZE);
    let irq = Arc::new(CountingInterrupt::default());
    let rings: Vec<_> = (0..queues)
        .map(|i| TestRing::new(0x1000 + u64::from(i) * 0x10000, QSIZE))
        .collect();
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    id[..9].copy_from_slice(b"disk-id-7");
    let worker = BlockWorker::new(
        Arc::new(disk),
        id,
        activation(&mem, irq.clone(), &rings, features),
    );
    Fixture {
        mem,
        rings,
        worker,
        image,
        irq,
    }
}

fn fixture() -> Fixture {
    fixture_with(false, ALL, 1)
}

impl Fixture {
    fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem.memory()
    }

    fn header(&self, t: u32, sector: u64) {
        let m = self.m();
        m.write_obj(t, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits a chain on queue 0, processes it; returns (status byte, used len).
    fn submit(&mut self, bufs: &[Buf]) -> (u8, u32) {
        self.submit_on(0, bufs)
    }

    fn submit_on(&mut self, q: usize, bufs: &[Buf]) -> (u8, u32) {
        let mem = self.mem.memory();
        let before = self.rings[q].used_idx(&mem);
        let head = self.rings[q].add(&mem, bufs);
        let stats = self.worker.process_queue(q);
        assert_eq!(stats.completed, 1);
        let used = self.rings[q].used_idx(&mem);
        assert_eq!(used, before.wrapping_add(1), "request not completed");
        let (id, len) = self.rings[q].used_elem(&mem, before);
        assert_eq!(id, u32::from(head));
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn rw(&mut self, t: u32, sector: u64, len: u32) -> (u8, u32) {
        self.header(t, sector);
        let writable = t == VIRTIO_BLK_T_IN || t == VIRTIO_BLK_T_GET_ID;
        self.submit(&[(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)])
    }

    fn ranges(&mut self, t: u32, segs: &[(u64, u32, u32)]) -> (u8, u32) {
        self.header(t, 0);
        let m = self.m();
        for (i, &(sector, n, flags)) in segs.iter().enumerate() {
            let a = DATA + 16 * i as u64;
            m.write_obj(sector, GuestAddress(a)).unwrap();
            m.write_obj(n, GuestAddress(a + 8)).unwrap();
            m.write_obj(flags, GuestAddress(a + 12)).unwrap();
        }
        drop(m);
        let len = 16 * segs.len() as u32;
        self.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.m().read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    fn fill_data(&self, byte: u8, len: usize) {
        self.m()
            .write_slice(&vec![byte; len], GuestAddress(DATA))
            .unwrap();
    }
}

fn sector_tag(s: u64) -> u8 {
    s as u8
}

#[test]
fn read_returns_the_right_sectors_and_signals_the_queue_vector() {
    let mut f = fixture();
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 2, 1024), (VIRTIO_BLK_S_OK, 1025));
    let d = f.data(1024);
    assert!(d[..512].iter().all(|&b| b == sector_tag(2)));
    assert!(d[512..].iter().all(|&b| b == sector_tag(3)));
    assert_eq!(*f.irq.vectors.lock().unwrap(), vec![1]);
}

#[test]
fn write_reaches_the_image_file_and_reads_back() {
    let mut f = fixture();
    f.fill_data(0xab, 1024);
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, 5, 1024), (VIRTIO_BLK_S_OK, 1));
    let file = f.image.bytes();
    assert!(file[5 * 512..7 * 512].iter().all(|&b| b == 0xab));
    assert_eq!(file[7 * 512], sector_tag(7));
    assert_eq!(file[5 * 512 - 1], sector_tag(4));
    f.fill_data(0, 1024);
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 5, 1024), (VIRTIO_BLK_S_OK, 1025));
    assert!(f.data(1024).iter().all(|&b| b == 0xab));
}

#[test]
fn any_layout_header_and_data_in_one_descriptor_and_data_split_over_many() {
    let mut f = fixture();
    // Header immediately followed by data in the same readable buffer.
    let m = f.m();
    m.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HDR)).unwrap();
    m.write_obj(9u64, GuestAddress(HDR + 8)).unwrap();
    m.write_slice(&[0x5c; 512], GuestAddress(HDR + 16)).unwrap();
    drop(m);
    assert_eq!(
        f.submit(&[(HDR, 16 + 512, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert!(f.image.bytes()[9 * 512..10 * 512]
        .iter()
        .all(|&b| b == 0x5c));
    // A read scattered over three buffers, status in its own.
    f.header(VIRTIO_BLK_T_IN, 20);
    let r = f.submit(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 0x1000, 1024, true),
        (DATA + 0x3000, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(r, (VIRTIO_BLK_S_OK, 2049));
    let m = f.m();
    let at = |a: u64| m.read_obj::<u8>(GuestAddress(a)).unwrap();
    assert_eq!(at(DATA), sector_tag(20));
    assert_eq!(at(DATA + 0x1000), sector_tag(21));
    assert_eq!(at(DATA + 0x1000 + 512), sector_tag(22));
    assert_eq!(at(DATA + 0x3000 + 511), sector_tag(23));
}

#[test]
fn flush_succeeds_and_is_unsupported_when_not_negotiated() {
    let mut f = fixture();
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    // The sector field means nothing to a flush; whatever the driver left
    // there (here the largest value) is ignored, not computed with.
    f.header(VIRTIO_BLK_T_FLUSH, u64::MAX);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let mut g = fixture_with(false, 0, 1);
    g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        g.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
}

#[test]
fn get_id_writes_the_serial_truncated_to_the_buffer() {
    let mut f = fixture();
    f.fill_data(0xee, 32);
    assert_eq!(f.rw(VIRTIO_BLK_T_GET_ID, 0, 20), (VIRTIO_BLK_S_OK, 21));
    let d = f.data(21);
    assert_eq!(&d[..9], b"disk-id-7");
    assert!(d[9..20].iter().all(|&b| b == 0));
    assert_eq!(d[20], 0xee, "wrote past the 20-byte id");
    f.fill_data(0xee, 32);
    assert_eq!(f.rw(VIRTIO_BLK_T_GET_ID, 0, 4), (VIRTIO_BLK_S_OK, 5));
    assert_eq!(&f.data(5), b"disk\xee");
    // Nor does GET_ID use the sector.
    assert_eq!(
        f.rw(VIRTIO_BLK_T_GET_ID, u64::MAX, 20),
        (VIRTIO_BLK_S_OK, 21)
    );
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    let mut f = fixture();
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_DISCARD, &[(8, 8, 0), (40, 1, 0)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(64, 3, 0)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(
        f.ranges(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(100, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]
        ),
        (VIRTIO_BLK_S_OK, 1)
    );
    let file = f.image.bytes();
    let sector = |s: usize| &file[s * 512..(s + 1) * 512];
    for s in (8..16).chain([40, 64, 65, 66, 100, 101]) {
        assert!(sector(s).iter().all(|&b| b == 0), "sector {s} not zero");
    }
    for s in [7, 16, 39, 41, 63, 67, 99, 102] {
        assert!(
            sector(s).iter().all(|&b| b == sector_tag(s as u64)),
            "sector {s} clobbered"
        );
    }
}

#[test]
fn bad_discard_and_write_zeroes_requests_fail() {
    let mut f = fixture();
    // Flags other than UNMAP on write-zeroes, any flag on discard: UNSUPP.
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 1, 1)]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    // Past the end, overflowing, too many segments, ragged length: IOERR.
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_DISCARD, &[(IMAGE_SECTORS - 1, 2, 0)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)]).0,
        VIRTIO_BLK_S_IOERR
    );
    let many = vec![(0u64, 1u32, 0u32); MAX_DISCARD_SEG as usize + 1];
    assert_eq!(f.ranges(VIRTIO_BLK_T_DISCARD, &many).0, VIRTIO_BLK_S_IOERR);
    f.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        f.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Not negotiated: UNSUPP.
    let mut g = fixture_with(false, VIRTIO_BLK_F_FLUSH, 1);
    assert_eq!(
        g.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        g.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    let file = f.image.bytes();
    assert_eq!(file[0], 0, "nothing was discarded");
    assert_eq!(file[511], 0);
    assert_eq!(
        file[(IMAGE_SECTORS as usize - 1) * 512],
        sector_tag(IMAGE_SECTORS - 1)
    );
}

#[test]
fn read_only_disk_refuses_every_write() {
    let mut f = fixture_with(true, ALL, 1);
    f.fill_data(0x11, 512);
    assert_eq!(f.rw(VIRTIO_BLK_T_OUT, 0, 512), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_DISCARD, &[(1, 1, 0)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        f.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(2, 1, 0)]).0,
        VIRTIO_BLK_S_IOERR
    );
    let file = f.image.bytes();
    assert_eq!(file[0], sector_tag(0));
    assert_eq!(file[512], sector_tag(1));
    assert_eq!(file[1024], sector_tag(2));
    // Reads and flushes still work.
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 3, 512), (VIRTIO_BLK_S_OK, 513));
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn read_only_device_advertises_ro_and_no_discard() {
    let image = TempImage::new(4096);
    let ro = Block::new(
        RawImage::open(&image.0, true, "ro").unwrap(),
        BlockOptions::default(),
    )
    .unwrap();
    let f = ro.device_features();
    assert_ne!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
    // The image is locked: read-only (shared) until this one is closed.
    drop(ro);
    let rw = Block::new(
        RawImage::open(&image.0, false, "rw").unwrap(),
        BlockOptions {
            id: "x".into(),
            num_queues: 4,
            queue_size: 128,
        },
    )
    .unwrap();
    let f = rw.device_features();
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    for b in [
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
    ] {
        assert_ne!(f & b, 0);
    }
    let mut cfg = [0u8; 8];
    rw.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 8, "capacity in sectors");
    let mut w = [0u8; 2];
    rw.read_config(34, &mut w);
    assert_eq!(u16::from_le_bytes(w), 4, "num_queues");
    let mut s = [0u8; 4];
    rw.read_config(12, &mut s);
    assert_eq!(u32::from_le_bytes(s), 126, "seg_max");
    rw.read_config(20, &mut s);
    assert_eq!(u32::from_le_bytes(s), 512, "blk_size");
    rw.read_config(0xffff_ffff_ffff_fff0, &mut cfg);
    assert_eq!(cfg, [0; 8]);
    assert_eq!(rw.queue_max_sizes(), vec![128; 4]);
    drop(rw);
    assert!(Block::new(
        RawImage::open(&image.0, true, "a").unwrap(),
        BlockOptions {
            num_queues: 0,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Block::new(
        RawImage::open(&image.0, true, "b").unwrap(),
        BlockOptions {
            queue_size: 100,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Block::new(
        RawImage::open(&image.0, true, "c").unwrap(),
        BlockOptions {
            id: "x".repeat(21),
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn malformed_requests_complete_with_an_error_status() {
    let mut f = fixture();
    let out_of_memory = MEM_SIZE as u64 - 256;
    // Data descriptor partly outside guest memory.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.submit(&[
            (HDR, 16, false),
            (out_of_memory, 512, true),
            (STATUS, 1, true)
        ]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Wholly outside.
    assert_eq!(
        f.submit(&[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Header outside memory.
    assert_eq!(
        f.submit(&[(u64::MAX - 8, 16, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Wrong direction: IN with a device-readable data buffer, OUT with a writable one.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Readable after writable.
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.submit(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true)
        ]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Short header.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.submit(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Sector past the end, and an overflowing sector.
    assert_eq!(
        f.rw(VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, 1024),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(
        f.rw(VIRTIO_BLK_T_OUT, u64::MAX, 512),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Length not a multiple of 512.
    assert_eq!(f.rw(VIRTIO_BLK_T_IN, 0, 100), (VIRTIO_BLK_S_IOERR, 1));
    // Unknown type.
    assert_eq!(f.rw(99, 0, 512), (VIRTIO_BLK_S_UNSUPP, 1));
    // No status byte: the last descriptor is readable, or empty, or outside
    // memory. Completed with length 0 and nothing written.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.submit(&[(HDR, 16, false), (STATUS, 1, false)]), (0xff, 0));
    assert_eq!(f.submit(&[(HDR, 16, false), (STATUS, 0, true)]), (0xff, 0));
    assert_eq!(f.submit(&[(HDR, 16, false), (1 << 40, 1, true)]), (0xff, 0));
    // The image was never touched.
    let file = f.image.bytes();
    assert!(file
        .chunks(512)
        .enumerate()
        .all(|(s, c)| c.iter().all(|&b| b == s as u8)));
}

#[test]
fn descriptor_loops_and_bogus_avail_index_do_not_hang() {
    let mut f = fixture();
    let m = f.mem.memory();
    // A chain whose descriptor points back to itself forever.
    f.header(VIRTIO_BLK_T_IN, 0);
    f.rings[0].write_desc(&m, 0, HDR, 16, 1, 0);
    f.rings[0].publish(&m, 0);
    let stats = f.worker.process_queue(0);
    assert_eq!(stats.completed, 1);
    assert_eq!(f.rings[0].used_idx(&m), 1);
    assert_eq!(f.rings[0].used_elem(&m, 0), (0, 0));
    // Head index beyond the queue size: consumed, but it cannot go into
    // the used ring, so it is not counted as completed either.
    f.rings[0].publish(&m, 500);
    let stats = f.worker.process_queue(0);
    assert_eq!(stats.completed, 0);
    assert_eq!(f.rings[0].used_idx(&m), 1);
    // An avail index far ahead of the ring: refused, nothing processed.
    m.write_obj(1000u16, GuestAddress(f.rings[0].avail + 2))
        .unwrap();
    let before = f.rings[0].used_idx(&m);
    let stats = f.worker.process_queue(0);
    assert_eq!(stats.completed, 0);
    assert_eq!(f.rings[0].used_idx(&m), before);
}

#[test]
fn a_full_ring_is_processed_within_one_budget() {
    let mut f = fixture();
    let m = f.mem.memory();
    f.header(VIRTIO_BLK_T_IN, 0);
    for i in 0..QSIZE {
        let st = STATUS + 0x10 * u64::from(i);
        f.rings[0].add(&m, &[(HDR, 16, false), (DATA, 512, true), (st, 1, true)]);
    }
    // Each chain is 3 descriptors in a 16-entry table: later chains reuse
    // descriptors, which is the driver's problem, not ours. Only the count
    // and the bound matter here.
    let stats = f.worker.process_queue(0);
    assert_eq!(stats.completed, u32::from(QSIZE));
    assert!(
        stats.more,
        "budget exhausted: the event loop must come back"
    );
    assert_eq!(f.rings[0].used_idx(&m), QSIZE);
    assert_eq!(f.irq.count(), 1, "one interrupt for the whole batch");
    let stats = f.worker.process_queue(0);
    assert_eq!(stats.completed, 0);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut f = fixture_with(false, ALL | VIRTIO_RING_F_EVENT_IDX, 1);
    let m = f.mem.memory();
    // The driver asks to be interrupted only after used index 2.
    f.rings[0].set_used_event(&m, 2);
    drop(m);
    f.rw(VIRTIO_BLK_T_IN, 0, 512);
    assert_eq!(f.irq.count(), 0);
    f.rw(VIRTIO_BLK_T_IN, 0, 512);
    assert_eq!(f.irq.count(), 0);
    f.rw(VIRTIO_BLK_T_IN, 0, 512);
    assert_eq!(f.irq.count(), 1, "used index passed used_event");
}

#[test]
fn multiple_queues_are_independent() {
    let mut f = fixture_with(false, ALL, 3);
    f.header(VIRTIO_BLK_T_IN, 4);
    let r = f.submit_on(2, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(r, (VIRTIO_BLK_S_OK, 513));
    assert_eq!(*f.irq.vectors.lock().unwrap(), vec![3], "queue 2's vector");
    let m = f.mem.memory();
    assert_eq!(f.rings[0].used_idx(&m), 0);
    assert_eq!(f.rings[1].used_idx(&m), 0);
    assert_eq!(f.worker.process_queue(7), ProcessStats::default());
}
