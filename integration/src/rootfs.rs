//! Booting the Debian root disk (`guest_image::rootfs`) with our VMM: the
//! image (built or cached, then copied so the cache stays pristine) goes to
//! L1 as a virtio disk ([`GuestRun::l1_disk`]) and from there to the VMM as
//! `--disk path=/dev/vda`; the L2 initramfs is the root disk's own. The VMM
//! script boots the disk `boots` times in a row, so a test sees whether
//! the previous shutdown left the file system clean.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_image::rootfs::{self, boot, RootfsSpec};
use guest_image::{images_dir, Scenario};

use crate::harness::vmm_args_with;
use crate::l1::sh_quote;
use crate::process::Event;
use crate::{GuestRun, Harness, ScriptPaths};

/// Printed by the VMM script before boot N: `ROOTFS-BOOT N`.
pub const MARK_BOOT: &str = "ROOTFS-BOOT";
/// Printed after boot N: `ROOTFS-VMM-RC N <exit status>`.
pub const MARK_VMM_RC: &str = "ROOTFS-VMM-RC";
/// Guest RAM for the Debian guest (systemd + udev are comfortable here).
pub const MEMORY_MIB: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum RootDiskError {
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Initramfs(#[from] guest_image::initramfs::InitramfsError),
}

/// A working copy of the root disk and the initramfs that boots it.
#[derive(Debug)]
pub struct RootDisk {
    /// The copy the guest boots (and writes).
    pub image: PathBuf,
    /// The cached image it was copied from.
    pub pristine: PathBuf,
    pub initrd: PathBuf,
}

impl RootDisk {
    /// Builds (or finds cached) the image and initramfs and copies the
    /// image to `copy`.
    pub fn prepare(h: &Harness, copy: &Path) -> Result<Self, RootDiskError> {
        let spec = RootfsSpec::host_default();
        let built = rootfs::build(&h.build, &h.assets.kernel, &spec)?;
        let initrd = boot::write_initramfs(&h.assets, &images_dir(&h.build))?;
        rootfs::copy_image(&built.image, copy)?;
        Ok(Self {
            image: copy.to_path_buf(),
            pristine: built.image,
            initrd,
        })
    }

    /// A run booting this disk with `cpus` vCPUs and [`MEMORY_MIB`]; the
    /// command line goes to [`script`].
    pub fn run(&self, cpus: u32) -> GuestRun {
        GuestRun::new(Scenario::inline("rootfs", ""))
            .cpus(cpus)
            .memory_mib(MEMORY_MIB)
            .l2_initrd(&self.initrd)
            .l1_disk_copy_of(&self.image, &self.pristine)
    }
}

/// Deletes a working copy when dropped, also when a test panics.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The VMM script: `boots` boots of the run's first L1 disk with `cmdline`,
/// each framed by [`MARK_BOOT`] and [`MARK_VMM_RC`]; stops at the first
/// non-zero exit and exits with it.
pub fn script(run: &GuestRun, p: &ScriptPaths, cmdline: &str, boots: u32) -> String {
    let disk = p.disks.first().map(String::as_str).unwrap_or("/dev/vda");
    let mut argv = vec![p.vmm.clone()];
    argv.extend(vmm_args_with(run, cmdline, &p.kernel, &p.initrd));
    argv.push("--disk".into());
    argv.push(format!("path={disk},id=root"));
    let line: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    let mut s = String::new();
    for n in 1..=boots {
        let _ = writeln!(s, "echo \"{MARK_BOOT} {n}\"");
        let _ = writeln!(s, "{}\nrc=$?", line.join(" "));
        let _ = writeln!(s, "echo \"{MARK_VMM_RC} {n} $rc\"");
        let _ = writeln!(s, "[ $rc -eq 0 ] || exit $rc");
    }
    s.push_str("exit 0\n");
    s
}

/// The console of boot `n` (from its [`MARK_BOOT`] line to the next one).
pub fn boot_section(console: &str, n: u32) -> &str {
    let start_mark = format!("{MARK_BOOT} {n}");
    let Some(start) = console.find(&start_mark) else {
        return "";
    };
    let rest = &console[start..];
    let next = format!("{MARK_BOOT} {}", n + 1);
    match rest.find(&next) {
        Some(end) => &rest[..end],
        None => rest,
    }
}

/// The VMM's exit status after boot `n`.
pub fn vmm_rc(console: &str, n: u32) -> Option<i32> {
    let key = format!("{MARK_VMM_RC} {n} ");
    console.lines().find_map(|l| {
        let rest = &l[l.find(&key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Time from the start of boot `n` (the VMM's launch) to the first
/// event containing `marker` after it.
pub fn time_to(events: &[Event], n: u32, marker: &str) -> Option<Duration> {
    let start_mark = format!("{MARK_BOOT} {n}");
    let idx = events.iter().position(|e| e.line.contains(&start_mark))?;
    let start = events[idx].at;
    events[idx + 1..]
        .iter()
        .take_while(|e| !e.line.contains(MARK_BOOT))
        .find(|e| e.line.contains(marker))
        .map(|e| e.at.saturating_sub(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "L1-INIT\nROOTFS-BOOT 1\nROOTFS-FSCK clean rc=0\nvmm-guest login: \
                           [ 9.1] VMM-AUTOREBOOT x\nROOTFS-VMM-RC 1 0\nROOTFS-BOOT 2\n\
                           ROOTFS-FSCK not-clean rc=4\nROOTFS-VMM-RC 2 1\n";

    #[test]
    fn sections_and_statuses() {
        let one = boot_section(CONSOLE, 1);
        assert!(one.contains("clean rc=0") && !one.contains("not-clean"));
        assert!(boot_section(CONSOLE, 2).contains("not-clean rc=4"));
        assert_eq!(boot_section(CONSOLE, 3), "");
        assert_eq!(vmm_rc(CONSOLE, 1), Some(0));
        assert_eq!(vmm_rc(CONSOLE, 2), Some(1));
        assert_eq!(vmm_rc(CONSOLE, 3), None);
    }

    #[test]
    fn times_are_per_boot() {
        let ev = |s: u64, line: &str| Event {
            at: Duration::from_secs(s),
            line: line.into(),
        };
        let events = [
            ev(5, "ROOTFS-BOOT 1"),
            ev(30, "vmm-guest login:"),
            ev(40, "ROOTFS-BOOT 2"),
            ev(70, "ROOTFS-BOOT 3"),
        ];
        assert_eq!(time_to(&events, 1, "login:"), Some(Duration::from_secs(25)));
        // Boot 2 never printed a prompt: boot 3's events do not count.
        assert_eq!(time_to(&events, 2, "login:"), None);
    }

    #[test]
    fn script_boots_n_times_and_stops_on_failure() {
        let run = GuestRun::new(Scenario::inline("t", ""));
        let p = ScriptPaths {
            vmm: "sh".into(),
            kernel: "k".into(),
            initrd: "i".into(),
            scratch: "/tmp".into(),
            disks: vec!["/dev/vda".into()],
        };
        let s = script(&run, &p, "c", 2);
        assert!(s.contains("'--disk' 'path=/dev/vda,id=root'"));
        // `sh --kernel ...` fails: the script stops after boot 1 with its status.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&s)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_ne!(out.status.code(), Some(0));
        assert!(
            text.contains("ROOTFS-BOOT 1") && !text.contains("ROOTFS-BOOT 2"),
            "{text}"
        );
        assert!(vmm_rc(&text, 1).is_some_and(|rc| rc != 0));
    }
}
