//! Queue and configuration interrupts of one virtio-pci device: the ISR
//! status byte plus the MSI-X vector the driver chose for each source.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use super::{ISR_CONFIG, ISR_QUEUE, VIRTIO_MSI_NO_VECTOR};
use crate::interrupt::Interrupt;

struct State {
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    irq: Arc<dyn Interrupt>,
}

/// How a device worker signals the driver. Cheap to clone.
#[derive(Clone)]
pub struct VirtioInterrupt {
    state: Arc<State>,
}

impl VirtioInterrupt {
    pub fn new(irq: Arc<dyn Interrupt>, num_queues: usize) -> Self {
        Self {
            state: Arc::new(State {
                isr: AtomicU8::new(0),
                config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
                queue_vectors: (0..num_queues)
                    .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                    .collect(),
                irq,
            }),
        }
    }

    /// Signals that queue `index` has used buffers (§2.7.7).
    pub fn signal_queue(&self, index: u16) {
        self.state.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let v = self
            .state
            .queue_vectors
            .get(usize::from(index))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire));
        if v != VIRTIO_MSI_NO_VECTOR {
            self.state.irq.trigger(v);
        }
    }

    /// Signals a configuration change (§4.1.4.5).
    pub fn signal_config(&self) {
        self.state.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let v = self.state.config_vector.load(Ordering::Acquire);
        if v != VIRTIO_MSI_NO_VECTOR {
            self.state.irq.trigger(v);
        }
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.state.config_vector.load(Ordering::Acquire)
    }

    pub(crate) fn set_config_vector(&self, v: u16) {
        self.state.config_vector.store(v, Ordering::Release);
    }

    pub(crate) fn queue_vector(&self, q: u16) -> u16 {
        self.state
            .queue_vectors
            .get(usize::from(q))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(crate) fn set_queue_vector(&self, q: u16, v: u16) {
        if let Some(slot) = self.state.queue_vectors.get(usize::from(q)) {
            slot.store(v, Ordering::Release);
        }
    }

    /// Reads and clears the ISR byte (§4.1.4.5: reading resets it).
    pub(crate) fn take_isr(&self) -> u8 {
        self.state.isr.swap(0, Ordering::SeqCst)
    }

    /// Back to the reset state: no vectors, ISR clear.
    pub(crate) fn reset(&self) {
        self.state.isr.store(0, Ordering::SeqCst);
        self.set_config_vector(VIRTIO_MSI_NO_VECTOR);
        for v in &self.state.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}
