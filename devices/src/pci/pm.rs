//! PCI Power Management capability (PCI Bus Power Management Interface
//! Specification 1.2, "PM §"): D0 and D3hot, PME from D3hot, PME_Status RW1C.
//!
//! Any function can opt in with [`PmCapability::add_to`]. The function tells
//! its device about D0 <-> D3hot transitions through
//! [`super::ConfigWriteEffects::power`], so a device (the xHCI controller, for
//! one) can quiesce on D3hot and resume on D0.

use super::{Capability, PciConfig, PciError, CAP_ID_POWER_MANAGEMENT};

/// Offsets inside the capability (PM §3.2).
pub const PM_PMC: usize = 2;
pub const PM_PMCSR: usize = 4;

/// PMC Version field value for PM 1.2 (PM §3.2.3).
pub const PMC_VERSION_1_2: u16 = 0b011;
/// PMC PME_Support bit for D0 (PM §3.2.3, bit 11).
pub const PMC_PME_D0: u16 = 1 << 11;
/// PMC PME_Support bit for D3hot (PM §3.2.3, bit 14).
pub const PMC_PME_D3HOT: u16 = 1 << 14;

/// PMCSR PowerState field (PM §3.2.4, bits 1:0).
pub const PMCSR_POWER_STATE: u16 = 0b11;
/// PMCSR No_Soft_Reset (PM §3.2.4, bit 3): D3hot -> D0 keeps device state.
pub const PMCSR_NO_SOFT_RESET: u16 = 1 << 3;
/// PMCSR PME_En (PM §3.2.4, bit 8).
pub const PMCSR_PME_EN: u16 = 1 << 8;
/// PMCSR PME_Status (PM §3.2.4, bit 15), write 1 to clear.
pub const PMCSR_PME_STATUS: u16 = 1 << 15;

/// Device power states a function can be in. D1 and D2 are not supported:
/// a write of those values is completed and discarded (PM §3.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    D0,
    D3Hot,
}

impl PowerState {
    fn bits(self) -> u16 {
        match self {
            PowerState::D0 => 0b00,
            PowerState::D3Hot => 0b11,
        }
    }
}

/// What a function advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmOptions {
    /// PME can be signalled from D3hot (and D0).
    pub pme: bool,
    /// No_Soft_Reset: going D3hot -> D0 keeps the device's state.
    pub no_soft_reset: bool,
}

impl Default for PmOptions {
    fn default() -> Self {
        Self {
            pme: true,
            no_soft_reset: true,
        }
    }
}

/// The power management capability of one function.
#[derive(Debug, Clone)]
pub struct PmCapability {
    offset: u8,
    state: PowerState,
    options: PmOptions,
}

impl PmCapability {
    /// Adds the capability to `config`.
    pub fn add_to(config: &mut PciConfig, options: PmOptions) -> Result<Self, PciError> {
        let mut pmc = PMC_VERSION_1_2;
        if options.pme {
            pmc |= PMC_PME_D0 | PMC_PME_D3HOT;
        }
        let mut pmcsr = PowerState::D0.bits();
        if options.no_soft_reset {
            pmcsr |= PMCSR_NO_SOFT_RESET;
        }
        let mut body = [0u8; 6];
        body[0..2].copy_from_slice(&pmc.to_le_bytes());
        body[2..4].copy_from_slice(&pmcsr.to_le_bytes());
        let mut writable = [0u8; 6];
        let pmcsr_writable = PMCSR_POWER_STATE | if options.pme { PMCSR_PME_EN } else { 0 };
        writable[2..4].copy_from_slice(&pmcsr_writable.to_le_bytes());
        let mut rw1c = [0u8; 6];
        if options.pme {
            rw1c[2..4].copy_from_slice(&PMCSR_PME_STATUS.to_le_bytes());
        }
        let offset = config.add_capability(&Capability {
            id: CAP_ID_POWER_MANAGEMENT,
            body: &body,
            writable: &writable,
            rw1c: &rw1c,
        })?;
        Ok(Self {
            offset,
            state: PowerState::D0,
            options,
        })
    }

    pub fn offset(&self) -> u8 {
        self.offset
    }

    pub fn state(&self) -> PowerState {
        self.state
    }

    fn pmcsr_offset(&self) -> usize {
        usize::from(self.offset) + PM_PMCSR
    }

    /// Whether a config write at `[offset, offset + len)` touched PMCSR.
    pub fn touches_pmcsr(&self, offset: usize, len: usize) -> bool {
        let p = self.pmcsr_offset();
        offset < p + 2 && p < offset.saturating_add(len)
    }

    /// Called after a guest write touched PMCSR: accepts D0/D3hot, discards
    /// D1/D2, and returns the transition if the state changed.
    pub fn after_write(&mut self, config: &mut PciConfig) -> Option<(PowerState, PowerState)> {
        let p = self.pmcsr_offset();
        let new = match config.read_u16(p) & PMCSR_POWER_STATE {
            0b00 => PowerState::D0,
            0b11 => PowerState::D3Hot,
            _ => {
                // Unsupported state: the write completes, the data is discarded.
                config.set_bits_u16(p, self.state.bits(), PMCSR_POWER_STATE);
                return None;
            }
        };
        let old = self.state;
        self.state = new;
        (old != new).then_some((old, new))
    }

