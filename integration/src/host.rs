//! What the host offers: which kind of `/dev/kvm` (ordinary, PVM or none),
//! the QEMU binary, and the VMM binary (which must be static to run in L1).

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Env var naming the VMM binary.
pub const VMM_BIN_ENV: &str = "VMM_BIN";
/// Env var naming the QEMU binary (default: `qemu-system-x86_64` on PATH).
pub const QEMU_ENV: &str = "QEMU";

/// ELF program header type of the interpreter path (System V gABI, "Program
/// Header": PT_INTERP = 3). A static executable has none.
const PT_INTERP: u32 = 3;
/// ELF64 header offsets (System V gABI, "ELF Header").
const E_PHOFF: usize = 0x20;
const E_PHENTSIZE: usize = 0x36;
const E_PHNUM: usize = 0x38;
const EI_CLASS_64: u8 = 2;

#[derive(Debug, Error)]
pub enum HostError {
    #[error(
        "VMM binary {0} not found. Build it with scripts/build-vmm-static.sh \
         (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p vmm \
         --target x86_64-unknown-linux-gnu) or point {VMM_BIN_ENV} at one"
    )]
    VmmMissing(PathBuf),
    #[error(
        "VMM binary {0} is dynamically linked and cannot run in the L1 initramfs; \
         build it with scripts/build-vmm-static.sh"
    )]
    VmmNotStatic(PathBuf),
    #[error(
        "vmm-ctl binary {0} not found. Build it with scripts/build-vmm-static.sh \
         (it builds vmm and vmm-ctl) or point {VMM_CTL_BIN_ENV} at one"
    )]
    VmmCtlMissing(PathBuf),
    #[error("{0} is not a 64-bit ELF executable")]
    NotElf(PathBuf),
    #[error("QEMU ({0}) not found; run scripts/setup.sh (installs qemu-system-x86)")]
    QemuMissing(String),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The kind of `/dev/kvm` on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// kvm_intel / kvm_amd: stock guests boot; run the VMM directly.
    Ordinary,
    /// kvm_pvm: stock kernels do not boot; use the nested harness.
    Pvm,
    /// No `/dev/kvm`.
    Missing,
}

/// Classifies the host's KVM from `/dev/kvm` and `/sys/module`.
pub fn detect_kvm() -> KvmKind {
    classify_kvm(Path::new("/dev/kvm").exists(), |m| {
        Path::new("/sys/module").join(m).exists()
    })
}

fn classify_kvm(dev_exists: bool, module_loaded: impl Fn(&str) -> bool) -> KvmKind {
    if !dev_exists {
        KvmKind::Missing
    } else if module_loaded("kvm_pvm") {
        KvmKind::Pvm
    } else if module_loaded("kvm_intel") || module_loaded("kvm_amd") {
        KvmKind::Ordinary
    } else {
        // A /dev/kvm we cannot identify: the nested harness is the safe bet.
        KvmKind::Pvm
    }
}

/// Default VMM location: the static release build of the workspace, in
/// Cargo's target directory (`$CARGO_TARGET_DIR`, as the build scripts use
/// it, else `<workspace>/target`).
pub fn default_vmm_path() -> PathBuf {
    target_dir(std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .join("x86_64-unknown-linux-gnu/release/vmm")
}

/// Cargo's target directory: `var` (`$CARGO_TARGET_DIR`; a relative one is
/// taken from the workspace, where the scripts run cargo), else
/// `<workspace>/target`.
fn target_dir(var: Option<PathBuf>) -> PathBuf {
    let ws = guest_image::workspace_dir();
    match var.filter(|v| !v.as_os_str().is_empty()) {
        Some(dir) => ws.join(dir),
        None => ws.join("target"),
    }
}

/// `$VMM_BIN` or [`default_vmm_path`], checked to exist (and, when
/// `need_static`, to be statically linked).
pub fn vmm_binary(need_static: bool) -> Result<PathBuf, HostError> {
    let path = std::env::var_os(VMM_BIN_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_vmm_path);
    if !path.is_file() {
        return Err(HostError::VmmMissing(path));
    }
    if need_static && !is_static_elf(&path)? {
        return Err(HostError::VmmNotStatic(path));
    }
    Ok(path)
}

/// True when the ELF64 file at `path` has no PT_INTERP program header.
pub fn is_static_elf(path: &Path) -> Result<bool, HostError> {
    let data = fs::read(path).map_err(|source| HostError::Io {
        path: path.into(),
        source,
    })?;
    elf_is_static(&data).ok_or_else(|| HostError::NotElf(path.into()))
}

fn elf_is_static(data: &[u8]) -> Option<bool> {
    if data.get(..4)? != b"\x7fELF" || *data.get(4)? != EI_CLASS_64 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(data.get(E_PHOFF..E_PHOFF + 8)?.try_into().ok()?);
    let phentsize = usize::from(u16_at(E_PHENTSIZE)?);
    let phnum = usize::from(u16_at(E_PHNUM)?);
    let phoff = usize::try_from(phoff).ok()?;
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// Env var naming the `vmm-ctl` binary (default: next to the VMM).
pub const VMM_CTL_BIN_ENV: &str = "VMM_CTL_BIN";
/// File name of the control client built with the VMM.
pub const VMM_CTL_NAME: &str = "vmm-ctl";

/// `$VMM_CTL_BIN`, else `vmm-ctl` in the directory of [`vmm_binary`]
/// (scripts/build-vmm-static.sh builds both), checked to exist (and, when
/// `need_static`, to be statically linked).
pub fn vmm_ctl_binary(need_static: bool) -> Result<PathBuf, HostError> {
    let path = match std::env::var_os(VMM_CTL_BIN_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let vmm = vmm_binary(false)?;
            vmm.with_file_name(VMM_CTL_NAME)
        }
    };
    if !path.is_file() {
        return Err(HostError::VmmCtlMissing(path));
    }
    if need_static && !is_static_elf(&path)? {
        return Err(HostError::VmmNotStatic(path));
    }
    Ok(path)
}

/// The QEMU binary: `$QEMU`, else `qemu-system-x86_64` found on PATH.
pub fn qemu_binary() -> Result<PathBuf, HostError> {
    if let Some(q) = std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(q);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(HostError::QemuMissing(p.display().to_string()))
        };
    }
    let name = "qemu-system-x86_64";
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| HostError::QemuMissing(name.into()))
}

