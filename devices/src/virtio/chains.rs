//! The queue loop every device worker runs: pop available chains with a
//! budget, hand each to the device, return it to the used ring, re-check for
//! buffers added while notifications were off (VIRTIO_RING_F_EVENT_IDX), and
//! signal the driver when the ring says so (§2.7.7, §2.7.10).

use virtio_queue::{DescriptorChain, QueueT};
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
/// counted against the budget but not completed. `tag` names the device in
/// log lines.
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
        while let Some(chain) = aq.queue.pop_descriptor_chain(mem) {
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
