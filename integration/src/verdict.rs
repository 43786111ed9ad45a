//! Reading results off a console log: the L2 scenario verdict and the L1
//! report of the VMM's exit code.

use guest_image::scenario::{MARK_FAIL, MARK_PASS};

/// Console line printed by the L1 init after the payload ends.
pub const MARK_L1_VMM_EXIT: &str = "L1-VMM-EXIT=";
/// L1 init found `/dev/kvm`.
pub const MARK_L1_KVM_READY: &str = "L1-KVM-READY";
/// L1 init found no `/dev/kvm` after loading kvm_amd.
pub const MARK_L1_NO_KVM: &str = "L1-NO-KVM";
/// L1 init started.
pub const MARK_L1_INIT: &str = "L1-INIT";

/// The scenario's verdict as printed on the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Neither marker was printed (crash, hang, timeout, VMM error).
    NoVerdict,
}

/// The last scenario marker on the console decides, with the `rc=` of a
/// failure when present.
pub fn parse_verdict(console: &str) -> (Verdict, Option<i32>) {
    let mut out = (Verdict::NoVerdict, None);
    for line in console.lines() {
        if let Some(pos) = line.find(MARK_FAIL) {
            let rc = line[pos + MARK_FAIL.len()..]
                .trim()
                .strip_prefix("rc=")
                .and_then(|r| r.trim().parse().ok());
            out = (Verdict::Fail, rc);
        } else if line.trim_end().ends_with(MARK_PASS) {
            out = (Verdict::Pass, None);
        }
    }
    out
}

/// The exit code reported by the L1 init (`L1-VMM-EXIT=<rc>`), if any.
pub fn parse_l1_exit(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|l| {
        let pos = l.find(MARK_L1_VMM_EXIT)?;
        l[pos + MARK_L1_VMM_EXIT.len()..].trim().parse().ok()
    })
}

/// QEMU's `isa-debug-exit` makes QEMU exit with `(byte << 1) | 1`; a normal
/// QEMU exit (guest reset with -no-reboot, poweroff) is 0. Maps back to the
/// byte the guest wrote, i.e. what our VMM would have exited with.
pub fn qemu_debug_exit_to_status(code: i32) -> i32 {
    if code & 1 == 1 {
        code >> 1
    } else {
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(
            parse_verdict("boot\nSCENARIO-PASS\r\n"),
            (Verdict::Pass, None)
        );
        assert_eq!(
            parse_verdict("x\nSCENARIO-FAIL rc=3\n--- diagnostics\n"),
            (Verdict::Fail, Some(3))
        );
        assert_eq!(
            parse_verdict("\x1b[2Jjunk SCENARIO-FAIL\n"),
            (Verdict::Fail, None)
        );
        assert_eq!(parse_verdict("kernel panic\n"), (Verdict::NoVerdict, None));
        assert_eq!(parse_verdict(""), (Verdict::NoVerdict, None));
    }

    #[test]
    fn l1_exit_and_debug_exit() {
        assert_eq!(parse_l1_exit("a\nL1-VMM-EXIT=3\r\n"), Some(3));
        assert_eq!(parse_l1_exit("L1-VMM-EXIT=0\n"), Some(0));
        assert_eq!(parse_l1_exit("L1-VMM-EXIT=\n"), None);
        assert_eq!(parse_l1_exit("nothing"), None);
        assert_eq!(qemu_debug_exit_to_status(1), 0);
        assert_eq!(qemu_debug_exit_to_status(7), 3);
        assert_eq!(qemu_debug_exit_to_status(0), 0);
    }
}
