//! Nested end-to-end tests of the xHCI controller and USB mass-storage
//! disks (issue 5): our VMM inside the L1 QEMU TCG guest boots the Debian
//! L2 with `--usb-storage` disks and an API socket; an L1 script makes the
//! images, drives `vmm-ctl` in step with the guest's console markers, and
//! checksums the images after the VMM exits.
//!
//! Needs the static VMM and vmm-ctl (scripts/build-vmm-static.sh) and, for
//! the port-reset test, sg3-utils on the host (scripts/setup.sh).

use std::time::Duration;

use guest_image::scenario::{FileMapping, MARK_INSMOD_FAIL};
use guest_image::Scenario;
use integration::disk::{
    tagged, DiskImage, Md5Range, MARK_GUEST_MD5_USB as MARK_GUEST_MD5, MARK_HOST_MD5,
    MARK_HOST_VMM_RC,
};
use integration::harness::vmm_args_with;
use integration::l1::{L1Payload, L2_INITRD, L2_KERNEL, VMM_PATH};
use integration::testing::{check, harness, nested};
use integration::usb::{
    field, find_program, guest_usb_lib, UsbScript, GUEST_MODULES, MARK_L1_ABORT, VMM_CTL_PATH,
};
use integration::{host, GuestRun, RunResult, Verdict};

/// Bound on one nested run (TCG L1 on a shared, loaded machine).
const TIMEOUT: Duration = Duration::from_secs(1200);
/// Hotplug cycles in one boot.
const HOT_CYCLES: u32 = 20;
/// The CRC libraries under sd_mod and the crypto drivers they must use: the
/// generic providers the module closure loads before them (no "fallback",
/// which is what a failed runtime `request_module` leaves).
const CRC_TRANSFORMS: &[(&str, &str)] = &[
    ("crc_t10dif", "crct10dif-generic"),
    ("crc64_rocksoft", "crc64-rocksoft-generic"),
];

/// A run of a `usb-*` scenario with the USB modules and helper file.
///
/// One vCPU: with two on the one-CPU TCG L1, L1 wedged in 5 of ~15 runs of
/// the port-reset and hotplug tests (2026-11-26): one L2 vCPU spins in
/// `queued_read_lock_slowpath` on a rwlock the other holds, and QEMU 7.2
/// never delivers L1's pending timer interrupt while it spins, so L1 never
/// preempts it (see `integration::monitor`). The price: no end-to-end run
/// drives the controller from two vCPUs at once any more.
fn usb_run(scenario: &str) -> GuestRun {
    let mut run = GuestRun::new(Scenario::load(scenario).unwrap())
        .cpus(1)
        .memory_mib(512)
        .timeout(TIMEOUT);
    run.modules = GUEST_MODULES.iter().map(|m| m.to_string()).collect();
    run.l2_files.push(guest_usb_lib());
    run
}

/// Boots `run` under the L1 `script` (VMM argv filled in here).
fn run_script(mut run: GuestRun, mut script: UsbScript) -> RunResult {
    let ctl = host::vmm_ctl_binary(true).unwrap_or_else(|e| panic!("{e}"));
    run.l1_files.push(FileMapping {
        src: ctl,
        dst: VMM_CTL_PATH.into(),
    });
    let cmdline = run.l2_cmdline().unwrap();
    let mut argv = vec![VMM_PATH.to_string()];
    argv.extend(vmm_args_with(&run, &cmdline, L2_KERNEL, L2_INITRD));
    script.vmm_argv = argv;
    let payload = L1Payload::VmmScript {
        binary: host::vmm_binary(true).unwrap_or_else(|e| panic!("{e}")),
        script: script.render(),
    };
    let r = harness()
        .run_l1_payload(&run, payload)
        .unwrap_or_else(|e| panic!("cannot run L1: {e}"));
    eprintln!("{}", r.summary());
    // The result lines, for the test log.
    for l in r.console.lines().filter(|l| {
        ["USB-", "HOST-", "L1-USB", "reset ", "FIO-RESULT"]
            .iter()
            .any(|m| l.contains(m))
            && !l.contains("USB-HOT-WANT")
            && !l.contains("USB-HOT-DONE")
            && !l.contains("USB-HOT-GONE")
    }) {
        eprintln!("  {l}");
    }
    r
}

