//! The trait every PCI function implements to sit on a [`super::PciBus`].

use std::sync::{Arc, Mutex};

use super::{ConfigWriteEffects, PciFunction, PowerState};

/// A PCI function as the bus sees it. Configuration accesses have default
/// implementations over the embedded [`PciFunction`]; a device implements
/// its BAR accesses and, if it opted into power management, reacts to
/// power transitions.
pub trait PciDevice: Send {
    fn function(&self) -> &PciFunction;
    fn function_mut(&mut self) -> &mut PciFunction;

    /// Reads configuration space at `offset` (0..256).
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.function().read(offset, data);
    }

    /// Writes configuration space; calls [`PciDevice::power_transition`] on a
    /// D0 <-> D3hot change and returns the effects for the bus (BAR moves).
    fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigWriteEffects {
        let effects = self.function_mut().write(offset, data);
        if let Some((from, to)) = effects.power {
            self.power_transition(from, to);
        }
        effects
    }

    /// The guest moved the function between D0 and D3hot. Runs on the vCPU
    /// thread that wrote PMCSR (a resume path: NOIO scope is the VMM's to set).
    fn power_transition(&mut self, _from: PowerState, _to: PowerState) {}

    /// Reads `data.len()` bytes at `offset` inside BAR `index`.
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` inside BAR `index`.
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]);
}

/// A PCI function shared between the PCI bus (configuration) and its BAR
/// regions on the MMIO bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;
