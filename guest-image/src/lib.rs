//! Builds guest kernels and initramfs images from Debian packages.
//!
//! - [`assets`]: fetch the kernel `linux-image-amd64` depends on and
//!   `busybox-static` (`apt-get download`, `dpkg-deb -x`, `depmod -b`),
//!   cached under [`build_dir`] keyed by package version.
//! - [`vmlinux`]: the uncompressed kernel ELF out of the bzImage.
//! - [`initramfs`]: an in-memory tree written as a gzip'd newc [`cpio`].
//! - [`scenario`]: the L2 image (`/init` + scenario script + modules).
//! - [`cmdline`]: guest command lines with `key=value` scenario parameters.
//! - [`rootfs`]: a Debian root disk (debootstrap + systemd, ext4 image) and
//!   the initramfs that boots it from virtio-blk.

use std::path::{Path, PathBuf};

pub mod assets;
pub mod cache;
pub mod cmdline;
pub mod cpio;
pub mod debian;
pub mod initramfs;
pub mod modules;
pub mod progress;
pub mod rootfs;
pub mod scenario;
pub mod vmlinux;

pub use assets::{fetch_assets, fetch_busybox, fetch_kernel, Busybox, GuestAssets, Kernel};
pub use cmdline::Param;
pub use initramfs::Initramfs;
pub use scenario::{build_l2, FileMapping, Scenario, ScenarioImage};

/// Environment variable overriding the build (cache) directory.
pub const BUILD_DIR_ENV: &str = "VMM_BUILD_DIR";

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$VMM_BUILD_DIR`, else `<workspace>/build` (gitignored).
pub fn build_dir() -> PathBuf {
    std::env::var_os(BUILD_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("build"))
}

/// Directory for generated images inside the build dir.
pub fn images_dir(build: &Path) -> PathBuf {
    build.join("images")
}
