//! The USB runtime-PM benchmark (not a test): the `usb-pm-bench` scenario
//! times the first read after each autosuspend (the guest-visible resume
//! latency) on our xHCI, on ours under memory pressure with swap on the
//! disk's own volume (NOIO at work), and on QEMU's `qemu-xhci` +
//! `usb-storage`, round-robin in one L1. The L1 script (shared with the USB
//! disk benchmark) marks each run with `USB-BENCH-RUN variant=<name>
//! rep=<n>`; the `PM-RESUME` and `PM-IDLE` lines after it belong to it.

use std::fmt::Write as _;

use crate::bench::{kv, ours_argv, qemu_argv, Variant};
use crate::harness::GuestRun;
use crate::l1::L2_KERNEL;
use crate::usb_bench::{qemu_disk_args, IMAGE, MARK_RUN, SERIAL};

/// Our VMM, ours with a pager, and QEMU, as the table names them.
pub const VARIANTS: &[(&str, &str)] = &[
    ("ours", "ours"),
    ("ours-d0", "ours, controller kept in D0 (link PM only)"),
    ("ours-loop", "ours, the pressure loop without a limit"),
    (
        "ours-pressure",
        "ours, limit + swap on the disk's volume, pressure",
    ),
    ("qemu", "QEMU qemu-xhci + usb-storage"),
];

/// The swap file of the pressure variant in L1's tmpfs.
const SWAP: &str = "/tmp/pm-bench.swap";

/// The variants. `pressure_mib` goes on the pressure variants' command
/// lines only; `ours-pressure`'s resident limit is `limit_mib`, `ours-loop`
/// runs the same guest loop without a limit (what the guest's own CPU
/// contention costs, apart from the pager). `ours-d0` keeps the controller
/// in D0 (like QEMU's, which has no PCI PM): only the link suspends, so its
/// resume is the like-for-like comparison.
pub fn variants(run: &GuestRun, cmdline: &str, pressure_mib: u32, limit_mib: u32) -> Vec<Variant> {
    let disk = [
        "--usb-storage".to_string(),
        format!("path={IMAGE},port=5,id={SERIAL}"),
    ];
    let mut ours = ours_argv(run, cmdline, L2_KERNEL);
    ours.extend(disk.clone());
    let mut d0 = ours_argv(run, &format!("{cmdline} pmb_controller=on"), L2_KERNEL);
    d0.extend(disk.clone());
    let mut loaded = run.clone();
    loaded.memory_opts = Some(format!(
        "limit={limit_mib}M,swap={SWAP},swap_volume={SERIAL}"
    ));
    let loaded_cmdline = format!("{cmdline} pmb_pressure_mib={pressure_mib}");
    let mut looping = ours_argv(run, &loaded_cmdline, L2_KERNEL);
    looping.extend(disk.clone());
    let mut pressure = ours_argv(&loaded, &loaded_cmdline, L2_KERNEL);
    pressure.extend(disk);
    let mut qemu = qemu_argv(run, cmdline, "pc", L2_KERNEL);
    qemu.extend(qemu_disk_args());
    vec![
        Variant {
            name: "ours",
            argv: ours,
        },
        Variant {
            name: "ours-d0",
            argv: d0,
        },
        Variant {
            name: "ours-loop",
            argv: looping,
        },
        Variant {
            name: "ours-pressure",
            argv: pressure,
        },
        Variant {
            name: "qemu",
            argv: qemu,
        },
    ]
}

/// What one run reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PmRun {
    pub variant: String,
    pub resume_us: Vec<u64>,
    pub reset_us: Vec<u64>,
    /// (ms the controller was runtime-suspended, ms of the idle stretch).
    pub idle: Option<(u64, u64)>,
}