/// Firmware directories (`-L`) for a QEMU unpacked outside `/usr`, e.g.
/// Debian packages extracted with `dpkg-deb -x` under `PREFIX`
/// (`PREFIX/usr/bin/qemu-system-x86_64`): its own `share/qemu` and
/// `share/seabios`, which QEMU searches before its built-in paths (Debian's
/// bookworm-backports build looks only in `/usr/share/...`, where the
/// installed QEMU's older files are). None for a QEMU under `/usr` or one
/// without a `share/qemu` beside its `bin`.
pub fn qemu_data_dirs(qemu: &Path) -> Vec<PathBuf> {
    let Some(prefix) = qemu.parent().and_then(Path::parent) else {
        return Vec::new();
    };
    if prefix == Path::new("/usr") || !prefix.join("share/qemu").is_dir() {
        return Vec::new();
    }
    ["share/qemu", "share/seabios"]
        .iter()
        .map(|d| prefix.join(d))
        .filter(|d| d.is_dir())
        .collect()
}

/// The module directory (`QEMU_MODULE_DIR`) of a QEMU unpacked outside
/// `/usr` like for [`qemu_data_dirs`]: its own `lib/x86_64-linux-gnu/qemu`, so
/// it does not try the installed QEMU's modules (which it refuses, "Only
/// modules from the same build can be loaded", noise on L1's console).
pub fn qemu_module_dir(qemu: &Path) -> Option<PathBuf> {
    let prefix = qemu.parent()?.parent()?;
    let dir = prefix.join("lib/x86_64-linux-gnu/qemu");
    (prefix != Path::new("/usr") && dir.is_dir()).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_follows_cargo_target_dir() {
        let ws = guest_image::workspace_dir();
        assert_eq!(target_dir(None), ws.join("target"));
        assert_eq!(target_dir(Some(PathBuf::new())), ws.join("target"));
        assert_eq!(target_dir(Some("/t/x".into())), PathBuf::from("/t/x"));
        assert_eq!(target_dir(Some("rel".into())), ws.join("rel"));
    }

    #[test]
    fn kvm_kinds() {
        assert_eq!(classify_kvm(false, |_| true), KvmKind::Missing);
        assert_eq!(classify_kvm(true, |m| m == "kvm_pvm"), KvmKind::Pvm);
        assert_eq!(classify_kvm(true, |m| m == "kvm_amd"), KvmKind::Ordinary);
        assert_eq!(classify_kvm(true, |m| m == "kvm_intel"), KvmKind::Ordinary);
        assert_eq!(classify_kvm(true, |_| false), KvmKind::Pvm);
    }

    #[test]
    fn firmware_dirs_only_for_a_qemu_outside_usr() {
        assert!(qemu_data_dirs(Path::new("/usr/bin/qemu-system-x86_64")).is_empty());
        assert!(qemu_data_dirs(Path::new("qemu-system-x86_64")).is_empty());
        let root = std::env::temp_dir().join(format!("qemu-prefix-{}", std::process::id()));
        let qemu = root.join("usr/bin/qemu-system-x86_64");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        assert!(qemu_data_dirs(&qemu).is_empty(), "no share/qemu yet");
        std::fs::create_dir_all(root.join("usr/share/qemu")).unwrap();
        assert_eq!(qemu_data_dirs(&qemu), vec![root.join("usr/share/qemu")]);
        std::fs::create_dir_all(root.join("usr/share/seabios")).unwrap();
        assert_eq!(
            qemu_data_dirs(&qemu),
            vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")]
        );
        assert_eq!(qemu_module_dir(&qemu), None);
        std::fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu/qemu")).unwrap();
        assert_eq!(
            qemu_module_dir(&qemu),
            Some(root.join("usr/lib/x86_64-linux-gnu/qemu"))
        );
        assert_eq!(
            qemu_module_dir(Path::new("/usr/bin/qemu-system-x86_64")),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn static_elf_detection() {
        // /bin/sh on Debian is dynamically linked.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        assert!(matches!(
            is_static_elf(Path::new("/etc/hostname")),
            Err(HostError::NotElf(_)) | Err(HostError::Io { .. })
        ));
        // A minimal ELF64 header with one PT_LOAD program header: static.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = EI_CLASS_64;
        elf[E_PHOFF..E_PHOFF + 8].copy_from_slice(&64u64.to_le_bytes());
        elf[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&56u16.to_le_bytes());
        elf[E_PHNUM..E_PHNUM + 2].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(elf_is_static(&elf), Some(true));
        elf[64..68].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert_eq!(elf_is_static(&elf), Some(false));
        // Program headers beyond the file: not an answer, not a panic.
        elf[E_PHNUM..E_PHNUM + 2].copy_from_slice(&100u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(elf_is_static(&elf), None);
    }
}
