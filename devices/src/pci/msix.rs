//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the
//! pending bit array in a BAR, per-vector and function masking.
//!
//! Delivery is the VMM's: it implements [`MsiRouter`]. In KVM terms
//! `set_route` writes the vector's entry (`KVM_IRQ_ROUTING_MSI` with the
//! address/data pair) into the VM's GSI routing table and issues
//! `KVM_SET_GSI_ROUTING`, with an irqfd already bound to that GSI
//! (`KVM_IRQFD`); `fire` writes that irqfd. The device model decides *whether*
//! to fire: a masked vector sets its pending bit instead, and unmasking a
//! vector with its pending bit set clears the bit and fires.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Capability, PciError, CAP_ID_MSIX};
use crate::interrupt::Interrupt;

/// Bytes per table entry (§6.8.2.6).
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Largest table the 11-bit Table Size field can describe (§6.8.2.3).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message Control: Function Mask (§6.8.2.3).
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: MSI-X Enable (§6.8.2.3).
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// Vector Control: Mask Bit (§6.8.2.9).
pub const MSIX_VECTOR_MASKED: u32 = 1;
/// Offset of Message Control inside the capability.
pub const MSIX_CAP_CONTROL: usize = 2;

/// The address/data pair the guest programmed into a table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// What the VMM provides to deliver MSI-X vectors of one function.
pub trait MsiRouter: Send + Sync {
    /// Points `vector` at `msg` (KVM: GSI routing entry + `KVM_SET_GSI_ROUTING`).
    /// Called when a vector becomes deliverable or its message changes while
    /// deliverable; not called for masked vectors.
    fn set_route(&self, vector: u16, msg: MsiMessage) -> io::Result<()>;
    /// Delivers `vector` through its route (KVM: write the vector's irqfd).
    fn fire(&self, vector: u16) -> io::Result<()>;
}

/// Where the table and PBA live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub table_bar: u8,
    /// Offset of the table in its BAR, 8-byte aligned.
    pub table_offset: u64,
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR, 8-byte aligned.
    pub pba_offset: u64,
}

impl MsixLayout {
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// PBA length: one bit per vector in whole QWORDs (§6.8.2.10).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & MSIX_VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector is masked after reset (§6.8.2.9).
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: MSIX_VECTOR_MASKED,
        }
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    /// Route last handed to the router per vector.
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
    /// Triggers dropped because MSI-X was disabled (no INTx fallback here).
    dropped: u64,
}

struct Shared {
    layout: MsixLayout,
    state: Mutex<State>,
    router: Arc<dyn MsiRouter>,
}

/// The MSI-X state of one function, shared by the configuration path (vCPU
/// thread), the BAR path (vCPU thread) and the device's workers (triggers).
#[derive(Clone)]
pub struct Msix {
    shared: Arc<Shared>,
}

