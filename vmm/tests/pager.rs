//! Host tests of the guest memory pager: real userfaultfd on anonymous guest
//! RAM (vm-memory), several threads, no KVM. Needs root or /dev/userfaultfd.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use devices::block::Volume;
use devices::noio::{register_current_thread, NoioScope};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::memory::{Pager, PagerConfig, PagerError, PAGE_SIZE};

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;

struct Fixture {
    _mem: GuestMemoryMmap,
    pager: Option<Pager>,
    volume: Arc<Volume>,
    swap: PathBuf,
    base: usize,
    pages: usize,
}

impl Fixture {
    fn new(ram: usize, limit: usize, tweak: impl FnOnce(&mut PagerConfig)) -> Self {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let swap = std::env::temp_dir().join(format!(
            "vmm-pager-test-{}-{}.swap",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram)]).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let volume = Volume::new("swap");
        let mut cfg = PagerConfig::new(limit as u64, &swap, volume.clone());
        tweak(&mut cfg);
        let pager = Pager::start(&cfg, &mem).expect("pager start (needs userfaultfd)");
        Self {
            _mem: mem,
            pager: Some(pager),
            volume,
            swap,
            base,
            pages: ram / PAGE_SIZE,
        }
    }

    fn pager(&self) -> &Pager {
        self.pager.as_ref().unwrap()
    }

    fn mem(&self) -> Mem {
        Mem { base: self.base }
    }

    /// Pages of guest RAM the kernel has mapped right now.
    fn physically_resident(&self) -> Vec<bool> {
        let mut vec = vec![0u8; self.pages];
        // SAFETY: `vec` has one byte per page of the mapping, which stays
        // mapped for the fixture's life; mincore does not touch its contents.
        let ret = unsafe {
            libc::mincore(
                self.base as *mut libc::c_void,
                self.pages * PAGE_SIZE,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.into_iter().map(|b| b & 1 != 0).collect()
    }

    fn resident_count(&self) -> usize {
        self.physically_resident()
            .into_iter()
            .filter(|&r| r)
            .count()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(p) = self.pager.take() {
            p.stop();
        }
        let _ = std::fs::remove_file(&self.swap);
    }
}

/// Guest RAM as seen by a test thread (a copyable base address).
#[derive(Clone, Copy)]
struct Mem {
    base: usize,
}

fn word(page: usize, tag: u64, i: usize) -> u64 {
    (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((page as u64) << 24) ^ i as u64)
        .rotate_left((i % 63) as u32)
}

impl Mem {
    fn ptr(&self, page: usize) -> *mut u64 {
        (self.base + page * PAGE_SIZE) as *mut u64
    }

    /// Fills a page with the pattern of `tag`.
    fn fill(&self, page: usize, tag: u64) {
        let p = self.ptr(page);
        for i in 0..WORDS {
            // SAFETY: `page` is inside the fixture's guest RAM mapping, which
            // outlives every test thread; u64 accesses are aligned.
            unsafe { p.add(i).write_volatile(word(page, tag, i)) };
        }
    }

    /// Whether the whole page holds the pattern of `tag` (0: all zeroes).
    fn holds(&self, page: usize, tag: u64) -> bool {
        let p = self.ptr(page);
        (0..WORDS).all(|i| {
            // SAFETY: as in `fill`.
            let v = unsafe { p.add(i).read_volatile() };
            v == if tag == 0 { 0 } else { word(page, tag, i) }
        })
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Polls the counters until `cond` holds (or 10 s pass); the handler bumps
/// counters just after it wakes the faulting thread, and after a block fill
/// only once `MADV_COLLAPSE` returned, which can take a second or more on a
/// loaded host.
fn eventually(
    f: &Fixture,
    cond: impl Fn(&vmm::memory::PagerStats) -> bool,
) -> vmm::memory::PagerStats {
    for _ in 0..1000 {
        let s = f.pager().stats();
        if cond(&s) {
            return s;
        }
        thread::sleep(Duration::from_millis(10));
    }
    f.pager().stats()
}

/// Waits until the writeback triggered by earlier accesses has settled.
fn settle(f: &Fixture) {
    let mut last = f.pager().stats().counters.pages_out;
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(50));
        let now = f.pager().stats().counters.pages_out;
        if now == last {
            return;
        }
        last = now;
    }
}

#[test]
fn random_access_over_four_times_the_limit_keeps_every_byte() {
    const THREADS: usize = 4;
    const OPS: usize = 2500;
    let f = Fixture::new(32 * MIB, 8 * MIB, |_| {});
    let stats = f.pager().stats();
    let bound = (stats.limit_pages + stats.reserve_pages) as usize;
    let mem = f.mem();
    let pages = f.pages;

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let _reg = register_current_thread();
                let mut rng = Rng(0x1234_5678 + t as u64);
                let mut tags = vec![0u64; pages];
                for _ in 0..OPS {
                    let page = (rng.next() as usize % (pages / THREADS)) * THREADS + t;
                    if rng.next() % 10 < 6 {
                        tags[page] += 1;
                        mem.fill(page, tags[page]);
                    } else {
                        assert!(mem.holds(page, tags[page]), "page {page} corrupted");
                    }
                }
                tags
            })
        })
        .collect();

    let mut max_physical = 0;
    let mut max_charged = 0;
    while !workers.iter().all(|w| w.is_finished()) {
        max_physical = max_physical.max(f.resident_count());
        max_charged = max_charged.max(f.pager().resident_pages());
        thread::sleep(Duration::from_millis(2));
    }
    let mut tags = vec![0u64; pages];
    for w in workers {
        for (i, t) in w.join().unwrap().into_iter().enumerate() {
            tags[i] = tags[i].max(t);
        }
    }
    let _reg = register_current_thread();
    for (page, &tag) in tags.iter().enumerate() {
        assert!(mem.holds(page, tag), "page {page} wrong after the run");
    }
    let s = f.pager().stats();
    eprintln!("{}", s.to_json());
    assert!(
        max_physical <= bound,
        "{max_physical} pages mapped > {bound}"
    );
    assert!(
        max_charged <= bound,
        "{max_charged} pages charged > {bound}"
    );
    assert!(s.peak_resident_pages as usize <= bound);
    assert!(s.counters.pages_out > 1000, "little writeback: {s:?}");
    assert!(s.counters.pages_in > 1000, "little swap-in: {s:?}");
    assert!(s.counters.faults_zero > 0);
    assert_eq!(
        s.counters.removed_pages, 0,
        "own evictions taken for discards"
    );
    assert_eq!(s.counters.overshoot_events, 0);
    assert!(s.fatal_error.is_none());
    assert!(s.to_json().contains("\"pages_out\":"));
}

