//! Pager configuration and the defaults derived from the limit.

use std::path::PathBuf;
use std::sync::Arc;

use devices::block::Volume;

use super::{PagerError, PAGE_SIZE};

/// Smallest resident limit the pager accepts (the watermarks need room).
pub const MIN_LIMIT_PAGES: usize = 64;
/// Default reserve: 1/64 of the limit, at least this many pages...
const MIN_RESERVE_PAGES: usize = 16;
/// ... and at most this many (16 MiB).
const MAX_RESERVE_PAGES: usize = 4096;
/// Default distance of the high watermark below the limit: 1/32 of it, at least 8 pages.
const MIN_WATERMARK_GAP: usize = 8;

/// `--memory ...,limit=...,swap=...` as the pager needs it.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Most guest RAM bytes resident at once (rounded down to pages).
    pub limit_bytes: u64,
    /// Swap file; created or truncated at start.
    pub swap_path: PathBuf,
    /// Swap file size; default: the whole guest RAM (the store never fills).
    pub swap_bytes: Option<u64>,
    /// Volume the swap I/O goes through (its own, or a disk's).
    pub swap_volume: Arc<Volume>,
    /// Pages above the limit held back for NOIO faults; default limit/64 in [16, 4096].
    pub reserve_pages: Option<usize>,
    /// Reclaim starts above this many resident pages; default limit - max(limit/32, 8).
    pub high_watermark_pages: Option<usize>,
    /// Reclaim stops at this many; default high - max(limit/32, 8).
    pub low_watermark_pages: Option<usize>,
    /// Back a block fill that mapped a whole aligned 2 MiB block with a
    /// transparent huge page (default on; tests turn it off to see the
    /// 4 KiB paths alone).
    pub huge_pages: bool,
    /// Whether a device's resume or reset path runs or has just run, so
    /// that the guest's faults now are its side of it (default: any
    /// `devices::noio::PmPath` in this process within the last 100 ms;
    /// tests give their own).
    pub pm_window: fn() -> bool,
}

impl PagerConfig {
    /// A config with every derived value at its default.
    pub fn new(limit_bytes: u64, swap_path: impl Into<PathBuf>, swap_volume: Arc<Volume>) -> Self {
        Self {
            limit_bytes,
            swap_path: swap_path.into(),
            swap_bytes: None,
            swap_volume,
            reserve_pages: None,
            high_watermark_pages: None,
            low_watermark_pages: None,
            huge_pages: true,
            pm_window: super::workingset::device_path_window,
        }
    }

    /// Fills in defaults and checks the values against `ram_pages`.
    pub(super) fn resolve(&self, ram_pages: usize) -> Result<Resolved, PagerError> {
        let limit = usize::try_from(self.limit_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX);
        if limit < MIN_LIMIT_PAGES {
            return Err(PagerError::Config(format!(
                "limit {} bytes is under {MIN_LIMIT_PAGES} pages",
                self.limit_bytes
            )));
        }
        let gap = (limit / 32).max(MIN_WATERMARK_GAP);
        let high = self.high_watermark_pages.unwrap_or(limit - gap);
        let low = self
            .low_watermark_pages
            .unwrap_or_else(|| high.saturating_sub(gap).max(1));
        if !(0 < low && low < high && high <= limit) {
            return Err(PagerError::Config(format!(
                "watermarks must satisfy 0 < low ({low}) < high ({high}) <= limit ({limit})"
            )));
        }
        let reserve = self
            .reserve_pages
            .unwrap_or_else(|| (limit / 64).clamp(MIN_RESERVE_PAGES, MAX_RESERVE_PAGES));
        let swap_pages = match self.swap_bytes {
            Some(b) => b / PAGE_SIZE as u64,
            None => ram_pages as u64,
        };
        let swap_slots = u32::try_from(swap_pages)
            .ok()
            .filter(|&s| s < super::pages::NO_SLOT)
            .ok_or_else(|| PagerError::Config(format!("swap of {swap_pages} pages is too big")))?;
        Ok(Resolved {
            limit,
            reserve,
            high,
            low,
            swap_slots,
        })
    }
}

/// Config values in pages, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resolved {
    pub limit: usize,
    pub reserve: usize,
    pub high: usize,
    pub low: usize,
    pub swap_slots: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_derive_from_the_limit() {
        let c = PagerConfig::new(512 << 20, "/tmp/x", Volume::new("swap"));
        let r = c.resolve(1 << 19).unwrap();
        assert_eq!(r.limit, 131072);
        assert_eq!(r.high, 131072 - 4096);
        assert_eq!(r.low, 131072 - 8192);
        assert_eq!(r.reserve, 2048);
        assert_eq!(r.swap_slots, 1 << 19);
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut c = PagerConfig::new(4096 * 10, "/tmp/x", Volume::new("swap"));
        assert!(c.resolve(100).is_err());
        c.limit_bytes = 4096 * 100;
        c.low_watermark_pages = Some(99);
        c.high_watermark_pages = Some(90);
        assert!(c.resolve(100).is_err());
    }
}
