//! One virtio-blk request: parsed completely and validated (§5.2.6), then
//! executed. A malformed request never panics: it becomes a status byte
//! (when the chain has one) and a used-ring entry.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::*;
use crate::block::{RawImage, SECTOR_SIZE};
use crate::virtio::block::device::MAX_DESCRIPTORS;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor {addr:#x}+{len:#x} lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain does not end in a device-writable status byte")]
    NoStatus,
    #[error("request header shorter than {REQUEST_HEADER_LEN} bytes")]
    ShortHeader,
    #[error("data buffers have the wrong direction for the request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} lie past the end of the disk")]
    OutOfRange { sector: u64, count: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("feature for request type {0} was not negotiated")]
    NotNegotiated(u32),
    #[error("malformed discard/write-zeroes segment list")]
    BadSegments,
    #[error("unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("guest memory access failed")]
    Memory,
}

impl RequestError {
    /// The status reported to the driver (§5.2.6).
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_)
            | RequestError::NotNegotiated(_)
            | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A discard or write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSegment {
    pub sector: u64,
    pub sectors: u32,
    pub flags: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard(Vec<RangeSegment>),
    WriteZeroes(Vec<RangeSegment>),
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Data buffers: device-writable for IN/GET_ID, readable for OUT.
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// A request that cannot run; `status` is where to report it, if anywhere.
#[derive(Debug)]
pub struct Rejected {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// What parsing needs to know about the disk and the negotiation.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo {
    pub sectors: u64,
    pub readonly: bool,
    pub acked_features: u64,
}

struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Reads `buf.len()` bytes spread over `segs`.
fn read_segments(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| RequestError::Memory)?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(RequestError::Memory)
    }
}

fn check_range(info: &DiskInfo, sector: u64, count: u64) -> Result<(), RequestError> {
    match sector.checked_add(count) {
        Some(end) if end <= info.sectors => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, count }),
    }
}

