//! Interrupt routing on KVM: the VM-wide GSI routing table and, per PCI
//! function, an [`MsiRouter`] that gives each MSI-X vector a GSI and an irqfd.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every change goes
//! through one [`GsiRouting`] that keeps the legacy irqchip routes (GSIs
//! 0-23, as KVM sets them up by default) next to the MSI routes.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::pci::{IrqLevel, MsiMessage, MsiRouter};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::mptable::IOAPIC_PINS;

/// First GSI handed out for MSI routes, after the IOAPIC pins.
const FIRST_MSI_GSI: u32 = IOAPIC_PINS as u32;
/// KVM's default routing table size limit is 4096 entries on x86.
const MAX_GSI: u32 = 4095;

fn to_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The default x86 routes: ISA IRQs 0-15 to both PICs and the IOAPIC (IRQ 2
/// is the cascade, not routed to the PIC), IOAPIC pins 16-23 alone.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..u32::from(IOAPIC_PINS) {
        if gsi < 8 && gsi != 2 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if (8..16).contains(&gsi) {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

/// The VM's GSI routing table.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<RoutingState>,
}

struct RoutingState {
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

impl GsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(RoutingState {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }
    }

    /// Reserves `n` consecutive GSIs for MSI routes.
    pub fn allocate(&self, n: u32) -> io::Result<Vec<u32>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = st.next_gsi;
        match first.checked_add(n) {
            Some(end) if end <= MAX_GSI + 1 => {
                st.next_gsi = end;
                Ok((first..end).collect())
            }
            _ => Err(io::Error::other("out of GSIs for MSI routes")),
        }
    }

    /// Points `gsi` at an MSI message and commits the table.
    pub fn set_msi(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msg.address as u32;
        e.u.msi.address_hi = (msg.address >> 32) as u32;
        e.u.msi.data = msg.data;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.msi.insert(gsi, e);
        let mut all = legacy_routes();
        all.extend(st.msi.values().copied());
        let table = KvmIrqRouting::from_entries(&all)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        // Committed under the lock so two updates cannot race each other.
        self.vm.set_gsi_routing(&table).map_err(to_io)
    }
}

/// MSI-X delivery for one PCI function: vector i → GSI → irqfd.
pub struct KvmMsiRouter {
    routing: Arc<GsiRouting>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiRouter {
    /// Allocates a GSI and an irqfd for each of `vectors` vectors.
    pub fn new(vm: &VmFd, routing: Arc<GsiRouting>, vectors: u16) -> io::Result<Self> {
        let gsis = routing.allocate(u32::from(vectors))?;
        let mut v = Vec::with_capacity(gsis.len());
        for gsi in gsis {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.register_irqfd(&fd, gsi).map_err(to_io)?;
            v.push((gsi, fd));
        }
        Ok(Self {
            routing,
            vectors: v,
        })
    }

    fn vector(&self, vector: u16) -> io::Result<&(u32, EventFd)> {
        self.vectors
            .get(usize::from(vector))
            .ok_or_else(|| io::Error::other(format!("MSI-X vector {vector} out of range")))
    }
}

impl MsiRouter for KvmMsiRouter {
    fn set_route(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
        let (gsi, _) = self.vector(vector)?;
        self.routing.set_msi(*gsi, msg)
    }

    fn fire(&self, vector: u16) -> io::Result<()> {
        self.vector(vector)?.1.write(1)
    }
}

/// An IOAPIC input driven with `KVM_IRQ_LINE`: a PCI function's INTx pin.
/// The level is the pin's logical assertion (KVM's IOAPIC applies the
/// polarity the guest programmed).
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        Self { vm, gsi }
    }
}

impl IrqLevel for KvmIrqLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, asserted) {
            log::warn!("KVM_IRQ_LINE gsi {} level {asserted}: {e}", self.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_kvm_defaults() {
        let r = legacy_routes();
        // 16 ISA IRQs on the IOAPIC + 15 on the PICs (not the cascade) + 8 IOAPIC-only.
        assert_eq!(r.len(), 16 + 15 + 8);
        // SAFETY: every entry built by legacy_routes is an irqchip route, so
        // the irqchip member of the union is the initialised one.
        let com1: Vec<_> = r
            .iter()
            .filter(|e| e.gsi == 4)
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert_eq!(
            com1,
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        // SAFETY: as above, all entries are irqchip routes.
        let gsi2: Vec<_> = r
            .iter()
            .filter(|e| e.gsi == 2)
            .map(|e| unsafe { e.u.irqchip.irqchip })
            .collect();
        assert_eq!(
            gsi2,
            vec![KVM_IRQCHIP_IOAPIC],
            "the cascade is not routed to the PIC"
        );
    }
}
