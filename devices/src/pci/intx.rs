//! Legacy INTx: the level-triggered interrupt pin a function falls back to
//! when the guest does not enable MSI-X (PCI 3.0 sections 2.2.6, 6.2.2).
//!
//! The device reports whether it has an interrupt condition; the pin is
//! asserted while that condition holds and Command.Interrupt Disable is
//! clear, and Status.Interrupt Status mirrors the condition regardless of
//! the disable bit. The line itself is an [`IrqLevel`] that the VMM maps to
//! an IOAPIC input (the MP table tells the guest which one). The pin is
//! shared between the configuration space (vCPU threads) and the device's
//! interrupt source (perhaps a worker thread), so it keeps its own state.

use std::sync::{Arc, Mutex};

use crate::interrupt::Interrupt;

use super::Msix;

/// Interrupt Pin register (read-only): 1 = INTA#.
pub const INTERRUPT_PIN: usize = 0x3d;
pub const PIN_INTA: u8 = 1;
/// Status.Interrupt Status (read-only, set by the device).
pub const STATUS_INTERRUPT: u16 = 1 << 3;

/// A level-triggered interrupt input (an IOAPIC pin on x86).
pub trait IrqLevel: Send + Sync {
    fn set_level(&self, asserted: bool);
}

#[derive(Default)]
struct PinState {
    /// The device's interrupt condition.
    pending: bool,
    /// Command.Interrupt Disable.
    disabled: bool,
    /// What the line was last driven to.
    asserted: bool,
}

/// The INTA# pin of one function.
pub struct IntxPin {
    line: Arc<dyn IrqLevel>,
    state: Mutex<PinState>,
}

impl IntxPin {
    pub fn new(line: Arc<dyn IrqLevel>) -> Arc<Self> {
        Arc::new(Self {
            line,
            state: Mutex::new(PinState::default()),
        })
    }

    fn change(&self, f: impl FnOnce(&mut PinState)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        let level = s.pending && !s.disabled;
        if level != s.asserted {
            s.asserted = level;
            self.line.set_level(level);
        }
    }

    /// Records the device's interrupt condition and drives the line.
    pub fn set_pending(&self, pending: bool) {
        self.change(|s| s.pending = pending);
    }

    /// Follows Command.Interrupt Disable.
    pub fn set_disabled(&self, disabled: bool) {
        self.change(|s| s.disabled = disabled);
    }

    /// Status.Interrupt Status.
    pub fn pending(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).pending
    }

    pub fn asserted(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .asserted
    }
}

/// A function's interrupt: MSI-X while the guest has it enabled, else the
/// INTx pin (if the function has one). A trigger asserts the pin; the
/// device deasserts it when the guest acknowledges the condition.
pub struct PciInterrupt {
    msix: Msix,
    intx: Option<Arc<IntxPin>>,
}

impl PciInterrupt {
    pub fn new(msix: Msix, intx: Option<Arc<IntxPin>>) -> Arc<Self> {
        Arc::new(Self { msix, intx })
    }
}

impl Interrupt for PciInterrupt {
    fn trigger(&self, vector: u16) {
        match &self.intx {
            Some(pin) if !self.msix.enabled() => pin.set_pending(true),
            _ => self.msix.trigger(vector),
        }
    }

    fn deassert(&self, _vector: u16) {
        if let Some(pin) = &self.intx {
            pin.set_pending(false);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pci::msix::test_router::RecordingRouter;
    use crate::pci::msix::{MsixLayout, MSIX_CTRL_ENABLE};

    /// Records every level change.
    #[derive(Default)]
    pub(crate) struct RecordingLine(pub Mutex<Vec<bool>>);

    impl IrqLevel for RecordingLine {
        fn set_level(&self, asserted: bool) {
            self.0.lock().unwrap().push(asserted);
        }
    }

    #[test]
    fn line_follows_the_condition_gated_by_interrupt_disable() {
        let line = Arc::new(RecordingLine::default());
        let pin = IntxPin::new(line.clone());
        pin.set_pending(true);
        assert!(pin.asserted());
        pin.set_disabled(true);
        assert!(!pin.asserted());
        assert!(pin.pending(), "Interrupt Status stays set while disabled");
        pin.set_disabled(false);
        pin.set_pending(true); // no change, no extra edge
        pin.set_pending(false);
        assert!(!pin.pending());
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true, false]);
    }

    #[test]
    fn msix_when_enabled_else_the_pin() {
        let router = Arc::new(RecordingRouter::default());
        let layout = MsixLayout {
            vectors: 1,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x800,
        };
        let msix = Msix::new(layout, router.clone()).unwrap();
        let line = Arc::new(RecordingLine::default());
        let irq = PciInterrupt::new(msix.clone(), Some(IntxPin::new(line.clone())));
        irq.trigger(0);
        irq.deassert(0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        assert!(router.fired().is_empty());
        msix.set_control(MSIX_CTRL_ENABLE);
        irq.trigger(0);
        irq.deassert(0);
        // Delivered, or pending behind the vector's reset-default mask.
        assert!(router.fired() == vec![0] || msix.is_pending(0));
        assert_eq!(line.0.lock().unwrap().len(), 2, "pin untouched under MSI-X");
    }
}