impl Msix {
    pub fn new(layout: MsixLayout, router: Arc<dyn MsiRouter>) -> Result<Self, PciError> {
        if layout.vectors == 0 || layout.vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixVectors(layout.vectors));
        }
        let n = usize::from(layout.vectors);
        Ok(Self {
            shared: Arc::new(Shared {
                layout,
                state: Mutex::new(State {
                    entries: vec![Entry::default(); n],
                    pending: vec![0; n.div_ceil(64)],
                    routed: vec![None; n],
                    enabled: false,
                    function_masked: false,
                    dropped: 0,
                }),
                router,
            }),
        })
    }

    pub fn layout(&self) -> MsixLayout {
        self.shared.layout
    }

    /// Capability bytes for [`super::PciConfig::add_capability`]: Table Size
    /// read-only, Function Mask and Enable writable, offsets/BIRs read-only.
    pub fn capability_body(&self) -> ([u8; 10], [u8; 10]) {
        let l = self.shared.layout;
        let ctrl = l.vectors - 1;
        let table = (l.table_offset as u32 & !7) | u32::from(l.table_bar & 7);
        let pba = (l.pba_offset as u32 & !7) | u32::from(l.pba_bar & 7);
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        body[2..6].copy_from_slice(&table.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let mut writable = [0u8; 10];
        writable[0..2].copy_from_slice(&(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// Adds the capability to `config`; returns its offset.
    pub fn add_to(&self, config: &mut super::PciConfig) -> Result<u8, PciError> {
        let (body, writable) = self.capability_body();
        config.add_capability(&Capability {
            id: CAP_ID_MSIX,
            body: &body,
            writable: &writable,
            rw1c: &[],
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a new Message Control value from configuration space.
    pub fn set_control(&self, control: u16) {
        let mut st = self.lock();
        st.enabled = control & MSIX_CTRL_ENABLE != 0;
        st.function_masked = control & MSIX_CTRL_FUNCTION_MASK != 0;
        for v in 0..self.shared.layout.vectors {
            self.deliver_if_unmasked(&mut st, v);
        }
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether `vector` exists and may be used by a device (for virtio's
    /// vector registers, which must read back NO_VECTOR for a bad index).
    pub fn has_vector(&self, vector: u16) -> bool {
        vector < self.shared.layout.vectors
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        let st = self.lock();
        Self::pending_bit(&st, vector)
    }

    /// Triggers dropped because MSI-X was disabled.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn pending_bit(st: &State, v: u16) -> bool {
        st.pending
            .get(usize::from(v / 64))
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(st: &mut State, v: u16, on: bool) {
        if let Some(w) = st.pending.get_mut(usize::from(v / 64)) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn deliverable(st: &State, v: u16) -> bool {
        st.enabled
            && !st.function_masked
            && st.entries.get(usize::from(v)).is_some_and(|e| !e.masked())
    }

    /// Syncs the route of a deliverable vector and flushes its pending bit.
    fn deliver_if_unmasked(&self, st: &mut State, v: u16) {
        if !Self::deliverable(st, v) {
            return;
        }
        self.sync_route(st, v);
        if Self::pending_bit(st, v) {
            Self::set_pending(st, v, false);
            self.fire(v);
        }
    }

    fn sync_route(&self, st: &mut State, v: u16) {
        let i = usize::from(v);
        let msg = st.entries[i].message();
        if st.routed[i] != Some(msg) {
            match self.shared.router.set_route(v, msg) {
                Ok(()) => st.routed[i] = Some(msg),
                Err(e) => log::error!("MSI-X: cannot route vector {v}: {e}"),
            }
        }
    }

    fn fire(&self, v: u16) {
        if let Err(e) = self.shared.router.fire(v) {
            log::error!("MSI-X: cannot fire vector {v}: {e}");
        }
    }

    /// Raises `vector`: fired when deliverable, else left pending (masked) or
    /// dropped (MSI-X disabled).
    pub fn trigger(&self, vector: u16) {
        let mut st = self.lock();
        if vector >= self.shared.layout.vectors {
            log::warn!("MSI-X: trigger of nonexistent vector {vector}");
            return;
        }
        if !st.enabled {
            st.dropped += 1;
            return;
        }
        if Self::deliverable(&st, vector) {
            self.sync_route(&mut st, vector);
            self.fire(vector);
        } else {
            Self::set_pending(&mut st, vector, true);
        }
    }

    /// An [`Interrupt`] backed by this MSI-X state, for device models.
    pub fn interrupt(&self) -> Arc<dyn Interrupt> {
        Arc::new(self.clone())
    }

    /// Handles a BAR read if it falls in the table or PBA; returns whether it did.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let l = self.shared.layout;
        if bar == l.table_bar {
            if let Some(off) = offset
                .checked_sub(l.table_offset)
                .filter(|o| *o < l.table_len())
            {
                self.read_table(off, data);
                return true;
            }
        }
        if bar == l.pba_bar {
            if let Some(off) = offset
                .checked_sub(l.pba_offset)
                .filter(|o| *o < l.pba_len())
            {
                self.read_pba(off, data);
                return true;
            }
        }
        false
    }

    /// Handles a BAR write if it falls in the table or PBA; returns whether it did.
    pub fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> bool {
        let l = self.shared.layout;
        if bar == l.table_bar {
            if let Some(off) = offset
                .checked_sub(l.table_offset)
                .filter(|o| *o < l.table_len())
            {
                self.write_table(off, data);
                return true;
            }
        }
        // The PBA is read-only (§6.8.2.10): writes are claimed and dropped.
        bar == l.pba_bar
            && offset
                .checked_sub(l.pba_offset)
                .is_some_and(|o| o < l.pba_len())
    }

    /// Reads the table at `offset`. DWORD and aligned QWORD accesses are
    /// defined (§6.8.2); anything else reads as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let st = self.lock();
        let dword = |off: u64| -> u32 {
            let Some(e) = st.entries.get((off / MSIX_ENTRY_SIZE) as usize) else {
                return 0;
            };
            match off % MSIX_ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                12 => e.control,
                _ => 0,
            }
        };
        match data.len() {
            4 if offset.is_multiple_of(4) => data.copy_from_slice(&dword(offset).to_le_bytes()),
            8 if offset.is_multiple_of(8) => {
                let v = u64::from(dword(offset)) | u64::from(dword(offset + 4)) << 32;
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }

    /// Writes the table at `offset` (DWORD or aligned QWORD; others ignored).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.write_table_dword(offset, v);
            }
            8 if offset.is_multiple_of(8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                let v = u64::from_le_bytes(b);
                self.write_table_dword(offset, v as u32);
                self.write_table_dword(offset + 4, (v >> 32) as u32);
            }
            _ => log::debug!(
                "MSI-X: ignored {}-byte table write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn write_table_dword(&self, offset: u64, v: u32) {
        let mut st = self.lock();
        let idx = offset / MSIX_ENTRY_SIZE;
        let Some(e) = st.entries.get_mut(idx as usize) else {
            return;
        };
        match offset % MSIX_ENTRY_SIZE {
            // Message Address is DWORD aligned: the low two bits are read-only 0.
            0 => e.addr_lo = v & !3,
            4 => e.addr_hi = v,
            8 => e.data = v,
            // Only the Mask Bit is defined; the rest is reserved (read-only 0).
            12 => e.control = v & MSIX_VECTOR_MASKED,
            _ => return,
        }
        // idx < vectors <= 2048, so it fits in u16.
        self.deliver_if_unmasked(&mut st, idx as u16);
    }

    /// Reads the PBA at `offset` (DWORD or aligned QWORD).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let st = self.lock();
        let Some(&word) = st.pending.get((offset / 8) as usize) else {
            return;
        };
        match data.len() {
            8 if offset.is_multiple_of(8) => data.copy_from_slice(&word.to_le_bytes()),
            4 if offset.is_multiple_of(4) => {
                let half = (word >> ((offset % 8) * 8)) as u32;
                data.copy_from_slice(&half.to_le_bytes());
            }
            _ => {}
        }
    }
}

impl Interrupt for Msix {
    fn trigger(&self, vector: u16) {
        Msix::trigger(self, vector);
    }
}

/// A router that records what it was asked to do, for tests of any device
/// (and the fuzz crate in ../fuzz).
#[cfg(any(test, feature = "test-utils"))]
pub mod test_router {
    use super::*;

    #[derive(Default)]
    pub struct RecordingRouter {
        pub routes: Mutex<Vec<(u16, MsiMessage)>>,
        pub fired: Mutex<Vec<u16>>,
    }

    impl RecordingRouter {
        pub fn fired(&self) -> Vec<u16> {
            self.fired.lock().unwrap().clone()
        }
        pub fn take_fired(&self) -> Vec<u16> {
            std::mem::take(&mut *self.fired.lock().unwrap())
        }
    }

    impl MsiRouter for RecordingRouter {
        fn set_route(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
            self.routes.lock().unwrap().push((vector, msg));
            Ok(())
        }
        fn fire(&self, vector: u16) -> io::Result<()> {
            self.fired.lock().unwrap().push(vector);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_router::RecordingRouter;
    use super::*;
    use crate::pci::{PciConfig, PciIds};

    fn msix(vectors: u16) -> (Msix, Arc<RecordingRouter>) {
        let router = Arc::new(RecordingRouter::default());
        let layout = MsixLayout {
            vectors,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x800,
        };
        (Msix::new(layout, router.clone()).unwrap(), router)
    }

    fn program(m: &Msix, v: u16, addr: u64, data: u32) {
        let base = u64::from(v) * 16;
        m.write_table(base, &(addr as u32).to_le_bytes());
        m.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
    }

    fn read32(m: &Msix, bar: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(m.bar_read(bar, off, &mut b));
        u32::from_le_bytes(b)
    }

    #[test]
    fn capability_exposes_size_and_only_enable_and_mask_are_writable() {
        let (m, _) = msix(3);
        let mut cfg = PciConfig::new(PciIds::default());
        let off = usize::from(m.add_to(&mut cfg).unwrap());
        assert_eq!(cfg.read_u16(off) & 0xff, u16::from(CAP_ID_MSIX));
        cfg.write(off + 2, &0xffffu16.to_le_bytes());
        assert_eq!(cfg.read_u16(off + 2), 0xc002, "table size N-1 read-only");
        cfg.write(off + 4, &[0xff; 8]);
        assert_eq!(cfg.read_u32(off + 4), 1, "table offset 0, BIR 1");
        assert_eq!(cfg.read_u32(off + 8), 0x801, "PBA offset 0x800, BIR 1");
        assert!(Msix::new(m.layout(), Arc::new(RecordingRouter::default())).is_ok());
        let mut bad = m.layout();
        bad.vectors = 0;
        assert!(Msix::new(bad, Arc::new(RecordingRouter::default())).is_err());
    }

    #[test]
    fn vectors_start_masked_and_table_reads_back() {
        let (m, router) = msix(2);
        assert_eq!(read32(&m, 1, 12), 1, "vector 0 masked after reset");
        program(&m, 0, 0xfee0_0003, 0x4041);
        assert_eq!(
            read32(&m, 1, 0),
            0xfee0_0000,
            "low address bits read-only 0"
        );
        assert_eq!(read32(&m, 1, 8), 0x4041);
        m.write_table(12, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(read32(&m, 1, 12), 0, "reserved control bits stay 0");
        // A QWORD read of address lo/hi.
        let mut q = [0u8; 8];
        m.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        // MSI-X still disabled: a trigger is dropped, nothing fires or pends.
        m.trigger(0);
        assert!(router.fired().is_empty());
        assert!(!m.is_pending(0));
        assert_eq!(m.dropped(), 1);
        // Out-of-range and odd accesses are harmless.
        m.write_table(0x1000, &[1, 2, 3, 4]);
        m.write_table(2, &[1, 2]);
        assert!(!m.bar_read(0, 0, &mut q));
        assert!(!m.bar_read(1, 0x900, &mut q));
        m.trigger(7);
    }

    #[test]
    fn masked_vector_pends_and_fires_on_unmask() {
        let (m, router) = msix(2);
        program(&m, 1, 0xfee0_1000, 0x31);
        m.set_control(MSIX_CTRL_ENABLE);
        // Vector 1 still masked: pending, not fired, PBA bit 1 visible.
        m.trigger(1);
        assert!(router.fired().is_empty());
        assert!(m.is_pending(1));
        assert_eq!(read32(&m, 1, 0x800), 0b10);
        // The PBA is read-only.
        assert!(m.bar_write(1, 0x800, &0u32.to_le_bytes()));
        assert_eq!(read32(&m, 1, 0x800), 0b10);
        // Unmask: route programmed, pending fired and cleared.
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(router.fired(), vec![1]);
        assert!(!m.is_pending(1));
        assert_eq!(
            router.routes.lock().unwrap().as_slice(),
            &[(
                1,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x31
                }
            )]
        );
        // Deliverable: fires directly, and the route is not reprogrammed.
        m.trigger(1);
        assert_eq!(router.take_fired(), vec![1, 1]);
        assert_eq!(router.routes.lock().unwrap().len(), 1);
        // Changing data while unmasked reprograms the route.
        m.write_table(16 + 8, &0x32u32.to_le_bytes());
        assert_eq!(router.routes.lock().unwrap().len(), 2);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (m, router) = msix(2);
        program(&m, 0, 0xfee0_0000, 0x20);
        m.write_table(12, &0u32.to_le_bytes());
        m.set_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        m.trigger(0);
        m.trigger(0);
        assert!(router.fired().is_empty());
        assert!(m.is_pending(0));
        // Clearing the function mask delivers once (pending is one bit).
        m.set_control(MSIX_CTRL_ENABLE);
        assert_eq!(router.fired(), vec![0]);
        assert!(!m.is_pending(0));
        // Through the Interrupt trait object.
        let irq = m.interrupt();
        irq.trigger(0);
        assert_eq!(router.fired(), vec![0, 0]);
    }
}
