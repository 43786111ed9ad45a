//! How a device model raises an interrupt without knowing how it is delivered.
//!
//! The PCI layer implements [`Interrupt`] on top of MSI-X (irqfd per vector,
//! masking and pending bits honoured) or INTx; unit tests implement it with a
//! counter. Device models hold an `Arc<dyn Interrupt>`.

/// Raises interrupt vectors of one device.
pub trait Interrupt: Send + Sync {
    /// Signals `vector` (an MSI-X table index; ignored for INTx). Delivery
    /// may be deferred by masking, which the implementation records as pending.
    fn trigger(&self, vector: u16);

    /// The guest acknowledged the condition behind `vector`: a level
    /// interrupt (INTx) drops its line. Message interrupts ignore it.
    fn deassert(&self, _vector: u16) {}
}
