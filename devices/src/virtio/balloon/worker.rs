//! Queue processing of an activated balloon. Runs on the event loop;
//! `process_queue` and `refresh_stats` are callable directly (tests).
//!
//! Every buffer's pages are discarded (through the [`BalloonSink`]) before
//! the buffer goes back to the used ring: for reporting the guest keeps the
//! pages isolated only until then, and for inflate it updates `actual`
//! after. Work per call is bounded by the queue size, descriptors per chain
//! by [`MAX_CHAIN_DESCRIPTORS`], PFNs per chain by [`MAX_PFNS_PER_CHAIN`],
//! reported lengths by [`MAX_REPORT_LEN`].

use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::device::{bump, Shared};
use super::held::{HeldBlocks, HOLD_DELAY, MAX_HELD_PAGES};
use super::*;
use crate::virtio::chains::{process_chains, return_held, Disposition, ProcessStats};
use crate::virtio::{ActivatedQueue, VirtioInterrupt};

/// What a queue is for, from its index and the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// Event data of the statistics timer and request eventfd (queue events
/// use their slot number, < 4).
const TOKEN_TIMER: u32 = 100;
const TOKEN_REQUEST: u32 = 101;
const TOKEN_HOLD: u32 = 102;

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// The queues, memory and sink of one activation.
pub struct BalloonWorker {
    shared: Arc<Shared>,
    sink: Arc<dyn BalloonSink>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: VirtioInterrupt,
    queues: Vec<(Role, ActivatedQueue)>,
    /// The statistics buffer the device holds until it wants fresh ones.
    held_stats: Option<u16>,
    timer: Option<TimerFd>,
    request: EventFd,
    /// Inflated pages waiting for the rest of their huge page's block,
    /// with the timer that lets go of them when the inflate pauses (only
    /// when the sink's discard granule is larger than a page).
    held: Option<(HeldBlocks, TimerFd)>,
}

impl BalloonWorker {
    pub(super) fn new(
        shared: Arc<Shared>,
        sink: Arc<dyn BalloonSink>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: VirtioInterrupt,
        queues: Vec<(Role, ActivatedQueue)>,
        stats_interval: Option<Duration>,
    ) -> std::io::Result<Self> {
        let timer = match stats_interval.filter(|d| !d.is_zero()) {
            Some(d) => {
                let mut t = TimerFd::new()?;
                t.reset(d, Some(d))?;
                Some(t)
            }
            None => None,
        };
        let request = shared.stats_request.try_clone()?;
        let granule = sink.discard_granule();
        let held = if granule > BALLOON_PAGE_SIZE && granule.is_power_of_two() {
            Some((HeldBlocks::new(granule, MAX_HELD_PAGES), TimerFd::new()?))
        } else {
            None
        };
        Ok(Self {
            shared,
            sink,
            mem,
            interrupt,
            queues,
            held_stats: None,
            timer,
            request,
            held,
        })
    }

    /// Slot of the queue with `role`.
    pub fn slot_of(&self, role: Role) -> Option<usize> {
        self.queues.iter().position(|(r, _)| *r == role)
    }

    /// Whether a statistics buffer is held.
    pub fn holds_stats(&self) -> bool {
        self.held_stats.is_some()
    }

    /// Processes queue slot `slot` (position in the activated queue list).
    pub fn process_queue(&mut self, slot: usize) -> ProcessStats {
        let Some((role, aq)) = self.queues.get_mut(slot) else {
            return ProcessStats::default();
        };
        let role = *role;
        let mem = self.mem.memory();
        let budget = u32::from(aq.queue.size());
        let (sh, sink) = (&*self.shared, &*self.sink);
        let mut stale = Vec::new();
        let held = &mut self.held_stats;
        let mut blocks = self.held.as_mut().map(|(b, _)| b);
        let stats = process_chains(aq, &mem, &self.interrupt, budget, "virtio-balloon", |c| {
            match role {
                Role::Inflate => inflate(sh, sink, &mem, blocks.as_deref_mut(), c),
                Role::Deflate => deflate(sh, sink, &mem, blocks.as_deref_mut(), c),
                Role::Reporting => report(sh, sink, &mem, c),
                Role::Stats => {
                    let head = c.head_index();
                    sh.store_stats(read_stats(sh, &mem, c));
                    // Hold at most one: a second buffer returns the first.
                    stale.extend(held.replace(head));
                    Disposition::Held
                }
            }
        });
        for head in stale {
            return_held(aq, &mem, &self.interrupt, head, 0, "virtio-balloon");
        }
        if role == Role::Inflate {
            self.schedule_held();
        }
        stats
    }

