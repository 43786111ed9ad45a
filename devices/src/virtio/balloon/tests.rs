//! The balloon driven as the Linux driver drives it: buffers written into
//! split rings in guest memory, then the worker's queue processing called
//! directly; and through the virtio-pci transport for activation and reset.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::worker::Role;
use super::*;
use crate::virtio::test_utils::{Buf, CountingInterrupt, TestRing};
use crate::virtio::{Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const MIB: u64 = 1 << 20;
/// Guest RAM: [0, 16 MiB) and [32 MiB, 48 MiB), a hole between.
const RAM: [(u64, u64); 2] = [(0, 16 * MIB), (32 * MIB, 16 * MIB)];
const BUF: u64 = 0x80_0000;
const QSIZE: u16 = 16;
const ALL: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_BALLOON_F_STATS_VQ
    | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    | VIRTIO_BALLOON_F_REPORTING;

fn memory() -> GuestMemoryAtomic<GuestMemoryMmap> {
    let ranges: Vec<_> = RAM
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
}

/// Records what the device hands the host; can be made to fail or block.
#[derive(Default)]
struct RecordingSink {
    discarded: Mutex<Vec<(u64, u64)>>,
    reclaimed: Mutex<Vec<(u64, u64)>>,
    fail: AtomicBool,
    /// `discard_granule` (0: the default, one page).
    granule: std::sync::atomic::AtomicU64,
    /// When set, each discard waits on the barrier twice (entered, release).
    gate: Mutex<Option<Arc<Barrier>>>,
}

impl RecordingSink {
    fn discarded(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.discarded.lock().unwrap())
    }
}

impl BalloonSink for RecordingSink {
    fn discard(&self, gpa: u64, len: u64) -> std::io::Result<u64> {
        let gate = self.gate.lock().unwrap().clone();
        if let Some(g) = gate {
            g.wait();
            g.wait();
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("refused"));
        }
        self.discarded.lock().unwrap().push((gpa, len));
        Ok(len / BALLOON_PAGE_SIZE)
    }
    fn reclaim(&self, gpa: u64, len: u64) {
        self.reclaimed.lock().unwrap().push((gpa, len));
    }
    fn discard_granule(&self) -> u64 {
        match self.granule.load(Ordering::SeqCst) {
            0 => BALLOON_PAGE_SIZE,
            g => g,
        }
    }
}

struct Fixture {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    rings: Vec<TestRing>,
    worker: BalloonWorker,
    sink: Arc<RecordingSink>,
    handle: BalloonHandle,
    irq: Arc<CountingInterrupt>,
    balloon: Balloon,
}

fn fixture_with(features: u64, size: u64) -> Fixture {
    let mem = memory();
    let sink = Arc::new(RecordingSink::default());
    let mut balloon = Balloon::new(
        BalloonOptions {
            size,
            ram_bytes: 32 * MIB,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: None,
        },
        sink.clone(),
    )
    .unwrap();
    let n = balloon.queue_max_sizes().len() as u16;
    let irq = Arc::new(CountingInterrupt::default());
    let interrupt = VirtioInterrupt::new(irq.clone(), usize::from(n));
    interrupt.set_config_vector(0);
    let mut rings = Vec::new();
    let mut queues = Vec::new();
    // Enable the queues the negotiated features number.
    let used = 2
        + u16::from(features & VIRTIO_BALLOON_F_STATS_VQ != 0)
        + u16::from(features & VIRTIO_BALLOON_F_REPORTING != 0);
    for i in 0..used {
        interrupt.set_queue_vector(i, i + 1);
        let ring = TestRing::new(0x1000 + u64::from(i) * 0x10000, QSIZE);
        queues.push(ring.activated_queue(i, false));
        rings.push(ring);
    }
    let worker = balloon
        .activate(Activation {
            mem: mem.clone(),
            interrupt,
            queues,
            acked_features: features,
        })
        .unwrap();
    // The transport would hand the worker to an event loop; the tests
    // drive a second worker over the same rings instead.
    drop(worker);
    let handle = balloon.handle();
    let worker = rebuild_worker(&balloon, &mem, &irq, features, &rings);
    Fixture {
        mem,
        rings,
        worker,
        sink,
        handle,
        irq,
        balloon,
    }
}

