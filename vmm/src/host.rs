//! Checks that this host can run a stock Linux guest, and says plainly what
//! to do when it cannot.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use thiserror::Error;

const KVM_DEV: &str = "/dev/kvm";
const NESTED_HINT: &str = "run the guest in the nested harness instead: scripts/demo.sh";

#[derive(Debug, Error)]
pub enum HostError {
    #[error("{KVM_DEV} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or {NESTED_HINT})")]
    NoKvm,
    #[error("permission denied opening {KVM_DEV}: run as root or join the group that owns it")]
    Permission,
    #[error("cannot open {KVM_DEV}")]
    Open(#[source] std::io::Error),
    #[error(
        "{KVM_DEV} is PVM (module kvm_pvm), a paravirtual KVM that cannot boot a stock Linux kernel; {NESTED_HINT}"
    )]
    Pvm,
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
}

/// Which KVM implementation backs `/dev/kvm`, from the loaded modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    Intel,
    Amd,
    Pvm,
    Unknown,
}

/// Reads the loaded KVM vendor module from sysfs.
pub fn kvm_flavour(sys_module: &Path) -> KvmFlavour {
    let loaded = |m: &str| sys_module.join(m).exists();
    if loaded("kvm_pvm") {
        KvmFlavour::Pvm
    } else if loaded("kvm_intel") {
        KvmFlavour::Intel
    } else if loaded("kvm_amd") {
        KvmFlavour::Amd
    } else {
        KvmFlavour::Unknown
    }
}

/// True when this host's KVM can boot a stock kernel directly.
pub fn can_boot_directly() -> bool {
    Path::new(KVM_DEV).exists()
        && matches!(
            kvm_flavour(Path::new("/sys/module")),
            KvmFlavour::Intel | KvmFlavour::Amd
        )
}

/// Opens `/dev/kvm` after the checks above; `allow_pvm` skips the PVM refusal
/// (for experiments only: stock kernels hang there).
pub fn open_kvm(allow_pvm: bool) -> Result<Kvm, HostError> {
    if !Path::new(KVM_DEV).exists() {
        return Err(HostError::NoKvm);
    }
    if !allow_pvm && kvm_flavour(Path::new("/sys/module")) == KvmFlavour::Pvm {
        return Err(HostError::Pvm);
    }
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => HostError::Permission,
        libc::ENOENT => HostError::NoKvm,
        _ => HostError::Open(std::io::Error::from_raw_os_error(e.errno())),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(HostError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::Pit2, "PIT2"),
        (Cap::ExtCpuid, "EXT_CPUID"),
        (Cap::SetTssAddr, "SET_TSS_ADDR"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCap(name));
        }
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_from_sysfs_modules() {
        let dir = std::env::temp_dir().join(format!("vmm-host-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(kvm_flavour(&dir), KvmFlavour::Unknown);
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(kvm_flavour(&dir), KvmFlavour::Amd);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(
            kvm_flavour(&dir),
            KvmFlavour::Pvm,
            "PVM wins: it is what /dev/kvm is"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pvm_message_names_the_fix() {
        let msg = HostError::Pvm.to_string();
        assert!(
            msg.contains("kvm_pvm") && msg.contains("scripts/demo.sh"),
            "{msg}"
        );
    }
}
