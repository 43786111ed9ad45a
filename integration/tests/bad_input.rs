//! Bad input to the VMM gives a clear error and a non-zero exit, never a
//! hang: a missing kernel, a file that is not a bzImage, memory too small
//! for the kernel, a truncated initramfs. All cases run in one L1 boot
//! (nested mode) or directly on an ordinary KVM host, each under a bound.

use std::process::Command;
use std::time::{Duration, Instant};

use guest_image::Scenario;
use integration::host;
use integration::l1::L1Payload;
use integration::{GuestRun, Harness, Mode};

/// Bound on one bad-input VMM run.
const CASE_TIMEOUT_SECS: u64 = 60;
/// busybox/coreutils `timeout` statuses when the bound was hit.
const TIMEOUT_STATUSES: &[i32] = &[124, 137, 143];

/// (name, VMM arguments, what the error line must say); `$K`/`$I`/`$T`
/// stand for the kernel, the initramfs and a truncated copy of it.
const CASES: &[(&str, &str, &str)] = &[
    (
        "missing-kernel",
        "--kernel /nonexistent/vmlinuz --initramfs $I",
        "cannot read kernel /nonexistent/vmlinuz",
    ),
    (
        "not-a-bzimage",
        "--kernel $I --initramfs $I",
        "is not a Linux bzImage",
    ),
    (
        "memory-too-small",
        "--kernel $K --initramfs $I --memory size=64M",
        "is too small",
    ),
    (
        "truncated-initramfs",
        "--kernel $K --initramfs $T",
        "truncated or corrupt",
    ),
];

const COMMON: &str = "--cmdline 'console=ttyS0 reboot=k panic=-1 quiet' --cpus 1";

/// A POSIX sh script that runs every case and prints
/// `BAD-INPUT <name> rc=<rc> last=<last output line>`.
fn script(vmm: &str, kernel: &str, initrd: &str, scratch: &str) -> String {
    let mut s = format!(
        "K={kernel}\nI={initrd}\nT={scratch}/truncated.gz\n\
         head -c 65536 \"$I\" > \"$T\"\n"
    );
    for (name, args, _) in CASES {
        let mem = if args.contains("--memory") {
            ""
        } else {
            " --memory size=256M"
        };
        s.push_str(&format!(
            "out=$(timeout {CASE_TIMEOUT_SECS} {vmm} {args} {COMMON}{mem} 2>&1 </dev/null)\n\
             rc=$?\n\
             echo \"BAD-INPUT {name} rc=$rc last=$(echo \"$out\" | grep -v '^$' | tail -n 1)\"\n"
        ));
    }
    s
}

fn parse(console: &str, name: &str) -> Option<(i32, String)> {
    integration::testing::case_result(console, "BAD-INPUT", name, "last")
}

#[test]
fn bad_input_gives_an_error_and_nonzero_exit() {
    let mode = Mode::auto().unwrap();
    let harness = Harness::new().unwrap();
    let (console, wall) = match mode {
        Mode::Nested => {
            let vmm = host::vmm_binary(true).unwrap_or_else(|e| panic!("{e}"));
            let run = GuestRun::new(Scenario::inline("bad-input", "true"))
                .timeout(Duration::from_secs(CASE_TIMEOUT_SECS * 5));
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
            let run = GuestRun::new(Scenario::inline("bad-input", "true"));
            let initrd = harness.l2_initramfs(&run).unwrap();
            let scratch = std::env::temp_dir();
            let start = Instant::now();
            let out = Command::new("sh")
                .arg("-c")
                .arg(script(
                    &vmm.display().to_string(),
                    &harness.assets.kernel.vmlinuz.display().to_string(),
                    &initrd.display().to_string(),
                    &scratch.display().to_string(),
                ))
                .output()
                .unwrap();
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                start.elapsed(),
            )
        }
        other => panic!("bad-input test needs the nested or direct mode, not {other:?}"),
    };
    eprintln!("bad-input cases ran in {:.1}s", wall.as_secs_f64());
    for (name, _, expected) in CASES {
        let (rc, last) = parse(&console, name)
            .unwrap_or_else(|| panic!("case {name} did not report\n{console}"));
        assert!(
            !TIMEOUT_STATUSES.contains(&rc),
            "{name}: the VMM hung (killed after {CASE_TIMEOUT_SECS}s)\n{console}"
        );
        assert_ne!(rc, 0, "{name}: the VMM exited 0 on bad input\n{console}");
        assert!(
            last.starts_with("error: ") && last.contains(expected),
            "{name}: the error line does not say '{expected}': {last}\n{console}"
        );
        eprintln!("{name}: rc={rc} {last}");
    }
}

#[test]
fn script_reports_each_case() {
    // The generated script itself, with a stand-in VMM that always fails.
    let s = script(
        "false",
        "/k",
        "/etc/hostname",
        &std::env::temp_dir().display().to_string(),
    );
    let out = Command::new("sh").arg("-c").arg(&s).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (name, _, _) in CASES {
        assert_eq!(parse(&text, name).map(|p| p.0), Some(1), "{text}");
    }
}