/// The run passed: no timeout, scenario pass, VMM exit 0, no driver abort.
fn check_passed(r: &RunResult) {
    check(!r.timed_out, "timed out", r);
    check(
        !r.console.contains(MARK_L1_ABORT),
        "the L1 driver gave up",
        r,
    );
    check(r.verdict == Verdict::Pass, "scenario did not pass", r);
    check(
        !r.console.contains(MARK_INSMOD_FAIL),
        "a guest module failed to load",
        r,
    );
    check(
        r.console.contains(&format!("{MARK_HOST_VMM_RC}0")),
        "VMM did not exit 0",
        r,
    );
    check(r.vmm_exit == Some(0), "L1 payload did not exit 0", r);
}

/// Guest and host md5 of `tag` are both there and equal.
fn check_md5(r: &RunResult, guest_tag: &str, host_tag: &str) {
    let g = tagged(&r.console, MARK_GUEST_MD5, guest_tag);
    let h = tagged(&r.console, MARK_HOST_MD5, host_tag);
    check(g.is_some(), &format!("no guest md5 for {guest_tag}"), r);
    check(h.is_some(), &format!("no host md5 for {host_tag}"), r);
    check(
        g == h,
        &format!("guest md5 {guest_tag}={g:?} != host md5 {host_tag}={h:?}"),
        r,
    );
}

