//! A cheap sanity check of an initramfs before it is handed to the guest.
//!
//! A truncated or corrupt initramfs makes the kernel panic long after the VMM
//! started ("Initramfs unpacking failed"). Checking it first turns that into
//! a clear error. The check walks newc cpio archives to their `TRAILER!!!`
//! and verifies gzip members end to end (CRC and length). What the kernel
//! would refuse to unpack ("invalid magic at start of compressed archive")
//! is refused here: anything that is neither a newc cpio archive nor starts
//! with the magic of a compression the kernel knows. Those other
//! compressions (bzip2, lzma, xz, lzo, lz4, zstd) are passed through
//! unchecked, and the caller warns once that they were not checked.

use std::io::{self, Read};

use flate2::read::GzDecoder;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InitramfsError {
    #[error("the initramfs is empty")]
    Empty,
    #[error("cpio archive at byte {offset} is truncated or corrupt: {what}")]
    BadCpio { offset: usize, what: &'static str },
    #[error("gzip stream at byte {offset} is truncated or corrupt: {message}")]
    BadGzip { offset: usize, message: String },
    #[error("byte {offset} starts neither a newc cpio archive nor a compressed one (gzip, bzip2, lzma, xz, lzo, lz4, zstd){hint}")]
    NotCpio { offset: usize, hint: &'static str },
    #[error("gzip stream at byte {offset} inflates to more than {limit} bytes")]
    TooLarge { offset: usize, limit: u64 },
}

/// Most bytes one gzip member may inflate to: far beyond any initramfs a
/// guest can unpack, and a bound on what a gzip bomb costs the host.
const MAX_PLAIN: u64 = 4 << 30;

/// The two-byte magics the kernel's initramfs unpacker recognises
/// (lib/decompress.c), other than gzip, which is checked here.
const OTHER_COMPRESSIONS: &[([u8; 2], &str)] = &[
    ([0x42, 0x5a], "bzip2"),
    ([0x5d, 0x00], "lzma"),
    ([0xfd, 0x37], "xz"),
    ([0x89, 0x4c], "lzo"),
    ([0x02, 0x21], "lz4"),
    ([0x28, 0xb5], "zstd"),
];

const NEWC_MAGIC: &[u8; 6] = b"070701";
const NEWC_CRC_MAGIC: &[u8; 6] = b"070702";
const NEWC_HEADER_LEN: usize = 110;
const TRAILER: &[u8] = b"TRAILER!!!";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// What the check found in an archive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub cpio_archives: usize,
    pub gzip_members: usize,
    /// Bytes in formats this check does not read (xz, zstd, lz4, ...).
    pub unchecked_bytes: usize,
    /// The compression of those bytes.
    pub unchecked_format: Option<&'static str>,
}

/// Checks the whole initramfs image.
pub fn check(image: &[u8]) -> Result<Summary, InitramfsError> {
    if image.is_empty() {
        return Err(InitramfsError::Empty);
    }
    check_limited(image, MAX_PLAIN)
}

/// [`check`] with each gzip member bounded to `max_plain` bytes.
fn check_limited(image: &[u8], max_plain: u64) -> Result<Summary, InitramfsError> {
    let mut summary = Summary::default();
    check_into(image, 0, None, max_plain, &mut summary)?;
    Ok(summary)
}

/// Walks `data`: archives, padding and compressed members. `inside` is the
/// offset of the gzip member `data` came out of: the kernel reads only cpio
/// archives and padding there (a compressed stream inside one is junk to
/// its unpacker), so the check does not recurse a second time.
fn check_into(
    data: &[u8],
    base: usize,
    inside: Option<usize>,
    max_plain: u64,
    summary: &mut Summary,
) -> Result<(), InitramfsError> {
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest[0] == 0 {
            // Zero padding between concatenated archives.
            pos += 1;
        } else if rest.starts_with(NEWC_MAGIC) || rest.starts_with(NEWC_CRC_MAGIC) {
            pos += walk_cpio(rest, base + pos)?;
            summary.cpio_archives += 1;
        } else if inside.is_some() {
            return Err(InitramfsError::NotCpio {
                offset: base + pos,
                hint: " (inside a gzip member, which must hold only cpio archives and padding)",
            });
        } else if rest.starts_with(&GZIP_MAGIC) {
            let (consumed, plain) = gunzip_member(rest, base + pos, max_plain)?;
            summary.gzip_members += 1;
            check_into(&plain, 0, Some(base + pos), max_plain, summary)?;
            pos += consumed;
        } else if let Some((_, name)) = OTHER_COMPRESSIONS
            .iter()
            .find(|(magic, _)| rest.starts_with(magic))
        {
            summary.unchecked_bytes += rest.len();
            summary.unchecked_format = Some(name);
            break;
        } else {
            let hint = if rest.starts_with(b"070707") {
                ": an old-format (odc) cpio archive; the kernel reads only newc (cpio -H newc)"
            } else {
                ""
            };
            return Err(InitramfsError::NotCpio {
                offset: base + pos,
                hint,
            });
        }
    }
    Ok(())
}

