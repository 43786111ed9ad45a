//! Typed wrappers over userfaultfd and the few mm syscalls the pager uses.
//!
//! Every `unsafe` block of the pager that talks to the kernel lives here.
//! Addresses are plain `usize` host virtual addresses inside guest RAM
//! mappings the pager keeps alive; nothing here dereferences them.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use thiserror::Error;
use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, UffdBuilder};

use super::PAGE_SIZE;

/// `_IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)`, include/uapi/linux/userfaultfd.h.
/// The crate's `copy` has no way to pass `UFFDIO_COPY_MODE_WP`, which the pager
/// needs to map a page write-protected atomically (no window in which another
/// thread could write it without a fault).
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `UFFDIO_COPY_MODE_WP` (Linux 5.7): map the copied page write-protected.
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;

/// `struct uffdio_copy`, include/uapi/linux/userfaultfd.h.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 0x28);

#[derive(Debug, Error)]
pub enum UffdError {
    #[error("cannot create the userfaultfd (needs root or /dev/userfaultfd access)")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register guest RAM {start:#x}+{len:#x} with userfaultfd")]
    Register {
        start: usize,
        len: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("kernel lacks userfaultfd ioctls {0:?} on guest RAM")]
    MissingIoctls(IoctlFlags),
    #[error("UFFDIO_COPY at {addr:#x} failed")]
    Copy {
        addr: usize,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_WRITEPROTECT at {addr:#x} failed")]
    WriteProtect {
        addr: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("UFFDIO_WAKE at {addr:#x} failed")]
    Wake {
        addr: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("reading userfaultfd events failed")]
    Read(#[source] userfaultfd::Error),
}

/// What a resolving ioctl did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// The page is mapped (or its protection changed) and waiters are woken.
    Done,
    /// The page was already mapped: the caller only has to wake.
    Exists,
    /// `EAGAIN`: the address space is changing (an unread REMOVE event);
    /// read events and try again.
    Retry,
}

/// One event read from the userfaultfd, with raw pointers turned into numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    Fault {
        addr: usize,
        tid: i32,
        write: bool,
        /// A write to a write-protected page (not a missing page).
        wp: bool,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)` of `[start, end)`; the zap follows
    /// once this event is read.
    Remove {
        start: usize,
        end: usize,
    },
    Other,
}

pub struct Uffd {
    inner: userfaultfd::Uffd,
}

fn errno_of(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::SystemError(n) => Some(*n as i32),
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => {
            Some(*n as i32)
        }
        _ => None,
    }
}

impl Uffd {
    /// A non-blocking uffd with thread ids, REMOVE events and write-protect
    /// faults, which also sees kernel-mode faults (KVM, pread into guest RAM).
    pub fn create() -> Result<Self, UffdError> {
        let inner = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::THREAD_ID
                    | FeatureFlags::EVENT_REMOVE
                    | FeatureFlags::PAGEFAULT_FLAG_WP,
            )
            .create()
            .map_err(UffdError::Create)?;
        Ok(Self { inner })
    }

    /// Registers `[start, start + len)` for missing and write-protect faults.
    pub fn register(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let ioctls = self
            .inner
            .register_with_mode(
                start as *mut libc::c_void,
                len,
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            )
            .map_err(|source| UffdError::Register { start, len, source })?;
        let needed = IoctlFlags::COPY | IoctlFlags::WAKE | IoctlFlags::WRITE_PROTECT;
        if !ioctls.contains(needed) {
            return Err(UffdError::MissingIoctls(needed.difference(ioctls)));
        }
        Ok(())
    }

    /// Unregisters a range; pending faults are woken and handled by the kernel.
    pub fn unregister(&self, start: usize, len: usize) {
        if let Err(e) = self.inner.unregister(start as *mut libc::c_void, len) {
            log::warn!("pager: unregistering {start:#x}+{len:#x}: {e}");
        }
    }

    /// Maps a copy of `src` at the page `dst`, write-protected if `wp`, and
    /// wakes the threads waiting on it.
    pub fn copy_page(&self, dst: usize, src: &[u8], wp: bool) -> Result<Resolve, UffdError> {
        debug_assert_eq!(src.len(), PAGE_SIZE);
        Ok(self.copy_range(dst, src, wp)?.1)
    }

    /// Maps a copy of `src` (whole pages) at `dst..dst + src.len()`,
    /// write-protected if `wp`, and wakes the threads waiting there. Returns
    /// how many leading pages were mapped and what stopped the rest: `Done`
    /// when all were; `Exists` or `Retry` for the first page not mapped.
    pub fn copy_range(
        &self,
        dst: usize,
        src: &[u8],
        wp: bool,
    ) -> Result<(usize, Resolve), UffdError> {
        debug_assert_eq!(src.len() % PAGE_SIZE, 0);
        debug_assert_eq!(dst % PAGE_SIZE, 0);
        let pages = src.len() / PAGE_SIZE;
        let mut arg = UffdioCopy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wp { UFFDIO_COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        // SAFETY: `arg` is a valid uffdio_copy that lives across the call; the
        // kernel reads `src.len()` bytes from `src`, a live slice of that
        // length, and writes only `arg.copy` and the registered pages at
        // `dst`, which no Rust reference covers (guest RAM is accessed
        // through raw pointers).
        let ret = unsafe { libc::ioctl(self.inner.as_raw_fd(), UFFDIO_COPY, &mut arg) };
        if ret == 0 {
            return Ok((pages, Resolve::Done));
        }
        let err = io::Error::last_os_error();
        // A partial copy reports the bytes copied (and wakes only those);
        // a failure of the first page reports -errno.
        let done = usize::try_from(arg.copy).unwrap_or(0) / PAGE_SIZE;
        if done >= pages {
            return Ok((pages, Resolve::Done));
        }
        match err.raw_os_error() {
            Some(libc::EEXIST) if done == 0 => Ok((0, Resolve::Exists)),
            // Partly copied: the next page hit EEXIST or EAGAIN; trying
            // again tells which.
            Some(libc::EEXIST | libc::EAGAIN) => Ok((done, Resolve::Retry)),
            _ => Err(UffdError::Copy {
                addr: dst + done * PAGE_SIZE,
                source: err,
            }),
        }
    }

    /// Write-protects `[addr, addr + len)` (present pages only).
    pub fn protect(&self, addr: usize, len: usize) -> Result<Resolve, UffdError> {
        match self.inner.write_protect(addr as *mut libc::c_void, len) {
            Ok(()) => Ok(Resolve::Done),
            Err(e) if errno_of(&e) == Some(libc::EAGAIN) => Ok(Resolve::Retry),
            Err(source) => Err(UffdError::WriteProtect { addr, source }),
        }
    }

    /// Removes write protection from a page and wakes its waiters.
    pub fn unprotect(&self, addr: usize, len: usize) -> Result<Resolve, UffdError> {
        match self
            .inner
            .remove_write_protection(addr as *mut libc::c_void, len, true)
        {
            Ok(()) => Ok(Resolve::Done),
            Err(e) if errno_of(&e) == Some(libc::EAGAIN) => Ok(Resolve::Retry),
            Err(source) => Err(UffdError::WriteProtect { addr, source }),
        }
    }

    /// Wakes threads waiting on faults in the range (they retry the access).
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.inner
            .wake(addr as *mut libc::c_void, len)
            .map_err(|source| UffdError::Wake { addr, source })
    }

    /// Reads the pending events without blocking (empty if none).
    pub fn read_events(
        &self,
        buf: &mut userfaultfd::EventBuffer,
        out: &mut Vec<UffdEvent>,
    ) -> Result<(), UffdError> {
        out.clear();
        for ev in self.inner.read_events(buf).map_err(UffdError::Read)? {
            out.push(match ev.map_err(UffdError::Read)? {
                userfaultfd::Event::Pagefault {
                    kind,
                    rw,
                    addr,
                    thread_id,
                } => UffdEvent::Fault {
                    addr: addr as usize,
                    tid: thread_id.as_raw(),
                    write: rw == userfaultfd::ReadWrite::Write,
                    wp: kind == userfaultfd::FaultKind::WriteProtected,
                },
                userfaultfd::Event::Remove { start, end } => UffdEvent::Remove {
                    start: start as usize,
                    end: end as usize,
                },
                _ => UffdEvent::Other,
            });
        }
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise only changes how the kernel backs `[addr, addr+len)`,
    // page-aligned guest RAM that stays mapped while the pager runs; with
    // MADV_DONTNEED the pages read back through the pager, so no Rust object
    // loses its contents behind the compiler's back.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops the frames of `[addr, addr + len)`. Produces a REMOVE event and
/// blocks until the fault handler has read it: never call on that thread.
pub fn madvise_dontneed(addr: usize, len: usize) -> io::Result<()> {
    madvise(addr, len, libc::MADV_DONTNEED)
}

/// Gives the host frames of the whole pages inside `buf` (VMM memory, not
/// guest RAM) back; they read as zeroes until written again.
pub fn release_buffer_frames(buf: &mut [u8]) -> io::Result<()> {
    let start = (buf.as_ptr() as usize).next_multiple_of(PAGE_SIZE);
    let end = (buf.as_ptr() as usize + buf.len()) / PAGE_SIZE * PAGE_SIZE;
    if end <= start {
        return Ok(());
    }
    // SAFETY: `[start, end)` lies inside `buf`, borrowed mutably here, so
    // nothing else reads or writes it meanwhile; MADV_DONTNEED on private
    // anonymous memory only makes those bytes read as zero afterwards, as if
    // the kernel had written zeroes into the buffer.
    let ret =
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for transparent huge pages on a range (advice: may be ignored).
pub fn madvise_hugepage(addr: usize, len: usize) -> io::Result<()> {
    madvise(addr, len, libc::MADV_HUGEPAGE)
}

/// Keeps transparent huge pages away from a range paged in 4 KiB units.
pub fn madvise_nohugepage(addr: usize, len: usize) -> io::Result<()> {
    madvise(addr, len, libc::MADV_NOHUGEPAGE)
}

/// Backs the 2 MiB-aligned block `[addr, addr + len)`, every page of it
/// mapped, with one transparent huge page now (the kernel copies the pages
/// into it). Guest RAM under the pager is `MADV_NOHUGEPAGE`, so that the
/// kernel (khugepaged) never collapses a block the pager does not know of,
/// and `MADV_COLLAPSE` refuses such memory: the block is advised
/// `MADV_HUGEPAGE` for the call and `MADV_NOHUGEPAGE` again after it (the
/// huge page stays).
pub fn collapse_block(addr: usize, len: usize) -> io::Result<()> {
    madvise(addr, len, libc::MADV_HUGEPAGE)?;
    let mut collapsed = madvise(addr, len, libc::MADV_COLLAPSE);
    if collapsed
        .as_ref()
        .is_err_and(|e| e.raw_os_error() == Some(libc::EAGAIN))
    {
        // Transient (a page still on a per-CPU list, a lock): once more.
        collapsed = madvise(addr, len, libc::MADV_COLLAPSE);
    }
    let restored = madvise_nohugepage(addr, len);
    collapsed.and(restored)
}

/// Which pages of `[addr, addr + len)` are resident.
pub fn mincore(addr: usize, len: usize) -> io::Result<Vec<bool>> {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range as mincore requires;
    // the range is mapped guest RAM and mincore does not touch its contents.
    let ret = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}
