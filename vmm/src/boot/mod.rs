//! Loading a Linux kernel (a bzImage, or an uncompressed x86-64 `vmlinux`
//! ELF), its initramfs and command line into guest memory for the 64-bit
//! boot protocol. Everything that can be checked without KVM
//! (file format, sizes, fit in guest memory) is checked by [`BootPlan::new`]
//! first, so bad input fails fast with a clear message.

pub mod elf;
pub mod initramfs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::bootparams::{self, InitrdPlacement};
use crate::arch::layout::*;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read kernel {path}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Linux bzImage ({why})")]
    NotBzImage { path: PathBuf, why: &'static str },
    #[error("{path} is not a Linux bzImage or x86-64 vmlinux ELF ({why})")]
    NotElfKernel { path: PathBuf, why: &'static str },
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} is unusable")]
    InitramfsBad {
        path: PathBuf,
        #[source]
        source: initramfs::InitramfsError,
    },
    #[error(
        "--memory size={have_mib}M is too small: the kernel and initramfs need at least {need_mib} MiB"
    )]
    MemoryTooSmall { have_mib: u64, need_mib: u64 },
    #[error("the command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("loading the kernel into guest memory failed")]
    Load(#[source] linux_loader::loader::Error),
    #[error("writing boot data into guest memory failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Setup header offset in a bzImage (boot protocol, "the real-mode kernel header").
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.12: xloadflags and 64-bit entry.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry point is 0x200 past the protected-mode kernel start.
const STARTUP_64_OFFSET: u64 = 0x200;
/// The boot protocol's limits for a kernel without a setup header (ELF):
/// COMMAND_LINE_SIZE on x86 and the default initrd_addr_max.
const ELF_CMDLINE_SIZE: usize = 2048;
const ELF_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Load alignment reported in the zero page for an ELF kernel, which has no
/// header of its own to carry it; 16 MiB = Debian's CONFIG_PHYSICAL_ALIGN
/// and the kernel's usual load address.
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Room for early allocations the kernel makes before it can use the rest of
/// RAM; below this a stock kernel does not get to init anyway.
const MEMORY_SLACK: u64 = 32 << 20;

/// The two kernel formats `--kernel` takes.
#[derive(Debug, Clone, Copy)]
enum KernelKind {
    /// A bzImage: decompresses itself; entered at its 64-bit entry point.
    BzImage(setup_header),
    /// An uncompressed vmlinux: loaded segment by segment, entered at `e_entry`.
    Elf(elf::ElfKernel),
}

impl KernelKind {
    /// Reads and checks `path` as either format.
    fn probe(path: &Path) -> Result<Self, BootError> {
        let read_err = |source| BootError::KernelRead {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        let mut head = [0u8; 4];
        let n = file.read(&mut head).map_err(read_err)?;
        if !elf::is_elf(&head[..n]) {
            return read_setup_header(path).map(Self::BzImage);
        }
        elf::probe(&mut file, len)
            .map(Self::Elf)
            .map_err(|why| BootError::NotElfKernel {
                path: path.to_owned(),
                why,
            })
    }

    /// First byte past the kernel once it runs (bzImage: its decompression
    /// buffer, `init_size` from `pref_address`).
    fn end(&self) -> u64 {
        match self {
            // Saturating: a header may name any 64-bit address; such a
            // kernel does not fit, which the memory check then reports.
            Self::BzImage(h) => h
                .pref_address
                .max(HIMEM_START)
                .saturating_add(u64::from(h.init_size)),
            Self::Elf(k) => k.end,
        }
    }

    fn cmdline_max(&self) -> usize {
        let size = match self {
            Self::BzImage(h) => h.cmdline_size as usize,
            Self::Elf(_) => ELF_CMDLINE_SIZE - 1,
        };
        size.min(CMDLINE_MAX_SIZE - 1)
    }

    fn initrd_addr_max(&self) -> u64 {
        match self {
            Self::BzImage(h) => u64::from(h.initrd_addr_max),
            Self::Elf(_) => ELF_INITRD_ADDR_MAX,
        }
    }
}

/// The checked inputs of a direct kernel boot.
pub struct BootPlan {
    kernel_path: PathBuf,
    kernel: KernelKind,
    initramfs: Option<Vec<u8>>,
    cmdline: Vec<u8>,
    mem_size: u64,
    initrd_at: Option<u64>,
}

impl BootPlan {
    /// Reads and checks the kernel and initramfs against `mem_size` bytes of RAM.
    pub fn new(
        kernel: &Path,
        initramfs_path: Option<&Path>,
        cmdline: &str,
        mem_size: u64,
    ) -> Result<Self, BootError> {
        let kind = KernelKind::probe(kernel)?;
        let initramfs = match initramfs_path {
            Some(p) => {
                let data = std::fs::read(p).map_err(|source| BootError::InitramfsRead {
                    path: p.to_owned(),
                    source,
                })?;
                let summary =
                    initramfs::check(&data).map_err(|source| BootError::InitramfsBad {
                        path: p.to_owned(),
                        source,
                    })?;
                log::debug!("initramfs {}: {summary:?}", p.display());
                if let Some(format) = summary.unchecked_format {
                    log::warn!(
                        "initramfs {}: {} bytes of {format}-compressed data are passed to the \
                         guest unchecked (only cpio and gzip are checked here)",
                        p.display(),
                        summary.unchecked_bytes
                    );
                }
                Some(data)
            }
            None => None,
        };

        if cmdline.contains('\0') {
            return Err(BootError::CmdlineNul);
        }
        let max = kind.cmdline_max();
        if cmdline.len() > max {
            return Err(BootError::CmdlineTooLong {
                len: cmdline.len(),
                max,
            });
        }
        let mut cmdline_bytes = cmdline.as_bytes().to_vec();
        cmdline_bytes.push(0);

        let kernel_end = kind.end();
        let initrd_len = initramfs.as_ref().map_or(0, |d| d.len() as u64);
        let need = kernel_end
            .saturating_add(page_align(initrd_len))
            .saturating_add(MEMORY_SLACK);
        if mem_size < need {
            return Err(BootError::MemoryTooSmall {
                have_mib: mem_size >> 20,
                need_mib: need.div_ceil(1 << 20),
            });
        }
        // The initramfs goes as high as the kernel allows, out of its way
        // (None inside: no room at all below initrd_addr_max).
        let initrd_at = initramfs.as_ref().map(|d| {
            let top = low_ram_end(mem_size).min(kind.initrd_addr_max() + 1);
            top.checked_sub(d.len() as u64).map(|at| at & !0xfff)
        });
        if let Some(at) = initrd_at {
            if !matches!(at, Some(at) if at >= kernel_end) {
                return Err(BootError::MemoryTooSmall {
                    have_mib: mem_size >> 20,
                    need_mib: need.div_ceil(1 << 20),
                });
            }
        }
        Ok(Self {
            kernel_path: kernel.to_owned(),
            kernel: kind,
            initramfs,
            cmdline: cmdline_bytes,
            mem_size,
            initrd_at: initrd_at.flatten(),
        })
    }

    /// Writes kernel, initramfs, command line, boot_params and page tables;
    /// returns the 64-bit entry point.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<u64, BootError> {
        let mut file = File::open(&self.kernel_path).map_err(|source| BootError::KernelRead {
            path: self.kernel_path.clone(),
            source,
        })?;
        let himem = Some(GuestAddress(HIMEM_START));
        let (header, entry) = match self.kernel {
            KernelKind::BzImage(header) => {
                let loaded = BzImage::load(mem, None, &mut file, himem).map_err(BootError::Load)?;
                (
                    loaded.setup_header.unwrap_or(header),
                    loaded.kernel_load.0 + STARTUP_64_OFFSET,
                )
            }
            KernelKind::Elf(_) => {
                let loaded = Elf::load(mem, None, &mut file, himem).map_err(BootError::Load)?;
                let header = setup_header {
                    kernel_alignment: ELF_KERNEL_ALIGNMENT,
                    ..Default::default()
                };
                (header, loaded.kernel_load.0)
            }
        };
        let gm = BootError::GuestMemory;
        mem.write_slice(&self.cmdline, GuestAddress(CMDLINE_START))
            .map_err(gm)?;
        let initrd = match (&self.initramfs, self.initrd_at) {
            (Some(data), Some(at)) => {
                mem.write_slice(data, GuestAddress(at)).map_err(gm)?;
                Some(InitrdPlacement {
                    addr: at,
                    size: data.len() as u64,
                })
            }
            _ => None,
        };
        let params = bootparams::build(header, self.mem_size, self.cmdline.len() - 1, initrd);
        mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
            .map_err(gm)?;
        crate::arch::regs::write_boot_tables(mem).map_err(gm)?;
        Ok(entry)
    }
}

fn page_align(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// Reads and checks the setup header of a bzImage without loading it.
fn read_setup_header(path: &Path) -> Result<setup_header, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let not = |why| BootError::NotBzImage {
        path: path.to_owned(),
        why,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(read_err)?;
    file.read_exact(header.as_mut_slice()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            not("file too short for a setup header")
        } else {
            read_err(e)
        }
    })?;
    let (magic, version, xloadflags, loadflags) = (
        header.header,
        header.version,
        header.xloadflags,
        header.loadflags,
    );
    if magic != HDRS_MAGIC {
        return Err(not("no 'HdrS' magic in the setup header"));
    }
    if version < MIN_BOOT_PROTOCOL {
        return Err(not("boot protocol older than 2.12"));
    }
    if loadflags & 1 == 0 {
        return Err(not("not loaded high (zImage)"));
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not("no 64-bit entry point"));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str, data: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(data).unwrap();
        p
    }

    fn fake_bzimage(init_size: u32) -> Vec<u8> {
        fake_bzimage_with(|h| h.init_size = init_size)
    }

    /// A bzImage whose setup header `edit` changed.
    fn fake_bzimage_with(edit: impl FnOnce(&mut setup_header)) -> Vec<u8> {
        let mut img = vec![0u8; 0x4000];
        let mut h = setup_header {
            setup_sects: 4,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: 1,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            pref_address: 0x100_0000,
            init_size: 20 << 20,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        h.boot_flag = 0xaa55;
        edit(&mut h);
        let off = SETUP_HEADER_OFFSET as usize;
        img[off..off + h.as_slice().len()].copy_from_slice(h.as_slice());
        img
    }

    #[test]
    fn rejects_files_that_are_not_bzimages() {
        let p = temp("notbz", b"hello, I am a text file");
        assert!(matches!(
            BootPlan::new(&p, None, "", 256 << 20),
            Err(BootError::NotBzImage { .. })
        ));
        let p = temp("zeros", &[0u8; 8192]);
        let e = BootPlan::new(&p, None, "", 256 << 20).err().unwrap();
        assert!(e.to_string().contains("HdrS"), "{e}");
        let missing = Path::new("/nonexistent/vmlinuz");
        assert!(matches!(
            BootPlan::new(missing, None, "", 256 << 20),
            Err(BootError::KernelRead { .. })
        ));
    }

    #[test]
    fn memory_must_hold_kernel_and_initramfs() {
        let k = temp("bz", &fake_bzimage(40 << 20));
        let e = BootPlan::new(&k, None, "", 64 << 20).err().unwrap();
        assert!(
            matches!(e, BootError::MemoryTooSmall { need_mib: 88, .. }),
            "{e}"
        );
        let plan = BootPlan::new(&k, None, "console=ttyS0", 128 << 20).unwrap();
        assert_eq!(plan.initrd_at, None);
    }

    #[test]
    fn initramfs_is_checked_and_placed_high() {
        let k = temp("bz2", &fake_bzimage(20 << 20));
        let trunc = temp("trunc.gz", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2]);
        assert!(matches!(
            BootPlan::new(&k, Some(&trunc), "", 256 << 20),
            Err(BootError::InitramfsBad { .. })
        ));
        let good = temp("unknown.img", &[0xfd, b'7', b'z', b'X', b'Z', 0]);
        let plan = BootPlan::new(&k, Some(&good), "", 256 << 20).unwrap();
        assert_eq!(plan.initrd_at, Some((256 << 20) - 4096));
    }

    #[test]
    fn elf_kernel_is_checked_loaded_and_entered_at_its_entry() {
        let k = temp("vmlinux", &elf::tests::fake_vmlinux(8192, 48 << 20));
        let e = BootPlan::new(&k, None, "", 64 << 20).err().unwrap();
        assert!(
            matches!(e, BootError::MemoryTooSmall { need_mib: 96, .. }),
            "{e}"
        );
        let long = "x".repeat(2048);
        assert!(matches!(
            BootPlan::new(&k, None, &long, 256 << 20),
            Err(BootError::CmdlineTooLong { max: 2047, .. })
        ));
        let plan = BootPlan::new(&k, None, "console=ttyS0", 256 << 20).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
        assert_eq!(plan.load(&mem).unwrap(), 0x100_0000);
        let mut text = [0u8; 8192];
        mem.read_slice(&mut text, GuestAddress(0x100_0000)).unwrap();
        assert!(text.iter().all(|&b| b == 0x90), "segment bytes not loaded");
        let params: linux_loader::loader::bootparam::boot_params =
            mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (align, magic) = (params.hdr.kernel_alignment, params.hdr.header);
        assert_eq!((align, magic), (ELF_KERNEL_ALIGNMENT, HDRS_MAGIC));

        let broken = temp("vmlinux-cut", &elf::tests::fake_vmlinux(8192, 8192)[..100]);
        let e = BootPlan::new(&broken, None, "", 256 << 20).err().unwrap();
        assert!(
            e.to_string()
                .contains("not a Linux bzImage or x86-64 vmlinux ELF"),
            "{e}"
        );
    }

    /// Found by the boot fuzz target: `pref_address + init_size` overflowed
    /// (a panic in a debug build; in release a wrapped end that passed the
    /// memory check).
    #[test]
    fn a_kernel_preferring_the_top_of_the_address_space_does_not_fit() {
        let k = temp(
            "bz-top",
            &fake_bzimage_with(|h| h.pref_address = u64::MAX - 0xfff),
        );
        let e = BootPlan::new(&k, None, "", 256 << 20).err().unwrap();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
    }

    /// An initrd_addr_max below the initramfs's size left no room under it
    /// (the placement subtracted past zero).
    #[test]
    fn an_initramfs_larger_than_initrd_addr_max_does_not_fit() {
        let k = temp("bz-lowmax", &fake_bzimage_with(|h| h.initrd_addr_max = 0));
        let initrd = temp("lowmax.img", &[0xfd, b'7', b'z', b'X', b'Z', 0]);
        let e = BootPlan::new(&k, Some(&initrd), "", 256 << 20)
            .err()
            .unwrap();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
    }

    #[test]
    fn cmdline_limits() {
        let k = temp("bz3", &fake_bzimage(20 << 20));
        let long = "x".repeat(3000);
        assert!(matches!(
            BootPlan::new(&k, None, &long, 256 << 20),
            Err(BootError::CmdlineTooLong { max: 2047, .. })
        ));
        assert!(matches!(
            BootPlan::new(&k, None, "a\0b", 256 << 20),
            Err(BootError::CmdlineNul)
        ));
    }
}