#[test]
fn sequential_paging_is_batched_and_keeps_every_byte() {
    let f = Fixture::new(32 * MIB, 4 * MIB, |_| {});
    let bound = {
        let s = f.pager().stats();
        s.limit_pages + s.reserve_pages
    };
    let _reg = register_current_thread();
    let mem = f.mem();
    // Reads of never-written memory: zero pages mapped sixteen per fault.
    for page in 0..1024 {
        assert!(mem.holds(page, 0), "fresh page {page} not zero");
    }
    let fresh = f.pager().stats().counters;
    assert!(
        fresh.faults_zero * 4 <= 1024 && fresh.fault_around_pages >= 512,
        "zero fault-around did not batch: {fresh:?}"
    );
    for round in 1..=2 {
        for page in 0..f.pages {
            mem.fill(page, round);
        }
        for page in 0..f.pages {
            assert!(mem.holds(page, round), "round {round}: page {page}");
        }
    }
    settle(&f);
    let s = f.pager().stats();
    let c = &s.counters;
    eprintln!("{}", s.to_json());
    assert!(
        c.pages_out >= 8192 && c.pages_in >= 8192,
        "little paging: {c:?}"
    );
    assert!(
        c.evict_batches * 4 <= c.clean_drops,
        "evictions not batched: {} madvise calls for {} pages",
        c.evict_batches,
        c.clean_drops
    );
    assert!(
        c.swap_writes * 4 <= c.pages_out,
        "writeback not batched: {} pwritev calls for {} pages",
        c.swap_writes,
        c.pages_out
    );
    assert!(
        c.swap_reads * 4 <= c.pages_in && c.faults_swap * 4 <= c.pages_in,
        "swap-in not read around: {} reads, {} faults for {} pages",
        c.swap_reads,
        c.faults_swap,
        c.pages_in
    );
    assert!(s.peak_resident_pages <= bound, "{s:?}");
    assert_eq!(c.removed_pages, 0, "own evictions taken for discards");
    assert!(s.fatal_error.is_none());
}

