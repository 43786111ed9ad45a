//! Kernel module closures from `depmod`'s metadata (see kmod's
//! `depmod(8)`, `modprobe.d(5)`), paths relative to `/lib/modules/<kver>/`:
//!
//! - `modules.dep`: one line per module, `path: dep dep ...`, the full
//!   transitive set of symbol dependencies;
//! - `modules.softdep` ([`softdep`]): what a module asks for at run time
//!   (`request_module`), to load before (`pre:`) or after (`post:`) it;
//! - `modules.alias`, `modules.builtin.modinfo` ([`alias`]): the modules
//!   behind a soft dependency's name (`crypto-crc32c` -> `crc32c_generic`);
//! - `modules.builtin`: modules compiled into the kernel (nothing to load).
//!
//! The initramfs has no `modprobe` with this metadata, so a request the
//! kernel makes at run time fails; the closure therefore loads soft
//! dependencies ahead of time, resolved the way `modprobe` would: a module
//! name first, then an exact alias, then built in.

mod alias;
mod softdep;

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use crate::progress;

pub use alias::Aliases;
pub use softdep::{SoftDeps, UNDECLARED_PRE};

/// Guard against malformed metadata with absurd nesting.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModulesError {
    #[error("kernel module {0:?} is neither a module, an alias nor built in")]
    Unknown(String),
    #[error("{file} line {line} is malformed: {text:?}")]
    Malformed {
        file: &'static str,
        line: usize,
        text: String,
    },
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
    alias::normalize(base)
}

/// The text of one kernel's depmod files. `dep` is required; the others may
/// be empty (then no soft dependencies, aliases or built-ins are known).
#[derive(Clone, Copy, Debug, Default)]
pub struct DepmodFiles<'a> {
    /// `modules.dep`.
    pub dep: &'a str,
    /// `modules.builtin`.
    pub builtin: &'a str,
    /// `modules.softdep`.
    pub softdep: &'a str,
    /// `modules.alias`.
    pub alias: &'a str,
    /// `modules.builtin.modinfo` (NUL-separated `module.key=value`).
    pub builtin_modinfo: &'a str,
}

/// A soft dependency that names nothing in this kernel: skipped, as
/// `modprobe` skips it (a soft dependency is optional by definition; e.g. a
/// name for another architecture's driver).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedSoftdep {
    /// The module declaring it.
    pub module: String,
    /// The name it asks for.
    pub name: String,
}

/// Modules to load, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Closure {
    /// Relative paths, each once, in `insmod` order.
    pub paths: Vec<String>,
    /// Soft dependencies that resolved to nothing (each logged).
    pub skipped: Vec<SkippedSoftdep>,
}

/// What a name stands for.
enum Resolved<'a> {
    /// Loadable modules (canonical names).
    Modules(Vec<&'a str>),
    Builtin,
    Missing,
}

/// The parsed metadata of one kernel.
#[derive(Debug, Default)]
pub struct ModuleDb {
    /// Canonical name -> (relative path, dependency paths).
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
    /// Canonical name -> soft dependencies (with [`UNDECLARED_PRE`]).
    softdeps: HashMap<String, SoftDeps>,
    aliases: Aliases,
}

/// The state of one closure walk.
#[derive(Default)]
struct Walk {
    visiting: HashSet<String>,
    done: HashSet<String>,
    out: Closure,
}

