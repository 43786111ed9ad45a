//! Booting the root disk: the initramfs (busybox, the virtio-blk and ext4
//! module closure, the host's `e2fsck`, and `/init` from
//! `guest/init-rootfs.sh`) and the kernel command line.

use std::path::{Path, PathBuf};

use crate::assets::GuestAssets;
use crate::cmdline;
use crate::initramfs::{Initramfs, InitramfsError};
use crate::scenario::base_image;

use super::recipe::ROOT_DEVICE;

/// The initramfs `/init`.
pub const INIT: &str = include_str!("../../guest/init-rootfs.sh");
/// Modules the initramfs loads (closure added): the disk on virtio-pci and
/// ext4 (whose soft dependency brings the crc32c its checksums need).
pub const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];
/// Where e2fsck may live on the host (Debian 12: /usr/sbin, older: /sbin).
const HOST_E2FSCK: &[&str] = &["/usr/sbin/e2fsck", "/sbin/e2fsck"];

/// Console markers printed by the initramfs.
pub const MARK_INITRAMFS: &str = "ROOTFS-INITRAMFS";
/// `ROOTFS-FSCK clean rc=0` or `ROOTFS-FSCK not-clean rc=N`.
pub const MARK_FSCK: &str = "ROOTFS-FSCK";
pub const MARK_FSCK_CLEAN: &str = "ROOTFS-FSCK clean";
/// systemd's status line for the multi-user target (after "Reached target").
pub const MARK_MULTI_USER: &str = "Multi-User System";
/// agetty's prompt: `<hostname> login:`.
pub const MARK_LOGIN: &str = "login:";

/// The host's e2fsck.
pub fn host_e2fsck() -> Option<PathBuf> {
    HOST_E2FSCK.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Builds the initramfs in memory; without a host e2fsck the image still
/// boots and prints `ROOTFS-FSCK not-clean` (the check cannot run).
pub fn initramfs(assets: &GuestAssets) -> Result<Initramfs, InitramfsError> {
    let mut img = base_image(assets)?;
    img.add_modules(&assets.kernel, MODULES)?;
    img.add_bytes("init", 0o755, INIT)?;
    img.add_dir("newroot")?;
    // e2fsck looks in /etc/mtab for mounted file systems.
    img.add_symlink("etc/mtab", "/proc/mounts")?;
    if let Some(e2fsck) = host_e2fsck() {
        img.add_host_binary(&e2fsck, "sbin/e2fsck")?;
    }
    Ok(img)
}

/// Writes the initramfs to `<dir>/rootfs-initrd-<hash>.cpio.gz` unless
/// cached; returns its path.
pub fn write_initramfs(assets: &GuestAssets, dir: &Path) -> Result<PathBuf, InitramfsError> {
    initramfs(assets)?.write_cached(dir, "rootfs-initrd")
}

/// The kernel command line: the VMM's base line (serial console, reboot
/// through the keyboard controller), the root device mounted read-only by
/// the initramfs, and systemd's status lines on the console despite
/// `quiet`; then `extra` words (e.g. [`super::recipe::AUTOREBOOT_PARAM`]).
pub fn cmdline(extra: &[&str]) -> String {
    let mut line = format!(
        "{} root={ROOT_DEVICE} ro systemd.show_status=1",
        cmdline::L2_BASE
    );
    for w in extra {
        line.push(' ');
        line.push_str(w);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_root_and_reboot() {
        let line = cmdline(&[super::super::recipe::AUTOREBOOT_PARAM]);
        assert_eq!(cmdline::lookup(&line, "root"), Some("/dev/vda"));
        assert_eq!(cmdline::lookup(&line, "reboot"), Some("k"));
        assert_eq!(cmdline::lookup(&line, "console"), Some("ttyS0"));
        assert!(line.ends_with(" vmm.autoreboot=1"));
    }

    #[test]
    fn init_script_is_valid_sh_and_prints_the_markers() {
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(INIT)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(INIT.contains(MARK_INITRAMFS));
        assert!(INIT.contains("ROOTFS-FSCK clean"));
        assert!(INIT.contains("ROOTFS-FSCK not-clean"));
        assert!(INIT.contains("switch_root /newroot /sbin/init"));
    }
}
