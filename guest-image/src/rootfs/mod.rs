//! A Debian root disk: `debootstrap --variant=minbase` with systemd, the
//! [`recipe`] applied, the guest kernel's modules copied in, written as a
//! sparse ext4 image with `mkfs.ext4 -d`; and the small initramfs that boots
//! it from virtio-blk ([`boot`]).
//!
//! Two cache levels under `<build>/rootfs/`:
//! - `debootstrap-<suite>-<hash>/root`: the pristine debootstrap tree, keyed
//!   by suite and package list (the slow, networked step);
//! - `debian-<suite>-<hash>.ext4`: the image, keyed by the tree's key, the
//!   recipe (and [`recipe::RECIPE_VERSION`]), the kernel package and the
//!   image size. The tree is copied to a staging directory for each image,
//!   so a recipe change never needs a new debootstrap.
//!
//! Booting writes to the image: callers that boot it copy it first.

use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::assets::Kernel;
use crate::debian::{run_visible, DebianError};
use crate::progress;

pub mod boot;
pub mod recipe;
pub mod sources;

pub use recipe::Recipe;

/// Packages on top of minbase: systemd as init, udev (device units the
/// serial getty waits for) and kmod (modprobe for udev and modules-load).
pub const BASE_PACKAGES: &[&str] = &["systemd-sysv", "udev", "kmod"];
/// Default image size (sparse: only written blocks take space).
pub const DEFAULT_SIZE_MIB: u64 = 1024;
/// Marker written once a debootstrap tree is complete.
const DONE_STAMP: &str = ".complete";
/// Images kept per suite in the cache.
const KEEP_IMAGES: usize = 2;
/// ext4 volume label.
const LABEL: &str = "debian-root";

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image size {0} MiB is too small for the root tree (need at least {1} MiB)")]
    TooSmall(u64, u64),
    #[error("package name {0:?} is not a Debian package name")]
    BadPackage(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsSpec {
    /// Debian suite (codename), e.g. `bookworm`.
    pub suite: String,
    /// Mirror URL debootstrap downloads from (not part of the cache key).
    pub mirror: String,
    /// Packages for `--include` (sorted and deduplicated for the key).
    pub packages: Vec<String>,
    pub size_mib: u64,
}

impl RootfsSpec {
    /// The host's suite and mirror, [`BASE_PACKAGES`], [`DEFAULT_SIZE_MIB`].
    pub fn host_default() -> Self {
        let suite = sources::host_suite();
        Self {
            mirror: sources::host_mirror(&suite),
            suite,
            packages: BASE_PACKAGES.iter().map(|p| p.to_string()).collect(),
            size_mib: DEFAULT_SIZE_MIB,
        }
    }

    /// Sorted, deduplicated package list, each name checked.
    fn package_list(&self) -> Result<Vec<String>, RootfsError> {
        let mut p = self.packages.clone();
        p.sort();
        p.dedup();
        for name in &p {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !ok {
                return Err(RootfsError::BadPackage(name.clone()));
            }
        }
        Ok(p)
    }
}

/// A built (or cached) root disk image.
#[derive(Clone, Debug)]
pub struct Rootfs {
    pub image: PathBuf,
    pub suite: String,
    pub size_mib: u64,
    /// True when this call built the image.
    pub fresh: bool,
}

/// FNV-1a, 64 bit: a cache key that stays the same across builds of this
/// crate (std's `DefaultHasher` makes no such promise).
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        if self.0 == 0 {
            self.0 = OFFSET;
        }
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(PRIME);
        }
    }
}

fn stable_hash(value: &impl Hash) -> u64 {
    let mut h = Fnv::default();
    value.hash(&mut h);
    h.finish()
}

/// Runs an administration tool from /usr/sbin or /sbin even when those are
/// not on the caller's PATH.
fn sbin_command(name: &str) -> Command {
    let mut cmd = Command::new(name);
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"));
    cmd
}

/// The pristine debootstrap tree for `spec`, built unless cached.
pub fn debootstrap_tree(build: &Path, spec: &RootfsSpec) -> Result<PathBuf, RootfsError> {
    let packages = spec.package_list()?;
    let key = stable_hash(&(&spec.suite, &packages));
    let dir = build
        .join("rootfs")
        .join(format!("debootstrap-{}-{key:016x}", spec.suite));
    let root = dir.join("root");
    if dir.join(DONE_STAMP).exists() {
        progress::step(&format!("debootstrap tree cached: {}", root.display()));
        return Ok(root);
    }
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = dir.join(format!("root.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    progress::step(&format!(
        "debootstrap --variant=minbase --include={} {} from {} (a few minutes)",
        packages.join(","),
        spec.suite,
        spec.mirror
    ));
    let started = std::time::Instant::now();
    let ran = run_visible(
        sbin_command("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", packages.join(",")))
            .arg(&spec.suite)
            .arg(&tmp)
            .arg(&spec.mirror),
    );
    if let Err(e) = ran {
        // debootstrap needs root; a half-built tree is of no use.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    progress::step(&format!(
        "debootstrap done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root).map_err(io_err(&root))?;
    fs::write(
        dir.join(DONE_STAMP),
        format!("{} {}\n", spec.suite, packages.join(",")),
    )
    .map_err(io_err(&dir))?;
    Ok(root)
}

