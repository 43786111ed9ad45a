//! One PCI function: its configuration space plus the capabilities whose
//! registers have side effects (MSI-X control, PMCSR), and BAR relocation
//! tracking. Device models embed a [`PciFunction`] and delegate to it.

use std::sync::Arc;

use super::intx::{IntxPin, IrqLevel, PIN_INTA, STATUS_INTERRUPT};
use super::msix::{Msix, MSIX_CAP_CONTROL};
use super::pm::{PmCapability, PmOptions, PowerState};
use super::{
    PciConfig, PciError, BAR0, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEMORY_SPACE, INTERRUPT_LINE,
    NUM_BARS, STATUS,
};

/// A BAR the guest moved to a new address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub index: u8,
    pub old: u64,
    pub new: u64,
    pub size: u64,
}

/// Side effects of a configuration write that the device or the VMM must act on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigWriteEffects {
    /// A D0 <-> D3hot transition: (from, to).
    pub power: Option<(PowerState, PowerState)>,
    /// BARs whose MMIO registration must move.
    pub bar_moves: Vec<BarMove>,
}

/// Configuration space of a function and its stateful capabilities.
pub struct PciFunction {
    config: PciConfig,
    msix: Option<(u8, Msix)>,
    intx: Option<Arc<IntxPin>>,
    pm: Option<PmCapability>,
    /// Last real (non-sizing) address of each BAR.
    committed: [Option<u64>; NUM_BARS],
}

impl PciFunction {
    pub fn new(config: PciConfig) -> Self {
        Self {
            config,
            msix: None,
            intx: None,
            pm: None,
            committed: [None; NUM_BARS],
        }
    }

    /// Adds the MSI-X capability for `msix`.
    pub fn add_msix(&mut self, msix: Msix) -> Result<(), PciError> {
        let off = msix.add_to(&mut self.config)?;
        self.msix = Some((off, msix));
        Ok(())
    }

    /// Adds an INTA# pin wired to interrupt input `irq` through `line`
    /// (Interrupt Line reads `irq`, as firmware would have written it).
    /// The device raises and lowers it through the returned pin, usually
    /// by way of a [`super::PciInterrupt`].
    pub fn add_intx(&mut self, irq: u8, line: Arc<dyn IrqLevel>) -> Arc<IntxPin> {
        self.config.set_interrupt_pin(PIN_INTA);
        self.config.set_bytes(INTERRUPT_LINE, &[irq]);
        let pin = IntxPin::new(line);
        self.intx = Some(pin.clone());
        pin
    }

    /// Opts into PCI power management.
    pub fn add_power_management(&mut self, options: PmOptions) -> Result<(), PciError> {
        self.pm = Some(PmCapability::add_to(&mut self.config, options)?);
        Ok(())
    }

