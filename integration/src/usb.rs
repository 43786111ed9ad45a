//! Nested USB mass-storage runs: the L1 script that makes the disk images,
//! runs the VMM in the background with `--usb-storage` disks and an API
//! socket, copies the guest console to a log the script can watch (so it
//! can drive `vmm-ctl` in step with the guest's console markers), and after
//! the VMM exits prints host-side checksums of image ranges.
//!
//! Guest scenarios (`guest-image/scenarios/usb-*.sh`, helpers in
//! `usb-lib.sh`) print `USB-GUEST-MD5 <tag> <md5>`; the script prints
//! `HOST-MD5 <tag> <md5>`; the images and checksums are [`crate::disk`]'s.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use guest_image::initramfs::InitramfsError;
use guest_image::scenario::{scenarios_dir, FileMapping};

use crate::disk::{vmm_disk_args, DiskImage, Md5Range, MARK_HOST_VMM_RC, OPT_USB_STORAGE};
use crate::l1::sh_quote;
use guest_image::initramfs::shared_libs;

/// Scratch directory in L1 (tmpfs) for images, the console log, the socket.
pub const SCRATCH: &str = "/tmp/usb";
/// Where `vmm-ctl` lives in the L1 image.
pub const VMM_CTL_PATH: &str = "/vmm-ctl";
/// Printed by the script when its driver gave up (a wait ran out).
pub const MARK_L1_ABORT: &str = "L1-USB-ABORT";
/// Guest modules for USB disks. The closure brings what sd_mod's CRC
/// libraries ask the crypto API for at load time (see
/// `guest_image::modules`).
pub const GUEST_MODULES: &[&str] = &["xhci-pci", "usb-storage", "sd_mod"];
/// Where the scenarios' helper file goes in the L2 image.
pub const GUEST_USB_LIB: &str = "lib/guest/usb.sh";

/// The helper file the `usb-*` scenarios source, as an L2 file mapping.
pub fn guest_usb_lib() -> FileMapping {
    FileMapping {
        src: scenarios_dir().join("usb-lib.sh"),
        dst: GUEST_USB_LIB.into(),
    }
}

/// A host program and the shared libraries `ldd` lists (each at its own
/// absolute path) as L2 file mappings. Scenarios run it with
/// `LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu`.
pub fn host_binary_files(src: &Path, dst: &str) -> Result<Vec<FileMapping>, InitramfsError> {
    let mut files = vec![FileMapping {
        src: src.into(),
        dst: dst.into(),
    }];
    for lib in shared_libs(src)? {
        files.push(FileMapping {
            dst: lib.display().to_string(),
            src: lib,
        });
    }
    Ok(files)
}

