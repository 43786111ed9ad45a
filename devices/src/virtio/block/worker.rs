//! Queue processing of an activated virtio-blk device. Runs on the event
//! loop; `process_queue` is callable directly (tests).

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::request::{DiskInfo, Request};
use super::VIRTIO_BLK_ID_BYTES;
use crate::block::RawImage;
use crate::virtio::chains::{process_chains, Disposition, ProcessStats};
use crate::virtio::{ActivatedQueue, Activation, VirtioInterrupt};

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
        let Some(aq) = self.queues.get_mut(slot) else {
            return ProcessStats::default();
        };
        let mem = self.mem.memory();
        let budget = u32::from(aq.queue.size());
        let (disk, info, id) = (&self.disk, &self.info, &self.id);
        process_chains(aq, &mem, &self.interrupt, budget, "virtio-blk", |chain| {
            let used_len = match Request::parse(chain, &mem, info) {
                Ok(req) => {
                    let (status, written) = req.execute(disk, &mem, id);
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
            Disposition::Used(used_len)
        })
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
