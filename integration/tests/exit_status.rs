//! The VMM's exit status tells how the guest ended (README "Exit status"):
//! a clean reboot, halt or poweroff is 0; a guest kernel panic is 78 (seen
//! by the warm-reboot flag, by the console, or both; also one that stays,
//! with `panic=0`); a kernel that cannot
//! even start (cut short, or its compressed payload damaged) ends in a
//! triple fault (77) or a dead halt (79), never 0; SIGTERM, SIGINT and
//! SIGHUP stop the VM with 128 + the signal and remove the API socket. All
//! cases run in one L1 boot (nested mode) or directly on an ordinary KVM
//! host, each under a bound.

use std::process::Command;
use std::time::{Duration, Instant};

use guest_image::Scenario;
use integration::host;
use integration::l1::L1Payload;
use integration::{GuestRun, Harness, Mode};

/// Bound on one VMM run.
const CASE_TIMEOUT_SECS: u64 = 90;
/// busybox/coreutils `timeout` statuses when the bound was hit.
const TIMEOUT_STATUSES: &[i32] = &[124, 137, 143];

const BOOT: &str = "quiet i8042.noaux i8042.nomux i8042.dumbkbd";

/// (name, VMM arguments after --kernel/--initramfs, accepted statuses).
/// `$K` is the kernel, `$I` the initramfs, `$D` a scratch directory.
fn cases() -> Vec<(&'static str, String, &'static [i32])> {
    let init = |cmd: &str| format!("rdinit=/bin/busybox -- {cmd}");
    let run = |cmdline: String| format!("--kernel $K --initramfs $I --cmdline '{cmdline}'");
    let default = format!("console=ttyS0 reboot=k,panic_warm panic=-1 {BOOT}");
    vec![
        (
            "reboot",
            run(format!("{default} {}", init("reboot -f"))),
            &[0],
        ),
        (
            "halt",
            run(format!("{default} {}", init("halt -f"))) + " --cpus 2",
            &[0],
        ),
        (
            "poweroff",
            run(format!("{default} {}", init("poweroff -f"))),
            &[0],
        ),
        // init= that cannot run: "Requested init /nope failed", a panic.
        (
            "panic",
            run(format!("{default} rdinit=/nope init=/nope")),
            &[78],
        ),
        (
            "panic-seen-by-the-warm-flag-alone",
            run(format!(
                "reboot=k,panic_warm panic=-1 {BOOT} rdinit=/nope init=/nope"
            )),
            &[78],
        ),
        (
            "panic-seen-on-the-console-alone",
            run(format!(
                "console=ttyS0 reboot=k panic=-1 {BOOT} rdinit=/nope init=/nope"
            )),
            &[78],
        ),
        (
            "panic-that-stays",
            run(format!(
                "console=ttyS0 reboot=k panic=0 {BOOT} rdinit=/nope init=/nope"
            )),
            &[78],
        ),
        (
            "cut-kernel",
            "--kernel $D/cut --initramfs $I".into(),
            &[77, 79],
        ),
        (
            "damaged-kernel",
            "--kernel $D/damaged --initramfs $I".into(),
            &[77, 79],
        ),
    ]
}

/// Signals sent to a VMM whose guest sleeps: (name, signal, status).
/// SIGINT is left to the unit tests: a non-interactive shell starts its
/// background jobs with SIGINT ignored, and the VMM keeps an ignored
/// signal ignored (as it keeps SIGHUP under nohup).
const SIGNALS: &[(&str, &str, i32)] = &[("sigterm", "TERM", 143), ("sighup", "HUP", 129)];