    pub fn config(&self) -> &PciConfig {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    pub fn msix(&self) -> Option<&Msix> {
        self.msix.as_ref().map(|(_, m)| m)
    }

    pub fn power_state(&self) -> PowerState {
        self.pm.as_ref().map_or(PowerState::D0, PmCapability::state)
    }

    /// (PME_En, PME_Status) of the PM capability; both false without one.
    pub fn pme_bits(&self) -> (bool, bool) {
        match &self.pm {
            Some(pm) => pm.pme_bits(&self.config),
            None => (false, false),
        }
    }

    /// Signals PME (see [`PmCapability::request_pme`]); false without PM.
    pub fn request_pme(&mut self) -> bool {
        match &self.pm {
            Some(pm) => pm.request_pme(&mut self.config),
            None => false,
        }
    }

    /// Programs BAR `index` from the host side (allocation).
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)?;
        self.committed[usize::from(index)] = Some(addr);
        Ok(())
    }

    /// Whether BAR accesses are decoded: Memory Space enabled and in D0
    /// (a function in D3hot answers configuration accesses only, PM §5.3.1.4).
    pub fn bar_access_allowed(&self) -> bool {
        self.config.command() & COMMAND_MEMORY_SPACE != 0 && self.power_state() == PowerState::D0
    }

    pub fn read(&self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        // Status.Interrupt Status lives in the pin (set from any thread).
        if let Some(pin) = &self.intx {
            let at = STATUS as isize - offset as isize;
            if let Some(b) = usize::try_from(at).ok().and_then(|i| data.get_mut(i)) {
                let bit = STATUS_INTERRUPT as u8;
                *b = if pin.pending() { *b | bit } else { *b & !bit };
            }
        }
    }

    /// Applies a guest configuration write and reports its side effects.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> ConfigWriteEffects {
        self.config.write(offset, data);
        let end = offset.saturating_add(data.len());
        let touches = |start: usize, len: usize| offset < start + len && start < end;
        let mut effects = ConfigWriteEffects::default();

        if let Some((cap, msix)) = &self.msix {
            let ctrl = usize::from(*cap) + MSIX_CAP_CONTROL;
            if touches(ctrl, 2) {
                msix.set_control(self.config.read_u16(ctrl));
                // The pin goes quiet when the guest switches to MSI-X.
                if let (true, Some(pin)) = (msix.enabled(), &self.intx) {
                    pin.set_pending(false);
                }
            }
        }
        if let Some(pin) = &self.intx {
            if touches(COMMAND, 2) {
                pin.set_disabled(self.config.command() & COMMAND_INTX_DISABLE != 0);
            }
        }
        if let Some(pm) = &mut self.pm {
            if pm.touches_pmcsr(offset, data.len()) {
                effects.power = pm.after_write(&mut self.config);
            }
        }
        if touches(BAR0, 4 * NUM_BARS) {
            let bars: Vec<_> = self.config.bars().collect();
            for bar in bars {
                let i = bar.index;
                let Some(new) = self.config.bar_address(i) else {
                    continue;
                };
                if self.config.bar_is_sizing(i) {
                    continue;
                }
                let slot = &mut self.committed[usize::from(i)];
                if let Some(old) = *slot {
                    if old != new {
                        effects.bar_moves.push(BarMove {
                            index: i,
                            old,
                            new,
                            size: bar.size,
                        });
                    }
                }
                *slot = Some(new);
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::test_router::RecordingRouter;
    use crate::pci::msix::MsixLayout;
    use crate::pci::{BarKind, BarSpec, PciIds, COMMAND};
    use std::sync::Arc;

    fn function() -> (PciFunction, Arc<RecordingRouter>) {
        let mut c = PciConfig::new(PciIds::default());
        c.add_bar(BarSpec {
            index: 0,
            size: 0x1000,
            kind: BarKind::Mem32,
        })
        .unwrap();
        let mut f = PciFunction::new(c);
        let router = Arc::new(RecordingRouter::default());
        let layout = MsixLayout {
            vectors: 2,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        };
        f.add_msix(Msix::new(layout, router.clone()).unwrap())
            .unwrap();
        f.add_power_management(PmOptions::default()).unwrap();
        f.set_bar_address(0, 0xe000_0000).unwrap();
        (f, router)
    }

    #[test]
    fn sizing_is_not_a_move_but_reprogramming_is() {
        let (mut f, _) = function();
        let e = f.write(0x10, &[0xff; 4]);
        assert!(e.bar_moves.is_empty(), "sizing pattern is not an address");
        let e = f.write(0x10, &0xe000_0000u32.to_le_bytes());
        assert!(
            e.bar_moves.is_empty(),
            "restoring the same address is no move"
        );
        let e = f.write(0x10, &0xe001_0000u32.to_le_bytes());
        assert_eq!(
            e.bar_moves,
            vec![BarMove {
                index: 0,
                old: 0xe000_0000,
                new: 0xe001_0000,
                size: 0x1000
            }]
        );
    }

    #[test]
    fn msix_control_and_pm_reach_their_state() {
        let (mut f, router) = function();
        let msix_cap = 0x40;
        f.msix().unwrap().write_table(12, &0u32.to_le_bytes());
        f.write(msix_cap + 2, &0x8000u16.to_le_bytes());
        assert!(f.msix().unwrap().enabled());
        f.msix().unwrap().trigger(0);
        assert_eq!(router.fired(), vec![0]);
        // Memory decoding follows the command register and the power state.
        assert!(!f.bar_access_allowed());
        f.write(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(f.bar_access_allowed());
        let pmcsr = 0x4c + 4;
        let e = f.write(pmcsr, &3u16.to_le_bytes());
        assert_eq!(e.power, Some((PowerState::D0, PowerState::D3Hot)));
        assert!(!f.bar_access_allowed(), "no BAR decoding in D3hot");
        let e = f.write(pmcsr, &0u16.to_le_bytes());
        assert_eq!(e.power, Some((PowerState::D3Hot, PowerState::D0)));
        assert!(
            f.bar_access_allowed(),
            "No_Soft_Reset: state kept across D3hot"
        );
    }

    #[test]
    fn intx_pin_shows_in_status_and_follows_interrupt_disable_and_msix() {
        use crate::pci::intx::tests::RecordingLine;
        use crate::pci::intx::INTERRUPT_PIN;
        let (mut f, _router) = function();
        let line = Arc::new(RecordingLine::default());
        let pin = f.add_intx(21, line.clone());
        let mut b = [0u8; 2];
        f.read(INTERRUPT_LINE, &mut b);
        assert_eq!(b, [21, PIN_INTA]);
        f.write(INTERRUPT_PIN, &[3]);
        f.read(INTERRUPT_PIN, &mut b[..1]);
        assert_eq!(b[0], PIN_INTA, "Interrupt Pin is read-only");

        pin.set_pending(true);
        let mut st = [0u8; 4];
        f.read(COMMAND, &mut st);
        assert_ne!(u16::from_le_bytes([st[2], st[3]]) & STATUS_INTERRUPT, 0);
        f.write(COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
        assert!(!pin.asserted());
        f.write(COMMAND, &0u16.to_le_bytes());
        assert!(pin.asserted());
        // Enabling MSI-X drops the pin.
        let cap = f.msix.as_ref().unwrap().0 as usize;
        f.write(
            cap + MSIX_CAP_CONTROL,
            &crate::pci::msix::MSIX_CTRL_ENABLE.to_le_bytes(),
        );
        assert!(!pin.asserted());
        f.read(STATUS, &mut st[..2]);
        assert_eq!(u16::from_le_bytes([st[0], st[1]]) & STATUS_INTERRUPT, 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true, false]);
    }
}
