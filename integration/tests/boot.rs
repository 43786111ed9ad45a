//! Nested end-to-end boot tests: our VMM boots the Debian guest (inside an
//! L1 QEMU TCG guest on hosts without ordinary KVM, directly otherwise) and
//! the guest scenario's verdict comes back through the console and the
//! VMM's exit code. Needs the static VMM (scripts/build-vmm-static.sh).

use guest_image::Scenario;
use integration::harness::{MARK_GUEST_WATCHDOG, WATCHDOG_PARAM};
use integration::l1::L1Payload;
use integration::testing::{check, harness, mode};
use integration::{GuestRun, Mode, RunResult, Verdict};

fn run(run: GuestRun, mode: Mode) -> RunResult {
    let r = harness()
        .run(&run, mode)
        .unwrap_or_else(|e| panic!("cannot run the guest: {e}"));
    eprintln!("{}", r.summary());
    r
}

fn boot_run(cpus: u32, mem_mib: u32) -> GuestRun {
    GuestRun::new(Scenario::load("boot").unwrap())
        .cpus(cpus)
        .memory_mib(mem_mib)
        .param("expect_cpus", cpus)
        .param("expect_mem_mib", mem_mib)
}

#[test]
fn boots_with_one_vcpu() {
    let r = run(boot_run(1, 512), mode());
    check(!r.timed_out, "timed out", &r);
    check(r.verdict == Verdict::Pass, "scenario did not pass", &r);
    check(r.vmm_exit == Some(0), "VMM exit code is not 0", &r);
    check(
        r.console.contains("nproc=1 "),
        "guest saw the wrong CPU count",
        &r,
    );
}

#[test]
fn boots_with_two_vcpus() {
    let r = run(boot_run(2, 512), mode());
    check(!r.timed_out, "timed out", &r);
    check(r.verdict == Verdict::Pass, "scenario did not pass", &r);
    check(r.vmm_exit == Some(0), "VMM exit code is not 0", &r);
    check(
        r.console.contains("nproc=2 "),
        "guest saw the wrong CPU count",
        &r,
    );
}

/// The uncompressed kernel (extracted by guest-image) boots through the
/// ELF entry point, skipping the guest's own decompressor.
#[test]
fn boots_the_uncompressed_vmlinux() {
    let r = run(boot_run(1, 512).vmlinux(), mode());
    check(!r.timed_out, "timed out", &r);
    check(r.verdict == Verdict::Pass, "scenario did not pass", &r);
    check(r.vmm_exit == Some(0), "VMM exit code is not 0", &r);
    check(
        r.console.contains("nproc=1 ") && r.console.contains("MemTotal="),
        "guest did not report its CPUs and memory",
        &r,
    );
    eprintln!("time to guest init: {:?}", r.time_to("GUEST-INIT"));
}

#[test]
fn failing_scenario_fails_the_run() {
    // The scenario outlives the init's watchdog, which reports the guest's
    // kernel state and leaves the verdict alone.
    let guest = GuestRun::new(Scenario::load("fail").unwrap())
        .param("fail_after", 3)
        .param(WATCHDOG_PARAM, 1);
    let r = run(guest, mode());
    check(!r.timed_out, "timed out", &r);
    check(r.verdict == Verdict::Fail, "verdict is not Fail", &r);
    check(r.scenario_rc == Some(3), "scenario status is not 3", &r);
    check(
        r.vmm_exit == Some(3),
        "VMM did not exit with the guest's status byte 3",
        &r,
    );
    check(!r.passed(), "a failing scenario counted as passed", &r);
    for part in [
        format!("{MARK_GUEST_WATCHDOG}: the scenario still runs after 1s"),
        "--- /proc/interrupts:".to_string(),
        format!("{MARK_GUEST_WATCHDOG}: end of report"),
    ] {
        check(
            r.console.contains(&part),
            &format!("no hang report ({part:?} missing)"),
            &r,
        );
    }
}