/// The first of `names` found on PATH (e.g. `sg_reset`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Shell functions the driver part of a script can use:
/// `wait_console TEXT SECONDS` (bounded poll of the console log; fails
/// early when the VMM is gone), `ctl ARGS...` (vmm-ctl on the socket),
/// `vmm_running`.
const DRIVER_FUNCTIONS: &str = r#"vmm_running() { [ ! -f "$D/vmm.rc" ]; }
wait_console() {
    i=0
    while [ "$i" -lt $(($2 * 4)) ]; do
        grep -q -F -- "$1" "$D/console.log" 2>/dev/null && return 0
        vmm_running || return 1
        sleep 0.25
        i=$((i + 1))
    done
    return 1
}
ctl() { /vmm-ctl --socket "$D/api.sock" --timeout 60 "$@"; }
vmm_threads() {
    for t in /proc/$(cat "$D/vmm.pid")/task/*; do
        echo "vmm thread $(cat "$t/comm"): $(grep '^State:' "$t/status") wchan=$(cat "$t/wchan" 2>/dev/null)"
        head -n 6 "$t/stack" 2>/dev/null
    done
}
"#;

/// The L1 script of a USB run.
#[derive(Clone, Debug, Default)]
pub struct UsbScript {
    /// Disks plugged at start (`--usb-storage`), usually
    /// [`DiskImage::with_id`].
    pub disks: Vec<DiskImage>,
    /// Images made but not plugged (for `usb.attach`).
    pub spare: Vec<DiskImage>,
    /// The VMM and its arguments (without disks and API socket).
    pub vmm_argv: Vec<String>,
    /// Shell run while the VMM runs (may use the driver functions).
    pub driver: String,
    /// Bound on the VMM's run after the driver finished, seconds; then
    /// `vm.shutdown`, then a kill.
    pub exit_wait_s: u32,
    /// Ranges checksummed before the VMM starts (tags get a `-before`
    /// suffix) and after it exits.
    pub before: Vec<Md5Range>,
    pub after: Vec<Md5Range>,
}

impl UsbScript {
    /// The script text, working in [`SCRATCH`].
    pub fn render(&self) -> String {
        self.render_in(SCRATCH)
    }

    /// The script text, working in `dir`.
    pub fn render_in(&self, dir: &str) -> String {
        let mut s = format!(
            "D={}\nmkdir -p \"$D\"\nrm -f \"$D/vmm.rc\" \"$D/vmm.pid\"\n",
            sh_quote(dir)
        );
        for d in self.disks.iter().chain(&self.spare) {
            s.push_str(&d.create_lines(dir));
        }
        for r in &self.before {
            s.push_str(&r.line(dir, "-before"));
        }
        let mut argv = self.vmm_argv.clone();
        argv.extend(["--api-socket".to_string(), format!("{dir}/api.sock")]);
        argv.extend(vmm_disk_args(OPT_USB_STORAGE, dir, &self.disks));
        let line: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        // The subshell records the VMM's status; tee copies the console
        // (and the VMM's log) to the L1 console and to the log the driver
        // polls.
        let _ = writeln!(
            s,
            "( {} </dev/null 2>&1 & echo $! > \"$D/vmm.pid\"; wait $!; echo $? > \"$D/vmm.rc\" ) | tee \"$D/console.log\" &",
            line.join(" ")
        );
        s.push_str(DRIVER_FUNCTIONS);
        s.push_str(&self.driver);
        s.push('\n');
        let _ = write!(
            s,
            r#"deadline=$(($(date +%s) + {secs}))
while vmm_running && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.25; done
if vmm_running; then
    echo "{MARK_L1_ABORT}: VMM still running {secs}s after the driver; its threads and vm.info, then vm.shutdown"
    vmm_threads
    ctl vm.info
    ctl vm.shutdown
    i=0
    while vmm_running && [ "$i" -lt 40 ]; do sleep 0.25; i=$((i + 1)); done
    vmm_running && kill -9 "$(cat "$D/vmm.pid")" 2>/dev/null
fi
wait
rc=$(cat "$D/vmm.rc" 2>/dev/null || echo 255)
echo "{MARK_HOST_VMM_RC}$rc"
"#,
            secs = self.exit_wait_s
        );
        for r in &self.after {
            s.push_str(&r.line(dir, ""));
        }
        s.push_str("exit $rc\n");
        s
    }
}

/// The value of `key=` (up to whitespace or `;`) on the last line holding
/// `line_mark` and `key=`.
pub fn field(console: &str, line_mark: &str, key: &str) -> Option<String> {
    let key = format!("{key}=");
    console.lines().rev().find_map(|l| {
        l.find(line_mark)?;
        let rest = &l[l.find(&key)? + key.len()..];
        Some(
            rest.split(|c: char| c.is_whitespace() || c == ';')
                .next()
                .unwrap_or("")
                .to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{tagged, MARK_GUEST_MD5_USB, MARK_HOST_MD5};
    use std::process::Command;

    #[test]
    fn console_fields() {
        let c = "x\nUSB-DISK serial=two dev=sdb speed=480 sectors=65536\n\
                 USB-GUEST-MD5 two abc\nUSB-HOT-CYCLE n=3; dev=sdc speed=5000\nHOST-MD5 two abc\n";
        assert_eq!(field(c, "USB-DISK", "speed").as_deref(), Some("480"));
        assert_eq!(field(c, "USB-HOT-CYCLE", "n").as_deref(), Some("3"));
        assert_eq!(field(c, "USB-HOT-CYCLE", "missing"), None);
        assert_eq!(tagged(c, MARK_GUEST_MD5_USB, "two").as_deref(), Some("abc"));
        assert_eq!(tagged(c, MARK_HOST_MD5, "tw"), None);
    }

    #[test]
    fn host_binary_brings_libc() {
        let files = host_binary_files(Path::new("/bin/sh"), "bin/x").unwrap();
        assert_eq!(files[0].dst, "bin/x");
        assert!(files.iter().any(|f| f.dst.contains("libc.so")));
    }

    /// The script on this host with `sh -c` standing in for the VMM (it
    /// prints a marker and exits 3): images made, driver sees the marker,
    /// the VMM's status and the checksums come out.
    #[test]
    fn script_runs_driver_and_reports() {
        let script = UsbScript {
            disks: vec![DiskImage::with_id("a", 2).random_head(1)],
            spare: vec![DiskImage::with_id("b", 1)],
            vmm_argv: vec![
                "sh".into(),
                "-c".into(),
                "echo GUEST-SAYS-HI; sleep 1; exit 3".into(),
            ],
            driver: "wait_console GUEST-SAYS-HI 10 && echo DRIVER-SAW-IT\n\
                     [ -f $D/b.img ] && echo SPARE-MADE\n"
                .into(),
            exit_wait_s: 10,
            before: vec![Md5Range::of("a", "a.img", 0, 1)],
            after: vec![Md5Range::of("a", "a.img", 0, 1)],
        };
        let dir = std::env::temp_dir().join(format!("usb-script-{}", std::process::id()));
        let text = script.render_in(&dir.display().to_string());
        let out = Command::new("sh").arg("-c").arg(text).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(text.contains("DRIVER-SAW-IT"), "{text}");
        assert!(text.contains("SPARE-MADE"), "{text}");
        assert!(text.contains("HOST-VMM-RC=3"), "{text}");
        let before = tagged(&text, MARK_HOST_MD5, "a-before").unwrap();
        let after = tagged(&text, MARK_HOST_MD5, "a").unwrap();
        assert_eq!(before.len(), 32);
        assert_eq!(before, after);
    }

    /// A VMM that outlives `exit_wait_s`: the script says so, shows the
    /// VMM's threads, asks for a shutdown (no vmm-ctl here) and kills it.
    #[test]
    fn script_reports_and_kills_a_vmm_that_does_not_exit() {
        let dir = std::env::temp_dir().join(format!("usb-script-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vmm = dir.join("vmm");
        std::fs::write(&vmm, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
        let script = UsbScript {
            vmm_argv: vec!["sh".into(), vmm.display().to_string()],
            exit_wait_s: 1,
            ..Default::default()
        };
        let text = script.render_in(&dir.display().to_string());
        let started = std::time::Instant::now();
        let out = Command::new("sh").arg("-c").arg(text).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(started.elapsed().as_secs() < 60, "{text}");
        assert!(
            text.contains(&format!("{MARK_L1_ABORT}: VMM still running 1s")),
            "{text}"
        );
        assert!(text.contains("vmm thread sh: State:"), "{text}");
        // Killed: the subshell records 128 + SIGKILL.
        assert!(text.contains("HOST-VMM-RC=137"), "{text}");
    }
}
