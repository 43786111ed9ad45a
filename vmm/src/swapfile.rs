//! Keeping `--memory ...,swap=PATH` from destroying data.
//!
//! The VMM's swap files start with a one-page header whose first bytes are
//! [`MAGIC`]; the page slots follow it. A path is accepted as a swap file
//! only when nothing is there yet, when it is an empty regular file, or when
//! it is a regular file that starts with that magic (a swap file a previous
//! run left behind). Anything else is refused with a one-line error before
//! any file is created or truncated: a file holding other data, a symbolic
//! link (never followed), a directory or device, and a file that is also a
//! disk image of this VM (compared by device and inode, so another name for
//! the same file is caught too).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The first bytes of every swap file this VMM writes.
pub const MAGIC: &[u8; 16] = b"vmm-swap-file-v1";
/// Bytes before the first slot: one page holding the magic.
pub const HEADER_LEN: u64 = 4096;

#[derive(Debug, Error)]
pub enum SwapFileError {
    #[error("--memory swap={}: is a symbolic link; give the file itself (a swap file is never reached through a link)", path.display())]
    Symlink { path: PathBuf },
    #[error("--memory swap={}: is not a regular file; refusing to use it as swap", path.display())]
    NotRegular { path: PathBuf },
    #[error("--memory swap={}: holds {size} bytes that are not a swap file of this VMM; refusing to overwrite it (remove it or choose another path)", path.display())]
    Foreign { path: PathBuf, size: u64 },
    #[error("--memory swap={}: is the disk image of {what}; refusing to use it as swap", path.display())]
    IsDisk { path: PathBuf, what: String },
    #[error("--memory swap={}: cannot inspect it", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `file` (a regular file of `size` bytes) may be reused as swap:
/// empty, or starting with [`MAGIC`].
pub fn reusable(file: &mut File, size: u64) -> io::Result<bool> {
    if size == 0 {
        return Ok(true);
    }
    let mut head = [0u8; MAGIC.len()];
    match file.read_exact(&mut head) {
        Ok(()) => Ok(&head == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Checks `swap` against what is on disk and against the VM's disk images
/// (`disks`: a description such as `--disk id=data` and the image path).
/// Creates and changes nothing.
pub fn check(swap: &Path, disks: &[(String, &Path)]) -> Result<(), SwapFileError> {
    let stat_err = |source| SwapFileError::Stat {
        path: swap.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(swap) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stat_err(e)),
    };
    let path = swap.to_owned();
    if meta.file_type().is_symlink() {
        return Err(SwapFileError::Symlink { path });
    }
    if !meta.file_type().is_file() {
        return Err(SwapFileError::NotRegular { path });
    }
    for (what, disk) in disks {
        // A disk that cannot be inspected is reported by its own check.
        if let Ok(d) = std::fs::metadata(disk) {
            if (d.dev(), d.ino()) == (meta.dev(), meta.ino()) {
                return Err(SwapFileError::IsDisk {
                    path,
                    what: what.clone(),
                });
            }
        }
    }
    let mut file = File::open(swap).map_err(stat_err)?;
    if !reusable(&mut file, meta.len()).map_err(stat_err)? {
        return Err(SwapFileError::Foreign {
            path,
            size: meta.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-swapfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn accepts_nothing_an_empty_file_and_our_own_swap_file() {
        let d = dir("ok");
        check(&d.join("absent"), &[]).unwrap();
        std::fs::File::create(d.join("empty")).unwrap();
        check(&d.join("empty"), &[]).unwrap();
        let mut ours = MAGIC.to_vec();
        ours.resize(3 * 4096, 0);
        std::fs::write(d.join("ours"), &ours).unwrap();
        check(&d.join("ours"), &[]).unwrap();
    }

    #[test]
    fn refuses_data_links_directories_and_disks() {
        let d = dir("refuse");
        let data = d.join("data");
        std::fs::File::create(&data)
            .unwrap()
            .write_all(&[7u8; 1 << 20])
            .unwrap();
        let e = check(&data, &[]).unwrap_err();
        assert!(
            matches!(e, SwapFileError::Foreign { size: 1048576, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        std::fs::write(d.join("short"), b"vmm").unwrap();
        assert!(matches!(
            check(&d.join("short"), &[]),
            Err(SwapFileError::Foreign { .. })
        ));

        std::os::unix::fs::symlink(d.join("absent"), d.join("link")).unwrap();
        assert!(matches!(
            check(&d.join("link"), &[]),
            Err(SwapFileError::Symlink { .. })
        ));
        assert!(matches!(
            check(&d, &[]),
            Err(SwapFileError::NotRegular { .. })
        ));

        // An empty image, attached as a disk under another name (hard link).
        let img = d.join("disk.img");
        std::fs::File::create(&img).unwrap();
        std::fs::hard_link(&img, d.join("alias")).unwrap();
        let disks = [("--disk id=data".to_string(), img.as_path())];
        let e = check(&d.join("alias"), &disks).unwrap_err();
        assert!(e.to_string().contains("--disk id=data"), "{e}");
        // The data is untouched.
        assert_eq!(std::fs::metadata(&data).unwrap().len(), 1 << 20);
    }
}