impl ModuleDb {
    /// Parses a kernel's depmod files.
    pub fn parse(files: &DepmodFiles) -> Result<Self, ModulesError> {
        let modules = parse_dep(files.dep)?;
        let builtin = files
            .builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        let mut softdeps = softdep::parse(files.softdep)?;
        for (module, name) in UNDECLARED_PRE {
            if modules.contains_key(*module) {
                let pre = &mut softdeps.entry(module.to_string()).or_default().pre;
                if !pre
                    .iter()
                    .any(|n| alias::normalize(n) == alias::normalize(name))
                {
                    pre.push(name.to_string());
                }
            }
        }
        let aliases = Aliases::parse(files.alias, files.builtin_modinfo)?;
        Ok(Self {
            modules,
            builtin,
            softdeps,
            aliases,
        })
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

    /// In kmod's lookup order: a module name, else an exact alias, else
    /// built in (a module name or a built-in module's alias).
    fn resolve(&self, name: &str) -> Resolved<'_> {
        let canon = module_name(name);
        if let Some((key, _)) = self.modules.get_key_value(&canon) {
            return Resolved::Modules(vec![key.as_str()]);
        }
        let chosen: Vec<&str> = self
            .aliases
            .choose(name)
            .into_iter()
            .filter_map(|m| self.modules.get_key_value(m).map(|(k, _)| k.as_str()))
            .collect();
        if !chosen.is_empty() {
            Resolved::Modules(chosen)
        } else if self.builtin.contains(&canon) || self.aliases.is_builtin(name) {
            Resolved::Builtin
        } else {
            Resolved::Missing
        }
    }

    /// The relative paths of the requested modules (names or aliases) and
    /// everything they need: `modules.dep` dependencies and soft
    /// dependencies, each once, in `insmod` order (a module's `pre:` soft
    /// dependencies and its dependencies before it, its `post:` ones after).
    /// Built-in modules are skipped; an unknown requested name is an error,
    /// an unknown soft dependency is skipped with a progress line.
    pub fn closure<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Closure, ModulesError> {
        let mut walk = Walk::default();
        for name in wanted {
            let name = name.as_ref();
            match self.resolve(name) {
                Resolved::Modules(list) => {
                    for m in list {
                        self.visit(m, 0, &mut walk)?;
                    }
                }
                Resolved::Builtin => {}
                Resolved::Missing => return Err(ModulesError::Unknown(name.to_string())),
            }
        }
        Ok(walk.out)
    }

    fn visit(&self, canon: &str, depth: usize, walk: &mut Walk) -> Result<(), ModulesError> {
        // Already placed, or a cycle back to a module being placed: skip.
        if walk.done.contains(canon) || walk.visiting.contains(canon) {
            return Ok(());
        }
        if depth > MAX_DEPTH {
            return Err(ModulesError::TooDeep(canon.to_string()));
        }
        let (path, deps) = self
            .modules
            .get(canon)
            .ok_or_else(|| ModulesError::Unknown(canon.to_string()))?;
        let soft = self.softdeps.get(canon);
        walk.visiting.insert(canon.to_string());
        for name in soft.iter().flat_map(|s| &s.pre) {
            self.visit_soft(canon, name, depth + 1, walk)?;
        }
        for dep in deps {
            self.visit(&module_name(dep), depth + 1, walk)?;
        }
        walk.visiting.remove(canon);
        walk.done.insert(canon.to_string());
        walk.out.paths.push(path.clone());
        for name in soft.iter().flat_map(|s| &s.post) {
            self.visit_soft(canon, name, depth + 1, walk)?;
        }
        Ok(())
    }