/// Every run of the console with its `PM-RESUME` and `PM-IDLE` lines.
pub fn parse(console: &str) -> Vec<PmRun> {
    let mut runs: Vec<PmRun> = Vec::new();
    for l in console.lines() {
        if let Some(at) = l.find(MARK_RUN) {
            if let Some(v) = kv(&l[at..], "variant") {
                runs.push(PmRun {
                    variant: v.to_string(),
                    ..Default::default()
                });
            }
        } else if let (Some(at), Some(run)) = (l.find("PM-RESUME "), runs.last_mut()) {
            if let Some(us) = kv(&l[at..], "us").and_then(|v| v.parse().ok()) {
                run.resume_us.push(us);
            }
        } else if let (Some(at), Some(run)) = (l.find("PM-RESET "), runs.last_mut()) {
            if let Some(us) = kv(&l[at..], "us").and_then(|v| v.parse().ok()) {
                run.reset_us.push(us);
            }
        } else if let (Some(at), Some(run)) = (l.find("PM-IDLE "), runs.last_mut()) {
            let rest = &l[at..];
            let ms = kv(rest, "controller_suspended_ms").and_then(|v| v.parse().ok());
            let of = kv(rest, "of").and_then(|v| v.parse().ok());
            run.idle = ms.zip(of);
        }
    }
    runs
}

/// The `q`-quantile (0..=1, nearest rank) of `v`.
pub fn quantile(v: &[u64], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

/// The table: resume latency p50/p99 (all cycles of all runs of a
/// variant), ratio to QEMU, and the controller's D3hot share of the idle
/// stretch.
pub fn render_table(runs: &[PmRun]) -> String {
    let mut t = String::from(
        "| VMM | cycles | resume p50 ms | resume p99 ms | p99 / QEMU p99 | resets | reset p50 ms | reset p99 ms | controller in D3hot while idle |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let all = |variant: &str| -> Vec<u64> {
        runs.iter()
            .filter(|r| r.variant == variant)
            .flat_map(|r| r.resume_us.iter().copied())
            .collect()
    };
    let resets = |variant: &str| -> Vec<u64> {
        runs.iter()
            .filter(|r| r.variant == variant)
            .flat_map(|r| r.reset_us.iter().copied())
            .collect()
    };
    let qemu_p99 = quantile(&all("qemu"), 0.99);
    let ms = |us: Option<u64>| us.map_or("n/a".into(), |u| format!("{:.1}", u as f64 / 1000.0));
    for (variant, label) in VARIANTS {
        let v = all(variant);
        if !runs.iter().any(|r| r.variant == *variant) {
            continue;
        }
        let p99 = quantile(&v, 0.99);
        let ratio = match (p99, qemu_p99) {
            (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
            _ => "n/a".into(),
        };
        let (susp, of) = runs
            .iter()
            .filter(|r| r.variant == *variant)
            .filter_map(|r| r.idle)
            .fold((0, 0), |(a, b), (s, o)| (a + s, b + o));
        let idle = if of > 0 {
            format!(
                "{:.0}% ({:.1} of {:.0} s)",
                100.0 * susp as f64 / of as f64,
                susp as f64 / 1000.0,
                of as f64 / 1000.0
            )
        } else {
            "n/a".into()
        };
        let r = resets(variant);
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} | {ratio} | {} | {} | {} | {idle} |",
            v.len(),
            ms(quantile(&v, 0.5)),
            ms(p99),
            r.len(),
            ms(quantile(&r, 0.5)),
            ms(quantile(&r, 0.99)),
        );
    }
    t
}

