//! Kernel module dependency closure from `modules.dep` (as written by
//! `depmod`, see kmod's `depmod(8)`: one line per module, `path: dep dep ...`,
//! paths relative to `/lib/modules/<kver>/`).

use std::collections::{HashMap, HashSet};

use thiserror::Error;

/// Guard against a malformed `modules.dep` with absurd nesting.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModulesError {
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
    #[error("modules.dep line {line} is malformed: {text:?}")]
    Malformed { line: usize, text: String },
    #[error("module dependency chain deeper than {MAX_DEPTH} at {0:?} (cycle?)")]
    TooDeep(String),
}

/// Canonical module name: file name without directory and `.ko[.xz|.zst|.gz]`
/// suffix, with `-` folded to `_` (the kernel treats them as equal).
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let base = ["xz", "zst", "gz"]
        .iter()
        .find_map(|ext| base.strip_suffix(&format!(".ko.{ext}")))
        .or_else(|| base.strip_suffix(".ko"))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// The parsed dependency table of one kernel.
#[derive(Debug, Default)]
pub struct ModuleDb {
    /// Canonical name -> (relative path, dependency paths).
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleDb {
    /// Parses the text of `modules.dep` and (optionally empty) `modules.builtin`.
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<Self, ModulesError> {
        let mut modules = HashMap::new();
        for (idx, line) in modules_dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or(ModulesError::Malformed {
                line: idx + 1,
                text: line.to_string(),
            })?;
            let path = path.trim();
            if path.is_empty() {
                return Err(ModulesError::Malformed {
                    line: idx + 1,
                    text: line.to_string(),
                });
            }
            let deps = deps.split_whitespace().map(str::to_string).collect();
            modules.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin = modules_builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        Ok(Self { modules, builtin })
    }

    /// True when the module is compiled into the kernel image.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// Relative path of a loadable module.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.modules
            .get(&module_name(name))
            .map(|(p, _)| p.as_str())
    }

    /// The relative paths of the requested modules and everything they need,
    /// each once, dependencies before their users (the `insmod` order).
    /// Built-in modules are skipped; unknown names are an error.
    pub fn closure<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in wanted {
            let name = name.as_ref();
            let canon = module_name(name);
            if self.modules.contains_key(&canon) {
                self.visit(&canon, 0, &mut visiting, &mut done, &mut order)?;
            } else if !self.builtin.contains(&canon) {
                return Err(ModulesError::Unknown(name.to_string()));
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        canon: &str,
        depth: usize,
        visiting: &mut HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        // Already placed, or a cycle back to a module being placed: skip.
        if done.contains(canon) || visiting.contains(canon) {
            return Ok(());
        }
        if depth > MAX_DEPTH {
            return Err(ModulesError::TooDeep(canon.to_string()));
        }
        let (path, deps) = self
            .modules
            .get(canon)
            .ok_or_else(|| ModulesError::Unknown(canon.to_string()))?;
        visiting.insert(canon.to_string());
        for dep in deps {
            self.visit(&module_name(dep), depth + 1, visiting, done, order)?;
        }
        visiting.remove(canon);
        done.insert(canon.to_string());
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Excerpt of Debian 6.1's modules.dep (depmod lists the full transitive set).
    const DEP: &str = "\
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/virt/lib/irqbypass.ko:
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko kernel/drivers/usb/core/usbcore.ko kernel/drivers/usb/common/usb-common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/usb/core/usbcore.ko: kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/common/usb-common.ko:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/drivers/tty/serial/8250/8250.ko\n";

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|p| module_name(p) == module_name(name))
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn names_are_canonical() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_name("virtio_blk.ko.xz"), "virtio_blk");
        assert_eq!(module_name("a/b/usb-storage.ko.zst"), "usb_storage");
        assert_eq!(module_name("kvm-amd"), "kvm_amd");
    }

    #[test]
    fn kvm_amd_closure_has_deps_first() {
        let db = ModuleDb::parse(DEP, BUILTIN).unwrap();
        let order = db.closure(&["kvm_amd"]).unwrap();
        assert_eq!(order.len(), 4);
        assert!(pos(&order, "irqbypass") < pos(&order, "kvm"));
        assert!(pos(&order, "kvm") < pos(&order, "kvm_amd"));
        assert!(pos(&order, "ccp") < pos(&order, "kvm_amd"));
        assert_eq!(order.last().unwrap(), "kernel/arch/x86/kvm/kvm-amd.ko");
    }

    #[test]
    fn shared_deps_appear_once_in_order() {
        let db = ModuleDb::parse(DEP, BUILTIN).unwrap();
        let order = db
            .closure(&["usb-storage", "usbcore", "virtio_blk", "ext4"])
            .unwrap();
        let names: Vec<_> = order.iter().map(|p| module_name(p)).collect();
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicates in {names:?}");
        assert_eq!(names.len(), 8);
        assert!(pos(&order, "usb_common") < pos(&order, "usbcore"));
        assert!(pos(&order, "scsi_common") < pos(&order, "scsi_mod"));
        assert!(pos(&order, "scsi_mod") < pos(&order, "usb_storage"));
        assert!(pos(&order, "virtio_ring") < pos(&order, "virtio_blk"));
        assert!(order.contains(&"kernel/drivers/block/virtio_blk.ko.xz".to_string()));
        assert!(db.is_builtin("ext4"));
    }

    #[test]
    fn unknown_and_malformed_are_errors() {
        let db = ModuleDb::parse(DEP, BUILTIN).unwrap();
        assert_eq!(
            db.closure(&["nope"]),
            Err(ModulesError::Unknown("nope".into()))
        );
        assert!(matches!(
            ModuleDb::parse("no colon here\n", ""),
            Err(ModulesError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn cycles_terminate() {
        let db = ModuleDb::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        let order = db.closure(&["a"]).unwrap();
        assert_eq!(order.len(), 2);
    }
}
