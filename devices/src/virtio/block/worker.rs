//! Queue processing of an activated virtio-blk device. Runs on the event
//! loop; `process_queue` is callable directly (tests).

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::request::{DiskInfo, Request};
use super::VIRTIO_BLK_ID_BYTES;
use crate::block::RawImage;
use crate::virtio::{ActivatedQueue, Activation, VirtioInterrupt};

/// What one `process_queue` call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStats {
    /// Chains returned to the used ring.
    pub completed: u32,
    /// The budget ran out with work left; the caller should come back.
    pub more: bool,
    /// An interrupt was signalled.
    pub notified: bool,
}

/// The queues, disk and memory of one activation.
pub struct BlockWorker {
    disk: Arc<RawImage>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: VirtioInterrupt,
    queues: Vec<ActivatedQueue>,
    info: DiskInfo,
    id: [u8; VIRTIO_BLK_ID_BYTES],
}

impl BlockWorker {
    pub fn new(disk: Arc<RawImage>, id: [u8; VIRTIO_BLK_ID_BYTES], a: Activation) -> Self {
        let info = DiskInfo {
            sectors: disk.sectors(),
            readonly: disk.readonly(),
            acked_features: a.acked_features,
        };
        Self {
            disk,
            mem: a.mem,
            interrupt: a.interrupt,
            queues: a.queues,
            info,
            id,
        }
    }

    /// Processes queue slot `slot` (position in the activated queue list).
    /// Work is bounded by the queue size per call: a guest that keeps
    /// adding buffers cannot hold the event loop.
    pub fn process_queue(&mut self, slot: usize) -> ProcessStats {
        let mut stats = ProcessStats::default();
        let Some(aq) = self.queues.get_mut(slot) else {
            return stats;
        };
        let mem = self.mem.memory();
        let budget = u32::from(aq.queue.size());
        let mut consumed = 0u32;
        let event_idx = aq.queue.event_idx_enabled();
        'outer: loop {
            if event_idx {
                if let Err(e) = aq.queue.disable_notification(&*mem) {
                    log::warn!("virtio-blk: disable notification: {e}");
                }
            }
            while let Some(chain) = aq.queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let used_len = match Request::parse(chain, &mem, &self.info) {
                    Ok(req) => {
                        let (status, written) = req.execute(&self.disk, &mem, &self.id);
                        match mem.write_obj(status, req.status) {
                            Ok(()) => written + 1,
                            Err(_) => written,
                        }
                    }
                    Err(rej) => {
                        log::debug!("virtio-blk: bad request: {}", rej.error);
                        match rej.status.map(|a| mem.write_obj(rej.error.status(), a)) {
                            Some(Ok(())) => 1,
                            _ => 0,
                        }
                    }
                };
                // A head index beyond the queue cannot be returned (the
                // driver published garbage): the chain is consumed and
                // counts against the budget, but is not completed.
                match aq.queue.add_used(&*mem, head, used_len) {
                    Ok(()) => stats.completed += 1,
                    Err(e) => log::warn!("virtio-blk: chain {head} not returned: {e}"),
                }
                consumed += 1;
                if consumed >= budget {
                    stats.more = true;
                    break 'outer;
                }
            }
            // With EVENT_IDX, re-enabling can reveal buffers added meanwhile.
            if !event_idx {
                break;
            }
            match aq.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-blk: enable notification: {e}");
                    break;
                }
            }
        }
        if stats.completed > 0 {
            match aq.queue.needs_notification(&*mem) {
                Ok(true) | Err(_) => {
                    self.interrupt.signal_queue(aq.index);
                    stats.notified = true;
                }
                Ok(false) => {}
            }
        }
        stats
    }
}

impl MutEventSubscriber for BlockWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (slot, q) in self.queues.iter().enumerate() {
            // slot < MAX_QUEUES.
            if let Err(e) = ops.add(Events::with_data(&q.event, slot as u32, EventSet::IN)) {
                log::error!("virtio-blk: cannot watch queue {}: {e}", q.index);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let slot = events.data() as usize;
        let Some(q) = self.queues.get(slot) else {
            return;
        };
        // Nonblocking eventfd: an empty counter is not an error worth more.
        let _ = q.event.read();
        let stats = self.process_queue(slot);
        if stats.more {
            // Come back after other sources have had their turn.
            if let Some(q) = self.queues.get(slot) {
                let _ = q.event.write(1);
            }
        }
    }
}
