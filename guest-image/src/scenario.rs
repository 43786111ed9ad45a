//! The L2 scenario initramfs: busybox, the shared shell helper, the module
//! closure, the generated `/init` and the scenario script.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::assets::GuestAssets;
use crate::initramfs::{Initramfs, InitramfsError};

/// Shared shell helper (`param`, `fail`, `report_status`), sourced by init
/// and scenarios.
pub const GUEST_LIB: &str = include_str!("../guest/lib.sh");
/// Where [`GUEST_LIB`] lives in every image.
pub const GUEST_LIB_PATH: &str = "lib/guest/lib.sh";
/// The L2 `/init`.
pub const L2_INIT: &str = include_str!("../guest/init-l2.sh");
/// Where the scenario script lives in the L2 image.
pub const SCENARIO_PATH: &str = "scenario.sh";

/// Console markers printed by the L2 init.
pub const MARK_PASS: &str = "SCENARIO-PASS";
pub const MARK_FAIL: &str = "SCENARIO-FAIL";
pub const MARK_GUEST_INIT: &str = "GUEST-INIT";
/// Printed by the L2 init for a module `insmod` could not load.
pub const MARK_INSMOD_FAIL: &str = "GUEST-INSMOD-FAIL";

#[derive(Debug, Error)]
pub enum ScenarioError {
    #[error("scenario {name:?} not found (looked for {tried})")]
    NotFound { name: String, tried: String },
    #[error("cannot read scenario {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--file {0:?} must be SRC:DST")]
    BadFileMapping(String),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
}

/// The directory of the checked-in scenarios (`guest-image/scenarios`).
pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// A scenario script: its name (for cache file names) and text.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub script: String,
}

impl Scenario {
    /// Loads a scenario by path, or by name from [`scenarios_dir`]
    /// (`boot` and `boot.sh` both find `scenarios/boot.sh`).
    pub fn load(name_or_path: &str) -> Result<Self, ScenarioError> {
        let direct = PathBuf::from(name_or_path);
        let file = if direct.is_file() {
            direct
        } else {
            let stem = name_or_path.trim_end_matches(".sh");
            let p = scenarios_dir().join(format!("{stem}.sh"));
            if !p.is_file() {
                return Err(ScenarioError::NotFound {
                    name: name_or_path.into(),
                    tried: format!("{} and {}", direct.display(), p.display()),
                });
            }
            p
        };
        let script = fs::read_to_string(&file).map_err(|source| ScenarioError::Read {
            path: file.clone(),
            source,
        })?;
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".into());
        Ok(Self { name, script })
    }

    /// A scenario from text.
    pub fn inline(name: &str, script: &str) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
        }
    }
}

/// A host file copied into an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMapping {
    pub src: PathBuf,
    pub dst: String,
}

impl std::str::FromStr for FileMapping {
    type Err = ScenarioError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.rsplit_once(':') {
            Some((src, dst)) if !src.is_empty() && !dst.is_empty() => Ok(Self {
                src: src.into(),
                dst: dst.into(),
            }),
            _ => Err(ScenarioError::BadFileMapping(s.into())),
        }
    }
}

/// What goes into an L2 scenario image.
#[derive(Clone, Debug)]
pub struct ScenarioImage {
    /// Modules to load (closure computed from modules.dep).
    pub modules: Vec<String>,
    pub scenario: Scenario,
    pub files: Vec<FileMapping>,
    /// Host programs copied with their shared libraries
    /// ([`Initramfs::add_host_binary`]), e.g. util-linux tools or fio.
    pub binaries: Vec<FileMapping>,
}

/// An image with busybox and the shared helper: the base of L1 and L2 images.
pub fn base_image(assets: &GuestAssets) -> Result<Initramfs, InitramfsError> {
    let mut img = Initramfs::new();
    img.add_busybox(&assets.busybox)?;
    img.add_bytes(GUEST_LIB_PATH, 0o644, GUEST_LIB)?;
    Ok(img)
}