/// A worker over `rings` sharing `balloon`'s state (tests call it directly).
fn rebuild_worker(
    balloon: &Balloon,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    irq: &Arc<CountingInterrupt>,
    features: u64,
    rings: &[TestRing],
) -> BalloonWorker {
    let interrupt = VirtioInterrupt::new(irq.clone(), rings.len());
    let roles = [Role::Inflate, Role::Deflate]
        .into_iter()
        .chain((features & VIRTIO_BALLOON_F_STATS_VQ != 0).then_some(Role::Stats))
        .chain((features & VIRTIO_BALLOON_F_REPORTING != 0).then_some(Role::Reporting));
    let queues = roles
        .zip(rings)
        .enumerate()
        .map(|(i, (role, ring))| {
            interrupt.set_queue_vector(i as u16, i as u16 + 1);
            (role, ring.activated_queue(i as u16, false))
        })
        .collect();
    BalloonWorker::new(
        balloon.shared_for_tests(),
        balloon.sink_for_tests(),
        mem.clone(),
        interrupt,
        queues,
        None,
    )
    .unwrap()
}

fn fixture() -> Fixture {
    fixture_with(ALL, 0)
}

/// A fixture whose sink says guest RAM is on 2 MiB huge pages.
fn huge_page_fixture() -> Fixture {
    let mut f = fixture();
    f.sink.granule.store(2 * MIB, Ordering::SeqCst);
    f.worker = rebuild_worker(&f.balloon, &f.mem, &f.irq, ALL, &f.rings);
    f
}

impl Fixture {
    fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem.memory()
    }

    /// Writes `pfns` at BUF and submits them as one readable descriptor on
    /// queue `q`; processes it and checks that it came back.
    fn send_pfns(&mut self, q: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.m().write_slice(&bytes, GuestAddress(BUF)).unwrap();
        self.submit(q, &[(BUF, bytes.len() as u32, false)]);
    }

    /// Submits a chain on queue slot `q`, processes it, checks it was used.
    fn submit(&mut self, q: usize, bufs: &[Buf]) {
        let mem = self.mem.memory();
        let before = self.rings[q].used_idx(&mem);
        let head = self.rings[q].add(&mem, bufs);
        let stats = self.worker.process_queue(q);
        assert_eq!(stats.completed, 1, "chain not completed");
        assert_eq!(self.rings[q].used_idx(&mem), before.wrapping_add(1));
        assert_eq!(self.rings[q].used_elem(&mem, before), (u32::from(head), 0));
    }

    fn counters(&self) -> BalloonCounters {
        self.handle.info().counters
    }
}

const fn pfn(gpa: u64) -> u32 {
    (gpa >> BALLOON_PAGE_SHIFT) as u32
}

#[test]
fn inflate_discards_exactly_the_valid_coalesced_pfns() {
    let mut f = fixture();
    let irqs = f.irq.count();
    // Unsorted, with a duplicate, a run across the end of region 0 into the
    // hole, PFNs in the hole, past the end of RAM and the largest u32.
    let pfns = [
        pfn(0x10_0000) + 2,
        pfn(0x10_0000),
        pfn(0x10_0000) + 1,
        pfn(0x10_0000) + 1,
        pfn(16 * MIB) - 1,
        pfn(16 * MIB),
        pfn(20 * MIB),
        pfn(32 * MIB),
        pfn(48 * MIB),
        u32::MAX,
        pfn(0x20_0000),
    ];
    f.send_pfns(0, &pfns);
    assert_eq!(
        f.sink.discarded(),
        vec![
            (0x10_0000, 3 * BALLOON_PAGE_SIZE),
            (0x20_0000, BALLOON_PAGE_SIZE),
            (16 * MIB - BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE),
            (32 * MIB, BALLOON_PAGE_SIZE),
        ]
    );
    let c = f.counters();
    assert_eq!(c.inflated_pages, 6);
    assert_eq!(c.discarded_pages, 6);
    assert_eq!(c.bad_pfns, 4, "16 MiB, 20 MiB, 48 MiB, u32::MAX");
    assert!(f.irq.count() > irqs, "used buffer signalled");
}

