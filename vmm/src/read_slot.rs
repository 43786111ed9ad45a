//! A read-only KVM memory slot over an MMIO range whose reads the device
//! model can answer ahead of time (the xHCI register space, published
//! through `ReadShadow`, and the doorbell array, which reads 0): guest reads
//! are served from the mapping with no exit, and writes still exit because
//! the slot is KVM_MEM_READONLY (KVM treats them as MMIO: ioeventfds first,
//! then a KVM_EXIT_MMIO to the VMM's bus). The VMM writes the published
//! register values into its own (writable) view of the same pages.

use std::io;
use std::sync::Mutex;

use devices::xhci::ReadShadow;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

/// First KVM memory slot number for device ranges (guest RAM takes slots
/// from 0, at most two on x86_64: below and above the MMIO hole).
pub const DEVICE_SLOT_BASE: u32 = 16;

/// Anonymous shared pages (zero-filled at first) backing one read-only slot.
pub struct ReadSlot {
    slot: u32,
    /// Where the slot starts within its BAR (`store` takes BAR offsets).
    bar_offset: u64,
    host: *mut libc::c_void,
    len: usize,
    /// Guest address of the slot, `None` while not mapped.
    at: Mutex<Option<u64>>,
}

// SAFETY: `host` is an anonymous mapping owned by this struct, written only
// through `store` with aligned volatile dword writes (the guest reads it
// concurrently, as it would read a register); `at` is behind a mutex.
unsafe impl Send for ReadSlot {}
// SAFETY: as above.
unsafe impl Sync for ReadSlot {}

impl ReadSlot {
    /// `len` bytes (a multiple of the page size) for memory slot `slot`,
    /// covering a BAR from `bar_offset`.
    pub fn new(slot: u32, bar_offset: u64, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared anonymous mapping; the result is checked.
        // Shared, so the pages KVM maps for the guest are the ones `store`
        // writes (no copy-on-write split).
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            slot,
            bar_offset,
            host,
            len,
            at: Mutex::new(None),
        })
    }

    fn set(&self, vm: &VmFd, gpa: u64, size: u64) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.host as u64,
            flags: KVM_MEM_READONLY,
        };
        // SAFETY: `host` maps `len` bytes (>= size) that stay mapped for as
        // long as this struct lives; the device manager and the device keep
        // Arcs of it until after the vCPUs are joined, and KVM never writes
        // through a read-only slot.
        unsafe { vm.set_user_memory_region(region) }
    }

    /// Maps the slot at guest address `gpa`, replacing an earlier mapping.
    pub fn map_at(&self, vm: &VmFd, gpa: u64) -> Result<(), kvm_ioctls::Error> {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if at.take().is_some() {
            // Size 0 deletes the slot (KVM API: KVM_SET_USER_MEMORY_REGION).
            self.set(vm, 0, 0)?;
        }
        self.set(vm, gpa, self.len as u64)?;
        *at = Some(gpa);
        Ok(())
    }

    /// Where the slot starts within its BAR.
    pub fn bar_offset(&self) -> u64 {
        self.bar_offset
    }
}

impl ReadShadow for ReadSlot {
    /// `offset` is a BAR offset; stores outside the slot or unaligned are
    /// ignored.
    fn store(&self, offset: u64, value: u32) {
        let Some(Ok(off)) = offset.checked_sub(self.bar_offset).map(usize::try_from) else {
            return;
        };
        if off % 4 != 0 || off.checked_add(4).is_none_or(|end| end > self.len) {
            return;
        }
        // SAFETY: off + 4 <= len and off is 4-aligned inside a page-aligned
        // mapping of `len` bytes owned by this struct.
        unsafe {
            self.host
                .cast::<u8>()
                .add(off)
                .cast::<u32>()
                .write_volatile(value);
        }
    }
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe {
            libc::munmap(self.host, self.len);
        }
    }
}