/// Builds the L2 scenario image in memory.
pub fn build_l2(assets: &GuestAssets, spec: &ScenarioImage) -> Result<Initramfs, ScenarioError> {
    let mut img = base_image(assets)?;
    img.add_modules(&assets.kernel, &spec.modules)?;
    img.add_bytes("init", 0o755, L2_INIT)?;
    img.add_bytes(SCENARIO_PATH, 0o755, spec.scenario.script.as_bytes())?;
    for f in &spec.files {
        img.add_file(&f.src, &f.dst)?;
    }
    for b in &spec.binaries {
        img.add_host_binary(&b.src, &b.dst)?;
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `body` in the host's POSIX sh with the guest helper sourced and
    /// a fake /proc/cmdline.
    fn sh(cmdline: &str, body: &str) -> (i32, String) {
        let dir = std::env::temp_dir().join(format!("gi-sh-{}-{}", std::process::id(), body.len()));
        fs::create_dir_all(&dir).unwrap();
        let cmd_file = dir.join("cmdline");
        let lib = dir.join("lib.sh");
        fs::write(&cmd_file, cmdline).unwrap();
        fs::write(&lib, GUEST_LIB).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(". {}\n{body}", lib.display()))
            .env("CMDLINE_FILE", &cmd_file)
            .output()
            .unwrap();
        fs::remove_dir_all(&dir).unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    const CMDLINE: &str = "console=ttyS0 reboot=k expect_cpus=2 expect_mem_mib=512 flag\n";

    #[test]
    fn shell_param_reads_cmdline() {
        assert_eq!(sh(CMDLINE, "param expect_cpus"), (0, "2\n".into()));
        assert_eq!(sh(CMDLINE, "param expect_mem_mib"), (0, "512\n".into()));
        assert_eq!(sh(CMDLINE, "param console"), (0, "ttyS0\n".into()));
        // Prefix of another key does not match.
        assert_eq!(sh(CMDLINE, "param expect").0, 1);
        assert_eq!(sh(CMDLINE, "param missing 7"), (0, "7\n".into()));
        assert_eq!(sh(CMDLINE, "require_param missing; echo after").0, 1);
    }

    #[test]
    fn shell_console_drain_passes_over_a_console_that_is_no_tty() {
        // Nothing to drain (and no stty settings to re-apply): it returns
        // at once, successfully, and prints nothing.
        let (rc, out) = sh("", "CONSOLE_DEV=/dev/null console_drain 1; echo rc=$?");
        assert_eq!((rc, out.as_str()), (0, "rc=0\n"));
    }

    #[test]
    fn shell_kernel_map_is_one_line_with_the_text_address() {
        let (rc, out) = sh("", "kernel_map");
        assert_eq!(rc, 0);
        assert_eq!(out.lines().count(), 1, "{out:?}");
        assert!(out.starts_with("text="), "{out:?}");
    }

    #[test]
    fn shell_status_byte_clamps() {
        let (rc, out) = sh("", "for r in 0 1 3 255 256 -2; do status_byte $r; done");
        assert_eq!(rc, 0);
        assert_eq!(out, "0\n1\n3\n255\n255\n1\n");
    }

    #[test]
    fn shell_md5_helpers_agree() {
        // md5 of one MiB of zeroes, read buffered from /dev/zero and from a
        // file holding them.
        let (rc, out) = sh(
            "",
            "f=/tmp/gi-md5-$$; dd if=/dev/zero of=$f bs=1M count=1 2>/dev/null; \
             md5_range /dev/zero 0 1 buffered; md5_of $f; md5_range $f 0 1 buffered; rm -f $f",
        );
        assert_eq!(rc, 0, "{out}");
        assert_eq!(out, "b6d81b360a5672d80c27430f39153e2c\n".repeat(3));
    }

    #[test]
    fn hang_report_frames_what_it_finds() {
        // On the host dmesg and sysrq may be refused: the report still
        // comes out whole, with its markers.
        let (rc, out) = sh("", "hang_report 42");
        assert_eq!(rc, 0, "{out}");
        assert!(out.starts_with("GUEST-WATCHDOG: the scenario still runs after 42s"));
        assert!(out.contains("--- /proc/interrupts:\n"));
        assert!(out.trim_end().ends_with("GUEST-WATCHDOG: end of report"));
    }

    #[test]
    fn fail_scenario_exits_with_its_status() {
        let s = Scenario::load("fail").unwrap();
        let (rc, out) = sh("", &s.script.replace(". /lib/guest/lib.sh", ""));
        assert_eq!(rc, 3);
        assert!(out.contains("failing on purpose"));
    }

    #[test]
    fn boot_scenario_needs_its_params() {
        let s = Scenario::load("boot.sh").unwrap();
        let body = s.script.replace(". /lib/guest/lib.sh", "");
        assert_eq!(sh("console=ttyS0", &body).0, 1);
    }

    #[test]
    fn file_mapping_parses() {
        let m: FileMapping = "/tmp/disk.img:/images/disk.img".parse().unwrap();
        assert_eq!(m.src, PathBuf::from("/tmp/disk.img"));
        assert_eq!(m.dst, "/images/disk.img");
        assert!("nocolon".parse::<FileMapping>().is_err());
        assert!(Scenario::load("no-such-scenario").is_err());
    }
}