/// With a sink on huge pages, inflated pages wait for the rest of their
/// 2 MiB block and go back in one discard; a block that does not fill
/// goes back when the inflate pauses, without the pages the guest took
/// back meanwhile.
#[test]
fn inflated_pages_are_held_until_their_huge_page_block_is_whole() {
    const PAGE: u64 = BALLOON_PAGE_SIZE;
    let mut f = huge_page_fixture();
    // Linux's order: the pages of a buffer, last allocated first.
    let half = |at: u64| (0..256).map(|i| pfn(at) + i).rev().collect::<Vec<_>>();
    f.send_pfns(0, &half(4 * MIB + MIB));
    assert!(f.sink.discarded().is_empty(), "half a block is held");
    assert_eq!(f.worker.held_pages(), 256);
    f.send_pfns(0, &half(4 * MIB));
    assert_eq!(f.sink.discarded(), vec![(4 * MIB, 2 * MIB)]);
    assert_eq!(f.counters().whole_blocks_discarded, 1);
    assert_eq!(f.worker.held_pages(), 0);
    // Three pages of a block that does not fill; the guest deflates one.
    let at = pfn(8 * MIB);
    f.send_pfns(0, &[at, at + 1, at + 2]);
    f.send_pfns(1, &[at + 1]);
    assert!(f.sink.discarded().is_empty());
    assert_eq!(f.worker.discard_held(), 2);
    assert_eq!(
        f.sink.discarded(),
        vec![(8 * MIB, PAGE), (8 * MIB + 2 * PAGE, PAGE)]
    );
    let c = f.counters();
    assert_eq!((c.inflated_pages, c.discarded_pages), (515, 514));
}

/// The worker lets go of held pages by itself when the inflate pauses.
#[test]
fn held_pages_are_discarded_after_the_inflate_pauses() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let mut f = huge_page_fixture();
    f.send_pfns(0, &[pfn(6 * MIB)]);
    assert!(f.sink.discarded().is_empty());
    let worker = std::mem::replace(
        &mut f.worker,
        rebuild_worker(&f.balloon, &f.mem, &f.irq, ALL, &f.rings),
    );
    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
    em.add_subscriber(Box::new(worker));
    let start = std::time::Instant::now();
    let mut discarded = Vec::new();
    while discarded.is_empty() && start.elapsed() < Duration::from_secs(5) {
        em.run_with_timeout(50).unwrap();
        discarded = f.sink.discarded();
    }
    assert_eq!(discarded, vec![(6 * MIB, BALLOON_PAGE_SIZE)]);
}

/// An inflate buffer handled after the hold timer expired, but before its
/// event, re-arms it: the stale event neither blocks the event loop on the
/// cleared timer nor discards pages whose block may still fill.
#[test]
fn a_hold_timer_event_made_stale_by_a_re_arm_neither_blocks_nor_discards() {
    let mut f = huge_page_fixture();
    f.send_pfns(0, &[pfn(6 * MIB)]);
    std::thread::sleep(super::held::HOLD_DELAY * 2);
    f.send_pfns(0, &[pfn(6 * MIB) + 1]);
    let start = std::time::Instant::now();
    f.worker.hold_timer_fired();
    assert!(
        start.elapsed() < super::held::HOLD_DELAY / 2,
        "blocked {:?}",
        start.elapsed()
    );
    assert!(f.sink.discarded().is_empty());
    assert_eq!(f.worker.held_pages(), 2);
    std::thread::sleep(super::held::HOLD_DELAY * 2);
    f.worker.hold_timer_fired();
    assert_eq!(f.sink.discarded(), vec![(6 * MIB, 2 * BALLOON_PAGE_SIZE)]);
}

/// Found by the balloon fuzz target: a reported range starting in the last
/// page below 2^64 overflowed rounding its start up to a page (a panic in
/// a debug build; in release the start wrapped to 0 and every page of guest
/// RAM was discarded).
#[test]
fn a_range_in_the_last_page_of_the_address_space_is_one_bad_page() {
    let mem = memory();
    let r = ram_runs(&mem.memory(), u64::MAX - 0xffe, 0xffe);
    assert_eq!(
        r,
        Runs {
            runs: vec![],
            pages: 0,
            bad_pages: 1
        }
    );
}