    /// Pages held for their block wait at most [`HOLD_DELAY`] after the
    /// last inflate buffer (and never past [`MAX_HELD_PAGES`]: `add`).
    fn schedule_held(&mut self) {
        let Some((blocks, timer)) = &mut self.held else {
            return;
        };
        if blocks.pages() > 0 {
            if let Err(e) = timer.reset(HOLD_DELAY, None) {
                log::warn!("virtio-balloon: cannot arm the hold timer ({e}); discarding now");
                self.discard_held();
            }
        }
    }

    /// Discards every page held for its block (their block will not
    /// fill soon). Returns how many pages.
    pub fn discard_held(&mut self) -> u64 {
        let Some((blocks, _)) = &mut self.held else {
            return 0;
        };
        let runs = blocks.take_all();
        let pages = runs.iter().map(|r| r.1 / BALLOON_PAGE_SIZE).sum();
        discard_runs(&self.shared, &*self.sink, &runs);
        pages
    }

    /// The hold timer was seen readable: discards what is held, unless an
    /// inflate buffer handled since (in the same batch of events) re-armed
    /// the timer, which cleared the expiry: then there is nothing to read
    /// (a read would block until the new expiry) and nothing to do yet.
    pub fn hold_timer_fired(&mut self) {
        if let Some((_, t)) = &mut self.held {
            if t.is_armed().unwrap_or(true) {
                return;
            }
            // Expired and not re-armed: readable, so this does not block.
            let _ = t.wait();
        }
        self.discard_held();
    }

    /// Pages held for their block now.
    pub fn held_pages(&self) -> u64 {
        self.held.as_ref().map_or(0, |(b, _)| b.pages())
    }

    /// Returns the held statistics buffer, which asks the guest to refill
    /// it with fresh values (§5.5.6.3). Returns whether one was held.
    pub fn refresh_stats(&mut self) -> bool {
        let Some(head) = self.held_stats.take() else {
            return false;
        };
        let Some(slot) = self.slot_of(Role::Stats) else {
            return false;
        };
        let mem = self.mem.memory();
        let aq = &mut self.queues[slot].1;
        return_held(aq, &mem, &self.interrupt, head, 0, "virtio-balloon")
    }
}

/// Up to [`MAX_CHAIN_DESCRIPTORS`] descriptors of `c`; an overlong chain
/// counts one bad descriptor.
fn descriptors<'m>(sh: &Shared, c: Chain<'m>) -> Vec<virtio_queue::desc::split::Descriptor> {
    let mut out = Vec::new();
    for d in c {
        if out.len() == MAX_CHAIN_DESCRIPTORS {
            bump(&sh.counters.bad_descriptors, 1);
            break;
        }
        out.push(d);
    }
    out
}