impl Request {
    /// Parses a chain. Every check happens here, before any disk I/O.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        info: &DiskInfo,
    ) -> Result<Request, Rejected> {
        let mut descs = Vec::new();
        for d in chain {
            if descs.len() == MAX_DESCRIPTORS {
                return Err(Rejected {
                    error: RequestError::TooManyDescriptors,
                    status: None,
                });
            }
            descs.push(Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            });
        }
        // The status byte is the last byte of the last descriptor, which must
        // be device-writable and inside guest memory (§5.2.6).
        let status = match descs.last() {
            Some(d) if d.writable && d.len > 0 && mem.check_range(d.addr, d.len as usize) => {
                d.addr.checked_add(u64::from(d.len) - 1)
            }
            _ => None,
        };
        let Some(status) = status else {
            return Err(Rejected {
                error: RequestError::NoStatus,
                status: None,
            });
        };
        let reject = |error| Rejected {
            error,
            status: Some(status),
        };

        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for d in &descs {
            if d.len == 0 {
                continue;
            }
            if !mem.check_range(d.addr, d.len as usize) {
                return Err(reject(RequestError::OutsideMemory {
                    addr: d.addr.0,
                    len: d.len,
                }));
            }
            // Readable descriptors precede writable ones (§2.7.4.2).
            if d.writable {
                writable.push(Segment {
                    addr: d.addr,
                    len: d.len,
                });
            } else if !writable.is_empty() {
                return Err(reject(RequestError::ReadableAfterWritable));
            } else {
                readable.push(Segment {
                    addr: d.addr,
                    len: d.len,
                });
            }
        }
        // Drop the status byte from the writable data.
        if let Some(last) = writable.last_mut() {
            last.len -= 1;
            if last.len == 0 {
                writable.pop();
            }
        }

        // Header, then what is left of the readable part is OUT data.
        if total(&readable) < REQUEST_HEADER_LEN {
            return Err(reject(RequestError::ShortHeader));
        }
        let mut header = [0u8; REQUEST_HEADER_LEN as usize];
        read_segments(mem, &readable, &mut header).map_err(reject)?;
        let out = skip(&readable, REQUEST_HEADER_LEN);
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(s);

        let kind = Self::validate(req_type, sector, &out, &writable, mem, info).map_err(reject)?;
        let data = match kind {
            RequestKind::In | RequestKind::GetId => writable,
            RequestKind::Out => out,
            _ => Vec::new(),
        };
        Ok(Request {
            data_len: total(&data),
            kind,
            sector,
            data,
            status,
        })
    }

    fn validate(
        req_type: u32,
        sector: u64,
        out: &[Segment],
        inb: &[Segment],
        mem: &GuestMemoryMmap,
        info: &DiskInfo,
    ) -> Result<RequestKind, RequestError> {
        let negotiated = |f: u64| info.acked_features & f != 0;
        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let (data, other) = if req_type == VIRTIO_BLK_T_IN {
                    (inb, out)
                } else {
                    (out, inb)
                };
                if !other.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                let len = total(data);
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::UnalignedLength(len));
                }
                if req_type == VIRTIO_BLK_T_OUT && info.readonly {
                    return Err(RequestError::ReadOnly);
                }
                check_range(info, sector, len / SECTOR_SIZE)?;
                Ok(if req_type == VIRTIO_BLK_T_IN {
                    RequestKind::In
                } else {
                    RequestKind::Out
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                if !negotiated(VIRTIO_BLK_F_FLUSH) {
                    return Err(RequestError::NotNegotiated(req_type));
                }
                Ok(RequestKind::Flush)
            }
            VIRTIO_BLK_T_GET_ID => {
                if !out.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                Ok(RequestKind::GetId)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                let feature = if discard {
                    VIRTIO_BLK_F_DISCARD
                } else {
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if !negotiated(feature) {
                    return Err(RequestError::NotNegotiated(req_type));
                }
                if !inb.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                if info.readonly {
                    return Err(RequestError::ReadOnly);
                }
                let segs = Self::range_segments(out, mem, info, discard)?;
                Ok(if discard {
                    RequestKind::Discard(segs)
                } else {
                    RequestKind::WriteZeroes(segs)
                })
            }
            t => Err(RequestError::UnsupportedType(t)),
        }
    }

    fn range_segments(
        out: &[Segment],
        mem: &GuestMemoryMmap,
        info: &DiskInfo,
        discard: bool,
    ) -> Result<Vec<RangeSegment>, RequestError> {
        let len = total(out);
        if len == 0
            || !len.is_multiple_of(DISCARD_SEGMENT_LEN)
            || len > u64::from(MAX_DISCARD_SEG) * DISCARD_SEGMENT_LEN
        {
            return Err(RequestError::BadSegments);
        }
        let mut raw = vec![0u8; len as usize];
        read_segments(mem, out, &mut raw)?;
        let allowed_flags = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        raw.chunks_exact(DISCARD_SEGMENT_LEN as usize)
            .map(|c| {
                let mut s = [0u8; 8];
                s.copy_from_slice(&c[0..8]);
                let seg = RangeSegment {
                    sector: u64::from_le_bytes(s),
                    sectors: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
                    flags: u32::from_le_bytes([c[12], c[13], c[14], c[15]]),
                };
                if seg.flags & !allowed_flags != 0 {
                    return Err(RequestError::UnsupportedFlags(seg.flags));
                }
                if seg.sectors > MAX_DISCARD_SECTORS {
                    return Err(RequestError::BadSegments);
                }
                check_range(info, seg.sector, u64::from(seg.sectors))?;
                Ok(seg)
            })
            .collect()
    }

    /// Runs the request. Returns the status and how many bytes were written
    /// into guest buffers (for the used ring), status byte excluded.
    pub fn execute(&self, disk: &RawImage, mem: &GuestMemoryMmap, id: &[u8]) -> (u8, u32) {
        match self.run(disk, mem, id) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                log::warn!("virtio-blk: request failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn run(&self, disk: &RawImage, mem: &GuestMemoryMmap, id: &[u8]) -> Result<u32, RunError> {
        // Only reads and writes use the sector, and parsing checked it
        // against the capacity for them; FLUSH and GET_ID carry whatever
        // the driver left there, which must not be multiplied.
        let pos = || self.sector * SECTOR_SIZE;
        match &self.kind {
            RequestKind::In => {
                // Straight from the image into the guest's buffers.
                disk.read_vectored_at(&guest_slices(mem, &self.data)?, pos())?;
                // data_len < 2^32: virtio-queue stops chains at 4 GiB total.
                Ok(self.data_len as u32)
            }
            RequestKind::Out => {
                disk.write_vectored_at(&guest_slices(mem, &self.data)?, pos())?;
                Ok(0)
            }
            RequestKind::Flush => {
                disk.flush()?;
                Ok(0)
            }
            RequestKind::GetId => {
                let mut written = 0usize;
                for seg in &self.data {
                    if written == id.len() {
                        break;
                    }
                    let n = (seg.len as usize).min(id.len() - written);
                    mem.write_slice(&id[written..written + n], seg.addr)
                        .map_err(|_| RunError::Memory)?;
                    written += n;
                }
                Ok(written as u32)
            }
            RequestKind::Discard(segs) => {
                for s in segs {
                    disk.discard(s.sector * SECTOR_SIZE, u64::from(s.sectors) * SECTOR_SIZE)?;
                }
                Ok(0)
            }
            RequestKind::WriteZeroes(segs) => {
                for s in segs {
                    let (off, len) = (s.sector * SECTOR_SIZE, u64::from(s.sectors) * SECTOR_SIZE);
                    if s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                        disk.discard(off, len)?;
                    } else {
                        disk.write_zeroes(off, len)?;
                    }
                }
                Ok(0)
            }
        }
    }
}

/// The data segments as host memory slices for vectored I/O (vm-memory
/// checks each range and splits it at region boundaries).
fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &[Segment],
) -> Result<Vec<VolatileSlice<'m>>, RunError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            out.push(slice.map_err(|_| RunError::Memory)?);
        }
    }
    Ok(out)
}

#[derive(Debug, Error)]
enum RunError {
    #[error("disk")]
    Disk(#[from] crate::block::RawImageError),
    #[error("guest memory changed under the request")]
    Memory,
}

/// The segments of `segs` after the first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX.
        out.push(Segment {
            addr: s.addr.unchecked_add(n),
            len: s.len - n as u32,
        });
        n = 0;
    }
    out
}
