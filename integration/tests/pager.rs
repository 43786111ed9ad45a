//! Overcommitted guest memory end to end: a guest touches far more memory
//! than the VMM's resident limit with a random pattern and verifies it,
//! while L1 samples the VMM's guest RAM mapping from /proc/PID/smaps.
//! Resident guest memory must stay within limit + reserve, by the pager's
//! own counters and by smaps.
//!
//! Two sizes: a tight one in CI (512 MiB guest, 64 MiB limit, 160 MiB
//! touched; 207 s in a clean CI run with batched paging) and, on demand
//! (`cargo test -p integration --test pager -- --ignored`), the full size
//! (1 GiB guest, 256 MiB limit, 700 MiB touched; 469 s on a quiet machine
//! with batched paging and fault-around, where per-page paging had needed
//! over 25 minutes): CI keeps its time for the runtime-PM and NOIO runs.

use std::time::Duration;

use guest_image::Scenario;
use integration::bench::number_after;
use integration::harness::vmm_args_with;
use integration::l1::{sh_quote, L1Payload, L2_INITRD, L2_KERNEL, VMM_PATH};
use integration::{host, GuestRun, Harness, Mode, Verdict};

/// The pager's default reserve: limit / 64, at least 16 pages.
fn reserve_kib(limit_mib: u64) -> u64 {
    (limit_mib * 1024 / 64).max(16 * 4)
}

/// L1 payload: run the VMM in the background, sample the Rss of its largest
/// mapping (guest RAM) every half second, report the maximum.
fn sampling_script(argv: &[String]) -> String {
    let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    format!(
        "{cmd} &\n\
         pid=$!\n\
         max=0\n\
         n=0\n\
         while kill -0 $pid 2>/dev/null; do\n\
         \x20 r=$(awk '/^Size:/{{s=$2}} /^Rss:/{{if (s>ms) {{ms=s; mr=$2}}}} END{{print mr+0}}' /proc/$pid/smaps 2>/dev/null)\n\
         \x20 [ -n \"$r\" ] && [ \"$r\" -gt \"$max\" ] && max=$r\n\
         \x20 n=$((n + 1))\n\
         \x20 if [ $((n % 60)) -eq 0 ]; then\n\
         \x20   echo \"L1-SAMPLE uptime=$(cut -d' ' -f1 /proc/uptime) guest_rss_kb=$r threads=$(cat /proc/$pid/task/*/stat 2>/dev/null | awk '{{printf \"%s:%s \", $2, $3}}')\"\n\
         \x20 fi\n\
         \x20 sleep 0.5\n\
         done\n\
         wait $pid\n\
         rc=$?\n\
         echo \"L1-GUEST-RSS-MAX-KB=$max\"\n\
         exit $rc\n",
        cmd = cmd.join(" ")
    )
}

#[test]
fn overcommitted_guest_keeps_its_data_and_stays_under_the_limit() {
    overcommit(512, 64, 160, Duration::from_secs(2400));
}

#[test]
#[ignore = "long variant (~8 min): run on demand with --ignored"]
fn overcommitted_guest_full_size() {
    overcommit(1024, 256, 700, Duration::from_secs(3600));
}

fn overcommit(mem_mib: u32, limit_mib: u64, touch_mib: u32, timeout: Duration) {
    if Mode::auto().unwrap() != Mode::Nested {
        eprintln!("this test drives the nested L1 harness; skipped in direct mode");
        return;
    }
    let harness = Harness::new().unwrap();
    let mut run = GuestRun::new(Scenario::load("pager-touch").unwrap())
        .cpus(2)
        .memory_mib(mem_mib)
        .param("touch_mib", touch_mib)
        .timeout(timeout);
    run.memory_opts = Some(format!("limit={limit_mib}M,swap=/tmp/guest.swap"));
    let cmdline = run.l2_cmdline().unwrap();
    let mut argv = vec![VMM_PATH.to_string()];
    argv.extend(vmm_args_with(&run, &cmdline, L2_KERNEL, L2_INITRD));
    argv.extend(["--log-level".to_string(), "info".to_string()]);
    let payload = L1Payload::VmmScript {
        binary: host::vmm_binary(true).unwrap(),
        script: sampling_script(&argv),
    };
    let r = harness.run_l1_payload(&run, payload).unwrap();
    let console = &r.console;
    eprintln!("{}", r.summary());
    // The guest's phase stamps and the pager's counters, pass or fail.
    for l in console
        .lines()
        .filter(|l| l.contains("pager-touch:") || l.contains("pager-stats"))
    {
        eprintln!("{}", l.trim());
    }
    assert!(!r.timed_out, "timed out\n{console}");
    assert_eq!(r.verdict, Verdict::Pass, "scenario failed\n{console}");
    assert_eq!(r.vmm_exit, Some(0), "VMM exit\n{console}");

    let bound_kib = limit_mib * 1024 + reserve_kib(limit_mib);
    let page_kib = 4;
    let peak_pages = number_after(console, "\"peak_resident_pages\":")
        .unwrap_or_else(|| panic!("no pager-stats JSON on the console\n{console}"));
    let pages_out = number_after(console, "\"pages_out\":").unwrap_or(0);
    let smaps_max = number_after(console, "L1-GUEST-RSS-MAX-KB=")
        .unwrap_or_else(|| panic!("L1 did not report the smaps sample\n{console}"));
    eprintln!(
        "pager: peak resident {} KiB, smaps max {} KiB, bound {} KiB, pages out {}",
        peak_pages * page_kib,
        smaps_max,
        bound_kib,
        pages_out
    );
    assert!(
        peak_pages * page_kib <= bound_kib,
        "pager counters: peak resident {} KiB > limit + reserve {} KiB\n{console}",
        peak_pages * page_kib,
        bound_kib
    );
    assert!(
        smaps_max <= bound_kib,
        "smaps: guest RAM Rss {smaps_max} KiB > limit + reserve {bound_kib} KiB\n{console}"
    );
    assert!(
        smaps_max > limit_mib * 1024 / 2,
        "smaps sample implausibly small ({smaps_max} KiB): wrong mapping?\n{console}"
    );
    // Touching more than the limit cannot happen without paging out at least
    // the difference.
    let must_page_out = (u64::from(touch_mib) - limit_mib) * 256;
    assert!(
        pages_out >= must_page_out,
        "only {pages_out} pages written to swap, expected >= {must_page_out}\n{console}"
    );
}