/// The PFNs of an inflate or deflate buffer: device-readable descriptors
/// holding le32 frame numbers (§5.5.6).
fn read_pfns(sh: &Shared, mem: &GuestMemoryMmap, c: Chain<'_>) -> Vec<u32> {
    let counters = &sh.counters;
    let mut pfns: Vec<u32> = Vec::new();
    let mut bytes = Vec::new();
    for d in descriptors(sh, c) {
        if d.is_write_only() {
            bump(&counters.bad_descriptors, 1);
            continue;
        }
        let len = u64::from(d.len());
        if len % 4 != 0 {
            // A partial PFN at the end is ignored.
            bump(&counters.bad_descriptors, 1);
        }
        let n = (len / 4) as usize;
        let room = MAX_PFNS_PER_CHAIN - pfns.len();
        if n > room {
            bump(&counters.ignored_pfns, (n - room) as u64);
        }
        let take = n.min(room);
        if take == 0 {
            continue;
        }
        bytes.resize(take * 4, 0);
        if mem.read_slice(&mut bytes, d.addr()).is_err() {
            bump(&counters.bad_descriptors, 1);
            continue;
        }
        pfns.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    pfns
}

/// Hands `runs` to the sink and counts what it discarded (or refused).
fn discard_runs(sh: &Shared, sink: &dyn BalloonSink, runs: &[(u64, u64)]) {
    for &(gpa, len) in runs {
        match sink.discard(gpa, len) {
            Ok(n) => bump(&sh.counters.discarded_pages, n),
            Err(e) => {
                let n = sh
                    .counters
                    .discard_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n < 16 {
                    log::warn!("virtio-balloon: discard of {gpa:#x}+{len:#x} failed: {e}");
                }
            }
        }
    }
}

/// Inflated pages go back to the host now, or (`held`) once their block
/// is whole.
fn inflate(
    sh: &Shared,
    sink: &dyn BalloonSink,
    mem: &GuestMemoryMmap,
    held: Option<&mut HeldBlocks>,
    c: Chain<'_>,
) -> Disposition {
    let mut pfns = read_pfns(sh, mem, c);
    let runs = pfn_runs(mem, &mut pfns);
    bump(&sh.counters.bad_pfns, runs.bad_pages);
    match held {
        Some(blocks) => {
            let block = blocks.block();
            let inside = |start: u64| {
                super::ranges::region_of(mem, start)
                    .is_some_and(|(_, end)| start.checked_add(block).is_some_and(|e| e <= end))
            };
            let now = blocks.add(&runs.runs, inside);
            let whole = now.iter().filter(|r| r.1 == block).count() as u64;
            bump(&sh.counters.whole_blocks_discarded, whole);
            discard_runs(sh, sink, &now);
        }
        None => discard_runs(sh, sink, &runs.runs),
    }
    bump(&sh.counters.inflated_pages, runs.pages);
    Disposition::Used(0)
}

fn deflate(
    sh: &Shared,
    sink: &dyn BalloonSink,
    mem: &GuestMemoryMmap,
    mut held: Option<&mut HeldBlocks>,
    c: Chain<'_>,
) -> Disposition {
    let mut pfns = read_pfns(sh, mem, c);
    let runs = pfn_runs(mem, &mut pfns);
    bump(&sh.counters.bad_pfns, runs.bad_pages);
    for &(gpa, len) in &runs.runs {
        if let Some(blocks) = held.as_deref_mut() {
            blocks.forget(gpa, len);
        }
        sink.reclaim(gpa, len);
    }
    bump(&sh.counters.deflated_pages, runs.pages);
    // A deflate while the balloon is not above its target was not asked
    // for: the guest's deflate-on-OOM (it lowers `actual` after this).
    if sh.actual() <= sh.target() {
        bump(&sh.counters.oom_deflated_pages, runs.pages);
    }
    Disposition::Used(0)
}

/// Free page reporting: each descriptor is a free range (device-writable
/// in Linux; the direction is not relied on, the contents are not read).
fn report(sh: &Shared, sink: &dyn BalloonSink, mem: &GuestMemoryMmap, c: Chain<'_>) -> Disposition {
    for d in descriptors(sh, c) {
        let len = u64::from(d.len());
        if len == 0 || len > MAX_REPORT_LEN {
            bump(&sh.counters.bad_descriptors, 1);
            continue;
        }
        let runs = ram_runs(mem, d.addr().0, len);
        bump(&sh.counters.bad_pfns, runs.bad_pages);
        discard_runs(sh, sink, &runs.runs);
        bump(&sh.counters.reported_pages, runs.pages);
        bump(&sh.counters.reported_ranges, 1);
    }
    Disposition::Used(0)
}

fn read_stats(sh: &Shared, mem: &GuestMemoryMmap, c: Chain<'_>) -> GuestStats {
    let max = MAX_STAT_ENTRIES * STAT_ENTRY_LEN;
    let mut buf = Vec::new();
    for d in descriptors(sh, c) {
        if d.is_write_only() {
            bump(&sh.counters.bad_descriptors, 1);
            continue;
        }
        let take = (d.len() as usize).min(max - buf.len());
        let at = buf.len();
        buf.resize(at + take, 0);
        if mem.read_slice(&mut buf[at..], d.addr()).is_err() {
            bump(&sh.counters.bad_descriptors, 1);
            buf.truncate(at);
        }
    }
    let parsed = parse_stats(&buf);
    if parsed.trailing != 0 || parsed.unknown != 0 {
        log::debug!(
            "virtio-balloon: statistics buffer with {} unknown entries, {} trailing bytes",
            parsed.unknown,
            parsed.trailing
        );
    }
    parsed.stats
}

impl MutEventSubscriber for BalloonWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (slot, (_, q)) in self.queues.iter().enumerate() {
            // slot < 4.
            if let Err(e) = ops.add(Events::with_data(&q.event, slot as u32, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch queue {}: {e}", q.index);
            }
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(t, TOKEN_TIMER, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch the statistics timer: {e}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.request,
            TOKEN_REQUEST,
            EventSet::IN,
        )) {
            log::error!("virtio-balloon: cannot watch statistics requests: {e}");
        }
        if let Some((_, t)) = &self.held {
            if let Err(e) = ops.add(Events::with_data(t, TOKEN_HOLD, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch the hold timer: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_TIMER => {
                if let Some(t) = &mut self.timer {
                    // Readable, so this does not block.
                    let _ = t.wait();
                }
                self.refresh_stats();
            }
            TOKEN_REQUEST => {
                let _ = self.request.read();
                self.refresh_stats();
            }
            TOKEN_HOLD => self.hold_timer_fired(),
            data => {
                let slot = data as usize;
                let Some((_, q)) = self.queues.get(slot) else {
                    return;
                };
                // Nonblocking eventfd: an empty counter is not an error.
                let _ = q.event.read();
                if self.process_queue(slot).more {
                    // Come back after other sources have had their turn.
                    if let Some((_, q)) = self.queues.get(slot) {
                        let _ = q.event.write(1);
                    }
                }
            }
        }
    }
}