/// A POSIX sh script that runs every case and prints
/// `EXIT-STATUS <name> rc=<rc> socket=<gone|left>`.
fn script(vmm: &str, kernel: &str, initrd: &str, scratch: &str) -> String {
    let mut s = format!(
        "K={kernel}\nI={initrd}\nD={scratch}/exit-status\nmkdir -p \"$D\"\n\
         head -c 3000000 \"$K\" > \"$D/cut\"\n\
         cp \"$K\" \"$D/damaged\"\n\
         dd if=/dev/urandom of=\"$D/damaged\" bs=65536 seek=32 count=4 conv=notrunc 2>/dev/null\n"
    );
    for (name, args, _) in cases() {
        s.push_str(&format!(
            "timeout {CASE_TIMEOUT_SECS} {vmm} {args} --memory size=256M --serial off </dev/null\n\
             echo \"EXIT-STATUS {name} rc=$? socket=gone\"\n"
        ));
    }
    let sleeper = format!(
        "console=ttyS0 reboot=k,panic_warm panic=-1 {BOOT} rdinit=/bin/busybox -- sleep 100000"
    );
    for (name, sig, _) in SIGNALS {
        s.push_str(&format!(
            "rm -f \"$D/api.sock\"\n\
             {vmm} --kernel $K --initramfs $I --cmdline '{sleeper}' --memory size=256M \
             --serial off --api-socket \"$D/api.sock\" </dev/null &\n\
             pid=$!\n\
             i=0; while [ ! -S \"$D/api.sock\" ] && kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do \
             sleep 0.1; i=$((i + 1)); done\n\
             kill -0 $pid 2>/dev/null && sleep 2\n\
             kill -{sig} $pid\n\
             i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done\n\
             kill -KILL $pid 2>/dev/null\n\
             wait $pid\n\
             rc=$?\n\
             if [ -e \"$D/api.sock\" ]; then left=left; else left=gone; fi\n\
             echo \"EXIT-STATUS {name} rc=$rc socket=$left\"\n"
        ));
    }
    s
}

fn parse(console: &str, name: &str) -> Option<(i32, String)> {
    integration::testing::case_result(console, "EXIT-STATUS", name, "socket")
}

#[test]
fn every_way_a_guest_ends_has_its_exit_status() {
    let mode = Mode::auto().unwrap();
    let harness = Harness::new().unwrap();
    let bound = Duration::from_secs(CASE_TIMEOUT_SECS * (cases().len() + SIGNALS.len()) as u64);
    let (console, wall) = match mode {
        Mode::Nested => {
            let vmm = host::vmm_binary(true).unwrap_or_else(|e| panic!("{e}"));
            let run = GuestRun::new(Scenario::inline("exit-status", "true")).timeout(bound);
            let script = script("/vmm", "/l2/vmlinuz", "/l2/initrd.gz", "/tmp");
            let r = harness
                .run_l1_payload(
                    &run,
                    L1Payload::VmmScript {
                        binary: vmm,
                        script,
                    },
                )
                .unwrap();
            assert!(!r.timed_out, "L1 timed out\n{}", r.console);
            (r.console, r.wall)
        }
        Mode::Direct => {
            let vmm = host::vmm_binary(false).unwrap_or_else(|e| panic!("{e}"));
            let run = GuestRun::new(Scenario::inline("exit-status", "true"));
            let initrd = harness.l2_initramfs(&run).unwrap();
            let start = Instant::now();
            let out = Command::new("sh")
                .arg("-c")
                .arg(script(
                    &vmm.display().to_string(),
                    &harness.assets.kernel.vmlinuz.display().to_string(),
                    &initrd.display().to_string(),
                    &std::env::temp_dir().display().to_string(),
                ))
                .output()
                .unwrap();
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                start.elapsed(),
            )
        }
        other => panic!("the exit-status test needs the nested or direct mode, not {other:?}"),
    };
    eprintln!("exit-status cases ran in {:.1}s", wall.as_secs_f64());
    for (name, _, expected) in cases() {
        let (rc, _) = parse(&console, name)
            .unwrap_or_else(|| panic!("case {name} did not report\n{console}"));
        assert!(
            !TIMEOUT_STATUSES.contains(&rc) || expected.contains(&rc),
            "{name}: the VMM hung (killed after {CASE_TIMEOUT_SECS}s)\n{console}"
        );
        assert!(
            expected.contains(&rc),
            "{name}: exit status {rc}, expected one of {expected:?}\n{console}"
        );
        eprintln!("{name}: rc={rc}");
    }
    for (name, _, expected) in SIGNALS {
        let (rc, socket) = parse(&console, name)
            .unwrap_or_else(|| panic!("case {name} did not report\n{console}"));
        assert_eq!(rc, *expected, "{name}: exit status\n{console}");
        assert_eq!(
            socket, "gone",
            "{name}: the API socket file was left\n{console}"
        );
        eprintln!("{name}: rc={rc}, socket removed");
    }
}

#[test]
fn script_reports_each_case() {
    // The generated script itself, with a stand-in VMM that always fails.
    let s = script(
        "false",
        "/etc/hostname",
        "/etc/hostname",
        &std::env::temp_dir().display().to_string(),
    );
    let out = Command::new("sh").arg("-c").arg(&s).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (name, _, _) in cases() {
        assert_eq!(parse(&text, name).map(|p| p.0), Some(1), "{text}");
    }
    for (name, _, _) in SIGNALS {
        assert_eq!(parse(&text, name), Some((1, "gone".into())), "{text}");
    }
}
