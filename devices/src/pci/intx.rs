//! Legacy INTx: the level-triggered interrupt pin a function falls back to
//! when the guest does not enable MSI-X (PCI 3.0 sections 2.2.6, 6.2.2).
//!
//! The device reports whether it has an interrupt condition; the pin is
//! asserted while that condition holds and Command.Interrupt Disable is
//! clear, and Status.Interrupt Status mirrors the condition regardless of
//! the disable bit. The line itself is an [`IrqLevel`] that the VMM maps to
//! an IOAPIC input (the MP table tells the guest which one).

use std::sync::Arc;

use super::{PciConfig, COMMAND_INTX_DISABLE, INTERRUPT_LINE, STATUS};

/// Interrupt Pin register (read-only): 1 = INTA#.
pub const INTERRUPT_PIN: usize = 0x3d;
pub const PIN_INTA: u8 = 1;
/// Status.Interrupt Status (read-only, set by the device).
pub const STATUS_INTERRUPT: u16 = 1 << 3;

/// A level-triggered interrupt input (an IOAPIC pin on x86).
pub trait IrqLevel: Send + Sync {
    fn set_level(&self, asserted: bool);
}

/// The INTA# pin of one function.
pub struct Intx {
    line: Arc<dyn IrqLevel>,
    /// The device's interrupt condition.
    pending: bool,
    /// What the line was last driven to.
    asserted: bool,
}

impl Intx {
    /// Advertises INTA# routed to input `irq` (written to Interrupt Line,
    /// as firmware would) and returns the pin, deasserted.
    pub fn add_to(config: &mut PciConfig, irq: u8, line: Arc<dyn IrqLevel>) -> Self {
        config.set_interrupt_pin(PIN_INTA);
        config.set_bytes(INTERRUPT_LINE, &[irq]);
        Self {
            line,
            pending: false,
            asserted: false,
        }
    }

    /// Records the device's interrupt condition and drives the line.
    pub fn set_pending(&mut self, config: &mut PciConfig, pending: bool) {
        self.pending = pending;
        self.update(config);
    }

    /// Re-evaluates the line after a Command write (Interrupt Disable).
    pub fn update(&mut self, config: &mut PciConfig) {
        let (set, clear) = if self.pending {
            (STATUS_INTERRUPT, 0)
        } else {
            (0, STATUS_INTERRUPT)
        };
        config.set_bits_u16(STATUS, set, clear);
        let level = self.pending && config.command() & COMMAND_INTX_DISABLE == 0;
        if level != self.asserted {
            self.asserted = level;
            self.line.set_level(level);
        }
    }

    pub fn asserted(&self) -> bool {
        self.asserted
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pci::{PciIds, COMMAND};
    use std::sync::Mutex;

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
        let mut config = PciConfig::new(PciIds::default());
        let line = Arc::new(RecordingLine::default());
        let mut intx = Intx::add_to(&mut config, 17, line.clone());
        let mut b = [0u8; 2];
        config.read(INTERRUPT_LINE, &mut b);
        assert_eq!(b, [17, PIN_INTA]);

        intx.set_pending(&mut config, true);
        assert!(intx.asserted());
        assert_ne!(config.read_u16(STATUS) & STATUS_INTERRUPT, 0);
        // Interrupt Disable drops the line but not Interrupt Status.
        config.write(COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
        intx.update(&mut config);
        assert!(!intx.asserted());
        assert_ne!(config.read_u16(STATUS) & STATUS_INTERRUPT, 0);
        config.write(COMMAND, &0u16.to_le_bytes());
        intx.update(&mut config);
        intx.set_pending(&mut config, true); // no change, no extra edge
        intx.set_pending(&mut config, false);
        assert_eq!(config.read_u16(STATUS) & STATUS_INTERRUPT, 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true, false]);
    }

    #[test]
    fn interrupt_status_and_pin_are_read_only_to_the_guest() {
        let mut config = PciConfig::new(PciIds::default());
        let mut intx = Intx::add_to(&mut config, 16, Arc::new(RecordingLine::default()));
        intx.set_pending(&mut config, true);
        config.write(STATUS, &0xffffu16.to_le_bytes());
        assert_ne!(config.read_u16(STATUS) & STATUS_INTERRUPT, 0);
        config.write(INTERRUPT_PIN, &[4]);
        let mut pin = [0u8];
        config.read(INTERRUPT_PIN, &mut pin);
        assert_eq!(pin, [PIN_INTA]);
    }
}
