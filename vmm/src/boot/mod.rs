//! Loading a Linux bzImage, its initramfs and command line into guest memory
//! for the 64-bit boot protocol. Everything that can be checked without KVM
//! (file format, sizes, fit in guest memory) is checked by [`BootPlan::new`]
//! first, so bad input fails fast with a clear message.

pub mod initramfs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
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
/// Room for early allocations the kernel makes before it can use the rest of
/// RAM; below this a stock kernel does not get to init anyway.
const MEMORY_SLACK: u64 = 32 << 20;

/// The checked inputs of a direct kernel boot.
pub struct BootPlan {
    kernel_path: PathBuf,
    header: setup_header,
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
        let header = read_setup_header(kernel)?;
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
                Some(data)
            }
            None => None,
        };

        if cmdline.contains('\0') {
            return Err(BootError::CmdlineNul);
        }
        let max = (header.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1);
        if cmdline.len() > max {
            return Err(BootError::CmdlineTooLong {
                len: cmdline.len(),
                max,
            });
        }
        let mut cmdline_bytes = cmdline.as_bytes().to_vec();
        cmdline_bytes.push(0);

        // The decompressed kernel occupies [pref_address, + init_size).
        let kernel_end = header.pref_address.max(HIMEM_START) + u64::from(header.init_size);
        let initrd_len = initramfs.as_ref().map_or(0, |d| d.len() as u64);
        let need = kernel_end + page_align(initrd_len) + MEMORY_SLACK;
        if mem_size < need {
            return Err(BootError::MemoryTooSmall {
                have_mib: mem_size >> 20,
                need_mib: need.div_ceil(1 << 20),
            });
        }
        // The initramfs goes as high as the kernel allows, out of its way.
        let initrd_at = initramfs.as_ref().map(|d| {
            let top = low_ram_end(mem_size).min(u64::from(header.initrd_addr_max) + 1);
            (top - d.len() as u64) & !0xfff
        });
        if let Some(at) = initrd_at {
            if at < kernel_end {
                return Err(BootError::MemoryTooSmall {
                    have_mib: mem_size >> 20,
                    need_mib: need.div_ceil(1 << 20),
                });
            }
        }
        Ok(Self {
            kernel_path: kernel.to_owned(),
            header,
            initramfs,
            cmdline: cmdline_bytes,
            mem_size,
            initrd_at,
        })
    }

    /// Writes kernel, initramfs, command line, boot_params and page tables;
    /// returns the 64-bit entry point.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<u64, BootError> {
        let mut file = File::open(&self.kernel_path).map_err(|source| BootError::KernelRead {
            path: self.kernel_path.clone(),
            source,
        })?;
        let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::Load)?;
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
        let hdr = loaded.setup_header.unwrap_or(self.header);
        let params = bootparams::build(hdr, self.mem_size, self.cmdline.len() - 1, initrd);
        mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
            .map_err(gm)?;
        crate::arch::regs::write_boot_tables(mem).map_err(gm)?;
        Ok(loaded.kernel_load.0 + STARTUP_64_OFFSET)
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
            init_size,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        h.boot_flag = 0xaa55;
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
