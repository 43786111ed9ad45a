//! The queue loop every device worker runs: pop available chains with a
//! budget, hand each to the device, return it to the used ring, re-check for
//! buffers added while notifications were off (VIRTIO_RING_F_EVENT_IDX), and
//! signal the driver when the ring says so (§2.7.7, §2.7.10).

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivatedQueue, VirtioInterrupt};

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStats {
    /// Chains returned to the used ring.
    pub completed: u32,
    /// The budget ran out with work left; the caller should come back.
    pub more: bool,
    /// An interrupt was signalled.
    pub notified: bool,
}

/// What the device did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Return it now with this many bytes written.
    Used(u32),
    /// The device keeps it (e.g. the balloon's statistics buffer) and
    /// returns it later itself.
    Held,
}

/// Runs `handle` on up to `budget` available chains of `aq`. A head index
/// the ring cannot take back (the driver published garbage) is consumed and
/// counted against the budget but not completed. An available ring that
/// cannot be read, or whose index is more than the ring's size ahead of the
/// device, ends the pass: nothing on it can be trusted until the driver
/// writes a sane index (and notifies). `tag` names the device in log lines.
pub fn process_chains<'m, F>(
    aq: &mut ActivatedQueue,
    mem: &'m GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    budget: u32,
    tag: &str,
    mut handle: F,
) -> ProcessStats
where
    F: FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> Disposition,
{
    let mut stats = ProcessStats::default();
    let mut consumed = 0u32;
    let event_idx = aq.queue.event_idx_enabled();
    'outer: loop {
        if event_idx {
            if let Err(e) = aq.queue.disable_notification(mem) {
                log::warn!("{tag}: disable notification: {e}");
            }
        }
        loop {
            // Not `pop_descriptor_chain`, which reads a broken ring as an
            // empty one: with EVENT_IDX, re-enabling notifications would
            // then report buffers forever.
            let chain = match aq.queue.iter(mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => {
                    log::warn!("{tag}: unusable available ring: {e}");
                    break 'outer;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if let Disposition::Used(len) = handle(chain) {
                match aq.queue.add_used(mem, head, len) {
                    Ok(()) => stats.completed += 1,
                    Err(e) => log::warn!("{tag}: chain {head} not returned: {e}"),
                }
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
        match aq.queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                log::warn!("{tag}: enable notification: {e}");
                break;
            }
        }
    }
    if stats.completed > 0 {
        stats.notified = notify(aq, mem, interrupt);
    }
    stats
}

/// Returns a chain the device held (see [`Disposition::Held`]) and signals
/// the driver if the ring asks for it. Returns whether it was returned.
pub fn return_held(
    aq: &mut ActivatedQueue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    head: u16,
    len: u32,
    tag: &str,
) -> bool {
    match aq.queue.add_used(mem, head, len) {
        Ok(()) => {
            notify(aq, mem, interrupt);
            true
        }
        Err(e) => {
            log::warn!("{tag}: held chain {head} not returned: {e}");
            false
        }
    }
}

fn notify(aq: &mut ActivatedQueue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) -> bool {
    match aq.queue.needs_notification(mem) {
        Ok(true) | Err(_) => {
            interrupt.signal_queue(aq.index);
            true
        }
        Ok(false) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    use super::*;
    use crate::virtio::test_utils::{activation, guest_memory, CountingInterrupt, TestRing};
    use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

    /// Found by the virtio_blk fuzz target: with EVENT_IDX, an available
    /// index more than a ring's size ahead of the device made every pop
    /// fail while re-enabling notifications kept reporting buffers, so the
    /// queue loop spun forever on the event-loop thread.
    #[test]
    fn an_avail_index_too_far_ahead_ends_the_pass() {
        let mem = guest_memory(1 << 20);
        let ring = TestRing::new(0x1000, 4);
        let mut a = activation(
            &mem,
            Arc::new(CountingInterrupt::default()),
            std::slice::from_ref(&ring),
            VIRTIO_RING_F_EVENT_IDX,
        );
        mem.memory()
            .write_obj(0x3333u16, GuestAddress(ring.avail + 2))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut aq = a.queues.remove(0);
            let m = a.mem.memory();
            let stats = process_chains(&mut aq, &m, &a.interrupt, 4, "test", |_| {
                Disposition::Used(0)
            });
            let _ = tx.send(stats);
        });
        let stats = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the queue pass never ended");
        assert_eq!(stats.completed, 0);
        assert!(!stats.more);
    }
}