#[test]
fn adjacent_regions_never_share_a_run() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MIB as usize),
        (GuestAddress(MIB), MIB as usize),
    ])
    .unwrap();
    let mut pfns = vec![pfn(MIB) - 1, pfn(MIB), pfn(MIB) + 1];
    let r = pfn_runs(&mem, &mut pfns);
    assert_eq!(
        r.runs,
        vec![
            (MIB - BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE),
            (MIB, 2 * BALLOON_PAGE_SIZE)
        ]
    );
    let r = ram_runs(&mem, MIB - 2 * BALLOON_PAGE_SIZE, 4 * BALLOON_PAGE_SIZE);
    assert_eq!(
        r.runs,
        vec![
            (MIB - 2 * BALLOON_PAGE_SIZE, 2 * BALLOON_PAGE_SIZE),
            (MIB, 2 * BALLOON_PAGE_SIZE)
        ]
    );
    assert_eq!((r.pages, r.bad_pages), (4, 0));
}

#[test]
fn huge_and_malformed_pfn_lists_are_bounded_and_counted() {
    let mut f = fixture();
    // 16384 PFNs in one descriptor: only MAX_PFNS_PER_CHAIN are looked at.
    let n = 4 * MAX_PFNS_PER_CHAIN;
    let pfns: Vec<u32> = (0..n as u32).map(|i| pfn(0x10_0000) + i % 2048).collect();
    f.send_pfns(0, &pfns);
    let c = f.counters();
    assert_eq!(c.ignored_pfns, (n - MAX_PFNS_PER_CHAIN) as u64);
    assert_eq!(c.inflated_pages, 2048, "4096 taken, 2048 distinct");
    assert_eq!(
        f.sink.discarded(),
        vec![(0x10_0000, 2048 * BALLOON_PAGE_SIZE)]
    );

    // A descriptor claiming 1 GiB of PFNs at the end of RAM, a writable
    // one, one outside memory and an odd length: no panic, all counted.
    let before = f.counters();
    f.m().write_obj(pfn(0x30_0000), GuestAddress(BUF)).unwrap();
    f.submit(
        0,
        &[
            (16 * MIB - 8, 1 << 30, false),
            (BUF, 4, true),
            (20 * MIB, 4096, false),
            (BUF, 6, false),
        ],
    );
    let c = f.counters();
    assert_eq!(c.bad_descriptors - before.bad_descriptors, 4);
    assert_eq!(
        c.ignored_pfns - before.ignored_pfns,
        (1 << 28) - MAX_PFNS_PER_CHAIN as u64
    );
    assert_eq!(f.sink.discarded(), vec![(0x30_0000, BALLOON_PAGE_SIZE)]);

    // An empty descriptor, and a chain as long as the ring repeating one
    // PFN: deduplicated to one page.
    f.submit(0, &[(BUF, 0, false)]);
    let long: Vec<Buf> = (0..QSIZE).map(|_| (BUF, 4, false)).collect();
    let before = f.counters();
    f.submit(0, &long);
    let c = f.counters();
    assert_eq!(c.inflated_pages - before.inflated_pages, 1);
    assert_eq!(c.bad_descriptors, before.bad_descriptors);
    assert_eq!(f.sink.discarded(), vec![(0x30_0000, BALLOON_PAGE_SIZE)]);
}

#[test]
fn queue_work_is_bounded_per_call() {
    let mut f = fixture();
    let mem = f.mem.memory();
    f.m().write_obj(pfn(0x10_0000), GuestAddress(BUF)).unwrap();
    // More chains than the queue size can hold at once would wrap; publish
    // QSIZE chains and check one call takes at most QSIZE.
    for _ in 0..QSIZE {
        f.rings[0].add(&mem, &[(BUF, 4, false)]);
    }
    let s = f.worker.process_queue(0);
    assert_eq!(s.completed, u32::from(QSIZE));
    assert!(s.more, "the budget ran out; the caller must come back");
    assert_eq!(f.worker.process_queue(0).completed, 0);
}