/// One `PM-SLOWEST` line per variant run: its `n` slowest resume cycles
/// and resets as `cycle:ms`, slowest first (where the tail sits in a run).
pub fn slowest(runs: &[PmRun], n: usize) -> Vec<String> {
    let top = |v: &[u64]| -> String {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|a, b| v[*b].cmp(&v[*a]).then(a.cmp(b)));
        idx.iter()
            .take(n)
            .map(|i| format!("{}:{:.1}", i + 1, v[*i] as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(",")
    };
    runs.iter()
        .map(|r| {
            format!(
                "PM-SLOWEST variant={} resume={} reset={}",
                r.variant,
                top(&r.resume_us),
                top(&r.reset_us)
            )
        })
        .collect()
}

/// Issue 14's measure: p99 under pressure over p99 without (ours with the
/// controller allowed to suspend in both), for resumes and for resets.
pub fn pressure_ratios(runs: &[PmRun]) -> String {
    let p99 = |variant: &str, resets: bool| -> Option<u64> {
        let v: Vec<u64> = runs
            .iter()
            .filter(|r| r.variant == variant)
            .flat_map(|r| {
                if resets { &r.reset_us } else { &r.resume_us }
                    .iter()
                    .copied()
            })
            .collect();
        quantile(&v, 0.99)
    };
    let ratio = |resets: bool| match (p99("ours-pressure", resets), p99("ours", resets)) {
        (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
        _ => "n/a".into(),
    };
    format!(
        "Under pressure / without (ours, p99; issue 14's goal <= 1.2x): resume {}, reset {}.",
        ratio(false),
        ratio(true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_image::Scenario;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn lines_belong_to_their_run_and_tabulate() {
        let c = "\
USB-BENCH-RUN variant=ours rep=0
PM-RESUME n=1 us=2000
[ 3.1] PM-RESUME n=2 us=4000
PM-IDLE controller_suspended_ms=55000 of=60000 status=suspended
USB-BENCH-RUN variant=qemu rep=0
PM-RESUME n=1 us=8000
PM-RESUME n=2 us=bad
PM-IDLE controller_suspended_ms=0 of=60000 status=active
USB-BENCH-RUN variant=ours-pressure rep=0
PM-RESUME n=1 us=3000
PM-RESET n=1 us=90000
";
        let r = parse(c);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].resume_us, vec![2000, 4000]);
        assert_eq!(r[0].idle, Some((55000, 60000)));
        assert_eq!(r[1].resume_us, vec![8000]);
        let t = render_table(&r);
        assert!(
            t.contains("| ours | 2 | 2.0 | 4.0 | 0.50x | 0 | n/a | n/a | 92% (55.0 of 60 s) |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| QEMU qemu-xhci + usb-storage | 1 | 8.0 | 8.0 | 1.00x | 0 | n/a | n/a | 0% (0.0 of 60 s) |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| 1 | 3.0 | 3.0 | 0.38x | 1 | 90.0 | 90.0 | n/a |"),
            "{t}"
        );
        assert_eq!(
            slowest(&r, 2),
            vec![
                "PM-SLOWEST variant=ours resume=2:4.0,1:2.0 reset=",
                "PM-SLOWEST variant=qemu resume=1:8.0 reset=",
                "PM-SLOWEST variant=ours-pressure resume=1:3.0 reset=1:90.0",
            ]
        );
        assert!(!t.contains("ours-loop") && !t.contains("kept in D0"), "{t}");
        assert_eq!(
            pressure_ratios(&r),
            "Under pressure / without (ours, p99; issue 14's goal <= 1.2x): resume 0.75x, reset n/a."
        );
    }

    #[test]
    fn only_the_pressure_variant_gets_a_limit_and_the_pressure() {
        let run = GuestRun::new(Scenario::inline("t", "true"));
        let v = variants(&run, "c", 192, 112);
        assert_eq!(v.len(), 5);
        let joined = |i: usize| v[i].argv.join(" ");
        assert!(!joined(0).contains("limit="));
        assert!(joined(1).contains("pmb_controller=on") && !joined(0).contains("pmb_controller"));
        assert!(joined(2).contains("pmb_pressure_mib=192") && !joined(2).contains("limit="));
        assert!(joined(3).contains("limit=112M,swap=/tmp/pm-bench.swap,swap_volume=bench"));
        assert!(joined(3).contains("pmb_pressure_mib=192"));
        assert!(!joined(0).contains("pmb_pressure_mib"));
        assert!(joined(4).contains("qemu-xhci"));
    }
}
