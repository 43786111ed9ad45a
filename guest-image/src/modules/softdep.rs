//! Soft dependencies: `modules.softdep`, written by `depmod` from each
//! module's `MODULE_SOFTDEP` (see kmod's `modprobe.d(5)`):
//! `softdep <module> pre: <name>... post: <name>...`, several lines per
//! module allowed. A name is a module or an alias (`crypto-crc32c`).
//!
//! These are how a module declares what it asks for at run time, e.g.
//! `crc_t10dif pre: crct10dif`: the library allocates the "crct10dif"
//! crypto algorithm at init, which would `request_module("crypto-crct10dif")`
//! through a `modprobe` the initramfs does not have.

use std::collections::HashMap;

use super::{alias::normalize, ModulesError};

/// Runtime requests the kernel does not declare, as extra `pre:` soft
/// dependencies: (module, name). Linux 6.0 to 6.13's `lib/crc64-rocksoft.c`
/// allocates the "crc64-rocksoft" algorithm at init (a
/// `request_module("crypto-crc64-rocksoft")` while no provider is loaded)
/// but declares `MODULE_SOFTDEP("pre: crc64")`, a library it already links
/// against. Without the provider it falls back to its slow table code after
/// the failed request. Entries for modules a kernel lacks are ignored (6.14
/// stopped routing the library through the crypto API).
pub const UNDECLARED_PRE: &[(&str, &str)] = &[("crc64_rocksoft", "crypto-crc64-rocksoft")];

const PRE: &str = "pre:";
const POST: &str = "post:";

/// Names to load before and after one module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoftDeps {
    pub pre: Vec<String>,
    pub post: Vec<String>,
}

/// Parses `modules.softdep` into canonical module name -> soft deps.
/// Names before the first `pre:`/`post:` are ignored, as kmod ignores them
/// (Debian 6.1's cifs has `softdep cifs gcm` lines).
pub fn parse(text: &str) -> Result<HashMap<String, SoftDeps>, ModulesError> {
    let mut table: HashMap<String, SoftDeps> = HashMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
            return Err(ModulesError::Malformed {
                file: "modules.softdep",
                line: idx + 1,
                text: line.to_string(),
            });
        };
        let deps = table.entry(normalize(module)).or_default();
        let mut list: Option<&mut Vec<String>> = None;
        for word in words {
            match word {
                PRE => list = Some(&mut deps.pre),
                POST => list = Some(&mut deps.post),
                name => {
                    if let Some(list) = list.as_deref_mut() {
                        list.push(name.to_string());
                    }
                }
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Excerpt of Debian 6.1's modules.softdep.
    const SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crypto-crc32c
softdep cifs gcm
softdep cifs ccm
softdep crc_t10dif pre: crct10dif
softdep pcengines_apuv2 pre: platform:gpio_amd_fch platform:leds-gpio
softdep vfio post: vfio_iommu_type1 vfio_iommu_spapr_tce
softdep mixed-name pre: a post: b pre: c
";

    #[test]
    fn pre_and_post_lists() {
        let t = parse(SOFTDEP).unwrap();
        assert_eq!(t["ext4"].pre, ["crypto-crc32c"]);
        assert_eq!(t["crc_t10dif"].pre, ["crct10dif"]);
        assert_eq!(
            t["pcengines_apuv2"].pre,
            ["platform:gpio_amd_fch", "platform:leds-gpio"]
        );
        assert!(t["vfio"].pre.is_empty());
        assert_eq!(t["vfio"].post, ["vfio_iommu_type1", "vfio_iommu_spapr_tce"]);
        assert_eq!(
            t["mixed_name"],
            SoftDeps {
                pre: vec!["a".into(), "c".into()],
                post: vec!["b".into()],
            }
        );
    }

    #[test]
    fn names_before_a_marker_are_ignored() {
        let t = parse(SOFTDEP).unwrap();
        assert_eq!(t["cifs"], SoftDeps::default());
    }

    #[test]
    fn malformed_line_is_an_error() {
        for bad in ["softdep\n", "alias a b\n"] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ModulesError::Malformed {
                        file: "modules.softdep",
                        line: 1,
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
