//! A raw disk image file, with every access routed through its volume.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::VolatileSlice;

use super::{Volume, SECTOR_SIZE};

/// Most iovecs one preadv/pwritev call takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

#[derive(Debug, Error)]
pub enum RawImageError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}-byte sectors")]
    Unaligned { path: PathBuf, size: u64 },
    #[error(
        "disk image {path} is {size} bytes; a disk needs at least one {SECTOR_SIZE}-byte sector"
    )]
    TooSmall { path: PathBuf, size: u64 },
    #[error("disk image {path} is not a regular file or a block device")]
    NotAnImage { path: PathBuf },
    #[error("disk image {path} is in use: {}", if *readonly {
        "something has it open read-write (another disk of this VM, the swap file, or another process)"
    } else {
        "something else has it open (another disk of this VM, the swap file, or another process)"
    })]
    Locked { path: PathBuf, readonly: bool },
    #[error("an earlier flush of this disk failed ({0}); writes since may be lost, so every later flush fails too")]
    EarlierFlushFailed(String),
    #[error("access at {offset:#x}+{len:#x} lies beyond the end of the disk ({size:#x} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("disk is read-only")]
    ReadOnly,
    #[error("I/O error on disk image")]
    Io(#[from] io::Error),
}

/// A raw image opened for a storage device: a regular file or a block
/// device (e.g. a disk of the VMM's own host).
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    volume: Arc<Volume>,
    /// The first failed `fdatasync`, kept like Linux's errseq: the kernel
    /// reports a writeback error to one fsync only, so a later flush could
    /// succeed although the data never reached the disk.
    flush_error: std::sync::Mutex<Option<String>>,
    /// Written since the last flush: closing or [`sync_all_images`] syncs it.
    dirty: Arc<Dirty>,
}

/// An image's "written since the last flush" flag, with its own handle on
/// the file so that [`sync_all_images`] can sync it.
#[derive(Debug)]
struct Dirty {
    flag: std::sync::atomic::AtomicBool,
    file: File,
    path: PathBuf,
}

impl Dirty {
    fn set(&self, dirty: bool) {
        self.flag.store(dirty, std::sync::atomic::Ordering::SeqCst);
    }

    /// Syncs the file if it was written since the last flush.
    fn sync(&self, when: &str) -> bool {
        if !self.flag.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        if let Err(e) = self.file.sync_data() {
            log::error!(
                "disk image {}: fdatasync {when} failed: {e}",
                self.path.display()
            );
        }
        true
    }
}

/// Every writable image open now.
static WRITABLE: std::sync::LazyLock<std::sync::Mutex<Vec<std::sync::Weak<Dirty>>>> =
    std::sync::LazyLock::new(Default::default);

