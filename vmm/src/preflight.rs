//! Checks of the operator's files that run before KVM is touched and before
//! anything is created, so a mistake is one clear error line with nothing
//! changed: every disk image opens (and locks: the same image twice
//! read-write, as `--disk` and `--usb-storage` say, is a conflict), and the
//! swap path holds nothing but a swap file of ours (see [`crate::swapfile`]);
//! USB ports exist and are not named twice, disk ids are unique across
//! virtio and USB disks, `swap_volume=` names a disk; the serial output file
//! and the API socket can be created where they are asked for (never
//! replacing a file that is not a socket).

use std::path::{Path, PathBuf};

use devices::block::{RawImage, RawImageError};
use thiserror::Error;

use crate::config::{DiskConfig, MemoryConfig, SerialConfig, UsbStorageConfig};
use crate::swapfile::{self, SwapFileError};
use crate::usb::{USB2_PORTS, USB3_PORTS};
use crate::vm::VmConfig;

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
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: String) -> PreflightError {
    PreflightError::Invalid(msg)
}

/// Every check of this module, in the order a user would fix them.
pub fn check_vm(cfg: &VmConfig) -> Result<(), PreflightError> {
    check_names(&cfg.memory, &cfg.disks, &cfg.usb)?;
    check_distinct_outputs(cfg)?;
    check(&cfg.memory, &cfg.disks, &cfg.usb)?;
    if let SerialConfig::File(path) = &cfg.serial {
        check_new_file("--serial file", path, false)?;
        // Console output appended to a disk image, the swap file, the
        // kernel or the initramfs would corrupt it.
        let images = cfg
            .disks
            .iter()
            .map(|d| (format!("--disk id={}", d.id), d.path.as_path()))
            .chain(cfg.usb.iter().map(|u| (usb_name(u), u.path.as_path())))
            .chain(
                cfg.memory
                    .swap
                    .iter()
                    .map(|s| ("the swap file".to_string(), s.as_path())),
            )
            .chain(std::iter::once((
                "--kernel".to_string(),
                cfg.kernel.as_path(),
            )))
            .chain(
                cfg.initramfs
                    .iter()
                    .map(|i| ("--initramfs".to_string(), i.as_path())),
            );
        if let Ok(console) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            for (what, image) in images {
                if std::fs::metadata(image)
                    .is_ok_and(|m| (m.dev(), m.ino()) == (console.dev(), console.ino()))
                {
                    return Err(invalid(format!(
                        "--serial file={}: is the file of {what}; console output would overwrite its data",
                        path.display()
                    )));
                }
            }
        }
    }
    if let Some(path) = &cfg.api_socket {
        check_new_file("--api-socket", path, true)?;
    }
    Ok(())
}

/// The files the VMM creates (swap file, serial log, API socket) must be
/// three different paths: two of them on one file would overwrite each
/// other (compared by name; files that exist already are compared by
/// device and inode too, below).
fn check_distinct_outputs(cfg: &VmConfig) -> Result<(), PreflightError> {
    let absolute = |p: &Path| match std::path::absolute(p) {
        Ok(a) => a,
        Err(_) => p.to_owned(),
    };
    let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(s) = &cfg.memory.swap {
        outputs.push(("--memory swap", absolute(s)));
    }
    if let SerialConfig::File(s) = &cfg.serial {
        outputs.push(("--serial file", absolute(s)));
    }
    if let Some(s) = &cfg.api_socket {
        outputs.push(("--api-socket", absolute(s)));
    }
    for (i, (a, pa)) in outputs.iter().enumerate() {
        for (b, pb) in &outputs[i + 1..] {
            if pa == pb {
                return Err(invalid(format!(
                    "{a} and {b} are both {}; give each its own file",
                    pa.display()
                )));
            }
        }
    }
    Ok(())
}

/// Ports, ids and `swap_volume=`.
fn check_names(
    memory: &MemoryConfig,
    disks: &[DiskConfig],
    usb: &[UsbStorageConfig],
) -> Result<(), PreflightError> {
    let max_port = USB2_PORTS + USB3_PORTS;
    let mut ports = std::collections::BTreeSet::new();
    let mut ids: std::collections::BTreeMap<String, String> = disks
        .iter()
        .map(|d| (d.id.clone(), format!("--disk id={}", d.id)))
        .collect();
    for u in usb {
        if let Some(p) = u.port {
            if p > max_port {
                return Err(invalid(format!(
                    "{}: port={p} does not exist: USB 2 ports are 1-{USB2_PORTS}, USB 3 ports {}-{max_port}",
                    usb_name(u),
                    USB2_PORTS + 1
                )));
            }
            if !ports.insert(p) {
                return Err(invalid(format!(
                    "{}: port={p} is given to two USB disks",
                    usb_name(u)
                )));
            }
        }
        let id = u.id.clone().or_else(|| u.port.map(|p| format!("usb{p}")));
        if let Some(id) = id {
            if let Some(other) = ids.insert(id.clone(), usb_name(u)) {
                return Err(invalid(format!(
                    "{}: id {id} is already the id of {other} (ids name disks and their I/O volumes)",
                    usb_name(u)
                )));
            }
        }
    }
    if let Some(vol) = &memory.swap_volume {
        // A USB disk without id or port gets its id (usb<port>) later.
        let unknown_ids = usb.iter().any(|u| u.id.is_none() && u.port.is_none());
        if !ids.contains_key(vol) && !unknown_ids {
            return Err(invalid(format!(
                "--memory swap_volume={vol}: no --disk or --usb-storage has that id"
            )));
        }
    }
    Ok(())
}

/// A file the VMM will create (or, for a socket, replace): its directory
/// must exist, and what is there already must be a file it may write to
/// (`socket`: only a socket, which a dead VMM may have left).
fn check_new_file(what: &str, path: &Path, socket: bool) -> Result<(), PreflightError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if socket && !m.file_type().is_socket() => Err(invalid(format!(
            "{what} {shown}: exists and is not a socket; refusing to replace it"
        ))),
        Ok(m) if m.is_dir() => Err(invalid(format!("{what} {shown}: is a directory"))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if dir.is_dir() {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{what} {shown}: directory {} does not exist",
                    dir.display()
                )))
            }
        }
        Err(e) => Err(invalid(format!("{what} {shown}: {e}"))),
    }
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
