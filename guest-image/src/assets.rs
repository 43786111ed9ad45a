//! The guest's building blocks from Debian: the kernel (image + modules with
//! rebuilt depmod files) and a static busybox.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::debian::{self, io_err, DebianError};
use crate::modules::{DepmodFiles, ModuleDb, ModulesError};
use crate::progress;
use crate::vmlinux::{self, VmlinuxError};

/// The meta package whose dependency names the current kernel ABI.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// Debian's statically linked busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

#[derive(Debug, Error)]
pub enum AssetError {
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error("{0} contains no lib/modules/<version> directory")]
    NoModulesDir(PathBuf),
    #[error("kernel image {0} is missing from the package")]
    NoVmlinuz(PathBuf),
    #[error("busybox binary is missing from {0}")]
    NoBusybox(PathBuf),
    #[error(transparent)]
    Vmlinux(#[from] VmlinuxError),
    #[error("cannot decompress module {path}: {why}")]
    Decompress { path: PathBuf, why: String },
}

/// A Debian kernel unpacked in the cache.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Versioned package name, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// Debian package version, e.g. `6.1.192-2`.
    pub version: String,
    /// Kernel release (`uname -r`), e.g. `6.1.0-56-amd64`.
    pub kver: String,
    /// Unpacked package root.
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    /// The uncompressed kernel ELF extracted from `vmlinuz` (see [`vmlinux`]).
    pub vmlinux: PathBuf,
    /// `<root>/lib/modules/<kver>`.
    pub modules_dir: PathBuf,
}

/// The statically linked busybox.
#[derive(Clone, Debug)]
pub struct Busybox {
    pub version: String,
    pub path: PathBuf,
}

/// Both assets, as the initramfs builders need them.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub kernel: Kernel,
    pub busybox: Busybox,
}

/// Locates `lib/modules/<kver>` (or `usr/lib/modules/<kver>`) in a root.
pub(crate) fn find_kver(root: &Path) -> Result<(String, PathBuf), AssetError> {
    for base in ["lib/modules", "usr/lib/modules"] {
        let dir = root.join(base);
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut kvers: Vec<String> = rd
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        kvers.sort();
        if let Some(k) = kvers.pop() {
            return Ok((k.clone(), dir.join(k)));
        }
    }
    Err(AssetError::NoModulesDir(root.to_path_buf()))
}

/// Parses the depmod files in `lib/modules/<kver>`: `modules.dep`,
/// `modules.softdep` and `modules.alias` (all written by the `depmod -b`
/// [`fetch_kernel`] runs, so required), `modules.builtin` and
/// `modules.builtin.modinfo` (shipped by the kernel package; optional).
pub fn read_module_db(modules_dir: &Path) -> Result<ModuleDb, AssetError> {
    let required = |name: &str| {
        let path = modules_dir.join(name);
        fs::read_to_string(&path).map_err(io_err(&path))
    };
    let optional = |name: &str| {
        fs::read(modules_dir.join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let dep = required("modules.dep")?;
    let softdep = required("modules.softdep")?;
    let alias = required("modules.alias")?;
    let builtin = optional("modules.builtin");
    let builtin_modinfo = optional("modules.builtin.modinfo");
    Ok(ModuleDb::parse(&DepmodFiles {
        dep: &dep,
        builtin: &builtin,
        softdep: &softdep,
        alias: &alias,
        builtin_modinfo: &builtin_modinfo,
    })?)
}

/// Fetches (or finds in the cache) the kernel `linux-image-amd64` depends on,
/// with `modules.dep` rebuilt by `depmod -b`.
pub fn fetch_kernel(build: &Path) -> Result<Kernel, AssetError> {
    let package = debian::kernel_package(KERNEL_META_PACKAGE)?;
    let unpacked = debian::fetch_unpacked(build, &package, |root| {
        let (kver, dir) = find_kver(root).map_err(|e| DebianError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // depmod -b looks in <root>/lib/modules; merged-/usr packages ship
        // usr/lib/modules only.
        if !root.join("lib/modules").exists() && dir.starts_with(root.join("usr/lib")) {
            std::os::unix::fs::symlink("usr/lib", root.join("lib")).map_err(io_err(root))?;
        }
        debian::depmod(root, &kver)
    })?;
    let (kver, modules_dir) = find_kver(&unpacked.root)?;
    let vmlinuz = unpacked.root.join("boot").join(format!("vmlinuz-{kver}"));
    if !vmlinuz.is_file() {
        return Err(AssetError::NoVmlinuz(vmlinuz));
    }
    let vmlinux = unpacked.root.join("boot").join(format!("vmlinux-{kver}"));
    vmlinux::extract(&vmlinuz, &vmlinux)?;
    let size = fs::metadata(&vmlinuz).map(|m| m.len()).unwrap_or(0);
    progress::step(&format!(
        "kernel {kver} ({} {}): {} ({})",
        unpacked.package,
        unpacked.version,
        vmlinuz.display(),
        progress::human(size)
    ));
    Ok(Kernel {
        package: unpacked.package,
        version: unpacked.version,
        kver,
        root: unpacked.root,
        vmlinuz,
        vmlinux,
        modules_dir,
    })
}

/// Fetches (or finds in the cache) `busybox-static`.
pub fn fetch_busybox(build: &Path) -> Result<Busybox, AssetError> {
    let unpacked = debian::fetch_unpacked(build, BUSYBOX_PACKAGE, |_| Ok(()))?;
    let path = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| unpacked.root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| AssetError::NoBusybox(unpacked.root.clone()))?;
    Ok(Busybox {
        version: unpacked.version,
        path,
    })
}

/// Fetches both assets.
pub fn fetch_assets(build: &Path) -> Result<GuestAssets, AssetError> {
    Ok(GuestAssets {
        kernel: fetch_kernel(build)?,
        busybox: fetch_busybox(build)?,
    })
}

impl Kernel {
    /// Parses this kernel's depmod files (see [`read_module_db`]).
    pub fn module_db(&self) -> Result<ModuleDb, AssetError> {
        read_module_db(&self.modules_dir)
    }

    /// Reads a module (path relative to the modules dir), decompressing
    /// `.xz`/`.zst`/`.gz` so busybox `insmod` can load it. Returns the
    /// uncompressed relative path and the bytes.
    pub fn module_bytes(&self, rel: &str) -> Result<(String, Vec<u8>), AssetError> {
        let path = self.modules_dir.join(rel);
        let decompress_err = |why: String| AssetError::Decompress {
            path: path.clone(),
            why,
        };
        if let Some(stem) = rel.strip_suffix(".gz") {
            let file = fs::File::open(&path).map_err(io_err(&path))?;
            let mut data = Vec::new();
            flate2::read::GzDecoder::new(file)
                .read_to_end(&mut data)
                .map_err(|e| decompress_err(e.to_string()))?;
            return Ok((stem.to_string(), data));
        }
        for (ext, tool) in [(".xz", "xz"), (".zst", "zstd")] {
            if let Some(stem) = rel.strip_suffix(ext) {
                let out = Command::new(tool)
                    .arg("-dc")
                    .arg(&path)
                    .output()
                    .map_err(|e| decompress_err(format!("{tool}: {e} (install {tool})")))?;
                if !out.status.success() {
                    return Err(decompress_err(String::from_utf8_lossy(&out.stderr).into()));
                }
                return Ok((stem.to_string(), out.stdout));
            }
        }
        let data = fs::read(&path).map_err(io_err(&path))?;
        Ok((rel.to_string(), data))
    }
}
