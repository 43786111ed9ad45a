//! Checks of the operator's files that run before KVM is touched and before
//! anything is created, so a mistake is one clear error line with nothing
//! changed: every disk image opens (and locks: the same image twice
//! read-write, as `--disk` and `--usb-storage` say, is a conflict), and the
//! swap path holds nothing but a swap file of ours (see [`crate::swapfile`]).

use std::path::{Path, PathBuf};

use devices::block::{RawImage, RawImageError};
use thiserror::Error;

use crate::config::{DiskConfig, MemoryConfig, UsbStorageConfig};
use crate::swapfile::{self, SwapFileError};

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error("{what}")]
    Image {
        what: String,
        #[source]
        source: RawImageError,
    },
    #[error(transparent)]
    Swap(#[from] SwapFileError),
}

fn usb_name(u: &UsbStorageConfig) -> String {
    match &u.id {
        Some(id) => format!("--usb-storage id={id}"),
        None => format!("--usb-storage path={}", u.path.display()),
    }
}

/// Opens (and locks) every image at once, then closes them all; checks the
/// swap path against them.
pub fn check(
    memory: &MemoryConfig,
    disks: &[DiskConfig],
    usb: &[UsbStorageConfig],
) -> Result<(), PreflightError> {
    let images: Vec<(String, &PathBuf, bool)> = disks
        .iter()
        .map(|d| (format!("--disk id={}", d.id), &d.path, d.readonly))
        .chain(usb.iter().map(|u| (usb_name(u), &u.path, u.readonly)))
        .collect();
    if let Some(swap) = &memory.swap {
        let named: Vec<(String, &Path)> = images
            .iter()
            .map(|(what, p, _)| (what.clone(), p.as_path()))
            .collect();
        swapfile::check(swap, &named)?;
    }
    let mut open = Vec::with_capacity(images.len());
    for (what, path, readonly) in &images {
        let image = RawImage::open(path, *readonly, "preflight").map_err(|source| {
            PreflightError::Image {
                what: what.clone(),
                source,
            }
        })?;
        open.push(image);
    }
    Ok(())
}