fn hex_field(header: &[u8], index: usize) -> Option<usize> {
    let start = 6 + index * 8;
    let text = std::str::from_utf8(header.get(start..start + 8)?).ok()?;
    usize::from_str_radix(text, 16).ok()
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Walks one newc archive; returns its length up to and including the trailer.
fn walk_cpio(data: &[u8], offset: usize) -> Result<usize, InitramfsError> {
    let bad = |pos: usize, what| InitramfsError::BadCpio {
        offset: offset + pos,
        what,
    };
    let mut pos = 0;
    loop {
        let header = data
            .get(pos..pos + NEWC_HEADER_LEN)
            .ok_or(bad(pos, "header cut short"))?;
        if !header.starts_with(NEWC_MAGIC) && !header.starts_with(NEWC_CRC_MAGIC) {
            return Err(bad(pos, "bad header magic"));
        }
        let filesize = hex_field(header, 6).ok_or(bad(pos, "bad file size field"))?;
        let namesize = hex_field(header, 11).ok_or(bad(pos, "bad name size field"))?;
        let name_start = pos + NEWC_HEADER_LEN;
        let name = data
            .get(name_start..name_start + namesize)
            .ok_or(bad(pos, "file name cut short"))?;
        let data_start = align4(name_start + namesize);
        let next = data_start
            .checked_add(filesize)
            .map(align4)
            .ok_or(bad(pos, "file size overflows"))?;
        if name.strip_suffix(&[0]).unwrap_or(name) == TRAILER {
            return Ok(next.min(data.len()));
        }
        if next > data.len() {
            return Err(bad(pos, "file data cut short"));
        }
        pos = next;
    }
}

/// Most bytes the size hint may reserve up front (a corrupt trailer must not
/// make the check allocate gigabytes).
const MAX_SIZE_HINT: usize = 256 << 20;

/// The plain size a gzip stream's trailer (ISIZE, its last four bytes)
/// announces when `data` is a single member, so the output is allocated
/// once instead of grown and copied (page faults are costly in a nested
/// L1). Only a hint: concatenated members or a damaged trailer cost a
/// regrown or an unused allocation, never a wrong result.
fn plain_size_hint(data: &[u8]) -> usize {
    data.last_chunk::<4>()
        .map_or(0, |isize| u32::from_le_bytes(*isize) as usize)
        .min(MAX_SIZE_HINT)
}

/// Decompresses one gzip member; returns (compressed length, plain bytes).
fn gunzip_member(
    data: &[u8],
    offset: usize,
    max_plain: u64,
) -> Result<(usize, Vec<u8>), InitramfsError> {
    let mut cursor = io::Cursor::new(data);
    let mut plain = Vec::with_capacity(plain_size_hint(data).min(max_plain as usize));
    // One byte past the bound tells "exactly the bound" from "more".
    let result = GzDecoder::new(&mut cursor)
        .take(max_plain + 1)
        .read_to_end(&mut plain);
    match result {
        Ok(n) if n as u64 > max_plain => Err(InitramfsError::TooLarge {
            offset,
            limit: max_plain,
        }),
        Ok(_) => Ok((cursor.position() as usize, plain)),
        Err(e) => Err(InitramfsError::BadGzip {
            offset,
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    fn newc_entry(out: &mut Vec<u8>, name: &str, body: &[u8]) {
        let namesize = name.len() + 1;
        let fields = [1, 0o100644, 0, 0, 1, 0, body.len(), 0, 0, 0, 0, namesize, 0];
        out.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(body);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    fn archive() -> Vec<u8> {
        let mut a = Vec::new();
        newc_entry(&mut a, "init", b"#!/bin/sh\necho hi\n");
        newc_entry(&mut a, "TRAILER!!!", b"");
        a
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn accepts_plain_gzip_and_concatenated_archives() {
        let plain = archive();
        assert_eq!(check(&plain).unwrap().cpio_archives, 1);
        let mut both = plain.clone();
        both.extend_from_slice(&[0; 512]);
        both.extend_from_slice(&gz(&plain));
        let s = check(&both).unwrap();
        assert_eq!((s.cpio_archives, s.gzip_members), (2, 1));
    }

    #[test]
    fn rejects_truncation() {
        let plain = archive();
        assert!(matches!(
            check(&plain[..plain.len() - 20]),
            Err(InitramfsError::BadCpio { .. })
        ));
        let z = gz(&plain);
        assert!(matches!(
            check(&z[..z.len() - 6]),
            Err(InitramfsError::BadGzip { .. })
        ));
        // A gzip stream of an archive that itself lacks the trailer.
        assert!(check(&gz(&plain[..60])).is_err());
        assert_eq!(check(&[]), Err(InitramfsError::Empty));
    }

    #[test]
    fn passes_other_kernel_compressions_through_unchecked() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2];
        let s = check(&xz).unwrap();
        assert_eq!((s.unchecked_bytes, s.unchecked_format), (8, Some("xz")));
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0, 0];
        assert_eq!(check(&zstd).unwrap().unchecked_format, Some("zstd"));
    }

    #[test]
    fn refuses_what_is_neither_cpio_nor_compressed() {
        // 100 KB of pseudo-random bytes (xorshift), as in the issue.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut garbage: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        garbage[0] = 0x42; // not "BZ"
        garbage[1] = 0x00;
        let e = check(&garbage).unwrap_err();
        assert_eq!(
            e,
            InitramfsError::NotCpio {
                offset: 0,
                hint: ""
            }
        );
        assert!(e.to_string().contains("neither a newc cpio archive"), "{e}");
        // Garbage after a good archive (the kernel stops unpacking there).
        let mut tail = archive();
        tail.extend_from_slice(b"garbage!");
        let at = archive().len();
        assert_eq!(
            check(&tail).unwrap_err(),
            InitramfsError::NotCpio {
                offset: at,
                hint: ""
            }
        );
        // Text, and an old-format cpio archive.
        assert!(check(b"#!/bin/sh\necho hi\n").is_err());
        let e = check(b"070707000000000000").unwrap_err().to_string();
        assert!(e.contains("-H newc"), "{e}");
        // Inside a gzip member too.
        assert!(matches!(
            check(&gz(b"not an archive")),
            Err(InitramfsError::NotCpio { .. })
        ));
    }

    #[test]
    fn a_gzip_member_inside_a_gzip_member_is_refused_not_unpacked() {
        // The kernel's unpacker treats it as junk; unpacking it here would
        // let a file nest members to any depth (stack) or ratio (memory).
        let nested = gz(&gz(&archive()));
        let e = check(&nested).unwrap_err();
        assert!(
            matches!(e, InitramfsError::NotCpio { offset: 0, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("must hold only cpio archives"),
            "{e}"
        );
        // A cpio archive, padding, then another archive inside one member
        // still passes.
        let mut two = archive();
        two.extend_from_slice(&[0; 4]);
        two.extend_from_slice(&archive());
        assert_eq!(check(&gz(&two)).unwrap().cpio_archives, 2);
    }

    #[test]
    fn a_member_inflating_past_the_bound_is_refused() {
        let mut big = archive();
        big.resize(64 << 10, 0); // padding after the archive
        let image = gz(&big);
        assert!(check_limited(&image, 64 << 10).is_ok());
        assert_eq!(
            check_limited(&image, (64 << 10) - 1).unwrap_err(),
            InitramfsError::TooLarge {
                offset: 0,
                limit: (64 << 10) - 1
            }
        );
    }
}
