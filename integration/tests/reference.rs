//! The guest images and the harness checked without our VMM: the same L2
//! kernel + scenario initramfs under host QEMU TCG, with QEMU's
//! isa-debug-exit on the port our VMM uses. A failure here is in the images
//! or the harness, not in the VMM.

use guest_image::Scenario;
use integration::{GuestRun, Harness, Mode, Verdict};

fn harness() -> Harness {
    Harness::new().unwrap_or_else(|e| panic!("guest assets: {e}"))
}

#[test]
fn qemu_tcg_reference_boot_passes() {
    let run = GuestRun::new(Scenario::load("boot").unwrap())
        .cpus(2)
        .memory_mib(384)
        .param("expect_cpus", 2)
        .param("expect_mem_mib", 384);
    let r = harness().run(&run, Mode::QemuTcg).unwrap();
    assert!(
        r.passed() && r.console.contains("nproc=2 "),
        "{}\n{}",
        r.summary(),
        r.console
    );
    assert!(r.time_to("GUEST-INIT").is_some());
}

#[test]
fn qemu_tcg_reference_failure_status_reaches_the_host() {
    let run = GuestRun::new(Scenario::load("fail").unwrap());
    let r = harness().run(&run, Mode::QemuTcg).unwrap();
    assert_eq!(r.verdict, Verdict::Fail, "{}\n{}", r.summary(), r.console);
    assert_eq!(r.scenario_rc, Some(3), "{}", r.console);
    assert_eq!(r.vmm_exit, Some(3), "{}", r.console);
}

/// The whole nested chain with QEMU as the L2 VMM inside L1 (the benchmark
/// peer): L1 boots, kvm_amd works, the guest's status byte comes back
/// through QEMU's debug-exit, the L1 report and the host QEMU's console.
#[test]
fn nested_qemu_reference_failure_status_reaches_the_host() {
    if Mode::auto().ok() != Some(Mode::Nested) {
        eprintln!("host is not in the nested mode: skipped");
        return;
    }
    let run = GuestRun::new(Scenario::load("fail").unwrap()).cpus(2);
    let r = harness().run(&run, Mode::NestedQemu).unwrap();
    let show = || format!("{}\n{}", r.summary(), r.console);
    assert!(r.console.contains("L1-KVM-READY nested=1"), "{}", show());
    assert_eq!(r.verdict, Verdict::Fail, "{}", show());
    assert_eq!(r.scenario_rc, Some(3), "{}", show());
    assert_eq!(r.vmm_exit, Some(3), "{}", show());
}