#[test]
fn fault_around_never_maps_past_the_limit() {
    // A limit of 64 pages: every fault-around window is cut by the budget.
    let f = Fixture::new(8 * MIB, 64 * PAGE_SIZE, |c| c.reserve_pages = Some(16));
    let bound = {
        let s = f.pager().stats();
        (s.limit_pages + s.reserve_pages) as usize
    };
    let mem = f.mem();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        thread::spawn(move || {
            let _reg = register_current_thread();
            for round in 1..=3 {
                for page in (0..2048).rev() {
                    mem.fill(page, round);
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut max_physical = 0;
    while !done.load(Ordering::SeqCst) && !writer.is_finished() {
        max_physical = max_physical.max(f.resident_count());
        thread::sleep(Duration::from_millis(1));
    }
    writer.join().unwrap();
    let _reg = register_current_thread();
    for page in 0..2048 {
        assert!(mem.holds(page, 3), "page {page}");
    }
    let s = f.pager().stats();
    assert!(
        max_physical <= bound,
        "{max_physical} pages mapped > {bound}"
    );
    assert!(s.peak_resident_pages as usize <= bound, "{s:?}");
    assert!(s.counters.fault_around_pages > 0, "{s:?}");
    assert_eq!(s.counters.overshoot_events, 0);
}

/// The first page of the 2 MiB host block holding `page`, and the block's
/// length in pages cut to the fixture's RAM.
fn block_of(f: &Fixture, page: usize) -> std::ops::Range<usize> {
    const BLOCK: usize = 512;
    let into = (f.base / PAGE_SIZE + page) % BLOCK;
    let lo = page.saturating_sub(into);
    lo..(lo + BLOCK).min(f.pages)
}

#[test]
fn a_first_write_fills_its_whole_block_while_memory_is_plentiful() {
    let f = Fixture::new(64 * MIB, 64 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    let page = 5000;
    let block = block_of(&f, page);
    mem.fill(page, 7);
    let s = eventually(&f, |s| s.counters.faults_zero > 0).counters;
    assert_eq!((s.block_fills, s.faults_zero), (1, 1), "{s:?}");
    // Filled inline: no device path's window is open.
    assert_eq!(s.blocks_handed_over, 0, "{s:?}");
    let resident = f.physically_resident();
    let mapped = block.clone().filter(|&i| resident[i]).count();
    assert_eq!(
        mapped,
        block.len(),
        "block {block:?}: {mapped} pages mapped"
    );
    assert_eq!(f.resident_count(), block.len(), "pages outside the block");
    // The rest of the block is writable already: no more faults.
    for i in block.clone() {
        if i != page {
            mem.fill(i, 8);
        }
    }
    let s = f.pager().stats().counters;
    assert_eq!((s.faults_zero, s.faults_write_protect), (1, 0), "{s:?}");
    for i in block {
        assert!(mem.holds(i, if i == page { 7 } else { 8 }), "page {i}");
    }
}

/// While a device's resume or reset path runs or just ran, a block fill is
/// handed to a worker: the handler goes on serving the faults behind it
/// (that path's guest side among them) instead of copying 2 MiB first.
#[test]
fn a_block_fill_in_a_device_path_window_runs_on_a_worker() {
    fn open() -> bool {
        true
    }
    let f = Fixture::new(64 * MIB, 64 * MIB, |c| c.pm_window = open);
    let _reg = register_current_thread();
    let mem = f.mem();
    let page = 5000;
    mem.fill(page, 7);
    let s = eventually(&f, |s| s.counters.block_fills > 0).counters;
    assert_eq!((s.block_fills, s.blocks_handed_over), (1, 1), "{s:?}");
    for i in block_of(&f, page) {
        assert!(mem.holds(i, if i == page { 7 } else { 0 }), "page {i}");
    }
}

#[test]
fn no_block_fill_once_memory_is_short() {
    // A limit of 4 MiB: a 2 MiB block would cross the low watermark soon.
    let f = Fixture::new(16 * MIB, 4 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    let blocks: Vec<usize> = (0..4).map(|b| block_of(&f, 1024).start + b * 512).collect();
    for &b in &blocks {
        mem.fill(b + 3, 1);
    }
    let s = eventually(&f, |s| s.counters.faults_zero >= 4);
    assert_eq!(s.counters.block_fills, 1, "{s:?}");
    assert!(s.peak_resident_pages <= s.limit_pages, "{s:?}");
    for &b in &blocks {
        assert!(mem.holds(b + 3, 1));
    }
}

/// Under pressure a stream of first writes still fills whole blocks while
/// one fits under the limit (reclaim makes room behind it), so streaming
/// guest memory stays in huge pages; scattered first writes do not (the
/// test above). The limit holds and every byte survives.
#[test]
fn a_write_stream_fills_blocks_under_pressure_within_the_limit() {
    let f = Fixture::new(256 * MIB, 64 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    let first = 96 * MIB / PAGE_SIZE;
    let second = 224 * MIB / PAGE_SIZE;
    for page in 0..first {
        mem.fill(page, 1);
    }
    let s = f.pager().stats();
    let low = s.limit_pages - s.limit_pages / 16;
    assert!(
        s.resident_pages + 512 > low,
        "not under pressure after writing 1.5x the limit: {s:?}"
    );
    let before = s.counters.block_fills;
    for page in first..second {
        mem.fill(page, 2);
    }
    let s = f.pager().stats();
    let fills = s.counters.block_fills - before;
    let blocks = (second - first) / 512;
    eprintln!("{fills} block fills under pressure for {blocks} blocks streamed");
    assert!(
        fills * 2 >= blocks as u64,
        "{fills} of {blocks} blocks filled whole: {s:?}"
    );
    assert!(
        s.peak_resident_pages <= s.limit_pages + s.reserve_pages,
        "{s:?}"
    );
    for page in 0..second {
        let tag = if page < first { 1 } else { 2 };
        assert!(mem.holds(page, tag), "page {page}");
    }
    assert!(s.fatal_error.is_none());
}

/// Under pressure a first write into a block no page of which was ever
/// written fills the whole block, waiting for reclaim to make room when one
/// does not fit (as the kernel gives a huge page to a first touch), even
/// when the writes are scattered: the block can become one huge page instead
/// of staying in 4 KiB pieces for good. The limit holds, every byte survives.
#[test]
fn a_first_write_into_a_never_written_block_fills_it_whole_under_pressure() {
    let f = Fixture::new(256 * MIB, 64 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    // 1.5x the limit written: under pressure from here on.
    let first = 96 * MIB / PAGE_SIZE;
    for page in 0..first {
        mem.fill(page, 1);
    }
    let before = f.pager().stats().counters;
    // One page in every other block of the rest, backwards: no stream.
    let start = block_of(&f, first).end;
    let blocks = (f.pages - start) / 512;
    let targets: Vec<usize> = (0..blocks)
        .step_by(2)
        .rev()
        .map(|b| start + b * 512 + 7)
        .collect();
    for &page in &targets {
        mem.fill(page, 3);
    }
    let s = f.pager().stats();
    let fills = s.counters.block_fills - before.block_fills;
    let partial = s.counters.block_fills_partial - before.block_fills_partial;
    eprintln!(
        "{fills} block fills for {} scattered first writes, {} waited for room",
        targets.len(),
        s.counters.block_waits - before.block_waits
    );
    // A wait for room is bounded (a slow host's reclaim may miss it, and
    // reclaim's hand may hold a page lock the fill meets): most, not all.
    let whole = fills - partial;
    assert!(
        whole * 4 >= targets.len() as u64 * 3,
        "{whole} whole: {s:?}"
    );
    assert!(
        s.peak_resident_pages <= s.limit_pages + s.reserve_pages,
        "{s:?}"
    );
    for page in 0..first {
        assert!(mem.holds(page, 1), "page {page}");
    }
    for &page in &targets {
        assert!(mem.holds(page, 3), "page {page}");
        assert!(mem.holds(page + 1, 0), "page {}", page + 1);
    }
    assert!(s.fatal_error.is_none());
}

#[test]
fn block_filled_pages_are_evicted_page_by_page_and_zero_ones_without_writes() {
    // Huge pages off: the blocks stay in 4 KiB pages, evicted one by one.
    let f = Fixture::new(64 * MIB, 16 * MIB, |c| c.huge_pages = false);
    let _reg = register_current_thread();
    let mem = f.mem();
    // Sparse first writes: each fills its block while memory is plentiful.
    let first = block_of(&f, 0).end % 512;
    let marked = |i: usize| i % 7 == 3;
    for i in (first..first + 6 * 512).filter(|&i| marked(i)) {
        mem.fill(i, 5);
    }
    let filled = eventually(&f, |s| s.counters.block_fills >= 5).counters;
    assert!(filled.block_fills >= 5, "{filled:?}");
    assert_eq!(filled.blocks_collapsed, 0, "{filled:?}");
    // Stream through the rest: the blocks are evicted, page by page.
    for round in 1..=2 {
        for i in first + 6 * 512..f.pages {
            mem.fill(i, round);
        }
    }
    settle(&f);
    for i in first..first + 6 * 512 {
        assert!(mem.holds(i, if marked(i) { 5 } else { 0 }), "page {i}");
    }
    for i in first + 6 * 512..f.pages {
        assert!(mem.holds(i, 2), "page {i}");
    }
    let s = f.pager().stats();
    let c = &s.counters;
    eprintln!("{}", s.to_json());
    // The never-written pages of the blocks went without a write.
    assert!(c.zero_pages_dropped >= 2048, "{c:?}");
    assert!(
        s.peak_resident_pages <= s.limit_pages + s.reserve_pages,
        "{s:?}"
    );
    assert!(s.fatal_error.is_none());
}

#[test]
fn huge_page_blocks_are_dropped_whole_under_pressure() {
    let f = Fixture::new(64 * MIB, 16 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    // First writes while memory is plentiful: block fills, each collapsed
    // into a huge page where the kernel can.
    let first = block_of(&f, 0).end % 512;
    for b in 0..4 {
        mem.fill(first + b * 512 + 1, 9);
    }
    let collapsed = eventually(&f, |s| s.counters.block_fills >= 4).counters;
    if collapsed.blocks_collapsed == 0 {
        eprintln!("no huge pages on this host (MADV_COLLAPSE refused): nothing to test");
        return;
    }
    // The advice toggled around each collapse leaves guest RAM one mapping
    // (adjacent areas with equal flags merge again), not three per block,
    // once the last collapse is over (block_fills counts a fill before its
    // collapse, which can take a while on a loaded host).
    let end = f.base + f.pages * PAGE_SIZE;
    let areas = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (range, _) = l.split_once(' ')?;
                let (a, b) = range.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .filter(|&(a, b)| a < end && b > f.base)
            .count()
    };
    let since = Instant::now();
    while areas() != 1 && since.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(10));
    }
    let n = areas();
    assert_eq!(n, 1, "guest RAM split into {n} mappings");
    // The evict aid takes one page of block 0 out: that block's pages go
    // their own ways from then on (and the huge page is split).
    let gpa = (first * PAGE_SIZE) as u64;
    assert_eq!(
        f.pager()
            .probe()
            .evict(vm_memory::GuestAddress(gpa), PAGE_SIZE as u64)
            .unwrap(),
        1
    );
    // Pressure: stream through the rest twice; the other blocks go out whole.
    for round in 1..=2 {
        for i in first + 4 * 512..f.pages {
            mem.fill(i, round);
        }
    }
    settle(&f);
    let s = f.pager().stats();
    eprintln!("{}", s.to_json());
    let c = &s.counters;
    assert!(c.huge_blocks_dropped >= 1, "no block dropped whole: {c:?}");
    // Written back whole too: one write-protect over the huge page, not
    // runs of it that would split its mapping.
    assert!(
        c.huge_blocks_staged >= 1,
        "no block written back whole: {c:?}"
    );
    assert!(
        c.huge_blocks_dropped < c.blocks_collapsed,
        "block 0 went out whole although a page of it was evicted alone: {c:?}"
    );
    for b in 0..4 {
        for i in first + b * 512..first + (b + 1) * 512 {
            let tag = if i == first + b * 512 + 1 { 9 } else { 0 };
            assert!(mem.holds(i, tag), "block {b} page {i}");
        }
    }
    for i in first + 4 * 512..f.pages {
        assert!(mem.holds(i, 2), "page {i}");
    }
    assert!(s.fatal_error.is_none());
}

/// A huge page's block that reclaim dropped whole comes back whole on a
/// fault on any of its pages (one read, one copy, a huge page again where
/// the kernel has one): the rest of the block reads without a fault. After
/// a read fault its pages count clean (their copies in swap still hold);
/// after a write fault the write lands; out and back again, every byte holds.
#[test]
fn a_block_that_went_out_whole_comes_back_whole() {
    // A limit whose reclaim keeps room for a block (limit/32 >= 512 pages).
    let f = Fixture::new(256 * MIB, 64 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    // Four whole blocks written while memory is plentiful: block fills,
    // each page with its own pattern.
    let first = block_of(&f, 0).end % 512;
    let blocks = first..first + 4 * 512;
    for i in blocks.clone() {
        mem.fill(i, 7);
    }
    let s = eventually(&f, |s| s.counters.block_fills >= 4).counters;
    if s.blocks_collapsed < 4 {
        eprintln!("no huge pages on this host (MADV_COLLAPSE refused): nothing to test");
        return;
    }
    // Pressure: the blocks go out whole.
    let stream = |round| {
        for i in blocks.end..f.pages {
            mem.fill(i, round);
        }
        settle(&f);
    };
    stream(1);
    stream(2);
    let out = f.pager().stats().counters;
    assert!(out.huge_blocks_dropped >= 4, "{out:?}");
    // A read of one page brings block 1 back whole.
    let b1 = first + 512;
    assert!(mem.holds(b1 + 100, 7));
    // The copy wakes the reader before the handler counts (and collapses).
    let back = eventually(&f, |s| s.counters.blocks_swapped_in > out.blocks_swapped_in).counters;
    assert_eq!(
        back.blocks_swapped_in,
        out.blocks_swapped_in + 1,
        "{back:?}"
    );
    // Brought back by the swap-in worker, not inline in the handler.
    assert!(
        back.blocks_handed_over + back.block_waits > out.blocks_handed_over + out.block_waits,
        "{back:?}"
    );
    for i in b1..b1 + 512 {
        assert!(mem.holds(i, 7), "page {i}");
    }
    let read = f.pager().stats().counters;
    // The rest of it is there: no fault per window of the rest (31 of
    // them page by page). On a loaded host reclaim's hand, racing through
    // memory that is mostly out, may take the block once more before it is
    // read: then it comes back whole again, one fault.
    let faults = (read.faults_swap + read.faults_zero) - (back.faults_swap + back.faults_zero);
    assert!(
        faults <= 2,
        "the rest of the block faulted {faults} times: {read:?}"
    );
    // A write to one page of block 2 brings it back whole too.
    let b2 = first + 2 * 512;
    mem.fill(b2 + 5, 9);
    let wrote = eventually(&f, |s| {
        s.counters.blocks_swapped_in > read.blocks_swapped_in
    })
    .counters;
    assert_eq!(
        wrote.blocks_swapped_in,
        read.blocks_swapped_in + 1,
        "{wrote:?}"
    );
    // Out again, then everything back page by page: every byte held.
    stream(3);
    let again = f.pager().stats().counters;
    for i in blocks.clone() {
        let tag = if i == b2 + 5 { 9 } else { 7 };
        assert!(mem.holds(i, tag), "page {i}");
    }
    for i in blocks.end..f.pages {
        assert!(mem.holds(i, 3), "page {i}");
    }
    eprintln!("{again:?}");
    assert!(f.pager().stats().fatal_error.is_none());
}

#[test]
fn clean_pages_are_dropped_without_writes() {
    let f = Fixture::new(16 * MIB, 4 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    for page in 0..f.pages {
        mem.fill(page, 1);
    }
    for page in 0..f.pages {
        assert!(mem.holds(page, 1), "page {page}");
    }
    settle(&f);
    let stats = f.pager().stats();
    // Pages that stayed resident and dirty since the first pass are the
    // only ones a read-only pass may write.
    let dirty = stats.resident_pages - stats.clean_pages;
    let before = stats.counters;
    for page in 0..f.pages {
        assert!(mem.holds(page, 1), "page {page}");
    }
    let after = f.pager().stats().counters;
    assert!(
        after.pages_out - before.pages_out <= dirty,
        "read-only pass wrote {} pages, only {dirty} were dirty",
        after.pages_out - before.pages_out
    );
    assert!(after.pages_in - before.pages_in >= 2048, "{after:?}");
    assert!(after.clean_drops - before.clean_drops >= 2048, "{after:?}");
}

/// A page in constant use, found non-resident, was evicted while hot: the
/// clock sees faults only, so plain second chance evicts every resident
/// page within two hand revolutions whether or not the guest uses it. A
/// page that comes back soon after each eviction must be spared longer
/// (`memory::workingset`): here a hot set read between every 256 pages of
/// a stream seven times the limit is found missing less than once per three
/// revolutions (plain second chance: at least once per two; measured 0.77
/// per revolution without the working-set levels, 0.2 with them).
#[test]
fn pages_that_keep_coming_back_are_spared_by_a_stream() {
    const HOT: usize = 32;
    const CHUNK: usize = 256;
    let f = Fixture::new(64 * MIB, 8 * MIB, |c| c.huge_pages = false);
    let _reg = register_current_thread();
    let mem = f.mem();
    // Far apart, so that no fault-around or read-around maps one with another.
    let hot: Vec<usize> = (0..HOT).map(|i| i * 64).collect();
    let stream = hot[HOT - 1] + 64..f.pages;
    for &page in &hot {
        mem.fill(page, 1);
    }
    let start = f.pager().stats().counters.hand_revolutions;
    let mut missing = 0;
    for round in 1..=4u64 {
        for chunk in stream.clone().step_by(CHUNK) {
            for page in chunk..(chunk + CHUNK).min(stream.end) {
                mem.fill(page, round);
            }
            let resident = f.physically_resident();
            missing += hot.iter().filter(|&&p| !resident[p]).count();
            for &page in &hot {
                assert!(mem.holds(page, 1), "hot page {page} lost in round {round}");
            }
        }
    }
    for page in stream.clone() {
        assert!(mem.holds(page, 4), "stream page {page}");
    }
    let s = f.pager().stats();
    eprintln!("{}", s.to_json());
    // The hand's own revolutions: while writeback lags (a loaded host) it
    // goes around more often per page dropped, and each pass spends a
    // chance.
    let revolutions = (s.counters.hand_revolutions - start) as usize;
    eprintln!("hot pages missing {missing} times in {revolutions} revolutions");
    assert!(
        revolutions >= 20,
        "the stream moved the hand only {revolutions} times"
    );
    assert!(
        missing * 3 < revolutions * HOT,
        "hot pages found missing {missing} times in {revolutions} revolutions \
         ({HOT} pages): not spared ({:?})",
        s.counters
    );
    assert!(s.counters.refaults_near > 0, "{:?}", s.counters);
}

/// Pages the guest faults while a device's resume or reset path runs (or
/// just ran) outlast a stream that takes the hand around 20 times without
/// touching them again, while pages faulted outside such a window go within
/// a few revolutions: userfaultfd never shows the pager that a mapped page
/// is used, so without the mark a resume path's pages are evicted between
/// two resumes however often they run.
#[test]
fn pages_a_resume_path_faulted_outlast_a_stream() {
    static WINDOW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn window() -> bool {
        WINDOW.load(Ordering::SeqCst)
    }
    const EACH: usize = 32;
    let f = Fixture::new(64 * MIB, 8 * MIB, |c| {
        c.huge_pages = false;
        c.pm_window = window;
    });
    let _reg = register_current_thread();
    let mem = f.mem();
    // Far apart, so that no fault-around maps one with another.
    let marked: Vec<usize> = (0..EACH).map(|i| i * 64).collect();
    let plain: Vec<usize> = (0..EACH).map(|i| EACH * 64 + i * 64).collect();
    // Memory short first, so that the faults below map their own page
    // only (no block fill maps a neighbour unfaulted).
    // (Not zeroes: a zero page would be dropped as never written, and a
    // run of first writes may fill a whole block.)
    for page in 0..f.pages {
        mem.fill(page, 7);
    }
    settle(&f);
    // And none of them still mapped, so that each one faults (a page the
    // hand is writing back right now is left alone by the evict aid).
    let ours = || marked.iter().chain(&plain);
    for _ in 0..100 {
        for &page in ours() {
            let gpa = GuestAddress((page * PAGE_SIZE) as u64);
            f.pager().probe().evict(gpa, PAGE_SIZE as u64).unwrap();
        }
        let resident = f.physically_resident();
        if ours().all(|&p| !resident[p]) {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    WINDOW.store(true, Ordering::SeqCst);
    for &page in &marked {
        mem.fill(page, 1);
    }
    WINDOW.store(false, Ordering::SeqCst);
    for &page in &plain {
        mem.fill(page, 2);
    }
    let stream = 2 * EACH * 64..f.pages;
    let start = f.pager().stats().counters.hand_revolutions;
    // 20 revolutions, checked every 256 pages: the hand goes around more
    // often per page written on a loaded host (writeback lagging), and
    // past 32 the marked pages would rightly go too.
    let mut written = 0usize;
    'stream: for round in 3u64.. {
        for chunk in stream.clone().step_by(256) {
            if f.pager().stats().counters.hand_revolutions - start >= 20 {
                break 'stream;
            }
            for page in chunk..(chunk + 256).min(stream.end) {
                mem.fill(page, round);
            }
            written += 256;
            assert!(written < 200 * f.pages, "the stream does not move the hand");
        }
    }
    let resident = f.physically_resident();
    let kept = |pages: &[usize]| pages.iter().filter(|&&p| resident[p]).count();
    let s = f.pager().stats();
    eprintln!("{}", s.to_json());
    // Only the marked pages fault while the window is open; now and then
    // one of them is mapped by another path than its own fault (seen on a
    // loaded host: 31 marks of 32) and goes like a plain page.
    let marks = s.counters.pm_marks as usize;
    assert!(marks + 2 >= EACH, "{marks} marks ({:?})", s.counters);
    assert!(
        kept(&marked) >= marks,
        "pages faulted in a resume window were evicted: {} of {marks} kept ({:?})",
        kept(&marked),
        s.counters
    );
    assert!(
        kept(&plain) < EACH / 4,
        "plain pages kept: {}",
        kept(&plain)
    );
    for &page in &marked {
        assert!(mem.holds(page, 1));
    }
    for &page in &plain {
        assert!(mem.holds(page, 2));
    }
}

#[test]
fn write_after_swap_in_marks_the_page_dirty() {
    let f = Fixture::new(16 * MIB, MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    let push_out = |tag| {
        for page in 1..1024 {
            if tag == 0 {
                mem.fill(page, 1);
            } else {
                assert!(mem.holds(page, 1));
            }
        }
    };
    mem.fill(0, 1);
    push_out(0);
    // Let reclaim reach its low watermark, so that the one swap-in below
    // does not start it again and page 0 stays put between read and write.
    settle(&f);
    assert!(!f.physically_resident()[0], "page 0 still mapped");
    assert!(mem.holds(0, 1));
    // Counters are bumped right after the wake: give the handler a moment.
    let s0 = eventually(&f, |s| s.counters.pages_in >= 1);
    assert!(s0.counters.pages_in >= 1, "page 0 was not swapped in");
    let wp_before = s0.counters.faults_write_protect;
    mem.fill(0, 2);
    let s1 = eventually(&f, |s| s.counters.faults_write_protect > wp_before);
    assert_eq!(
        s1.counters.faults_write_protect,
        wp_before + 1,
        "write to a swapped-in page did not fault"
    );
    // Page 0 is referenced and dirty: it needs a hand pass to lose its
    // reference, a writeback and another pass. Fault-around maps 16 pages
    // per fault, so one sweep may make too few faults for all of that.
    for _ in 0..10 {
        push_out(1);
        if !f.physically_resident()[0] {
            break;
        }
    }
    assert!(!f.physically_resident()[0], "page 0 still mapped");
    assert!(
        mem.holds(0, 2),
        "the second write was lost: page dropped as clean"
    );
}

#[test]
fn noio_faults_complete_while_the_swap_volume_is_quiesced() {
    const RESERVE: usize = 16;
    let f = Fixture::new(32 * MIB, 2 * MIB, |c| c.reserve_pages = Some(RESERVE));
    let mem = f.mem();
    let limit = f.pager().stats().limit_pages as usize;
    {
        let _reg = register_current_thread();
        for page in 0..2048 {
            mem.fill(page, 1);
        }
    }
    settle(&f);
    f.volume.quiesce();

    // Fill resident memory with dirty pages: an ordinary thread writes fresh
    // pages until it blocks (all frames dirty, writeback cannot run).
    let progress = Arc::new(AtomicUsize::new(0));
    let filler = {
        let progress = progress.clone();
        thread::spawn(move || {
            let _reg = register_current_thread();
            for page in 4096..6144 {
                mem.fill(page, 2);
                progress.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut last = usize::MAX;
    let start = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = progress.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "filler never stalled"
        );
    }
    assert!(
        !filler.is_finished(),
        "ordinary writes did not wait for the quiesced volume"
    );
    let stalled = f.pager().stats();
    assert!(stalled.resident_pages as usize >= limit, "{stalled:?}");
    assert_eq!(
        stalled.clean_pages, 0,
        "clean pages left while a fault waits"
    );

    let resident = f.physically_resident();
    let swapped: Vec<usize> = (0..2048).filter(|&p| !resident[p]).take(2).collect();
    assert_eq!(swapped.len(), 2);

    // NOIO: a swapped-out page and fresh pages, beyond the whole reserve.
    let (tx, rx) = mpsc::channel();
    let noio_page = swapped[0];
    thread::spawn(move || {
        let _reg = register_current_thread();
        let _noio = NoioScope::enter();
        let ok = mem.holds(noio_page, 1);
        for page in 7000..7000 + 2 * RESERVE {
            mem.fill(page, 3);
        }
        let _ = tx.send(ok && (7000..7000 + 2 * RESERVE).all(|p| mem.holds(p, 3)));
    });
    let noio_ok = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("NOIO faults blocked on a quiesced volume");
    assert!(noio_ok, "NOIO thread read wrong data");
    let s = eventually(&f, |s| s.counters.noio_faults > 2 * RESERVE as u64);
    let c = &s.counters;
    assert!(c.noio_faults > 2 * RESERVE as u64, "{s:?}");
    assert!(c.noio_reads_past_quiesce >= 1, "{s:?}");
    assert!(c.noio_from_reserve >= 1, "{s:?}");
    assert!(
        c.noio_from_overshoot >= 1 && c.overshoot_events >= 1,
        "{s:?}"
    );
    assert_eq!(s.reserve_low_water_pages, 0);

    // The same access outside NOIO waits until the volume is resumed.
    let plain_page = swapped[1];
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let _reg = register_current_thread();
        let _ = tx.send(mem.holds(plain_page, 1));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "ordinary fault completed while the swap volume was quiesced"
    );
    f.volume.resume();
    let ok = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("ordinary fault did not complete after resume");
    assert!(ok, "ordinary swap-in read wrong data");
    reader.join().unwrap();
    filler.join().unwrap();
    let s = f.pager().stats();
    assert!(s.counters.wait_ns_max >= 300_000_000, "{s:?}");

    let _reg = register_current_thread();
    for page in 0..2048 {
        assert!(mem.holds(page, 1), "page {page}");
    }
    for page in 4096..6144 {
        assert!(mem.holds(page, 2), "page {page}");
    }
    assert!(f.pager().fatal_error().is_none());
}

/// A registered (ordinary, not NOIO) thread that checks `page` holds tag 1:
/// its thread id, and where its answer arrives.
fn spawn_reader(mem: Mem, page: usize) -> (i32, mpsc::Receiver<bool>) {
    let (tx, rx) = mpsc::channel();
    let (tid_tx, tid_rx) = mpsc::channel();
    thread::spawn(move || {
        let _reg = register_current_thread();
        let _ = tid_tx.send(devices::noio::gettid());
        let _ = tx.send(mem.holds(page, 1));
    });
    (tid_rx.recv().unwrap(), rx)
}

/// 8 MiB of guest RAM written (tag 1) through a 2 MiB limit and settled:
/// most of it is on swap, written back. Returns the fixture, its memory and
/// which of the 2048 written pages are mapped now.
fn mostly_swapped() -> (Fixture, Mem, Vec<bool>) {
    let f = Fixture::new(32 * MIB, 2 * MIB, |_| {});
    let mem = f.mem();
    {
        let _reg = register_current_thread();
        for page in 0..2048 {
            mem.fill(page, 1);
        }
    }
    settle(&f);
    let resident = f.physically_resident();
    (f, mem, resident)
}

/// A vCPU running guest code that faults while the swap volume is quiesced
/// is served past the quiesce (the guest could never resume its device
/// while stuck); device emulation outside NOIO waits, and its blocked fault
/// is on record (thread, guest page, what it waits for) with the volume's
/// waiter. Also the evict test aid: a resident page goes to swap and reads
/// back.
#[test]
fn guest_code_faults_pass_a_quiesced_volume_and_emulation_waits_on_record() {
    let (f, mem, resident) = mostly_swapped();
    let probe = f.pager().probe();
    let hot = (0..2048)
        .rev()
        .find(|&p| resident[p])
        .expect("a resident page");
    let evicted = probe
        .evict(GuestAddress((hot * PAGE_SIZE) as u64), PAGE_SIZE as u64)
        .unwrap();
    assert_eq!(evicted, 1);
    assert!(!f.physically_resident()[hot], "evicted page still mapped");
    assert_eq!(f.pager().stats().counters.evicted_on_request, 1);
    let resident = f.physically_resident();
    let swapped: Vec<usize> = (0..2048)
        .filter(|&p| !resident[p] && p != hot)
        .take(2)
        .collect();
    f.volume.quiesce();

    // Guest code (KVM_RUN) faulting: served at once, past the quiesce.
    let (tx, rx) = mpsc::channel();
    let (guest_page, hot_page) = (swapped[0], hot);
    thread::spawn(move || {
        let _reg = register_current_thread();
        devices::noio::set_running_guest(true);
        let _ = tx.send(mem.holds(guest_page, 1) && mem.holds(hot_page, 1));
    });
    let ok = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a guest-code fault waited on the quiesced volume");
    assert!(ok, "guest-code fault read wrong data");
    let s = eventually(&f, |s| s.counters.guest_faults_past_quiesce >= 2);
    assert!(s.counters.guest_faults_past_quiesce >= 2, "{s:?}");
    assert_eq!(
        s.counters.noio_faults, 0,
        "guest faults are not NOIO faults"
    );

    // Device emulation (not NOIO) waits, on record.
    let plain = swapped[1];
    let (tid, rx) = spawn_reader(mem, plain);
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "emulation fault passed"
    );
    let blocked = probe.blocked_faults();
    let b = blocked
        .iter()
        .find(|b| b.tid == tid)
        .expect("blocked fault on record");
    assert_eq!(b.gpa, (plain * PAGE_SIZE) as u64);
    assert_eq!(b.waiting_for, "its swap-in read");
    let waiters = f.volume.info().waiters;
    assert!(
        waiters.iter().any(|w| w.thread == "pager-swapin"),
        "{waiters:?}"
    );
    f.volume.resume();
    assert!(rx
        .recv_timeout(Duration::from_secs(10))
        .expect("fault after resume"));
    assert!(eventually_empty(&probe), "the fault stayed on record");
}

/// NOIO travels: a thread whose fault already waits on the quiesced volume
/// is served the NOIO way as soon as a NOIO path lends it NOIO (a reset
/// waiting for its worker), without the volume being resumed.
#[test]
fn a_fault_waiting_on_the_volume_is_served_once_noio_is_lent_to_its_thread() {
    let (f, mem, resident) = mostly_swapped();
    let page = (0..2048).find(|&p| !resident[p]).expect("a swapped page");
    f.volume.quiesce();
    let (tid, rx) = spawn_reader(mem, page);
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "did not wait"
    );
    let _loan = devices::noio::lend_noio(tid);
    let ok = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the waiting fault was not re-served after the loan");
    assert!(ok, "wrong data");
    assert!(f.volume.is_quiesced(), "served without resuming the volume");
    let s = eventually(&f, |s| s.counters.noio_reads_past_quiesce >= 1);
    assert!(s.counters.noio_reads_past_quiesce >= 1, "{s:?}");
    f.volume.resume();
}

/// The pager's threads (`pager-*`) of this process: name and thread id.
fn pager_threads() -> Vec<(String, i32)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if tid as u32 == std::process::id() {
            continue; // the main thread, named after the test binary
        }
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let name = comm.trim().to_string();
        if name.starts_with("pager-") {
            found.push((name, tid));
        }
    }
    found
}

/// The nice value of thread `tid` of this process (`/proc/.../stat` field
/// 19), or `None` once it has exited (other tests' pagers stop meanwhile).
fn nice_of(tid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the parenthesised name, which may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(16)?.parse().ok()
}

/// The threads that serve faults run at a raised priority where the host
/// allows it (reclaim and writeback, busy copying pages, then cannot
/// preempt a fault half served); reclaim and writeback keep the default.
#[test]
fn fault_serving_threads_run_above_reclaim_where_allowed() {
    // Whether this process may raise a priority: try it on a scratch thread.
    let allowed = thread::spawn(|| {
        // SAFETY: changes only the calling (scratch) thread's nice value.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -5) == 0 }
    })
    .join()
    .unwrap();
    let f = Fixture::new(4 * MIB, MIB, |_| {});
    let tids = |name: &str| -> Vec<i32> {
        pager_threads()
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, tid)| tid)
            .collect()
    };
    for name in ["pager-fault", "pager-wait", "pager-swapin"] {
        // A thread takes its name a moment after the pager starts it.
        let mut ids = tids(name);
        for _ in 0..200 {
            if !ids.is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
            ids = tids(name);
        }
        assert!(!ids.is_empty(), "no {name} thread");
        for tid in ids {
            let mut nice = nice_of(tid);
            // Other tests' pagers may be starting: a thread sets its
            // priority first thing, so look again a moment later.
            if nice == Some(0) {
                thread::sleep(Duration::from_millis(100));
                nice = nice_of(tid);
            }
            if let Some(nice) = nice {
                assert_eq!(nice, if allowed { -5 } else { 0 }, "{name} ({tid})");
            }
        }
    }
    for name in ["pager-reclaim", "pager-writeback"] {
        for tid in tids(name) {
            assert!(matches!(nice_of(tid), Some(0) | None), "{name} ({tid})");
        }
    }
    drop(f);
}

/// A pager thread can fault on guest RAM (the swap volume's waker runs the
/// device's remote-wake path inline on the thread that waits on the
/// volume); unregistered, its fault would be taken for the kernel's on a
/// vCPU's behalf and served past the quiesce even with NOIO disabled.
#[test]
fn every_pager_thread_is_registered() {
    let f = Fixture::new(4 * MIB, MIB, |_| {});
    // Other tests' pagers start and stop meanwhile: a thread is named a
    // moment before it registers, so look until one snapshot is clean.
    let mut last = Vec::new();
    for _ in 0..200 {
        last = pager_threads()
            .into_iter()
            .map(|(name, tid)| (name, devices::noio::is_registered(tid)))
            .collect();
        if last.len() >= 5 && last.iter().all(|(_, registered)| *registered) {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(last.len() >= 5, "pager threads not found: {last:?}");
    let unregistered: Vec<_> = last.iter().filter(|(_, r)| !r).collect();
    assert!(unregistered.is_empty(), "unregistered: {unregistered:?}");
    drop(f);
}

/// A swap-in parked on a quiesced volume does not hold up a zero-fill
/// fault that only waits for a frame: they wait in different queues.
#[test]
fn a_parked_swap_in_does_not_hold_up_zero_fill_faults() {
    let (f, mem, _) = mostly_swapped();
    // Clean frames for the zero fills below to take without I/O: pages read
    // back from swap (the last pages written may all be dirty still).
    {
        let _reg = register_current_thread();
        for page in (0..2048).step_by(8).take(128) {
            assert!(mem.holds(page, 1), "page {page}");
        }
    }
    settle(&f);
    let clean = f.pager().stats().clean_pages;
    assert!(clean >= 96, "only {clean} clean pages");
    let resident = f.physically_resident();
    let swapped = (0..2048).find(|&p| !resident[p]).expect("a swapped page");
    f.volume.quiesce();
    // An ordinary thread's swap-in: parked on the quiesced volume.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _reg = register_current_thread();
        let _ = tx.send(mem.holds(swapped, 1));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "swap-in did not park"
    );
    // Fresh pages at the limit: zero fills that wait only for frames,
    // which reclaim makes by dropping clean pages (no I/O).
    let (ztx, zrx) = mpsc::channel();
    thread::spawn(move || {
        let _reg = register_current_thread();
        for page in 4096..4096 + 64 {
            mem.fill(page, 2);
        }
        let _ = ztx.send((4096..4096 + 64).all(|p| mem.holds(p, 2)));
    });
    let ok = zrx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| {
            panic!(
                "zero fills waited behind the parked swap-in: {:?}",
                f.pager().stats()
            )
        });
    assert!(ok, "fresh pages lost their data");
    assert!(
        rx.try_recv().is_err(),
        "the parked swap-in passed the quiesce"
    );
    f.volume.resume();
    assert!(rx
        .recv_timeout(Duration::from_secs(10))
        .expect("swap-in after resume"));
}

fn eventually_empty(probe: &vmm::memory::PagerProbe) -> bool {
    (0..100).any(|_| {
        thread::sleep(Duration::from_millis(10));
        probe.blocked_faults().is_empty()
    })
}

#[test]
fn discard_and_external_remove_free_slots_and_read_zero() {
    let f = Fixture::new(16 * MIB, MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    for page in 0..1024 {
        mem.fill(page, 1);
    }
    settle(&f);
    let before = f.pager().stats();
    assert!(before.swap_slots_used >= 700, "{before:?}");

    let dropped = f
        .pager()
        .discard(GuestAddress(0), 512 * PAGE_SIZE as u64)
        .unwrap();
    assert_eq!(dropped, 512);
    let after = f.pager().stats();
    assert_eq!(after.counters.discarded_pages, 512);
    assert!(
        after.swap_slots_used + 400 <= before.swap_slots_used,
        "slots not freed: {} -> {}",
        before.swap_slots_used,
        after.swap_slots_used
    );
    assert!(matches!(
        f.pager()
            .discard(GuestAddress(15 * MIB as u64), 2 * MIB as u64),
        Err(PagerError::NotRam { .. })
    ));

    // A REMOVE the pager did not cause (madvise by someone else).
    mem.fill(600, 5);
    // SAFETY: page 600 of the fixture's mapping; after the zap it reads back
    // through the pager.
    let ret = unsafe {
        libc::madvise(
            (f.base + 600 * PAGE_SIZE) as *mut libc::c_void,
            PAGE_SIZE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(ret, 0);
    // madvise returns once the handler has read the event; it counts the
    // pages just after.
    let s = eventually(&f, |s| s.counters.removed_pages >= 1);
    assert!(s.counters.removed_pages >= 1, "{s:?}");

    for page in 0..512 {
        assert!(mem.holds(page, 0), "discarded page {page} not zero");
    }
    assert!(mem.holds(600, 0), "removed page not zero");
    for page in (512..1024).filter(|&p| p != 600) {
        assert!(mem.holds(page, 1), "page {page}");
    }
}

#[test]
fn a_full_swap_store_is_fatal_and_signalled() {
    let f = Fixture::new(16 * MIB, 64 * PAGE_SIZE, |c| {
        c.swap_bytes = Some(32 * PAGE_SIZE as u64)
    });
    let mem = f.mem();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _reg = register_current_thread();
        for page in 0..512 {
            mem.fill(page, 1);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("faults hung after the pager failed");
    assert!(f.pager().fatal_eventfd().read().unwrap() >= 1);
    let err = f.pager().fatal_error().expect("no fatal error recorded");
    assert!(err.contains("full"), "{err}");
    assert_eq!(f.pager().stats().fatal_error, Some(err));
}

/// A swap-in that fails (the swap file cut short under the pager) is fatal
/// and signalled, and the faulting thread is not left blocked: it gets a
/// page and runs on (the VM is being stopped).
#[test]
fn a_failed_swap_in_is_fatal_and_releases_the_faulting_thread() {
    let (f, mem, _) = mostly_swapped();
    // Everything out, so that no dirty page is left whose writeback, when
    // the reads below need frames, would extend the cut file past the
    // slots read (holes read back as zeroes, not as errors).
    f.pager()
        .probe()
        .evict(GuestAddress(0), (2048 * PAGE_SIZE) as u64)
        .unwrap();
    settle(&f);
    let resident = f.physically_resident();
    let swapped: Vec<usize> = (0..2048).filter(|&p| !resident[p]).take(8).collect();
    assert_eq!(swapped.len(), 8);
    // Cut the file short, again if a late writeback extends it.
    let swap = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.swap)
        .unwrap();
    for _ in 0..20 {
        swap.set_len(0).unwrap();
        thread::sleep(Duration::from_millis(300));
        if swap.metadata().unwrap().len() == 0 {
            break;
        }
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _reg = register_current_thread();
        for &p in &swapped {
            let _ = mem.holds(p, 1);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a thread stayed blocked on a failed swap-in");
    let err = f.pager().fatal_error().unwrap_or_else(|| {
        panic!(
            "no fatal error recorded: swap file {} bytes, {}",
            swap.metadata().unwrap().len(),
            f.pager().stats().to_json()
        )
    });
    assert!(err.contains("swap-in"), "{err}");
}

/// A NOIO fault on a page the waiting worker is swapping in (parked on a
/// quiesced volume) reads it itself and is counted as a takeover, not as a
/// frame from the free budget.
#[test]
fn a_noio_fault_takes_over_a_parked_swap_in_and_is_counted_so() {
    let (f, mem, resident) = mostly_swapped();
    let probe = f.pager().probe();
    let page = (0..2048).find(|&p| !resident[p]).expect("a swapped page");
    f.volume.quiesce();
    let (tid, rx) = spawn_reader(mem, page);
    // Wait until the worker has claimed the page and parked on its read.
    let parked = (0..500).any(|_| {
        thread::sleep(Duration::from_millis(10));
        probe
            .blocked_faults()
            .iter()
            .any(|b| b.tid == tid && b.waiting_for == "its swap-in read")
    });
    assert!(parked, "{:?}", probe.blocked_faults());
    let before = f.pager().stats().counters;
    let (ntx, nrx) = mpsc::channel();
    thread::spawn(move || {
        let _reg = register_current_thread();
        let _noio = NoioScope::enter();
        let _ = ntx.send(mem.holds(page, 1));
    });
    assert!(nrx
        .recv_timeout(Duration::from_secs(5))
        .expect("NOIO fault blocked"));
    assert!(rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the parked thread was not woken"));
    let s = eventually(&f, |s| s.counters.noio_swapin_takeovers >= 1);
    assert_eq!(s.counters.noio_swapin_takeovers, 1, "{s:?}");
    assert_eq!(s.counters.noio_from_free, before.noio_from_free, "{s:?}");
    f.volume.resume();
}

/// Host micro-benchmark, not a test: `cargo test --release -p vmm --test
/// pager -- --ignored --nocapture bench`. Guest RAM of 64 MiB with a limit of
/// 16 MiB: a write pass over fresh memory (page-out throughput), then a read
/// pass over the swapped pages (page-in throughput). Latencies: every first
/// touch of the read pass, and the touches that found their page unmapped
/// (by `mincore` just before, untimed) - the faults themselves.
#[test]
#[ignore]
fn bench_fault_latency_and_throughput() {
    let f = Fixture::new(64 * MIB, 16 * MIB, |_| {});
    let _reg = register_current_thread();
    let mem = f.mem();
    let t0 = Instant::now();
    for page in 0..f.pages {
        mem.fill(page, 1);
    }
    let write_pass = t0.elapsed();
    settle(&f);
    let mut touch = Vec::with_capacity(f.pages);
    let mut fault = Vec::with_capacity(f.pages);
    let mut read_pass = Duration::ZERO;
    for page in 0..f.pages {
        let p = mem.ptr(page);
        let mut vec = [0u8; 1];
        // SAFETY: one page of the fixture's mapping, one result byte.
        let ret = unsafe { libc::mincore(p as *mut libc::c_void, PAGE_SIZE, vec.as_mut_ptr()) };
        assert_eq!(ret, 0);
        let t = Instant::now();
        // SAFETY: page of the fixture's guest RAM; one aligned read.
        let _ = unsafe { p.read_volatile() };
        let ns = t.elapsed();
        read_pass += ns;
        touch.push(ns.as_nanos() as u64);
        if vec[0] & 1 == 0 {
            fault.push(ns.as_nanos() as u64);
        }
    }
    touch.sort_unstable();
    fault.sort_unstable();
    let s = f.pager().stats();
    let mib = |b: u64, d: Duration| b as f64 / MIB as f64 / d.as_secs_f64();
    let pct = |v: &[u64], q: usize| v.get(v.len() * q / 100).copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "BENCH-PAGER touch_p50_us={:.1} touch_p99_us={:.1} faults={} fault_p50_us={:.1} \
         fault_p99_us={:.1} write_mib_s={:.0} out_mib={} read_mib_s={:.0} in_mib={}",
        pct(&touch, 50),
        pct(&touch, 99),
        fault.len(),
        pct(&fault, 50),
        pct(&fault, 99),
        mib((f.pages * PAGE_SIZE) as u64, write_pass),
        s.counters.bytes_written / MIB as u64,
        mib((f.pages * PAGE_SIZE) as u64, read_pass),
        s.counters.bytes_read / MIB as u64,
    );
    println!("{}", s.to_json());
}

/// Host micro-benchmark, not a test: `cargo test --release -p vmm --test
/// pager -- --ignored --nocapture bench_fresh`. Fills 256 MiB of fresh guest
/// RAM with one `memset` through the pager (limit = the RAM's size, with and
/// without huge pages, and limit = half of it with the first 96 MiB
/// written: no reclaim in any)
/// and the same `memset` on plain anonymous memory: 4 KiB pages (no advice)
/// and transparent huge pages (`MADV_HUGEPAGE`, as guest RAM without a
/// limit). Three rounds each, medians; ratios are pager time / plain time.
#[test]
#[ignore]
fn bench_fresh_memory_vs_memset() {
    const RAM: usize = 256 * MIB;
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
    fn timed_memset(base: usize, len: usize) -> f64 {
        let t = Instant::now();
        // SAFETY: `base..base+len` is a live read-write mapping owned by the
        // caller for the duration of the call.
        unsafe { std::ptr::write_bytes(base as *mut u8, 0xa5, len) };
        t.elapsed().as_secs_f64()
    }
    let plain = |huge: bool| {
        let mem = vmm::guest_ram::map(&[(GuestAddress(0), RAM)], huge).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        timed_memset(base, RAM)
    };
    let paged = |limit: usize, len: usize, huge: bool| {
        let f = Fixture::new(RAM, limit, |c| c.huge_pages = huge);
        let _reg = register_current_thread();
        let s = timed_memset(f.base, len);
        let st = f.pager().stats();
        assert!(st.fatal_error.is_none(), "{st:?}");
        (s, st.counters.faults_zero)
    };
    let mut rows: Vec<(&str, Vec<f64>, usize, u64)> = Vec::new();
    let mut small = Vec::new();
    let mut huge = Vec::new();
    let mut full = Vec::new();
    let mut full_4k = Vec::new();
    let mut half = Vec::new();
    let (mut full_faults, mut half_faults) = (0, 0);
    for _ in 0..3 {
        small.push(plain(false));
        huge.push(plain(true));
        let (s, n) = paged(RAM, RAM, true);
        full.push(s);
        full_faults = n;
        full_4k.push(paged(RAM, RAM, false).0);
        let (s, n) = paged(RAM / 2, 96 * MIB, true);
        half.push(s);
        half_faults = n;
    }
    rows.push(("plain_4k", small, RAM, 0));
    rows.push(("plain_thp", huge, RAM, 0));
    rows.push(("pager_limit_100", full, RAM, full_faults));
    rows.push(("pager_limit_100_huge_pages_off", full_4k, RAM, full_faults));
    rows.push(("pager_limit_50", half, 96 * MIB, half_faults));
    let rate = |v: &[f64], len: usize| len as f64 / MIB as f64 / median(v.to_vec());
    let base_4k = rate(&rows[0].1, rows[0].2);
    let base_thp = rate(&rows[1].1, rows[1].2);
    for (name, v, len, faults) in &rows {
        let r = rate(v, *len);
        println!(
            "BENCH-FRESH {name} mib_s={r:.0} faults={faults} vs_4k={:.2} vs_thp={:.2} runs_s={:?}",
            base_4k / r,
            base_thp / r,
            v.iter()
                .map(|s| (s * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
    }
}