#[test]
fn deflate_reclaims_and_counts_oom_deflates() {
    let mut f = fixture_with(ALL, 8 * BALLOON_PAGE_SIZE);
    let target = 8;
    f.balloon.write_config(4, &(target as u32).to_le_bytes());
    assert_eq!(f.handle.info().actual_bytes, 8 * BALLOON_PAGE_SIZE);
    // Host lowers the target: a requested deflate.
    f.handle.set_size(4 * BALLOON_PAGE_SIZE).unwrap();
    f.send_pfns(
        1,
        &[
            pfn(32 * MIB),
            pfn(32 * MIB) + 1,
            pfn(40 * MIB),
            pfn(16 * MIB),
        ],
    );
    assert_eq!(
        *f.sink.reclaimed.lock().unwrap(),
        vec![
            (32 * MIB, 2 * BALLOON_PAGE_SIZE),
            (40 * MIB, BALLOON_PAGE_SIZE)
        ]
    );
    let c = f.counters();
    assert_eq!(
        (c.deflated_pages, c.oom_deflated_pages, c.bad_pfns),
        (3, 0, 1)
    );
    assert!(f.sink.discarded().is_empty(), "deflate discards nothing");
    // The guest deflates on its own at its target: deflate-on-OOM.
    f.balloon.write_config(4, &4u32.to_le_bytes());
    f.send_pfns(1, &[pfn(0x10_0000)]);
    let c = f.counters();
    assert_eq!((c.deflated_pages, c.oom_deflated_pages), (4, 1));
}

#[test]
fn stats_parsing_takes_whole_entries_only() {
    let entry = |tag: u16, v: u64| -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend(v.to_le_bytes());
        e
    };
    assert_eq!(parse_stats(&[]), stats::ParsedStats::default());
    let short = parse_stats(&[4, 0, 1, 2, 3]);
    assert_eq!((short.known, short.trailing), (0, 5));
    assert_eq!(short.stats, GuestStats::default());
    let mut buf = entry(VIRTIO_BALLOON_S_MEMFREE, 100 * MIB);
    buf.extend(entry(0x7777, 5));
    buf.extend(entry(VIRTIO_BALLOON_S_MEMTOT, 512 * MIB));
    buf.extend(entry(VIRTIO_BALLOON_S_SWAP_IN, 3));
    buf.extend(&[9, 9, 9]);
    let p = parse_stats(&buf);
    assert_eq!((p.known, p.unknown, p.trailing), (3, 1, 3));
    assert_eq!(p.stats.free_memory, Some(100 * MIB));
    assert_eq!(p.stats.total_memory, Some(512 * MIB));
    assert_eq!(p.stats.swap_in, Some(3));
    assert_eq!(p.stats.available_memory, None);
    // A later entry with the same tag wins; entries past the cap are ignored.
    let mut many = Vec::new();
    for i in 0..(MAX_STAT_ENTRIES as u64 + 5) {
        many.extend(entry(VIRTIO_BALLOON_S_MAJFLT, i));
    }
    let p = parse_stats(&many);
    assert_eq!(p.known, MAX_STAT_ENTRIES);
    assert_eq!(p.stats.major_faults, Some(MAX_STAT_ENTRIES as u64 - 1));
}

#[test]
fn stats_buffer_is_held_until_the_host_asks_again() {
    let mut f = fixture();
    let stats_q = 2;
    let mem = f.mem.memory();
    let mut buf = VIRTIO_BALLOON_S_AVAIL.to_le_bytes().to_vec();
    buf.extend((300 * MIB).to_le_bytes());
    buf.extend([1, 2, 3]); // odd tail
    mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
    // Primed before DRIVER_OK by the guest: held, not returned.
    let head = f.rings[stats_q].add(&mem, &[(BUF, buf.len() as u32, false)]);
    let s = f.worker.process_queue(stats_q);
    assert_eq!(s.completed, 0);
    assert_eq!(f.rings[stats_q].used_idx(&mem), 0);
    assert!(f.worker.holds_stats());
    let info = f.handle.info();
    assert_eq!(info.guest_stats.unwrap().available_memory, Some(300 * MIB));
    assert_eq!(info.counters.stats_updates, 1);
    // The host asks for fresh values: the buffer goes back.
    assert!(f.worker.refresh_stats());
    assert_eq!(f.rings[stats_q].used_idx(&mem), 1);
    assert_eq!(f.rings[stats_q].used_elem(&mem, 0).0, u32::from(head));
    assert!(!f.worker.refresh_stats(), "nothing held any more");
    // A guest sending two buffers gets the first one back at once.
    f.rings[stats_q].add(&mem, &[(BUF, 10, false)]);
    f.rings[stats_q].add(&mem, &[(BUF, 10, false)]);
    f.worker.process_queue(stats_q);
    assert_eq!(f.rings[stats_q].used_idx(&mem), 2);
    assert!(f.worker.holds_stats());
    assert_eq!(f.handle.info().counters.stats_updates, 3);
}