/// The root disk image for `spec` with `kernel`'s modules, built unless
/// cached.
pub fn build(build: &Path, kernel: &Kernel, spec: &RootfsSpec) -> Result<Rootfs, RootfsError> {
    let tree = debootstrap_tree(build, spec)?;
    let recipe = Recipe::default();
    let key = stable_hash(&(
        &tree,
        recipe::RECIPE_VERSION,
        &recipe,
        &kernel.package,
        &kernel.version,
        spec.size_mib,
    ));
    let dir = build.join("rootfs");
    let stem = format!("debian-{}", spec.suite);
    let image = dir.join(format!("{stem}-{key:016x}.ext4"));
    let done = |fresh| Rootfs {
        image: image.clone(),
        suite: spec.suite.clone(),
        size_mib: spec.size_mib,
        fresh,
    };
    if image.is_file() {
        progress::step(&format!("root disk cached: {}", image.display()));
        return Ok(done(false));
    }
    let staging = dir.join(format!("staging-{}", std::process::id()));
    let result = assemble(&tree, &staging, kernel, &recipe)
        .and_then(|()| mkfs(&staging, &image, spec.size_mib));
    let _ = fs::remove_dir_all(&staging);
    result?;
    crate::cache::prune(&dir, &stem, ".ext4", KEEP_IMAGES);
    Ok(done(true))
}

/// Copies the tree to `staging`, applies the recipe, adds the modules.
fn assemble(
    tree: &Path,
    staging: &Path,
    kernel: &Kernel,
    recipe: &Recipe,
) -> Result<(), RootfsError> {
    let _ = fs::remove_dir_all(staging);
    progress::step(&format!("assembling root tree in {}", staging.display()));
    run_visible(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(tree)
            .arg(staging),
    )?;
    recipe.apply(staging)?;
    // Merged /usr: /lib is a link to usr/lib in the tree.
    let modules = staging.join("usr/lib/modules");
    fs::create_dir_all(&modules).map_err(io_err(&modules))?;
    run_visible(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&kernel.modules_dir)
            .arg(modules.join(&kernel.kver)),
    )?;
    Ok(())
}

/// Writes `staging` as a sparse ext4 image of `size_mib` at `image`.
fn mkfs(staging: &Path, image: &Path, size_mib: u64) -> Result<(), RootfsError> {
    let used_mib = du_mib(staging)?;
    // Room for metadata (inode tables, journal) and a little free space.
    let need = used_mib + used_mib / 4 + 64;
    if size_mib < need {
        return Err(RootfsError::TooSmall(size_mib, need));
    }
    let tmp = image.with_extension(format!("tmp-{}", std::process::id()));
    let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    file.set_len(size_mib << 20).map_err(io_err(&tmp))?;
    drop(file);
    progress::step(&format!(
        "mkfs.ext4 -d ({used_mib} MiB of files) into {} ({size_mib} MiB, sparse)",
        image.display()
    ));
    let made = run_visible(
        sbin_command("mkfs.ext4")
            .args(["-q", "-F", "-L", LABEL, "-d"])
            .arg(staging)
            .arg(&tmp),
    );
    if let Err(e) = made {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    fs::rename(&tmp, image).map_err(io_err(image))?;
    let allocated = fs::metadata(image).map(|m| m.blocks() * 512).unwrap_or(0);
    progress::step(&format!(
        "wrote {} ({} allocated)",
        image.display(),
        progress::human(allocated)
    ));
    Ok(())
}

/// Disk usage of a tree in MiB (`du -sm`).
fn du_mib(path: &Path) -> Result<u64, RootfsError> {
    let out = Command::new("du")
        .arg("-sm")
        .arg(path)
        .output()
        .map_err(io_err(path))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// Copies an image sparsely (`cp --sparse=always`), e.g. before booting it
/// so the cached image stays pristine.
pub fn copy_image(src: &Path, dst: &Path) -> Result<(), RootfsError> {
    let _ = fs::remove_file(dst);
    run_visible(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(src)
            .arg(dst),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fnv1a() {
        // FNV-1a test vector: "a" -> 0xaf63dc4c8601ec8c.
        let mut h = Fnv::default();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        let a = stable_hash(&("bookworm", vec!["kmod", "udev"]));
        assert_eq!(a, stable_hash(&("bookworm", vec!["kmod", "udev"])));
        assert_ne!(a, stable_hash(&("bookworm", vec!["kmod"])));
    }

    #[test]
    fn package_list_is_sorted_and_checked() {
        let mut spec = RootfsSpec {
            suite: "bookworm".into(),
            mirror: sources::DEFAULT_MIRROR.into(),
            packages: vec!["udev".into(), "kmod".into(), "udev".into()],
            size_mib: DEFAULT_SIZE_MIB,
        };
        assert_eq!(spec.package_list().unwrap(), vec!["kmod", "udev"]);
        spec.packages.push("bad name".into());
        assert!(matches!(
            spec.package_list(),
            Err(RootfsError::BadPackage(_))
        ));
    }
}
