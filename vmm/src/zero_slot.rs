//! A read-only KVM memory slot of zeroes over an MMIO range whose reads
//! always return 0 (the xHCI doorbell array): guest reads are served from
//! the mapping with no exit, and writes still exit because the slot is
//! KVM_MEM_READONLY (KVM treats them as MMIO: ioeventfds first, then a
//! KVM_EXIT_MMIO to the VMM's bus).

use std::io;
use std::sync::Mutex;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

/// First KVM memory slot number for device ranges (guest RAM takes slots
/// from 0, at most two on x86_64: below and above the MMIO hole).
pub const DEVICE_SLOT_BASE: u32 = 16;

/// Anonymous, read-only, zero-filled pages backing one slot.
pub struct ZeroSlot {
    slot: u32,
    host: *mut libc::c_void,
    len: usize,
    /// Guest address of the slot, `None` while not mapped.
    at: Mutex<Option<u64>>,
}

// SAFETY: `host` is an immutable anonymous mapping owned by this struct;
// the only mutable state is `at`, behind a mutex.
unsafe impl Send for ZeroSlot {}
// SAFETY: as above.
unsafe impl Sync for ZeroSlot {}

impl ZeroSlot {
    /// `len` bytes (a multiple of the page size) for memory slot `slot`.
    pub fn new(slot: u32, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            slot,
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
        // long as this struct lives; the device manager keeps it (and the
        // BAR listener an Arc of it) until after the vCPUs are joined, and
        // KVM never writes through a read-only slot.
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

    /// Where the slot is mapped.
    pub fn address(&self) -> Option<u64> {
        *self.at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ZeroSlot {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe {
            libc::munmap(self.host, self.len);
        }
    }
}