    /// A device wants to signal a wake event. Sets PME_Status when PME is
    /// supported, and returns whether PME_En is set, i.e. whether the caller
    /// should signal the wake to the platform.
    pub fn request_pme(&self, config: &mut PciConfig) -> bool {
        if !self.options.pme {
            return false;
        }
        let p = self.pmcsr_offset();
        config.set_bits_u16(p, PMCSR_PME_STATUS, 0);
        config.read_u16(p) & PMCSR_PME_EN != 0
    }

    /// (PME_En, PME_Status) as the guest sees them.
    pub fn pme_bits(&self, config: &PciConfig) -> (bool, bool) {
        let v = config.read_u16(self.pmcsr_offset());
        (v & PMCSR_PME_EN != 0, v & PMCSR_PME_STATUS != 0)
    }

    /// PME_Status as the guest sees it.
    pub fn pme_status(&self, config: &PciConfig) -> bool {
        config.read_u16(self.pmcsr_offset()) & PMCSR_PME_STATUS != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciIds;

    fn setup(options: PmOptions) -> (PciConfig, PmCapability, usize) {
        let mut c = PciConfig::new(PciIds::default());
        let pm = PmCapability::add_to(&mut c, options).unwrap();
        let p = usize::from(pm.offset()) + PM_PMCSR;
        (c, pm, p)
    }

    fn write_pmcsr(
        c: &mut PciConfig,
        pm: &mut PmCapability,
        p: usize,
        v: u16,
    ) -> Option<(PowerState, PowerState)> {
        c.write(p, &v.to_le_bytes());
        assert!(pm.touches_pmcsr(p, 2));
        pm.after_write(c)
    }

    #[test]
    fn advertises_d3hot_pme_and_no_soft_reset() {
        let (c, pm, p) = setup(PmOptions::default());
        let off = usize::from(pm.offset());
        assert_eq!(c.read_u16(off) & 0xff, u16::from(CAP_ID_POWER_MANAGEMENT));
        let pmc = c.read_u16(off + PM_PMC);
        assert_eq!(pmc & 0b111, PMC_VERSION_1_2);
        assert_ne!(pmc & PMC_PME_D3HOT, 0);
        assert_eq!(pmc & (1 << 9 | 1 << 10), 0, "no D1/D2 support");
        assert_eq!(c.read_u16(p), PMCSR_NO_SOFT_RESET);
    }

    #[test]
    fn d0_d3hot_transitions_and_unsupported_states_discarded() {
        let (mut c, mut pm, p) = setup(PmOptions::default());
        assert_eq!(
            write_pmcsr(&mut c, &mut pm, p, 0b11),
            Some((PowerState::D0, PowerState::D3Hot))
        );
        assert_eq!(pm.state(), PowerState::D3Hot);
        // Same state again: no transition reported.
        assert_eq!(write_pmcsr(&mut c, &mut pm, p, 0b11), None);
        // D1 and D2 are unsupported: the field keeps D3hot.
        assert_eq!(write_pmcsr(&mut c, &mut pm, p, 0b01), None);
        assert_eq!(c.read_u16(p) & PMCSR_POWER_STATE, 0b11);
        assert_eq!(write_pmcsr(&mut c, &mut pm, p, 0b10), None);
        assert_eq!(pm.state(), PowerState::D3Hot);
        // Read-only No_Soft_Reset survives a write of 0.
        assert_eq!(
            write_pmcsr(&mut c, &mut pm, p, 0),
            Some((PowerState::D3Hot, PowerState::D0))
        );
        assert_eq!(c.read_u16(p), PMCSR_NO_SOFT_RESET);
        // A write elsewhere does not touch PMCSR.
        assert!(!pm.touches_pmcsr(p + 2, 2));
        assert!(pm.touches_pmcsr(p - 1, 2));
    }

    #[test]
    fn pme_status_is_rw1c_and_pme_en_is_reported() {
        let (mut c, mut pm, p) = setup(PmOptions::default());
        assert!(!pm.request_pme(&mut c), "PME_En clear: no wake signalled");
        assert!(pm.pme_status(&c));
        // Writing 0 keeps it, writing 1 clears it.
        write_pmcsr(&mut c, &mut pm, p, PMCSR_PME_EN);
        assert!(pm.pme_status(&c));
        write_pmcsr(&mut c, &mut pm, p, PMCSR_PME_EN | PMCSR_PME_STATUS);
        assert!(!pm.pme_status(&c));
        assert_eq!(c.read_u16(p) & PMCSR_PME_EN, PMCSR_PME_EN);
        assert!(pm.request_pme(&mut c), "PME_En set: caller signals wake");
        // Without PME support nothing is set and PME_En is read-only.
        let (mut c2, mut pm2, p2) = setup(PmOptions {
            pme: false,
            no_soft_reset: false,
        });
        write_pmcsr(&mut c2, &mut pm2, p2, PMCSR_PME_EN | PMCSR_PME_STATUS);
        assert_eq!(c2.read_u16(p2), 0);
        assert!(!pm2.request_pme(&mut c2));
        assert!(!pm2.pme_status(&c2));
    }
}