#[test]
fn request_stats_waits_a_bounded_time() {
    let f = fixture();
    let t = std::time::Instant::now();
    assert!(
        !f.handle.request_stats(Duration::from_millis(50)),
        "no worker answers"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    // The request reached the worker's eventfd.
    assert_eq!(
        f.balloon.shared_for_tests().stats_request.read().unwrap(),
        1
    );
}

#[test]
fn reporting_discards_clamped_ranges_then_returns_the_buffer() {
    let mut f = fixture();
    let rq = 3;
    f.submit(
        rq,
        &[
            (0x20_0000, 2 << 20, true),
            // Runs past the end of region 0 into the hole.
            (15 * MIB, 4 << 20, true),
            // Entirely in the hole.
            (20 * MIB, 2 << 20, true),
            // Too long to be a report.
            (32 * MIB, (MAX_REPORT_LEN + 4096) as u32, true),
            // Unaligned ends: partial pages are kept.
            (32 * MIB + 100, 3 * 4096, true),
            (0, 0, true),
        ],
    );
    assert_eq!(
        f.sink.discarded(),
        vec![
            (0x20_0000, 2 << 20),
            (15 * MIB, MIB),
            (32 * MIB + 4096, 2 * 4096),
        ]
    );
    let c = f.counters();
    assert_eq!(c.reported_pages, 512 + 256 + 2);
    assert_eq!(c.reported_ranges, 4);
    assert_eq!(c.bad_descriptors, 2, "too long, empty");
    assert_eq!(c.bad_pfns, 768 + 512 + 2);
}

#[test]
fn a_failing_sink_is_counted_and_the_buffer_still_returns() {
    let mut f = fixture();
    f.sink.fail.store(true, Ordering::SeqCst);
    f.send_pfns(0, &[pfn(0x10_0000)]);
    let c = f.counters();
    assert_eq!(
        (c.discard_errors, c.discarded_pages, c.inflated_pages),
        (1, 0, 1)
    );
}

#[test]
fn queues_are_numbered_from_the_negotiated_features() {
    // Reporting without statistics is queue 2.
    let mut f = fixture_with(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING, 0);
    assert_eq!(f.worker.slot_of(Role::Reporting), Some(2));
    assert_eq!(f.worker.slot_of(Role::Stats), None);
    f.submit(2, &[(0x20_0000, 2 << 20, true)]);
    assert_eq!(f.sink.discarded(), vec![(0x20_0000, 2 << 20)]);
    let info = f.handle.info();
    assert!(info.free_page_reporting && !info.stats_vq && !info.deflate_on_oom);
}

#[test]
fn config_space_target_actual_and_size_limits() {
    let mut f = fixture_with(ALL, 2 * MIB);
    let mut c = [0u8; CONFIG_LEN_FOR_TESTS];
    f.balloon.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c[0..4].try_into().unwrap()), 512);
    // Byte-wise writes of actual merge; num_pages is read-only.
    f.balloon.write_config(4, &[0x34]);
    f.balloon.write_config(5, &[0x12]);
    f.balloon.write_config(0, &[9, 9, 9, 9]);
    f.balloon.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c[0..4].try_into().unwrap()), 512);
    assert_eq!(u32::from_le_bytes(c[4..8].try_into().unwrap()), 0x1234);
    let mut far = [0xffu8; 4];
    f.balloon.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    // set_size signals the configuration vector and rounds down.
    let n = f.irq.count();
    assert_eq!(f.handle.set_size(MIB + 5).unwrap(), MIB);
    assert_eq!(f.irq.count(), n + 1);
    assert!(f.irq.vectors.lock().unwrap().contains(&0));
    assert!(matches!(
        f.handle.set_size(64 * MIB),
        Err(BalloonError::TooLarge { .. })
    ));
    // Reset: actual 0, target kept, no more config interrupts.
    f.balloon.reset();
    let info = f.handle.info();
    assert_eq!(
        (info.actual_bytes, info.size_bytes, info.active),
        (0, MIB, false)
    );
    f.handle.set_size(0).unwrap();
    assert_eq!(f.irq.count(), n + 1);
}

