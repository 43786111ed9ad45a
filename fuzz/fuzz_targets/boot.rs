//! The kernel and initramfs checks on operator files: a bzImage setup
//! header or an ELF kernel (or anything else), an initramfs of any bytes
//! (newc cpio, gzip members, other compressions' magics), any command line
//! and a memory size the configuration accepts. Only the checks that read
//! bytes run (`BootPlan::new`); nothing is loaded into a guest.

#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use vmm::boot::initramfs;
use vmm::boot::BootPlan;
use vmm::config::{MAX_MEMORY, MIN_MEMORY};
use vmm_fuzz::{Arbitrary, ScratchFile};

/// Where the setup header starts in a bzImage, and its length.
const SETUP_HEADER: usize = 0x1f1;
const SETUP_HEADER_LEN: usize = 0x7b;

#[derive(Arbitrary, Debug)]
enum Kernel {
    /// A bzImage: the setup header's bytes (its 'HdrS' magic set), then
    /// the rest of the file.
    BzImage {
        header: [u8; SETUP_HEADER_LEN],
        rest: Vec<u8>,
    },
    /// An ELF file: bytes after the magic.
    Elf(Vec<u8>),
    Raw(Vec<u8>),
}

impl Kernel {
    fn bytes(self) -> Vec<u8> {
        match self {
            Kernel::BzImage { mut header, rest } => {
                // 'HdrS' at 0x202 (offset 0x11 into the header).
                header[0x11..0x15].copy_from_slice(b"HdrS");
                let mut b = vec![0u8; SETUP_HEADER];
                b.extend_from_slice(&header);
                b.extend_from_slice(&rest);
                b
            }
            Kernel::Elf(rest) => [b"\x7fELF".as_slice(), &rest].concat(),
            Kernel::Raw(b) => b,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Initramfs {
    None,
    /// Bytes after a newc cpio magic.
    Cpio(Vec<u8>),
    /// Bytes after a gzip magic.
    Gzip(Vec<u8>),
    /// A valid gzip member of `plain` (so the check inflates and walks
    /// what is inside), then `trailer`; one byte of the member is
    /// replaced when `corrupt` names one.
    GzipOf {
        plain: Vec<u8>,
        corrupt: Option<(u16, u8)>,
        trailer: Vec<u8>,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    kernel: Kernel,
    initramfs: Initramfs,
    cmdline: String,
    mem_size: u64,
}

fuzz_target!(|input: Input| {
    static FILES: OnceLock<(ScratchFile, ScratchFile)> = OnceLock::new();
    let (kernel_file, initrd_file) =
        FILES.get_or_init(|| (ScratchFile::new("kernel"), ScratchFile::new("initrd")));
    let kernel = kernel_file.set(&input.kernel.bytes());
    let initrd = match input.initramfs {
        Initramfs::None => None,
        Initramfs::Cpio(rest) => Some([b"070701".as_slice(), &rest].concat()),
        Initramfs::Gzip(rest) => Some([[0x1f, 0x8b].as_slice(), &rest].concat()),
        Initramfs::GzipOf {
            plain,
            corrupt,
            trailer,
        } => {
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&plain).unwrap();
            let mut member = gz.finish().unwrap();
            if let Some((at, byte)) = corrupt {
                let i = usize::from(at) % member.len();
                member[i] = byte;
            }
            member.extend_from_slice(&trailer);
            Some(member)
        }
        Initramfs::Raw(b) => Some(b),
    };
    if let Some(bytes) = &initrd {
        // The check alone, on every image (BootPlan::new stops at a bad kernel).
        let _ = initramfs::check(bytes);
    }
    let initrd = initrd.map(|b| initrd_file.set(&b));
    let mem_size = MIN_MEMORY + input.mem_size % (MAX_MEMORY - MIN_MEMORY + 1);
    let _ = BootPlan::new(&kernel, initrd.as_deref(), &input.cmdline, mem_size);
});