    fn visit_soft(
        &self,
        module: &str,
        name: &str,
        depth: usize,
        walk: &mut Walk,
    ) -> Result<(), ModulesError> {
        match self.resolve(name) {
            Resolved::Modules(list) => {
                for m in list {
                    self.visit(m, depth, walk)?;
                }
            }
            Resolved::Builtin => {}
            Resolved::Missing => {
                progress::step(&format!(
                    "module {module}: soft dependency {name:?} is no module, alias or \
                     built-in of this kernel; skipped"
                ));
                walk.out.skipped.push(SkippedSoftdep {
                    module: module.to_string(),
                    name: name.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Parses `modules.dep` into canonical name -> (path, dependency paths).
fn parse_dep(text: &str) -> Result<HashMap<String, (String, Vec<String>)>, ModulesError> {
    let mut modules = HashMap::new();
    for (idx, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = || ModulesError::Malformed {
            file: "modules.dep",
            line: idx + 1,
            text: line.to_string(),
        };
        let (path, deps) = line.split_once(':').ok_or_else(malformed)?;
        let path = path.trim();
        if path.is_empty() {
            return Err(malformed());
        }
        let deps = deps.split_whitespace().map(str::to_string).collect();
        modules.insert(module_name(path), (path.to_string(), deps));
    }
    Ok(modules)
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

    // sd_mod's part of Debian 6.1's modules.dep, modules.softdep and
    // modules.alias, plus a module with a `post:` soft dependency and one
    // whose soft dependency is built in or missing.
    const SD_DEP: &str = "\
kernel/arch/x86/crypto/crct10dif-pclmul.ko: kernel/crypto/crct10dif_common.ko
kernel/crypto/crct10dif_common.ko:
kernel/crypto/crct10dif_generic.ko: kernel/crypto/crct10dif_common.ko
kernel/crypto/crc64_rocksoft_generic.ko: kernel/lib/crc64.ko
kernel/block/t10-pi.ko: kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko kernel/crypto/crct10dif_common.ko
kernel/lib/crc-t10dif.ko: kernel/crypto/crct10dif_common.ko
kernel/lib/crc64.ko:
kernel/lib/crc64-rocksoft.ko: kernel/lib/crc64.ko
kernel/drivers/scsi/sd_mod.ko: kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko kernel/crypto/crct10dif_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/vfio/vfio.ko:
kernel/drivers/vfio/vfio_iommu_type1.ko: kernel/drivers/vfio/vfio.ko
kernel/fs/nfsd/nfsd.ko:
kernel/drivers/spi/spi-pxa2xx-platform.ko:
kernel/fs/f2fs/f2fs.ko:
kernel/crypto/crc32_generic.ko:
";
    const SD_SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep crc_t10dif pre: crct10dif
softdep crc64_rocksoft pre: crc64
softdep vfio post: vfio_iommu_type1
softdep nfsd pre: crypto-md5
softdep spi_pxa2xx_platform pre: dw_dmac
softdep f2fs pre: crc32
";
    const SD_ALIAS: &str = "\
alias crypto-crct10dif-pclmul crct10dif_pclmul
alias crypto-crct10dif crct10dif_pclmul
alias crct10dif crct10dif_pclmul
alias crypto-crct10dif-generic crct10dif_generic
alias crypto-crct10dif crct10dif_generic
alias crct10dif crct10dif_generic
alias crypto-crc64-rocksoft crc64_rocksoft_generic
alias crc64-rocksoft crc64_rocksoft_generic
alias crc32 crc32_generic
";
    const SD_MODINFO: &str = "md5.alias=crypto-md5\0md5.alias=md5\0";

    fn sd_db() -> ModuleDb {
        ModuleDb::parse(&DepmodFiles {
            dep: SD_DEP,
            builtin: "kernel/lib/crc32.ko\nkernel/crypto/md5.ko\n",
            softdep: SD_SOFTDEP,
            alias: SD_ALIAS,
            builtin_modinfo: SD_MODINFO,
        })
        .unwrap()
    }

    fn soft_db(dep: &str, softdep: &str, alias: &str) -> ModuleDb {
        ModuleDb::parse(&DepmodFiles {
            dep,
            softdep,
            alias,
            ..DepmodFiles::default()
        })
        .unwrap()
    }

    fn db(dep: &str, builtin: &str) -> ModuleDb {
        ModuleDb::parse(&DepmodFiles {
            dep,
            builtin,
            ..DepmodFiles::default()
        })
        .unwrap()
    }

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|p| module_name(p) == module_name(name))
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    fn names(order: &[String]) -> Vec<String> {
        order.iter().map(|p| module_name(p)).collect()
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
        let order = db(DEP, BUILTIN).closure(&["kvm_amd"]).unwrap().paths;
        assert_eq!(order.len(), 4);
        assert!(pos(&order, "irqbypass") < pos(&order, "kvm"));
        assert!(pos(&order, "kvm") < pos(&order, "kvm_amd"));
        assert!(pos(&order, "ccp") < pos(&order, "kvm_amd"));
        assert_eq!(order.last().unwrap(), "kernel/arch/x86/kvm/kvm-amd.ko");
    }

    #[test]
    fn shared_deps_appear_once_in_order() {
        let db = db(DEP, BUILTIN);
        let order = db
            .closure(&["usb-storage", "usbcore", "virtio_blk", "ext4"])
            .unwrap()
            .paths;
        let names = names(&order);
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
        assert_eq!(
            db(DEP, BUILTIN).closure(&["nope"]),
            Err(ModulesError::Unknown("nope".into()))
        );
        let parse = |dep| {
            ModuleDb::parse(&DepmodFiles {
                dep,
                ..DepmodFiles::default()
            })
        };
        assert!(matches!(
            parse("no colon here\n"),
            Err(ModulesError::Malformed {
                file: "modules.dep",
                line: 1,
                ..
            })
        ));
    }

    #[test]
    fn cycles_terminate() {
        let order = db("a.ko: b.ko\nb.ko: a.ko\n", "").closure(&["a"]).unwrap();
        assert_eq!(order.paths.len(), 2);
    }

    /// sd_mod pulls in the providers t10-pi's CRC libraries ask the crypto
    /// API for, generic ones, each before the library that asks: crct10dif
    /// through crc_t10dif's declared soft dependency, crc64-rocksoft through
    /// [`UNDECLARED_PRE`].
    #[test]
    fn sd_mod_gets_its_crc_providers_first() {
        let c = sd_db().closure(&["sd_mod"]).unwrap();
        assert!(c.skipped.is_empty(), "{:?}", c.skipped);
        let order = &c.paths;
        assert_eq!(
            names(order).iter().collect::<HashSet<_>>(),
            [
                "scsi_common",
                "scsi_mod",
                "crct10dif_common",
                "crct10dif_generic",
                "crc_t10dif",
                "crc64",
                "crc64_rocksoft_generic",
                "crc64_rocksoft",
                "t10_pi",
                "sd_mod",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .iter()
            .collect::<HashSet<_>>(),
            "{order:?}"
        );
        assert_eq!(order.len(), 10);
        assert!(pos(order, "crct10dif_common") < pos(order, "crct10dif_generic"));
        assert!(pos(order, "crct10dif_generic") < pos(order, "crc_t10dif"));
        assert!(pos(order, "crc64") < pos(order, "crc64_rocksoft_generic"));
        assert!(pos(order, "crc64_rocksoft_generic") < pos(order, "crc64_rocksoft"));
        assert!(pos(order, "t10_pi") < pos(order, "sd_mod"));
    }

    #[test]
    fn requested_alias_resolves_like_a_soft_dependency() {
        let order = sd_db().closure(&["crypto-crct10dif"]).unwrap().paths;
        assert_eq!(names(&order), ["crct10dif_common", "crct10dif_generic"]);
    }

    #[test]
    fn post_soft_dependency_comes_after() {
        let order = sd_db().closure(&["vfio"]).unwrap().paths;
        assert_eq!(names(&order), ["vfio", "vfio_iommu_type1"]);
    }

    /// A soft dependency a built-in module answers needs nothing; one that
    /// names nothing in the kernel is skipped and reported, not an error.
    #[test]
    fn builtin_and_missing_soft_dependencies() {
        let db = sd_db();
        let c = db.closure(&["nfsd"]).unwrap();
        assert_eq!(names(&c.paths), ["nfsd"]);
        assert!(c.skipped.is_empty());
        let c = db.closure(&["spi-pxa2xx-platform"]).unwrap();
        assert_eq!(names(&c.paths), ["spi_pxa2xx_platform"]);
        assert_eq!(
            c.skipped,
            [SkippedSoftdep {
                module: "spi_pxa2xx_platform".into(),
                name: "dw_dmac".into(),
            }]
        );
        // An alias comes before a built-in of that name, as in kmod: the
        // built-in crc32 library is not the "crc32" crypto algorithm.
        let c = db.closure(&["f2fs"]).unwrap();
        assert_eq!(names(&c.paths), ["crc32_generic", "f2fs"]);
        assert!(db.is_builtin("crc32"));
        // Asked for by name, the same missing module is an error.
        assert_eq!(
            db.closure(&["dw_dmac"]),
            Err(ModulesError::Unknown("dw_dmac".into()))
        );
    }

    /// Soft dependencies may form cycles (through aliases too); the walk
    /// places each module once and stops.
    #[test]
    fn soft_dependency_cycles_terminate() {
        let db = soft_db(
            "a.ko:\nb.ko:\nc.ko: a.ko\n",
            "softdep a pre: alias-b\nsoftdep b pre: c post: a\nsoftdep c post: b\n",
            "alias alias-b b\n",
        );
        let c = db.closure(&["a", "b", "c"]).unwrap();
        let names = names(&c.paths);
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names.iter().collect::<HashSet<_>>().len(), 3, "{names:?}");
        // a's pre: chain b -> c comes back to a while a is being placed:
        // the cycle is broken there, so c and b are placed before a.
        assert_eq!(names, ["c", "b", "a"]);
    }

    #[test]
    fn undeclared_entry_is_not_duplicated() {
        let db = soft_db(
            "crc64-rocksoft.ko:\nx_generic.ko:\n",
            "softdep crc64_rocksoft pre: crypto_crc64_rocksoft\n",
            "alias crypto-crc64-rocksoft x_generic\n",
        );
        assert_eq!(db.softdeps["crc64_rocksoft"].pre.len(), 1);
        let order = db.closure(&["crc64_rocksoft"]).unwrap().paths;
        assert_eq!(names(&order), ["x_generic", "crc64_rocksoft"]);
    }

    /// The Debian kernel in the build cache, when a run has fetched it.
    fn cached_kernel_modules_dir() -> Option<std::path::PathBuf> {
        let debian = crate::build_dir().join("debian");
        let mut roots: Vec<_> = std::fs::read_dir(debian)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("linux-image-"))
            .map(|e| e.path().join("root"))
            .collect();
        roots.sort();
        let root = roots.pop()?;
        crate::assets::find_kver(&root).ok().map(|(_, dir)| dir)
    }

    /// The real tree: the modules the integration tests load get their
    /// runtime-requested providers, and every module's closure resolves.
    #[test]
    fn cached_debian_kernel_closures() {
        let Some(dir) = cached_kernel_modules_dir() else {
            eprintln!("no Debian kernel in the build cache; skipped (run `guest-image kernel`)");
            return;
        };
        let db = crate::assets::read_module_db(&dir).unwrap();
        let sd = db.closure(&["sd_mod"]).unwrap();
        eprintln!("sd_mod closure in {}: {:?}", dir.display(), sd.paths);
        assert!(sd.skipped.is_empty(), "{:?}", sd.skipped);
        for (before, after) in [
            ("crct10dif_generic", "crc_t10dif"),
            ("crc64_rocksoft_generic", "crc64_rocksoft"),
            ("t10_pi", "sd_mod"),
        ] {
            assert!(
                pos(&sd.paths, before) < pos(&sd.paths, after),
                "{before} < {after}"
            );
        }
        for accelerated in ["crct10dif_pclmul", "crc32c_intel"] {
            assert!(!names(&sd.paths).contains(&accelerated.to_string()));
        }
        let ext4 = db.closure(crate::rootfs::boot::MODULES).unwrap();
        assert!(pos(&ext4.paths, "crc32c_generic") < pos(&ext4.paths, "ext4"));
        let all: Vec<&String> = db.modules.keys().collect();
        let whole = db.closure(&all).unwrap();
        assert!(whole.paths.len() >= all.len());
    }
}