/// Syncs every open image written since its last flush (the VM stopped:
/// the guest may not have flushed, e.g. when the VMM got SIGTERM). Returns
/// how many were synced.
pub fn sync_all_images() -> usize {
    let live: Vec<Arc<Dirty>> = {
        let mut list = WRITABLE.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    live.iter().filter(|d| d.sync("at stop")).count()
}

impl Drop for RawImage {
    /// Closing an image makes what the guest wrote durable.
    fn drop(&mut self) {
        if !self.readonly {
            self.dirty.sync("on close");
        }
    }
}

/// How long a conflicting lock is re-tried before the file counts as in
/// use. A fork in any thread of the process that holds the lock shares its
/// open file description, and so the lock, until the child execs or exits:
/// a file closed a moment ago can still look locked for that long.
const LOCK_CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Takes an advisory whole-file OFD lock on `file`: exclusive (a writer)
/// or shared (readers). Held as long as the open file description lives;
/// another open of the same file (in this process or any other) that
/// conflicts fails (after `LOCK_CONFLICT_GRACE`) instead of waiting.
pub fn lock_file(file: &File, exclusive: bool) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_CONFLICT_GRACE;
    loop {
        match try_lock_file(file, exclusive) {
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn try_lock_file(file: &File, exclusive: bool) -> io::Result<()> {
    let lock = libc::flock {
        l_type: if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads one `struct flock` that lives on this stack
    // frame for the duration of the call; the fd is owned by `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size of an image: a regular file's length, or a block device's
/// capacity (whose `st_size` is 0), both as the offset of the end.
fn image_size(file: &File) -> io::Result<u64> {
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl RawImage {
    /// Opens `path`; the image gets its own volume named after `id`.
    pub fn open(path: &Path, readonly: bool, id: &str) -> Result<Self, RawImageError> {
        Self::open_on(path, readonly, Volume::new(id))
    }

    /// Opens `path` with its I/O on an existing `volume`.
    pub fn open_on(
        path: &Path,
        readonly: bool,
        volume: Arc<Volume>,
    ) -> Result<Self, RawImageError> {
        let open_err = |source| RawImageError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(open_err)?;
        let kind = file.metadata().map_err(open_err)?.file_type();
        if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
            return Err(RawImageError::NotAnImage {
                path: path.to_owned(),
            });
        }
        if let Err(e) = lock_file(&file, !readonly) {
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EACCES) => RawImageError::Locked {
                    path: path.to_owned(),
                    readonly,
                },
                _ => open_err(e),
            });
        }
        let size = image_size(&file).map_err(open_err)?;
        let dirty = Arc::new(Dirty {
            flag: Default::default(),
            file: file.try_clone().map_err(open_err)?,
            path: path.to_owned(),
        });
        if !readonly {
            let mut list = WRITABLE.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&dirty));
        }
        if size < SECTOR_SIZE {
            return Err(RawImageError::TooSmall {
                path: path.to_owned(),
                size,
            });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(RawImageError::Unaligned {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            readonly,
            volume,
            flush_error: Default::default(),
            dirty,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), RawImageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(RawImageError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), RawImageError> {
        if self.readonly {
            return Err(RawImageError::ReadOnly);
        }
        self.check(offset, len)?;
        self.dirty.set(true);
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), RawImageError> {
        self.check(offset, buf.len() as u64)?;
        let _io = self.volume.begin_io();
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), RawImageError> {
        self.check_writable(offset, buf.len() as u64)?;
        let _io = self.volume.begin_io();
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    /// Reads `offset..offset + total length` of the image straight into
    /// `bufs` (guest memory, already bounds-checked by vm-memory) with
    /// `preadv`: no bounce buffer, one system call for a whole scatter list.
    pub fn read_vectored_at(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), RawImageError> {
        self.check(offset, total_len(bufs))?;
        let _io = self.volume.begin_io();
        self.vectored(bufs, offset, Dir::Read)?;
        Ok(())
    }

    /// Writes `bufs` (guest memory) to the image at `offset` with `pwritev`.
    pub fn write_vectored_at(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), RawImageError> {
        self.check_writable(offset, total_len(bufs))?;
        let _io = self.volume.begin_io();
        self.vectored(bufs, offset, Dir::Write)?;
        Ok(())
    }

    /// Runs preadv/pwritev until every byte moved. Each call either moves at
    /// least one byte or ends the loop, so it runs at most (bytes) times;
    /// in practice once per IOV_MAX slices.
    fn vectored(&self, bufs: &[VolatileSlice<'_>], offset: u64, dir: Dir) -> io::Result<()> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .filter(|(_, b)| !b.is_empty())
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0usize;
        let mut pos = offset;
        while first < iov.len() {
            let batch = &iov[first..iov.len().min(first + IOV_MAX)];
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec spans a VolatileSlice of mapped guest memory
            // (vm-memory checked its bounds; `guards` keep the mappings alive
            // until this function returns); the kernel only reads (pwritev) or
            // writes (preadv) those ranges. The fd is owned by `self.file`.
            let r = unsafe {
                match dir {
                    Dir::Read => libc::preadv(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        off,
                    ),
                    Dir::Write => libc::pwritev(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        off,
                    ),
                }
            };
            let mut n = match r {
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                0 => {
                    return Err(match dir {
                        Dir::Read => io::ErrorKind::UnexpectedEof,
                        Dir::Write => io::ErrorKind::WriteZero,
                    }
                    .into())
                }
                r => r as usize,
            };
            pos += n as u64;
            // Skip what moved; a partly moved iovec keeps its tail.
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Makes every completed write durable. Once a flush failed, every
    /// later one fails too (see `flush_error`).
    pub fn flush(&self) -> Result<(), RawImageError> {
        self.flush_with(|f| f.sync_data())
    }

    fn flush_with(&self, sync: impl FnOnce(&File) -> io::Result<()>) -> Result<(), RawImageError> {
        if self.readonly {
            return Ok(());
        }
        let mut failed = self.flush_error.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = failed.as_ref() {
            return Err(RawImageError::EarlierFlushFailed(e.clone()));
        }
        let _io = self.volume.begin_io();
        self.dirty.set(false);
        if let Err(e) = sync(&self.file) {
            log::error!(
                "disk image {}: fdatasync failed: {e}; later flushes will fail too",
                self.path.display()
            );
            *failed = Some(e.to_string());
            return Err(e.into());
        }
        Ok(())
    }

    /// Deallocates a range; it reads back as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), RawImageError> {
        self.check_writable(offset, len)?;
        let _io = self.volume.begin_io();
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Writes zeroes over a range, preferring a metadata-only operation.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RawImageError> {
        self.check_writable(offset, len)?;
        let _io = self.volume.begin_io();
        if self
            .fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        let zeroes = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.file
                .write_all_at(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), RawImageError> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate only reads its scalar arguments and acts on a file
        // descriptor this struct owns; no memory is passed to the kernel.
        let ret =
            unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if ret != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize, fill: u8) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("disk.img");
        File::create(&path)
            .unwrap()
            .write_all(&vec![fill; len])
            .unwrap();
        (dir, path)
    }

    /// A throwaway directory removed on drop (std only, no extra crate).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "devices-raw-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn reads_writes_and_bounds() {
        let (_d, path) = image(4096, 0xaa);
        let img = RawImage::open(&path, false, "d0").unwrap();
        assert_eq!(img.sectors(), 8);
        img.write_at(&[1, 2, 3], 510).unwrap();
        let mut b = [0u8; 5];
        img.read_at(&mut b, 509).unwrap();
        assert_eq!(b, [0xaa, 1, 2, 3, 0xaa]);
        assert!(matches!(
            img.read_at(&mut b, 4092),
            Err(RawImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(&b, u64::MAX),
            Err(RawImageError::OutOfRange { .. })
        ));
        img.flush().unwrap();
    }

    #[test]
    fn vectored_io_moves_data_between_the_image_and_scattered_memory() {
        let (_d, path) = image(8192, 0x11);
        let img = RawImage::open(&path, false, "d0").unwrap();
        let mut a = [0u8; 100];
        let mut b = [0u8; 0];
        let mut c = vec![0u8; 412];
        {
            let slices = [
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
                VolatileSlice::from(&mut c[..]),
            ];
            img.read_vectored_at(&slices, 1024).unwrap();
        }
        assert!(a.iter().chain(&c).all(|&x| x == 0x11));
        a.fill(1);
        c.fill(2);
        {
            let slices = [
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut c[..]),
            ];
            img.write_vectored_at(&slices, 4000).unwrap();
        }
        let mut back = vec![0u8; 514];
        img.read_at(&mut back, 3999).unwrap();
        assert_eq!(back[0], 0x11);
        assert!(back[1..101].iter().all(|&x| x == 1));
        assert!(back[101..513].iter().all(|&x| x == 2));
        assert_eq!(back[513], 0x11);
        // Past the end, and writes to a read-only image, are refused whole.
        let slices = [VolatileSlice::from(&mut c[..])];
        assert!(matches!(
            img.read_vectored_at(&slices, 8192 - 100),
            Err(RawImageError::OutOfRange { .. })
        ));
        drop(img);
        let ro = RawImage::open(&path, true, "ro").unwrap();
        assert!(matches!(
            ro.write_vectored_at(&slices, 0),
            Err(RawImageError::ReadOnly)
        ));
    }

    #[test]
    fn vectored_io_takes_more_slices_than_one_call_allows() {
        let n = IOV_MAX + 7;
        let (_d, path) = image(n * 512, 0);
        let img = RawImage::open(&path, false, "d0").unwrap();
        let mut src: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 512]).collect();
        {
            let slices: Vec<_> = src
                .iter_mut()
                .map(|v| VolatileSlice::from(&mut v[..]))
                .collect();
            img.write_vectored_at(&slices, 0).unwrap();
        }
        let mut all = vec![0u8; n * 512];
        img.read_at(&mut all, 0).unwrap();
        for (i, chunk) in all.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&x| x == i as u8), "sector {i}");
        }
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let (_d, path) = image(64 * 1024, 0x5a);
        let img = RawImage::open(&path, false, "d0").unwrap();
        img.discard(4096, 8192).unwrap();
        img.write_zeroes(32 * 1024, 1000).unwrap();
        let mut all = vec![0u8; 64 * 1024];
        img.read_at(&mut all, 0).unwrap();
        assert!(all[4096..12288].iter().all(|&b| b == 0));
        assert!(all[32 * 1024..32 * 1024 + 1000].iter().all(|&b| b == 0));
        assert_eq!(all[4095], 0x5a);
        assert_eq!(all[12288], 0x5a);
        assert_eq!(all[32 * 1024 + 1000], 0x5a);
    }

    /// A block device's `st_size` is 0: the size must come from its end.
    /// Uses a loop device when this host lets us attach one (root).
    #[test]
    fn block_device_size_is_its_capacity() {
        let (_d, path) = image(1 << 20, 0x11);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&path)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            _ => {
                eprintln!("skipped: no loop device here (needs root and losetup)");
                return;
            }
        };
        let checked = RawImage::open(Path::new(&dev), true, "loop").map(|img| {
            let mut b = [0u8; 4];
            let read = img.read_at(&mut b, (1 << 20) - 4).map(|()| b);
            (img.size(), read)
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        let (size, tail) = checked.unwrap();
        assert_eq!(size, 1 << 20);
        assert_eq!(tail.unwrap(), [0x11; 4]);
    }

    #[test]
    fn readonly_refuses_writes_and_unaligned_images_are_rejected() {
        let (_d, path) = image(1024, 0);
        let img = RawImage::open(&path, true, "ro").unwrap();
        assert!(matches!(
            img.write_at(&[0], 0),
            Err(RawImageError::ReadOnly)
        ));
        assert!(matches!(img.discard(0, 512), Err(RawImageError::ReadOnly)));
        let (_d2, odd) = image(1000, 0);
        assert!(matches!(
            RawImage::open(&odd, false, "odd"),
            Err(RawImageError::Unaligned { .. })
        ));
    }

    #[test]
    fn images_are_locked_shared_for_readers_and_exclusive_for_a_writer() {
        let (_d, path) = image(4096, 0);
        let rw = RawImage::open(&path, false, "rw").unwrap();
        for readonly in [false, true] {
            let e = RawImage::open(&path, readonly, "again").unwrap_err();
            assert!(matches!(e, RawImageError::Locked { .. }), "{e}");
            assert!(e.to_string().contains("is in use"), "{e}");
        }
        drop(rw);
        let r1 = RawImage::open(&path, true, "r1").unwrap();
        let _r2 = RawImage::open(&path, true, "r2").unwrap();
        assert!(matches!(
            RawImage::open(&path, false, "w"),
            Err(RawImageError::Locked {
                readonly: false,
                ..
            })
        ));
        drop(r1);
    }

    /// A forked child shares the parent's open file descriptions, and so
    /// their OFD locks, until it execs or exits. An image closed while such
    /// a child (of any thread: the test harness runs `losetup` next door)
    /// still lives must not be refused as in use by the next open.
    #[test]
    fn a_lock_shared_with_a_short_lived_child_is_waited_out() {
        let (_d, path) = image(4096, 0);
        let rw = RawImage::open(&path, false, "rw").unwrap();
        // SAFETY: the child calls only async-signal-safe functions
        // (nanosleep, _exit) before it exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", io::Error::last_os_error());
        if child == 0 {
            let nap = libc::timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            // SAFETY: see above; `nap` outlives the call and the child
            // never returns into the harness.
            unsafe {
                libc::nanosleep(&nap, std::ptr::null_mut());
                libc::_exit(0);
            }
        }
        drop(rw);
        let again = RawImage::open(&path, false, "again");
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` is a valid out pointer.
        unsafe { libc::waitpid(child, &mut status, 0) };
        again.unwrap();
    }

    #[test]
    fn directories_are_not_images() {
        let d = tempdir::Dir::new();
        let e = RawImage::open(&d.0, true, "dir").unwrap_err();
        assert!(matches!(e, RawImageError::NotAnImage { .. }), "{e}");
        assert!(RawImage::open(&d.0, false, "dir").is_err());
    }

    #[test]
    fn images_smaller_than_one_sector_are_refused() {
        for len in [0, 1, 511] {
            let (_d, path) = image(len, 0);
            for readonly in [false, true] {
                let e = RawImage::open(&path, readonly, "tiny").unwrap_err();
                assert!(matches!(e, RawImageError::TooSmall { .. }), "{len}: {e}");
                assert!(
                    e.to_string().contains("at least one 512-byte sector"),
                    "{e}"
                );
            }
        }
        let (_d, path) = image(512, 0);
        assert_eq!(RawImage::open(&path, false, "one").unwrap().sectors(), 1);
    }

    #[test]
    fn written_images_are_synced_at_stop_and_clean_ones_are_not() {
        let (_d, path) = image(4096, 0);
        let img = RawImage::open(&path, false, "d0").unwrap();
        let (_d2, path2) = image(4096, 0);
        let _clean = RawImage::open(&path2, false, "d1").unwrap();
        img.write_at(&[1], 0).unwrap();
        assert!(img.dirty.flag.load(std::sync::atomic::Ordering::SeqCst));
        // At least this one (other tests' images may be written too).
        assert!(sync_all_images() >= 1);
        assert!(!img.dirty.flag.load(std::sync::atomic::Ordering::SeqCst));
        img.write_at(&[2], 0).unwrap();
        img.flush().unwrap();
        assert!(
            !img.dirty.flag.load(std::sync::atomic::Ordering::SeqCst),
            "a flush cleans"
        );
    }

    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        let (_d, path) = image(4096, 0);
        let img = RawImage::open(&path, false, "d0").unwrap();
        img.flush().unwrap();
        let eio = || Err(io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(
            img.flush_with(|_| eio()),
            Err(RawImageError::Io(_))
        ));
        // The kernel would now report success (the error was consumed).
        for _ in 0..3 {
            let e = img.flush_with(|_| Ok(())).unwrap_err();
            assert!(matches!(e, RawImageError::EarlierFlushFailed(_)), "{e}");
        }
        assert!(img.flush().is_err());
    }
}
