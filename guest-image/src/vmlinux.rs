//! The uncompressed kernel (`vmlinux`, an ELF) inside a bzImage.
//!
//! A bzImage carries the kernel as a compressed payload that the guest
//! decompresses itself before anything else runs; under nested paging that
//! is most of the time to init. Extracting it once on the build host lets
//! the VMM load the ELF directly (`vmm --kernel vmlinux`), as Firecracker's
//! guests do. The payload is located by the setup header (boot protocol
//! 2.08+: `payload_offset`/`payload_length`) and ends with the little-endian
//! length of its decompressed form, which is checked.

use std::fs;
use std::io::Read;
use std::path::Path;

use thiserror::Error;

use crate::debian::io_err;
use crate::debian::DebianError;

const SETUP_SECTS: usize = 0x1f1;
const HDRS: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// `setup_sects` = 0 means 4 (boot protocol).
const DEFAULT_SETUP_SECTS: usize = 4;
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ELF_MAGIC: &[u8] = b"\x7fELF";

#[derive(Debug, Error)]
pub enum VmlinuxError {
    #[error(transparent)]
    Io(#[from] DebianError),
    #[error("{0}: not a bzImage with a payload (boot protocol 2.08+)")]
    NotBzImage(String),
    #[error("{path}: payload is {what}; only xz and gzip kernels are supported")]
    Compression { path: String, what: &'static str },
    #[error("{path}: decompressing the payload failed: {why}")]
    Decompress { path: String, why: String },
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The compressed payload of the bzImage in `image`.
fn payload(image: &[u8]) -> Option<&[u8]> {
    if image.get(HDRS..HDRS + 4)? != b"HdrS" {
        return None;
    }
    let sects = match *image.get(SETUP_SECTS)? {
        0 => DEFAULT_SETUP_SECTS,
        n => usize::from(n),
    };
    let start = (sects + 1) * 512 + le32(image, PAYLOAD_OFFSET)? as usize;
    let len = le32(image, PAYLOAD_LENGTH)? as usize;
    image.get(start..start.checked_add(len)?)
}

/// Decompresses a bzImage's payload into the kernel ELF.
pub fn decompress(image: &[u8], name: &str) -> Result<Vec<u8>, VmlinuxError> {
    let data = payload(image).ok_or_else(|| VmlinuxError::NotBzImage(name.into()))?;
    let failed = |why: String| VmlinuxError::Decompress {
        path: name.into(),
        why,
    };
    let stream_len = data
        .len()
        .checked_sub(4)
        .ok_or_else(|| failed("payload too short".into()))?;
    // The last four bytes are the decompressed length, not part of the stream.
    let (stream, want) = (
        &data[..stream_len],
        le32(data, stream_len).unwrap_or(0) as usize,
    );
    let mut out = Vec::with_capacity(want);
    let read = if data.starts_with(XZ_MAGIC) {
        xz2::read::XzDecoder::new(stream).read_to_end(&mut out)
    } else if data.starts_with(GZIP_MAGIC) {
        flate2::read::GzDecoder::new(stream).read_to_end(&mut out)
    } else {
        let what = match data.get(..4) {
            Some([0x28, 0xb5, 0x2f, 0xfd]) => "zstd",
            Some([0x02, 0x21, 0x4c, 0x18]) => "lz4",
            Some([b'B', b'Z', b'h', _]) => "bzip2",
            _ => "in an unknown format",
        };
        return Err(VmlinuxError::Compression {
            path: name.into(),
            what,
        });
    };
    read.map_err(|e| failed(e.to_string()))?;
    if out.len() != want {
        return Err(failed(format!(
            "{} bytes, the image says {want}",
            out.len()
        )));
    }
    if !out.starts_with(ELF_MAGIC) {
        return Err(failed("the result is not an ELF file".into()));
    }
    Ok(out)
}

/// Writes the vmlinux of `bzimage` to `out` unless it is already there.
pub fn extract(bzimage: &Path, out: &Path) -> Result<(), VmlinuxError> {
    if out.is_file() {
        return Ok(());
    }
    let image = fs::read(bzimage).map_err(io_err(bzimage))?;
    let elf = decompress(&image, &bzimage.display().to_string())?;
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &elf).map_err(io_err(&tmp))?;
    fs::rename(&tmp, out).map_err(io_err(out))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A bzImage-shaped file whose payload is `compressed` + the size trailer.
    fn fake_bzimage(compressed: &[u8], size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[SETUP_SECTS] = 4;
        img[HDRS..HDRS + 4].copy_from_slice(b"HdrS");
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        let len = compressed.len() as u32 + 4;
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(compressed);
        img.extend_from_slice(&size.to_le_bytes());
        img.extend_from_slice(b"trailing setup data");
        img
    }

    fn elf_bytes() -> Vec<u8> {
        let mut elf = ELF_MAGIC.to_vec();
        elf.extend((0..50_000u32).map(|i| (i * 7 % 251) as u8));
        elf
    }

    #[test]
    fn xz_and_gzip_payloads_decompress_to_the_elf() {
        let elf = elf_bytes();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&elf).unwrap();
        let img = fake_bzimage(&xz.finish().unwrap(), elf.len() as u32);
        assert_eq!(decompress(&img, "xz").unwrap(), elf);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let img = fake_bzimage(&gz.finish().unwrap(), elf.len() as u32);
        assert_eq!(decompress(&img, "gz").unwrap(), elf);
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        let elf = elf_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        let wrong_size = fake_bzimage(&gz, 12);
        let e = decompress(&wrong_size, "k").unwrap_err().to_string();
        assert!(e.contains("the image says 12"), "{e}");
        let zstd = fake_bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0], 10);
        let e = decompress(&zstd, "k").unwrap_err().to_string();
        assert!(e.contains("zstd"), "{e}");
        let truncated = fake_bzimage(&gz[..gz.len() / 2], elf.len() as u32);
        assert!(matches!(
            decompress(&truncated, "k"),
            Err(VmlinuxError::Decompress { .. })
        ));
        assert!(matches!(
            decompress(b"not a kernel", "k"),
            Err(VmlinuxError::NotBzImage(_))
        ));
    }
}
