//! Writer (and a small reader, for tests and checks) for the "newc" cpio
//! format that the Linux kernel unpacks as an initramfs.
//!
//! Format reference: Linux `Documentation/driver-api/early-userspace/buffer-format.rst`
//! and `usr/gen_init_cpio.c`: a 110-byte ASCII header (magic `070701` and 13
//! eight-digit hex fields), the NUL-terminated name, padding to 4 bytes, the
//! data, padding to 4 bytes; the archive ends with an entry named `TRAILER!!!`.

use std::io::{self, Write};

use thiserror::Error;

/// Magic of a newc header without checksums.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Header length: 6 bytes of magic plus 13 fields of 8 hex digits.
pub const HEADER_LEN: usize = 6 + 13 * 8;
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode` (POSIX `<sys/stat.h>`).
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
const S_IFMT: u32 = 0o170000;

#[derive(Debug, Error)]
pub enum CpioError {
    #[error("cpio I/O error")]
    Io(#[from] io::Error),
    #[error("cpio entry name {0:?} is empty, absolute or contains a NUL byte")]
    BadName(String),
    #[error("cpio entry {0:?} is too large for the newc format")]
    TooLarge(String),
    #[error("malformed cpio archive at offset {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
}

/// What kind of entry is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    /// Character device with (major, minor).
    CharDev(u32, u32),
}

/// One archive entry as read back by [`parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Permission bits only (file type is in `kind`).
    pub perm: u32,
    pub kind: EntryKind,
}

/// Streams newc entries into a writer. Inode numbers are assigned in order;
/// owner is root, mtime 0 (reproducible output).
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory (parents are not created implicitly).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.raw_entry(TRAILER, 0, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') || name == TRAILER {
            return Err(CpioError::BadName(name.to_string()));
        }
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.raw_entry(name, ino, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.into()))?;
        let namesize =
            u32::try_from(name.len() + 1).map_err(|_| CpioError::TooLarge(name.into()))?;
        let fields: [u32; 13] = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime
            size, 0, // devmajor
            0, // devminor
            rdev.0, rdev.1, namesize, 0, // check (unused by newc)
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.put(&header)?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn hex_field(buf: &[u8], offset: usize, index: usize) -> Result<u32, CpioError> {
    let start = offset + 6 + index * 8;
    let digits = buf.get(start..start + 8).ok_or(CpioError::Malformed {
        offset,
        what: "truncated header",
    })?;
    let text = std::str::from_utf8(digits).map_err(|_| CpioError::Malformed {
        offset,
        what: "non-ASCII header field",
    })?;
    u32::from_str_radix(text, 16).map_err(|_| CpioError::Malformed {
        offset,
        what: "non-hex header field",
    })
}

/// Parses an uncompressed newc archive up to its trailer.
pub fn parse(buf: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let magic = buf.get(offset..offset + 6).ok_or(CpioError::Malformed {
            offset,
            what: "missing trailer",
        })?;
        if magic != NEWC_MAGIC {
            return Err(CpioError::Malformed {
                offset,
                what: "bad magic",
            });
        }
        let mode = hex_field(buf, offset, 1)?;
        let size = hex_field(buf, offset, 6)? as usize;
        let rdev = (hex_field(buf, offset, 9)?, hex_field(buf, offset, 10)?);
        let namesize = hex_field(buf, offset, 11)? as usize;
        let name_start = offset + HEADER_LEN;
        let name_bytes =
            buf.get(name_start..name_start + namesize)
                .ok_or(CpioError::Malformed {
                    offset,
                    what: "truncated name",
                })?;
        let name = name_bytes
            .strip_suffix(&[0])
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(CpioError::Malformed {
                offset,
                what: "name not NUL-terminated UTF-8",
            })?
            .to_string();
        let data_start = align4(name_start + namesize);
        let data = buf
            .get(data_start..data_start + size)
            .ok_or(CpioError::Malformed {
                offset,
                what: "truncated data",
            })?;
        offset = align4(data_start + size);
        if name == TRAILER {
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => EntryKind::Dir,
            S_IFREG => EntryKind::File(data.to_vec()),
            S_IFLNK => EntryKind::Symlink(String::from_utf8_lossy(data).into_owned()),
            S_IFCHR => EntryKind::CharDev(rdev.0, rdev.1),
            _ => {
                return Err(CpioError::Malformed {
                    offset,
                    what: "unsupported file type",
                })
            }
        };
        entries.push(Entry {
            name,
            perm: mode & 0o7777,
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF-not-really").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let buf = sample();
        assert_eq!(buf.len() % 4, 0);
        let entries = parse(&buf).unwrap();
        assert_eq!(
            entries,
            vec![
                Entry {
                    name: "bin".into(),
                    perm: 0o755,
                    kind: EntryKind::Dir
                },
                Entry {
                    name: "bin/busybox".into(),
                    perm: 0o755,
                    kind: EntryKind::File(b"\x7fELF-not-really".to_vec())
                },
                Entry {
                    name: "bin/sh".into(),
                    perm: 0o777,
                    kind: EntryKind::Symlink("busybox".into())
                },
                Entry {
                    name: "dev/console".into(),
                    perm: 0o600,
                    kind: EntryKind::CharDev(5, 1)
                },
                Entry {
                    name: "empty".into(),
                    perm: 0o644,
                    kind: EntryKind::File(vec![])
                },
            ]
        );
    }

    #[test]
    fn header_layout_matches_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let buf = w.finish().unwrap();
        // magic, ino=1, mode=0100644, uid, gid, nlink=1, mtime, filesize=3
        let header = std::str::from_utf8(&buf[..HEADER_LEN]).unwrap();
        assert!(header.starts_with("07070100000001000081a4"));
        assert_eq!(&header[6 + 6 * 8..6 + 7 * 8], "00000003");
        // namesize = 2 ("a\0"), name at 110, data aligned to 112.
        assert_eq!(&header[6 + 11 * 8..6 + 12 * 8], "00000002");
        assert_eq!(&buf[110..112], b"a\0");
        assert_eq!(&buf[112..115], b"xyz");
        assert_eq!(buf[115], 0);
        // Trailer follows at 116.
        assert_eq!(&buf[116..122], NEWC_MAGIC);
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(matches!(
            w.file("/abs", 0o644, b""),
            Err(CpioError::BadName(_))
        ));
        assert!(matches!(w.file("", 0o644, b""), Err(CpioError::BadName(_))));
        assert!(matches!(
            w.file(TRAILER, 0o644, b""),
            Err(CpioError::BadName(_))
        ));
    }

    #[test]
    fn parse_rejects_truncation() {
        let buf = sample();
        for cut in [0, 5, HEADER_LEN, buf.len() - 8] {
            assert!(parse(&buf[..cut]).is_err(), "cut at {cut} accepted");
        }
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            parse(&bad),
            Err(CpioError::Malformed {
                what: "bad magic",
                ..
            })
        ));
    }
}
