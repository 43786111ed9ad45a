//! Module aliases: `modules.alias` (written by `depmod`, one
//! `alias <name-or-pattern> <module>` a line) for loadable modules, and the
//! `<module>.alias=<name>` records of `modules.builtin.modinfo` (written by
//! the kernel build, NUL-separated) for built-in ones.
//!
//! Only exact-name aliases are kept. Patterns (`*`, `?`, `[`) are device
//! modaliases (`pci:v…`, `usb:v…`, `cpu:type:…`) that udev matches against a
//! device; the closure needs names a module or the crypto API asks for
//! (`crypto-crc32c`, `crct10dif`, `platform:idma64`), which are all exact.
//! As in kmod, `-` and `_` are the same character in an alias.

use std::collections::{HashMap, HashSet};

use super::ModulesError;

/// The suffix of a portable C implementation in the crypto API
/// (`crc32c_generic`, `crct10dif_generic`, …).
const GENERIC_SUFFIX: &str = "_generic";

/// An alias (or module name) with `-` folded to `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn is_pattern(alias: &str) -> bool {
    alias.contains(['*', '?', '['])
}

/// The exact-name aliases of one kernel.
#[derive(Debug, Default)]
pub struct Aliases {
    /// Normalized alias -> canonical module names, in file order.
    loadable: HashMap<String, Vec<String>>,
    /// Normalized aliases some built-in module provides.
    builtin: HashSet<String>,
}

impl Aliases {
    /// Parses `modules.alias` and (optionally empty)
    /// `modules.builtin.modinfo`.
    pub fn parse(modules_alias: &str, builtin_modinfo: &str) -> Result<Self, ModulesError> {
        let mut loadable: HashMap<String, Vec<String>> = HashMap::new();
        for (idx, raw) in modules_alias.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some("alias"), Some(alias), Some(module), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(ModulesError::Malformed {
                    file: "modules.alias",
                    line: idx + 1,
                    text: line.to_string(),
                });
            };
            if is_pattern(alias) {
                continue;
            }
            let providers = loadable.entry(normalize(alias)).or_default();
            let module = super::module_name(module);
            if !providers.contains(&module) {
                providers.push(module);
            }
        }
        let builtin = builtin_modinfo
            .split('\0')
            .filter_map(|record| record.split_once(".alias="))
            .map(|(_, alias)| alias.trim())
            .filter(|alias| !alias.is_empty() && !is_pattern(alias))
            .map(normalize)
            .collect();
        Ok(Self { loadable, builtin })
    }

    /// True when a built-in module answers to `name`.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// The loadable modules to load for `name`, chosen among its providers:
    /// the `*_generic` ones when there are any, otherwise all of them.
    ///
    /// Why generic: an arch-accelerated provider (`crc32c_intel`,
    /// `crct10dif_pclmul`) refuses to load (`-ENODEV`) on a CPU without its
    /// instruction set extension, which `insmod` reports as a failure, while
    /// the generic one loads everywhere; the guests checksum too little for
    /// the speed to matter. Without a generic provider (e.g. an alias that
    /// names one driver) all providers are loaded, as `modprobe` does.
    pub fn choose(&self, name: &str) -> Vec<&str> {
        let Some(providers) = self.loadable.get(&normalize(name)) else {
            return Vec::new();
        };
        let generic: Vec<&str> = providers
            .iter()
            .map(String::as_str)
            .filter(|m| m.ends_with(GENERIC_SUFFIX))
            .collect();
        if generic.is_empty() {
            providers.iter().map(String::as_str).collect()
        } else {
            generic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Excerpts of Debian 6.1's modules.alias and modules.builtin.modinfo.
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00001B36d0000000Dsv*sd*bc*sc*i* xhci_pci
alias crypto-crc32c-intel crc32c_intel
alias crypto-crc32c crc32c_intel
alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias crypto-crct10dif crct10dif_pclmul
alias crypto-crct10dif crct10dif_generic
alias platform:idma64 idma64
";
    const MODINFO: &str = "md5.alias=crypto-md5\0md5.license=GPL\0ext4.softdep=pre: crc32c\0";

    #[test]
    fn generic_provider_is_chosen() {
        let a = Aliases::parse(ALIAS, MODINFO).unwrap();
        assert_eq!(a.choose("crypto-crc32c"), ["crc32c_generic"]);
        assert_eq!(a.choose("crypto_crct10dif"), ["crct10dif_generic"]);
        assert_eq!(a.choose("crypto-crc32c-intel"), ["crc32c_intel"]);
        assert_eq!(a.choose("platform:idma64"), ["idma64"]);
        assert!(a.choose("crypto-sha1").is_empty());
    }

    #[test]
    fn patterns_are_not_names() {
        let a = Aliases::parse(ALIAS, "").unwrap();
        assert!(a.choose("pci:v00001B36d0000000Dsv*sd*bc*sc*i*").is_empty());
        assert_eq!(a.loadable.len(), 5);
    }

    #[test]
    fn builtin_aliases_come_from_modinfo() {
        let a = Aliases::parse(ALIAS, MODINFO).unwrap();
        assert!(a.is_builtin("crypto-md5"));
        assert!(a.is_builtin("crypto_md5"));
        assert!(!a.is_builtin("crypto-crc32c"));
        assert!(!a.is_builtin("pre: crc32c"));
    }

    #[test]
    fn malformed_line_is_an_error() {
        for bad in ["alias only-two\n", "softdep a pre: b\n", "alias a b c\n"] {
            assert!(
                matches!(
                    Aliases::parse(bad, ""),
                    Err(ModulesError::Malformed {
                        file: "modules.alias",
                        line: 1,
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