const CONFIG_LEN_FOR_TESTS: usize = 16;

mod transport {
    //! Activation and reset through the virtio-pci transport and a real
    //! event loop.
    use super::*;
    use crate::pci::msix::test_router::RecordingRouter;
    use crate::pci::PciDevice;
    use crate::virtio::common_cfg::{self, *};
    use crate::virtio::{
        EventLoop, VirtioPciDevice, VirtioPciOptions, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
        STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_BAR,
    };
    use std::time::Instant;

    /// The notify area's offset in BAR 0 (transport.rs), 4 bytes a queue.
    const NOTIFY: u64 = 0x3000;

    struct Dev {
        dev: VirtioPciDevice,
        handle: BalloonHandle,
        sink: Arc<RecordingSink>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        _el: Arc<EventLoop>,
    }

    fn w(dev: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
        dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
    }

    fn r(dev: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.bar_read(VIRTIO_BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn device() -> Dev {
        let mem = memory();
        let sink = Arc::new(RecordingSink::default());
        let balloon = Balloon::new(
            BalloonOptions {
                size: 0,
                ram_bytes: 32 * MIB,
                deflate_on_oom: false,
                free_page_reporting: false,
                stats_interval: None,
            },
            sink.clone(),
        )
        .unwrap();
        let handle = balloon.handle();
        let el = EventLoop::spawn("test-balloon").unwrap();
        let dev = VirtioPciDevice::new(
            Box::new(balloon),
            VirtioPciOptions {
                mem: mem.clone(),
                msi_router: Arc::new(RecordingRouter::default()),
                workers: el.clone(),
            },
        )
        .unwrap();
        Dev {
            dev,
            handle,
            sink,
            mem,
            _el: el,
        }
    }

    /// The Linux driver's bring-up with inflate and deflate queues.
    fn bring_up(d: &mut Dev, rings: &[TestRing]) {
        let dev = &mut d.dev;
        w(
            dev,
            DEVICE_STATUS,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
            1,
        );
        // Acknowledge VERSION_1 only (no statistics queue).
        w(dev, DRIVER_FEATURE_SELECT, 1, 4);
        w(dev, DRIVER_FEATURE, 1, 4);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(dev, DEVICE_STATUS, u64::from(s), 1);
        for (i, ring) in rings.iter().enumerate() {
            w(dev, QUEUE_SELECT, i as u64, 2);
            w(dev, common_cfg::QUEUE_SIZE, u64::from(ring.size), 2);
            w(dev, QUEUE_DESC, ring.desc, 8);
            w(dev, QUEUE_DRIVER, ring.avail, 8);
            w(dev, QUEUE_DEVICE, ring.used, 8);
            w(dev, QUEUE_ENABLE, 1, 2);
        }
        w(dev, DEVICE_STATUS, u64::from(s | STATUS_DRIVER_OK), 1);
        assert!(d.handle.info().active);
    }

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn inflate_through_the_event_loop() {
        let mut d = device();
        let mut rings = [TestRing::new(0x1000, QSIZE), TestRing::new(0x11000, QSIZE)];
        bring_up(&mut d, &rings);
        let m = d.mem.memory();
        m.write_obj(pfn(0x10_0000), GuestAddress(BUF)).unwrap();
        rings[0].add(&m, &[(BUF, 4, false)]);
        w(&mut d.dev, NOTIFY, 0, 2);
        assert!(wait_for(|| rings[0].used_idx(&m) == 1));
        assert_eq!(d.sink.discarded(), vec![(0x10_0000, BALLOON_PAGE_SIZE)]);
        // The config write of actual reaches the handle.
        d.dev.bar_write(VIRTIO_BAR, 0x2004, &1u32.to_le_bytes());
        assert_eq!(d.handle.info().actual_bytes, BALLOON_PAGE_SIZE);
    }

    #[test]
    fn reset_mid_inflate_waits_for_the_discard_and_forgets_the_buffer() {
        let mut d = device();
        d.handle.set_size(8 * BALLOON_PAGE_SIZE).unwrap();
        let mut rings = [TestRing::new(0x1000, QSIZE), TestRing::new(0x11000, QSIZE)];
        bring_up(&mut d, &rings);
        d.dev.bar_write(VIRTIO_BAR, 0x2004, &4u32.to_le_bytes());
        let m = d.mem.memory();
        // Two buffers queued; the first one's discard is held in the sink.
        m.write_obj(pfn(0x10_0000), GuestAddress(BUF)).unwrap();
        m.write_obj(pfn(0x20_0000), GuestAddress(BUF + 4)).unwrap();
        let gate = Arc::new(Barrier::new(2));
        *d.sink.gate.lock().unwrap() = Some(gate.clone());
        rings[0].add(&m, &[(BUF, 4, false)]);
        rings[0].add(&m, &[(BUF + 4, 4, false)]);
        w(&mut d.dev, NOTIFY, 0, 2);
        gate.wait(); // the worker is inside the first discard
        let released = Arc::new(AtomicBool::new(false));
        let releaser = {
            let (gate, released, sink) = (gate.clone(), released.clone(), d.sink.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                released.store(true, Ordering::SeqCst);
                // Later discards run ungated.
                *sink.gate.lock().unwrap() = None;
                gate.wait();
            })
        };
        // The guest resets the device (vCPU thread) while the discard runs.
        w(&mut d.dev, DEVICE_STATUS, 0, 1);
        assert!(
            released.load(Ordering::SeqCst),
            "reset returned before the in-flight discard finished"
        );
        releaser.join().unwrap();
        assert_eq!(r(&mut d.dev, DEVICE_STATUS, 1), 0);
        // The first discard completed; whatever the worker had not started
        // on before the reset is never discarded after it.
        let done = d.sink.discarded();
        assert_eq!(done[0], (0x10_0000, BALLOON_PAGE_SIZE));
        let info = d.handle.info();
        assert_eq!(info.actual_bytes, 0, "actual is reset");
        assert_eq!(info.size_bytes, 8 * BALLOON_PAGE_SIZE, "target kept");
        assert!(!info.active);
        std::thread::sleep(Duration::from_millis(50));
        let after = d.sink.discarded();
        assert!(after.is_empty(), "discards after the reset: {after:?}");
        // A fresh activation starts from new rings: the old buffers are gone.
        let mut rings = [TestRing::new(0x21000, QSIZE), TestRing::new(0x31000, QSIZE)];
        bring_up(&mut d, &rings);
        m.write_obj(pfn(0x30_0000), GuestAddress(BUF + 8)).unwrap();
        rings[0].add(&m, &[(BUF + 8, 4, false)]);
        w(&mut d.dev, NOTIFY, 0, 2);
        assert!(wait_for(|| rings[0].used_idx(&m) == 1));
        assert_eq!(d.sink.discarded(), vec![(0x30_0000, BALLOON_PAGE_SIZE)]);
    }

    #[test]
    fn activation_without_the_deflate_queue_fails_cleanly() {
        let mut d = device();
        let rings = [TestRing::new(0x1000, QSIZE)];
        let dev = &mut d.dev;
        w(
            dev,
            DEVICE_STATUS,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
            1,
        );
        w(dev, DRIVER_FEATURE_SELECT, 1, 4);
        w(dev, DRIVER_FEATURE, 1, 4);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(dev, DEVICE_STATUS, u64::from(s), 1);
        w(dev, QUEUE_SELECT, 0, 2);
        w(dev, common_cfg::QUEUE_SIZE, u64::from(rings[0].size), 2);
        w(dev, QUEUE_DESC, rings[0].desc, 8);
        w(dev, QUEUE_DRIVER, rings[0].avail, 8);
        w(dev, QUEUE_DEVICE, rings[0].used, 8);
        w(dev, QUEUE_ENABLE, 1, 2);
        w(dev, DEVICE_STATUS, u64::from(s | STATUS_DRIVER_OK), 1);
        let status = r(dev, DEVICE_STATUS, 1) as u8;
        assert_ne!(status & crate::virtio::STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(!d.handle.info().active);
    }
}