/// The nested environment itself: L1 boots, kvm_amd loads with nested SVM
/// and /dev/kvm exists. Independent of the VMM.
#[test]
fn l1_gets_a_working_dev_kvm() {
    if mode() != Mode::Nested {
        eprintln!("not the nested mode here: nothing to check");
        return;
    }
    let script =
        "ls -l /dev/kvm && grep -q 1 /sys/module/kvm_amd/parameters/nested && echo L1-CHECK-OK\n";
    let r = harness()
        .run_l1_payload(
            &GuestRun::new(Scenario::inline("l1check", "true")),
            L1Payload::Script(script.into()),
        )
        .unwrap_or_else(|e| panic!("cannot run L1: {e}"));
    eprintln!("{}", r.summary());
    check(!r.timed_out, "timed out", &r);
    check(
        r.console.contains("L1-KVM-READY nested=1"),
        "kvm_amd did not load",
        &r,
    );
    check(
        r.console.contains("L1-CHECK-OK"),
        "/dev/kvm check failed",
        &r,
    );
    check(r.vmm_exit == Some(0), "L1 payload did not exit 0", &r);
}

/// Everything the guest writes before it reports its status reaches the
/// console: the VMM exits as soon as the status byte arrives, so the guest
/// init first waits for its UART to drain. 300 lines (~24 KiB) written in
/// one burst right before the end must all arrive, followed by the verdict.
#[test]
fn console_output_written_just_before_exit_arrives() {
    const LINES: usize = 300;
    let r = run(boot_run(1, 256).param("tail_lines", LINES), mode());
    check(!r.timed_out, "timed out", &r);
    let missing: Vec<usize> = (1..=LINES)
        .filter(|i| {
            !r.console
                .contains(&format!("boot: tail line {i} of {LINES} "))
        })
        .collect();
    check(
        missing.is_empty(),
        &format!(
            "{} tail lines missing, first {:?}",
            missing.len(),
            missing.first()
        ),
        &r,
    );
    check(r.verdict == Verdict::Pass, "scenario did not pass", &r);
    check(r.vmm_exit == Some(0), "VMM exit code is not 0", &r);
}

/// The harness's look at a silent L1 (through QEMU's monitor) reads the
/// real vCPU and LAPIC state and leaves a merely sleeping L1 running: an
/// L1 that sleeps 25 s in silence is probed (twice: at 8 s and 21 s),
/// found with its periodic timer alive (the harness's `L1Tick::Periodic`),
/// and finishes its payload.
#[test]
fn a_silent_but_sleeping_l1_is_probed_and_left_running() {
    if mode() != Mode::Nested {
        eprintln!("not the nested mode here: nothing to check");
        return;
    }
    let r = harness()
        .run_l1_payload(
            &GuestRun::new(Scenario::inline("l1quiet", "true"))
                .l1_silence_probe(std::time::Duration::from_secs(8)),
            L1Payload::Script("sleep 25; echo L1-AWAKE-AGAIN\n".into()),
        )
        .unwrap_or_else(|e| panic!("cannot run L1: {e}"));
    eprintln!("{}", r.summary());
    check(!r.timed_out && !r.l1_wedged, "L1 did not finish", &r);
    check(r.wedged_attempts.is_empty(), "the run was repeated", &r);
    // The first look once L1's payload sleeps (on a loaded host L1's own
    // boot can be silent for 8 s too, with its timer not yet periodic).
    let probe = r
        .console
        .lines()
        .skip_while(|l| !l.contains("L1-KVM-READY"))
        .find(|l| l.starts_with("[harness] L1 silent for 8s; its vCPU: RIP="));
    check(probe.is_some(), "the silent L1 was not probed", &r);
    eprintln!("{}", probe.unwrap());
    check(
        probe.unwrap().contains("lapic-timer=periodic") && !probe.unwrap().contains("count=?"),
        "the probe could not read L1's periodic LAPIC timer",
        &r,
    );
    check(
        r.console.contains("L1-AWAKE-AGAIN"),
        "payload did not finish",
        &r,
    );
    check(r.vmm_exit == Some(0), "L1 payload did not exit 0", &r);
}
