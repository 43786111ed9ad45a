//! KVM coalesced MMIO (KVM_REGISTER_COALESCED_MMIO): guest writes to
//! registered zones do not exit to the VMM; KVM appends them to a ring page
//! shared with userspace, and the VMM applies them later, in order.
//!
//! The ring belongs to the VM (every vCPU fd maps the same page), so one
//! mapping serves all vCPU threads; a mutex makes them a single consumer.
//! A vCPU drains the ring right after every KVM_RUN return, before it handles
//! the exit: a trapped access therefore always sees the effect of every
//! coalesced write the guest issued before it, on any vCPU that has exited
//! since. Only registers whose writes may be applied late are registered
//! (see `devices::xhci::regs::DEFERRABLE_WRITES` for the analysis).

use std::io;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};

/// Entries applied per drain at most: one ring's worth (the ring holds fewer
/// than a page of entries), so a guest writing in a loop on another vCPU
/// cannot keep a drain going forever.
const DRAIN_LIMIT: usize = 4096 / std::mem::size_of::<kvm_coalesced_mmio>();

/// The VM's coalesced MMIO ring page, mapped from a vCPU fd.
pub struct CoalescedRing {
    page: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// Entries in the ring: KVM_COALESCED_MMIO_MAX for this page size.
    entries: u32,
    consumer: Mutex<()>,
}

// SAFETY: the mapping is plain shared memory that lives until drop; all
// access to it goes through `drain`, serialised by `consumer`, using volatile
// reads/writes and fences as the KVM ring protocol requires.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above; `&self` methods only touch the ring under `consumer`.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring page of `vcpu` (at KVM_COALESCED_MMIO_PAGE_OFFSET pages
    /// into the vCPU fd, kernel Documentation/virt/kvm/api.rst 4.116).
    pub fn map(vcpu: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: sysconf has no memory side effects.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page_size = usize::try_from(page_size).map_err(|_| io::Error::last_os_error())?;
        let offset = libc::off_t::try_from(KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: maps one page of the vCPU fd, shared, at the offset KVM
        // documents for the coalesced MMIO ring; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast()).ok_or_else(io::Error::last_os_error)?;
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entries = ((page_size - header) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(Self {
            page,
            page_size,
            entries,
            consumer: Mutex::new(()),
        })
    }

    /// Applies the pending writes in order through `apply(address, data)`;
    /// returns how many were applied.
    pub fn drain(&self, mut apply: impl FnMut(u64, &[u8])) -> usize {
        let _consumer = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        let ring = self.page.as_ptr();
        let mut n = 0;
        while n < DRAIN_LIMIT {
            // SAFETY: `ring` points to the mapped page; `first` and `last`
            // are u32 fields of its header. `last` is written by KVM, hence
            // the volatile read.
            let (first, last) = unsafe {
                (
                    std::ptr::addr_of!((*ring).first).read_volatile(),
                    std::ptr::addr_of!((*ring).last).read_volatile(),
                )
            };
            if first == last || first >= self.entries {
                break;
            }
            // Pairs with KVM's smp_wmb() between the entry and `last`.
            fence(Ordering::Acquire);
            // SAFETY: first < entries, so the entry lies inside the page
            // (entries was computed from the page size).
            let entry = unsafe {
                std::ptr::addr_of!((*ring).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize)
                    .read_volatile()
            };
            let len = (entry.len as usize).min(entry.data.len());
            apply(entry.phys_addr, &entry.data[..len]);
            // The entry has been read before KVM may reuse its slot.
            fence(Ordering::Release);
            // SAFETY: as above; only the consumer writes `first`.
            unsafe {
                std::ptr::addr_of_mut!((*ring).first).write_volatile((first + 1) % self.entries);
            }
            n += 1;
        }
        n
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `map` mapped; nothing uses it after.
        unsafe {
            libc::munmap(self.page.as_ptr().cast(), self.page_size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in ordinary memory, filled the way KVM fills it.
    fn fake_ring(writes: &[(u64, u32)]) -> CoalescedRing {
        let page_size = 4096;
        let layout = std::alloc::Layout::from_size_align(page_size, 4096).unwrap();
        // SAFETY: test-only allocation of one zeroed page, leaked.
        let page = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<kvm_coalesced_mmio_ring>();
        let entries = ((page_size - 8) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        for (i, &(addr, v)) in writes.iter().enumerate() {
            let mut e = kvm_coalesced_mmio {
                phys_addr: addr,
                len: 4,
                ..Default::default()
            };
            e.data[..4].copy_from_slice(&v.to_le_bytes());
            // SAFETY: i < entries for the few test writes.
            unsafe {
                std::ptr::addr_of_mut!((*page).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(i)
                    .write(e);
                (*page).last = i as u32 + 1;
            }
        }
        CoalescedRing {
            page: NonNull::new(page).unwrap(),
            page_size: 0, // not unmapped: see the test's leak
            entries,
            consumer: Mutex::new(()),
        }
    }

    #[test]
    fn drain_applies_entries_in_order_and_advances_first() {
        let ring = fake_ring(&[(0x1000, 1), (0x2004, 2), (0x1000, 3)]);
        let mut seen = Vec::new();
        let n = ring.drain(|a, d| seen.push((a, u32::from_le_bytes(d.try_into().unwrap()))));
        assert_eq!(n, 3);
        assert_eq!(seen, vec![(0x1000, 1), (0x2004, 2), (0x1000, 3)]);
        assert_eq!(ring.drain(|_, _| panic!("ring is empty")), 0);
        // SAFETY: reading the header of the test ring.
        assert_eq!(unsafe { (*ring.page.as_ptr()).first }, 3);
        std::mem::forget(ring);
    }
}