/// A USB 3 and a USB 2 disk read-write plus a read-only USB 2 disk, all
/// plugged at start: sizes, speeds, O_DIRECT data round trip, host-side
/// checksums after the VMM exits; the read-only image is unchanged.
#[test]
fn disks_on_usb3_and_usb2_ports_keep_their_data() {
    if !nested() {
        return;
    }
    let run = usb_run("usb-disks")
        .param("usb_rw", "three:5000:64,two:480:32")
        .param("usb_ro", "ro:480:16")
        .param("usb_off_mib", 1)
        .param("usb_len_mib", 8);
    let script = UsbScript {
        disks: vec![
            DiskImage::with_id("three", 64).port(5),
            DiskImage::with_id("two", 32).port(1),
            DiskImage::with_id("ro", 16)
                .port(2)
                .readonly()
                .random_head(1),
        ],
        exit_wait_s: 900,
        before: vec![Md5Range::of("ro-head", "ro.img", 0, 1)],
        after: vec![
            Md5Range::of("three", "three.img", 1, 8),
            Md5Range::of("two", "two.img", 1, 8),
            Md5Range::of("ro-head", "ro.img", 0, 1),
        ],
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    for (serial, speed, sectors) in [("three", "5000", "131072"), ("two", "480", "65536")] {
        let mark = format!("USB-DISK serial={serial} ");
        check(
            field(&r.console, &mark, "speed").as_deref() == Some(speed),
            &format!("{serial}: wrong or no speed"),
            &r,
        );
        check(
            field(&r.console, &mark, "sectors").as_deref() == Some(sectors),
            &format!("{serial}: wrong or no size"),
            &r,
        );
        check_md5(&r, serial, serial);
    }
    check(
        field(&r.console, "USB-DISK serial=ro ", "ro").as_deref() == Some("1"),
        "the read-only disk is not read-only in the guest",
        &r,
    );
    check_md5(&r, "ro-head", "ro-head");
    check_md5(&r, "ro-head", "ro-head-before");
    for (lib, driver) in CRC_TRANSFORMS {
        let got = field(&r.console, "USB-CRC ", lib);
        check(
            got.as_deref() == Some(*driver),
            &format!("{lib} uses {got:?}, expected {driver}"),
            &r,
        );
    }
}

/// With `pci=nomsi` the guest leaves MSI-X off and the controller falls
/// back to INTx (INTA# on the IOAPIC input the MP table names): the disk
/// still enumerates and its data round-trips.
#[test]
fn usb_disk_works_over_intx_without_msix() {
    if !nested() {
        return;
    }
    let run = usb_run("usb-disks")
        .param("pci", "nomsi")
        .param("usb_rw", "intx:5000:16")
        .param("usb_off_mib", 1)
        .param("usb_len_mib", 4);
    let script = UsbScript {
        disks: vec![DiskImage::with_id("intx", 16).port(5)],
        exit_wait_s: 900,
        after: vec![Md5Range::of("intx", "intx.img", 1, 4)],
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    check_md5(&r, "intx", "intx");
    let irq = r
        .console
        .lines()
        .find(|l| l.contains("USB-IRQ "))
        .unwrap_or_default();
    check(
        irq.contains("IO-APIC") && irq.contains("xhci"),
        &format!("xhci_hcd is not on an IO-APIC line: {irq:?}"),
        &r,
    );
}

/// The L1 driver of the hotplug test: per cycle, wait for the guest's
/// request, attach (odd cycles on USB 3 port 6, even on USB 2 port 3), wait
/// for the guest's I/O, detach.
fn hotplug_driver(cycles: u32) -> String {
    format!(
        r#"n=1
while [ "$n" -le {cycles} ]; do
    wait_console "USB-HOT-WANT n=$n;" 300 || {{ echo "{MARK_L1_ABORT}: guest did not ask for cycle $n"; break; }}
    if [ $((n % 2)) -eq 1 ]; then port=6; else port=3; fi
    ctl usb.attach "{{\"path\":\"$D/hot.img\",\"port\":$port,\"id\":\"hot\"}}" ||
        {{ echo "{MARK_L1_ABORT}: attach in cycle $n failed"; break; }}
    wait_console "USB-HOT-DONE n=$n;" 300 || {{ echo "{MARK_L1_ABORT}: guest did not finish cycle $n"; break; }}
    ctl usb.detach '{{"id":"hot"}}' || {{ echo "{MARK_L1_ABORT}: detach in cycle $n failed"; break; }}
    echo "L1-USB-CYCLE n=$n; port=$port"
    n=$((n + 1))
done
"#
    )
}

/// 20 hot-attach/detach cycles in one boot, alternating USB 3 and USB 2
/// ports, with I/O on the hot disk each cycle (the previous cycle's block
/// must survive) and a disk plugged at start that must not change.
#[test]
fn hotplug_cycles_attach_and_detach_with_io() {
    if !nested() {
        return;
    }
    let run = usb_run("usb-hotplug")
        .param("hot_serial", "hot")
        .param("hot_cycles", HOT_CYCLES)
        .param("hot_wait", 120)
        .param("base_serial", "base");
    let script = UsbScript {
        disks: vec![DiskImage::with_id("base", 16).port(1).random_head(1)],
        spare: vec![DiskImage::with_id("hot", 32)],
        driver: hotplug_driver(HOT_CYCLES),
        exit_wait_s: 600,
        before: vec![Md5Range::of("base-head", "base.img", 0, 1)],
        after: vec![
            Md5Range::of("base-head", "base.img", 0, 1),
            Md5Range::of("hot-all", "hot.img", 1, u64::from(HOT_CYCLES)),
        ],
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    let l1_cycles = r.console.matches("L1-USB-CYCLE n=").count();
    check(
        l1_cycles == HOT_CYCLES as usize,
        &format!("L1 completed {l1_cycles} attach/detach cycles, not {HOT_CYCLES}"),
        &r,
    );
    let guest_cycles = r
        .console
        .lines()
        .filter(|l| l.contains("USB-HOT-CYCLE n=") && l.contains("io=ok"))
        .count();
    check(
        guest_cycles == HOT_CYCLES as usize,
        &format!("guest saw {guest_cycles} cycles with good I/O, not {HOT_CYCLES}"),
        &r,
    );
    check(
        r.console
            .contains(&format!("USB-HOT-CYCLES-DONE={HOT_CYCLES}")),
        "guest did not finish its cycles",
        &r,
    );
    let speed_of = |n: u32| {
        r.console
            .lines()
            .find(|l| l.contains(&format!("USB-HOT-CYCLE n={n};")))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("speed=")))
            .map(str::to_string)
    };
    check(
        speed_of(1).as_deref() == Some("5000"),
        "cycle 1 (port 6) not SuperSpeed",
        &r,
    );
    check(
        speed_of(2).as_deref() == Some("480"),
        "cycle 2 (port 3) not high speed",
        &r,
    );
    check_md5(&r, "hot-all", "hot-all");
    check_md5(&r, "base-head", "base-head");
    check_md5(&r, "base-head", "base-head-before");
}

/// `sg_reset -b` during O_DIRECT writes and reads on a USB 3 and a USB 2
/// disk: usb-storage resets the port (dmesg), the I/O completes, the data
/// match in the guest and in the image after exit.
#[test]
fn port_reset_during_io_keeps_data() {
    if !nested() {
        return;
    }
    let sg_reset = find_program("sg_reset")
        .unwrap_or_else(|| panic!("sg_reset not found: run scripts/setup.sh (sg3-utils)"));
    let mut run = usb_run("usb-reset")
        .param("reset_disks", "rs3:5000,rs2:480")
        .param("reset_mib", 32)
        .param("resets", 3)
        .l2_binary(sg_reset, "usr/bin/sg_reset");
    run.modules.push("sg".into());
    let script = UsbScript {
        disks: vec![
            DiskImage::with_id("rs3", 64).port(5),
            DiskImage::with_id("rs2", 64).port(1),
        ],
        exit_wait_s: 900,
        after: vec![
            Md5Range::of("rs3", "rs3.img", 0, 32),
            Md5Range::of("rs2", "rs2.img", 0, 32),
        ],
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    for serial in ["rs3", "rs2"] {
        let mark = format!("USB-RESET serial={serial} ");
        let seen: u32 = field(&r.console, &mark, "seen")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        check(seen >= 1, &format!("{serial}: no port reset seen"), &r);
        check(
            field(&r.console, &mark, "io").as_deref() == Some("ok"),
            &format!("{serial}: I/O not ok"),
            &r,
        );
        check_md5(&r, serial, serial);
    }
}

/// Hot-detach while the guest has O_DIRECT I/O in flight on the disk: the
/// I/O fails in the guest instead of hanging, the disk goes away, the VMM
/// keeps running (the guest powers off, the VMM exits 0), and the block
/// written and synced before the detach is intact in the image.
/// Transfers on the vCPU thread (`--usb-io vcpu`, the default): the detach
/// comes from the control thread while a vCPU may hold the controller.
#[test]
fn hot_detach_with_io_in_flight_keeps_synced_data() {
    detach_with_io_in_flight("vcpu");
}

/// The same with transfers on the controller's own I/O thread.
#[test]
fn hot_detach_with_io_in_flight_on_the_io_thread() {
    detach_with_io_in_flight("thread");
}

fn detach_with_io_in_flight(usb_io: &str) {
    if !nested() {
        return;
    }
    let run = usb_run("usb-detach-io")
        .param("det_serial", "det")
        .param("det_wait", 120)
        .vmm_arg(format!("--usb-io={usb_io}"));
    let script = UsbScript {
        disks: vec![DiskImage::with_id("det", 32).port(5)],
        driver: format!(
            r#"wait_console "USB-DETACH-WANT" 600 || echo "{MARK_L1_ABORT}: guest did not start its I/O"
ctl usb.detach '{{"id":"det"}}' || echo "{MARK_L1_ABORT}: detach failed"
echo "L1-USB-DETACHED"
"#
        ),
        exit_wait_s: 600,
        after: vec![Md5Range::of("det-kept", "det.img", 0, 4)],
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    check(
        r.console.contains("L1-USB-DETACHED"),
        "L1 did not detach",
        &r,
    );
    let loops: Option<u32> =
        field(&r.console, "USB-DETACH-IO-END ", "loops").and_then(|v| v.parse().ok());
    check(
        loops.is_some_and(|n| n < 100_000),
        "the guest's I/O loop did not end with a failed command",
        &r,
    );
    check(
        r.console.contains("USB-DETACH-DONE io=failed"),
        "guest did not finish",
        &r,
    );
    check_md5(&r, "det-kept", "det-kept");
}

/// Smoke run of the `usb-bench` scenario (fio on a USB 3 disk) on our VMM
/// only, short jobs: the scenario works and prints one result per job.
/// Not the benchmark (that compares with QEMU in the same L1); ignored by
/// default because it copies fio and its ~80 MB of libraries into L2.
#[test]
#[ignore]
fn usb_bench_scenario_runs_on_our_vmm() {
    if !nested() {
        return;
    }
    let fio = find_program("fio").unwrap_or_else(|| panic!("fio not found on the host"));
    let run = usb_run("usb-bench")
        .param("bench_serial", "bench")
        .param("fio_runtime", 5)
        .param("fio_size_mib", 64)
        .l2_binary(fio, "usr/local/bin/fio");
    let script = UsbScript {
        disks: vec![DiskImage::with_id("bench", 64).port(5).random_head(64)],
        exit_wait_s: 900,
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    for l in r.console.lines().filter(|l| l.contains("usb-bench:")) {
        eprintln!("  {l}");
    }
    let results = r.console.matches("FIO-RESULT job=").count();
    check(results == 3, "not one FIO-RESULT per job", &r);
    check(r.console.contains("FIO-DONE"), "no FIO-DONE", &r);
}

/// The L1 side of the runtime-PM test: records vm.info at each of the
/// guest's looks, and does the remote wake, the detach and the attach the
/// guest asks for.
fn pm_driver() -> String {
    format!(
        r#"info() {{ echo "L1-PM-INFO tag=$1 $(ctl vm.info)"; }}
step() {{ wait_console "$1" 1500 || {{ echo "{MARK_L1_ABORT}: guest never said $1"; return 1; }}; }}
pm_driver() {{
    step "USB-PM-LOOK link-suspended;" && info link-suspended || return
    step "USB-PM-LOOK d3-suspended;" && info d3-suspended || return
    n=1
    while step "USB-PM-WAKE-WANT n=$n;"; do
        [ "$n" -eq 1 ] && info before-wake
        ctl usb.wake '{{"id":"pm"}}' >/dev/null || {{ echo "{MARK_L1_ABORT}: usb.wake $n failed"; return; }}
        [ "$n" -eq {PM_CYCLES} ] && break
        n=$((n + 1))
    done
    n=1
    id=pm
    while step "USB-PM-DETACH-WANT n=$n;"; do
        [ "$n" -eq 1 ] && info before-detach
        ctl usb.detach "{{\"id\":\"$id\"}}" >/dev/null || {{ echo "{MARK_L1_ABORT}: detach $n failed"; return; }}
        [ "$n" -eq 1 ] && {{ step "USB-PM-LOOK idle-suspended;" && info idle-suspended || return; }}
        step "USB-PM-ATTACH-WANT n=$n;" || return
        ctl usb.attach "{{\"path\":\"$D/pm2.img\",\"port\":6,\"id\":\"pm2\"}}" >/dev/null ||
            {{ echo "{MARK_L1_ABORT}: attach $n failed"; return; }}
        echo "L1-PM-HOTPLUG n=$n;"
        id=pm2
        [ "$n" -eq {PM_CYCLES} ] && break
        n=$((n + 1))
    done
}}
pm_driver
"#
    )
}

/// Remote-wake and hotplug cycles through a D3hot controller.
const PM_CYCLES: u32 = 20;

/// The vm.info line L1 recorded at the guest's look `tag`.
fn pm_info<'a>(r: &'a RunResult, tag: &str) -> &'a str {
    let mark = format!("L1-PM-INFO tag={tag} ");
    let line = r.console.lines().find(|l| l.contains(&mark));
    check(line.is_some(), &format!("no vm.info recorded at {tag}"), r);
    line.unwrap_or_default()
}

/// Asserts that the vm.info line holds every one of `facts` (JSON snippets).
fn check_info(r: &RunResult, tag: &str, facts: &[&str]) {
    let line = pm_info(r, tag);
    for f in facts {
        check(
            line.contains(f),
            &format!("vm.info at {tag} lacks {f}: {line}"),
            r,
        );
    }
}

/// USB autosuspend on (power/control=auto, 500 ms) in a Debian guest: 100
/// link suspend/resume cycles (port U3 with the device suspended and its
/// volume quiesced, as vm.info shows), then the controller itself in D3hot:
/// 20 cycles woken by I/O, 20 by a host-side remote wake, and 20 of a
/// hot-detach behind the D3hot controller followed by a hot-attach to the
/// idle D3hot controller; checksummed I/O in every cycle and no failed
/// controller resume in the guest's log.
#[test]
fn runtime_pm_autosuspend_d3hot_remote_wake_and_hotplug() {
    if !nested() {
        return;
    }
    let run = usb_run("usb-pm")
        .param("pm_serial", "pm")
        .param("pm_hot_serial", "pm2")
        .param("pm_link_cycles", 100)
        .param("pm_d3_cycles", 20)
        .param("pm_wake_cycles", PM_CYCLES)
        .param("pm_attach_cycles", PM_CYCLES);
    let script = UsbScript {
        disks: vec![DiskImage::with_id("pm", 64).port(5)],
        spare: vec![DiskImage::with_id("pm2", 16)],
        driver: pm_driver(),
        exit_wait_s: 900,
        ..Default::default()
    };
    let r = run_script(run, script);
    check_passed(&r);
    check(
        r.console.contains("USB-PM-LINK cycles=100 io=ok"),
        "link suspend/resume cycles did not all pass",
        &r,
    );
    check(
        r.console.contains("USB-PM-D3-CYCLES cycles=20 io=ok"),
        "D3hot cycles did not all pass",
        &r,
    );
    let asleep = [r#""suspended":true"#, r#""quiesced":true"#];
    check_info(
        &r,
        "link-suspended",
        &[r#""power_state":"D0""#, r#""link_state":"U3""#],
    );
    check_info(&r, "link-suspended", &asleep);
    check_info(&r, "d3-suspended", &[r#""power_state":"D3hot""#]);
    check_info(&r, "d3-suspended", &asleep);
    check_info(&r, "before-wake", &[r#""power_state":"D3hot""#]);
    check_info(&r, "before-detach", &[r#""power_state":"D3hot""#]);
    check_info(
        &r,
        "idle-suspended",
        &[r#""power_state":"D3hot""#, r#""ports":[]"#],
    );
    check(
        r.console
            .contains(&format!("USB-PM-WAKES n={PM_CYCLES} io=ok")),
        "not every remote wake brought the device back",
        &r,
    );
    check(
        r.console
            .contains(&format!("USB-PM-ATTACH-CYCLES n={PM_CYCLES} io=ok")),
        "not every detach/attach through a D3hot controller worked",
        &r,
    );
    check(
        r.console.contains("USB-PM-DMESG bad=0"),
        "controller failures in the guest log",
        &r,
    );
}

/// The L1 side of the NOIO tests: every time the guest's disk sleeps,
/// push every xHCI structure out to swap (on the sleeping disk's volume).
fn noio_driver() -> String {
    format!(
        r#"n=1
while wait_console "USB-NOIO-SLEEPING n=$n;" 1500; do
    ctl debug.evict '{{"device":"xhci"}}' >/dev/null || {{ echo "{MARK_L1_ABORT}: debug.evict failed"; break; }}
    n=$((n + 1))
done
echo "L1-NOIO-EVICTS n=$((n - 1))"
"#
    )
}

/// A run of the NOIO scenario: 192 MiB guest, 64 MiB resident limit, swap
/// on the USB disk's volume, `cycles` suspend/evict/resume cycles.
fn noio_run(cycles: u32, extra: &[&str]) -> RunResult {
    let sg_reset = find_program("sg_reset")
        .unwrap_or_else(|| panic!("sg_reset not found: run scripts/setup.sh (sg3-utils)"));
    // Lean cycles (1 MiB of pressure I/O, 1 s of stillness for L1's evict)
    // keep 100 of them within a CI run; the pressure file stays larger
    // than the limit, so the pager swaps throughout.
    let mut run = usb_run("usb-noio")
        .memory_mib(192)
        .param("noio_serial", "noio")
        .param("noio_cycles", cycles)
        .param("noio_slice_mib", 1)
        .param("noio_hold_s", 1)
        .param("noio_delay_ms", 200)
        .timeout(Duration::from_secs(1800))
        .l2_binary(sg_reset, "usr/bin/sg_reset");
    run.modules.push("sg".into());
    run.memory_opts = Some("limit=64M,swap=/tmp/usb/swap.img,swap_volume=noio".into());
    for a in extra {
        run = run.vmm_arg(*a);
    }
    let script = UsbScript {
        disks: vec![DiskImage::with_id("noio", 64).port(5)],
        driver: noio_driver(),
        exit_wait_s: 900,
        ..Default::default()
    };
    run_script(run, script)
}

/// A counter from the VMM's `pager-stats` line.
fn pager_counter(r: &RunResult, name: &str) -> u64 {
    let line = r
        .console
        .lines()
        .rev()
        .find(|l| l.contains("pager-stats {"))
        .unwrap_or_default();
    let key = format!("\"{name}\":");
    line.split(&key)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// NOIO on, the deadlock's conditions all present: swap on the USB disk's
/// volume, a resident limit a third of the guest's RAM under constant
/// pressure, the disk autosuspending 40 times (100 in the on-demand
/// variant) with every controller structure evicted to swap while it
/// sleeps, bus resets every 10 cycles.
/// Every resume and reset completes (no watchdog report, the VMM exits 0),
/// the data is intact, and the counters show NOIO faults served past the
/// quiesced volume.
#[test]
fn noio_resume_and_reset_paths_never_wait_on_their_own_swap_volume() {
    noio_cycles(40);
}

/// The same at the issue's full length: 100 cycles (~15 min on a loaded
/// machine); on demand: `cargo test -p integration --test usb -- --ignored noio`.
#[test]
#[ignore = "long variant: run on demand with --ignored"]
fn noio_holds_for_100_cycles() {
    noio_cycles(100);
}

fn noio_cycles(cycles: u32) {
    if !nested() {
        return;
    }
    let r = noio_run(cycles, &["--stall-watchdog=30"]);
    check_passed(&r);
    check(
        !r.console.contains("STALL-WATCHDOG"),
        "the stall watchdog fired",
        &r,
    );
    check(
        r.console
            .contains(&format!("USB-NOIO-CYCLES n={cycles} io=ok pressure=ok")),
        "not every cycle passed",
        &r,
    );
    check(
        r.console.contains(&format!("L1-NOIO-EVICTS n={cycles}")),
        "L1 did not evict every cycle",
        &r,
    );
    for (counter, min) in [
        ("noio_faults", 1),
        ("noio_reads_past_quiesce", 1),
        ("evicted_on_request", u64::from(cycles)),
        ("pages_out", 1),
    ] {
        let n = pager_counter(&r, counter);
        check(
            n >= min,
            &format!("pager counter {counter} = {n}, want >= {min}"),
            &r,
        );
    }
    check(
        r.console.contains(r#""owner":"USB disk 'noio' on port 5""#),
        "no volume-stats for the disk's volume",
        &r,
    );
}

/// The same with NOIO switched off (`--unsafe-disable-noio`): the first
/// resume faults on an evicted structure whose swap-in waits for the very
/// volume the resume would un-quiesce. The watchdog names that cycle and
/// the VMM exits with its status 76.
#[test]
fn without_noio_the_resume_deadlocks_and_the_watchdog_names_the_cycle() {
    if !nested() {
        return;
    }
    let r = noio_run(5, &["--unsafe-disable-noio", "--stall-watchdog=10"]);
    check(!r.timed_out, "timed out", &r);
    check(
        r.console.contains(&format!("{MARK_HOST_VMM_RC}76")),
        "the VMM did not exit with the watchdog's status 76",
        &r,
    );
    for want in [
        "STALL-WATCHDOG",
        "in a resume/reset path: xhci",
        "waits on guest page",
        "its swap-in read",
        "quiesced for",
        "belongs to USB disk 'noio' on port 5",
        "NOIO is disabled (--unsafe-disable-noio)",
    ] {
        check(
            r.console.contains(want),
            &format!("the report lacks {want:?}"),
            &r,
        );
    }
}
