//! The pager benchmark (not a test): the `pager-touch` scenario (write N MiB
//! of random data to the guest's tmpfs, then two checksum passes) in a guest
//! of S MiB whose host-side memory is limited to S/2, round-robin in one L1:
//!
//! - ours: `--memory size=S,limit=S/2,swap=<file in L1's tmpfs>`;
//! - QEMU `-M pc` in a cgroup v2 with `memory.max` = S/2, swapping to a zram
//!   device in the same L1 (L1's tmpfs cannot hold a swap file).
//!
//! Both swap stores are RAM of the same L1. The L1 script marks each run
//! with `PAGER-BENCH-RUN variant=<name> rep=<n>` and ends it with
//! `PAGER-BENCH-END ...`; the guest's `pager-touch: [uptime]` lines in
//! between time the phases.

use std::fmt::Write as _;

use crate::bench::{kv, median, ours_argv, ours_vs, qemu_argv, Variant, CPU_SH};
use crate::harness::GuestRun;
use crate::l1::{sh_quote, L2_KERNEL};

/// Our swap file, in L1's tmpfs.
pub const SWAP_FILE: &str = "/tmp/guest.swap";
/// The cgroup QEMU runs in (one per run, so `memory.peak` is per run).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Marks the start and the end of one run in the console.
pub const MARK_RUN: &str = "PAGER-BENCH-RUN";
pub const MARK_END: &str = "PAGER-BENCH-END";
/// CPU seconds of each of our VMM's threads in one run (user/system/guest,
/// sampled every second, so up to a second short) and of the whole L1.
pub const MARK_CPU: &str = "PAGER-BENCH-CPU";
/// The phases of `pager-touch`, as (name, line that starts it, line that ends it).
pub const PHASES: &[(&str, &str, &str)] = &[
    ("write", "] writing", "] first checksum pass"),
    ("checksum 1", "] first checksum pass", "] first pass md5"),
    ("checksum 2", "] first pass md5", "] second pass md5"),
];

/// Ours without a limit: what the limit costs, in the same L1.
pub const UNLIMITED: &str = "ours-nolimit";
/// Ours with the pager on and a limit as large as guest RAM: the pager's
/// cost without any eviction (4 KiB host pages, first-touch faults).
pub const FULL_LIMIT: &str = "ours-limit100";
/// Ours with the limit and `huge_pages=off`: what huge pages change.
pub const SMALL_PAGES: &str = "ours-4k";

/// Ours with the pager (limit `limit_mib`), QEMU `-M pc` (its limit is the
/// cgroup's, set by [`script`]), ours without a limit and ours with a limit
/// of all guest RAM. `run.memory_opts` is ignored.
pub fn variants(run: &GuestRun, cmdline: &str, limit_mib: u32) -> Vec<Variant> {
    let mut paged = run.clone();
    paged.memory_opts = Some(format!("limit={limit_mib}M,swap={SWAP_FILE}"));
    let ours = ours_argv(&paged, cmdline, L2_KERNEL);
    let qemu = qemu_argv(run, cmdline, "pc", L2_KERNEL);
    let mut plain = run.clone();
    plain.memory_opts = None;
    let mut full = run.clone();
    full.memory_opts = Some(format!("limit={}M,swap={SWAP_FILE}", run.memory_mib));
    let mut v = ours_vs(ours, "qemu", qemu);
    v.push(Variant {
        name: UNLIMITED,
        argv: ours_argv(&plain, cmdline, L2_KERNEL),
    });
    v.push(Variant {
        name: FULL_LIMIT,
        argv: ours_argv(&full, cmdline, L2_KERNEL),
    });
    let mut small = run.clone();
    small.memory_opts = Some(format!(
        "limit={limit_mib}M,swap={SWAP_FILE},huge_pages=off"
    ));
    v.push(Variant {
        name: SMALL_PAGES,
        argv: ours_argv(&small, cmdline, L2_KERNEL),
    });
    v
}

/// The L1 script: zram swap and the cgroup hierarchy once, then `reps`
/// rounds of every variant, each bounded by `per_run_s`. QEMU runs in a
/// fresh cgroup with `memory.max` = `limit_mib`; ours with its own limit.
pub fn script(
    reps: u32,
    per_run_s: u64,
    limit_mib: u32,
    zram_mib: u32,
    variants: &[Variant],
) -> String {
    let mut s = format!(
        "export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu\n{CPU_SH}\
         up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         vm() {{ awk -v k=\"$1\" '$1 == k {{print $2}}' /proc/vmstat; }}\n\
         echo {zram_mib}M > /sys/block/zram0/disksize || exit 91\n\
         mkswap /dev/zram0 >/dev/null && swapon /dev/zram0 || exit 92\n\
         mkdir -p {CGROUP_ROOT} && mount -t cgroup2 none {CGROUP_ROOT} || exit 93\n\
         echo +memory > {CGROUP_ROOT}/cgroup.subtree_control || exit 94\n\
         echo \"PAGER-BENCH-SETUP swap=$(tail -n +2 /proc/swaps | tr -s ' ') memory.max={limit_mib}M\"\n\
         r=0\nwhile [ \"$r\" -lt {reps} ]; do\n"
    );
    for v in variants {
        let argv: Vec<String> = v.argv.iter().map(|a| sh_quote(a)).collect();
        let argv = argv.join(" ");
        let _ = writeln!(
            s,
            "    echo \"{MARK_RUN} variant={name} rep=$r\"\n    \
             rm -f {SWAP_FILE}\n    \
             in0=$(vm pswpin); out0=$(vm pswpout); t0=$(up)",
            name = v.name
        );
        if v.name == "qemu" {
            let cg = format!("{CGROUP_ROOT}/bench$r");
            let _ = writeln!(
                s,
                "    mkdir {cg} && echo {limit_mib}M > {cg}/memory.max || exit 95\n    \
                 timeout {per_run_s} sh -c 'echo $$ > \"$0/cgroup.procs\" && exec \"$@\"' {cg} {argv} </dev/null 2>&1\n    \
                 rc=$?\n    \
                 extra=\"cgroup_peak_kib=$(($(cat {cg}/memory.peak) / 1024)) events=$(tr '\\n' ' ' < {cg}/memory.events | tr ' ' ',')\"",
            );
        } else {
            let _ = writeln!(
                s,
                "    cpu0=$(head -1 /proc/stat)\n    \
                 {argv} </dev/null 2>&1 &\n    \
                 t=$!\n    \
                 (sleep {per_run_s}; kill $t 2>/dev/null) &\n    \
                 k=$!\n    \
                 while kill -0 $t 2>/dev/null; do\n        \
                 cat /proc/$t/task/*/stat > /tmp/tstat.new 2>/dev/null && mv /tmp/tstat.new /tmp/tstat\n        \
                 sleep 1\n    \
                 done\n    \
                 wait $t\n    \
                 rc=$?\n    \
                 kill $k 2>/dev/null\n    \
                 echo \"{MARK_CPU} variant={name} rep=$r $(thread_cpu < /tmp/tstat) l1: $(l1_cpu \"$cpu0\")\"\n    \
                 rm -f /tmp/tstat\n    \
                 extra=\"\"",
                name = v.name
            );
        }
        let _ = writeln!(
            s,
            "    echo \"{MARK_END} variant={name} rep=$r rc=$rc start=$t0 end=$(up) \
             l1_pswpin=$(($(vm pswpin) - in0)) l1_pswpout=$(($(vm pswpout) - out0)) $extra\"",
            name = v.name
        );
    }
    s.push_str("    r=$((r + 1))\ndone\n");
    s
}

/// One run: its phase times from the guest's uptime stamps (seconds), the
/// L1 wall time, and whether the guest verified its data.
#[derive(Clone, Debug, PartialEq)]
pub struct PagerRun {
    pub variant: String,
    pub rep: u32,
    /// Seconds per entry of [`PHASES`], when both stamps were printed.
    pub phases: Vec<Option<f64>>,
    /// The guest's uptime when the scenario started: its boot to init.
    pub boot_s: Option<f64>,
    pub wall_s: Option<f64>,
    /// The guest verified its data (`pager-touch: ok`).
    pub ok: bool,
    /// The `PAGER-BENCH-END` line.
    pub end_line: String,
}

/// The uptime stamp of the first `pager-touch: [T]...` line containing `what`.
fn stamp(lines: &[&str], what: &str) -> Option<f64> {
    let l = lines.iter().find(|l| l.contains(what))?;
    let at = l.find("pager-touch: [")? + "pager-touch: [".len();
    l[at..].split(']').next()?.trim().parse().ok()
}

/// Every run of the console, between its start and end markers.
pub fn parse(console: &str) -> Vec<PagerRun> {
    let mut out = Vec::new();
    let mut cur: Option<(String, u32, Vec<&str>)> = None;
    for l in console.lines() {
        if let Some(at) = l.find(MARK_RUN) {
            let rest = &l[at..];
            cur = kv(rest, "variant")
                .zip(kv(rest, "rep").and_then(|r| r.parse().ok()))
                .map(|(v, r)| (v.to_string(), r, Vec::new()));
        } else if let Some(at) = l.find(MARK_END) {
            let Some((variant, rep, lines)) = cur.take() else {
                continue;
            };
            let rest = &l[at..];
            let num = |k| kv(rest, k).and_then(|v| v.parse::<f64>().ok());
            let phases = PHASES
                .iter()
                .map(|(_, from, to)| Some(stamp(&lines, to)? - stamp(&lines, from)?))
                .collect();
            out.push(PagerRun {
                variant,
                rep,
                phases,
                boot_s: stamp(&lines, PHASES[0].1),
                wall_s: num("end").zip(num("start")).map(|(e, s)| e - s),
                // QEMU's exit status comes from isa-debug-exit (odd even on
                // success): the guest's own verdict decides.
                ok: lines.iter().any(|l| l.contains("pager-touch: ok")),
                end_line: rest.trim().to_string(),
            });
        } else if let Some((_, _, lines)) = cur.as_mut() {
            lines.push(l);
        }
    }
    out
}

/// Median of a variant's successful runs for one metric (in ms, as `median`
/// works on integers), with the number of runs.
fn med(
    runs: &[PagerRun],
    variant: &str,
    f: impl Fn(&PagerRun) -> Option<f64>,
) -> (Option<f64>, usize) {
    let v: Vec<u64> = runs
        .iter()
        .filter(|r| r.variant == variant && r.ok)
        .filter_map(|r| f(r).map(|s| (s * 1000.0).round() as u64))
        .collect();
    let n = v.len();
    (median(v).map(|ms| ms as f64 / 1000.0), n)
}

/// Row `i` of the table for one run: a phase, then the workload (all
/// phases), then the L1 wall time.
fn row_value(r: &PagerRun, i: usize) -> Option<f64> {
    match i.checked_sub(PHASES.len()) {
        None => r.phases.get(i).copied().flatten(),
        Some(0) => r.phases.iter().copied().sum(),
        Some(_) => r.wall_s,
    }
}

/// The markdown table: per phase, median seconds and MiB/s of each VMM and
/// ours / QEMU throughput (= QEMU time / our time; the goal is >= 0.8).
pub fn render_table(runs: &[PagerRun], touch_mib: u32) -> String {
    let mut t = String::from(
        "| phase | ours s (runs) | ours MiB/s | QEMU + cgroup s (runs) | QEMU MiB/s | ours / QEMU throughput |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut rows: Vec<&str> = PHASES.iter().map(|(name, _, _)| *name).collect();
    rows.extend(["workload (all three)", "L1 wall time, boot to exit"]);
    let phases = PHASES.len();
    for (i, name) in rows.iter().enumerate() {
        let f = |r: &PagerRun| row_value(r, i);
        let (o, on) = med(runs, "ours", f);
        let (q, qn) = med(runs, "qemu", f);
        // Throughput only for the phases that move `touch_mib`.
        let rate = |s: Option<f64>| match s {
            Some(s) if i < phases && s > 0.0 => format!("{:.1}", f64::from(touch_mib) / s),
            _ => "-".into(),
        };
        let secs = |s: Option<f64>| s.map_or("n/a".into(), |s| format!("{s:.1}"));
        let ratio = match (o, q) {
            (Some(o), Some(q)) if o > 0.0 => format!("{:.2}x", q / o),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            t,
            "| {name} | {} ({on}) | {} | {} ({qn}) | {} | {ratio} |",
            secs(o),
            rate(o),
            secs(q),
            rate(q)
        );
    }
    t
}

/// What the limit costs: ours with the limit vs ours without one (time
/// ratios; issue 16's goal for the boot is <= 1.2x).
pub fn render_limit_table(runs: &[PagerRun]) -> String {
    let mut t = String::from(
        "| | ours, limit 50% s (runs) | ours, limit 50%, `huge_pages=off` s (runs) | ours, limit 100% s (runs) | ours without a limit s (runs) | limit 50% / without (time) | limit 50%, 4 KiB / without (time) | limit 100% / without (time) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mut rows = vec!["boot to init (guest uptime at the scenario's start)"];
    rows.extend(PHASES.iter().map(|(name, _, _)| *name));
    rows.push("workload (all three)");
    for (i, name) in rows.into_iter().enumerate() {
        // Row 0 is the boot, then the rows of `row_value` from its first.
        let f = |r: &PagerRun| match i {
            0 => r.boot_s,
            _ => row_value(r, i - 1),
        };
        let (u, un) = med(runs, UNLIMITED, f);
        let secs = |s: Option<f64>| s.map_or("n/a".into(), |s| format!("{s:.1}"));
        let mut cells = Vec::new();
        let mut ratios = Vec::new();
        for variant in ["ours", SMALL_PAGES, FULL_LIMIT] {
            let (o, on) = med(runs, variant, f);
            cells.push(format!("{} ({on})", secs(o)));
            ratios.push(match (o, u) {
                (Some(o), Some(u)) if u > 0.0 => format!("{:.2}x", o / u),
                _ => "n/a".into(),
            });
        }
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {} | {} ({un}) | {} | {} | {} |",
            cells[0],
            cells[1],
            cells[2],
            secs(u),
            ratios[0],
            ratios[1],
            ratios[2]
        );
    }
    t
}

/// The ours / QEMU throughput ratio of the whole workload, if both ran.
pub fn workload_ratio(runs: &[PagerRun]) -> Option<f64> {
    let total = |r: &PagerRun| row_value(r, PHASES.len());
    let (o, _) = med(runs, "ours", total);
    let (q, _) = med(runs, "qemu", total);
    Some(q? / o?).filter(|r| r.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_image::Scenario;

    const CONSOLE: &str = "\
PAGER-BENCH-SETUP swap=/dev/zram0 partition 1048572 0 -2 memory.max=256M
PAGER-BENCH-RUN variant=ours rep=0
[    0.5] boot
pager-touch: [10.00] writing 100 MiB of random data to tmpfs
pager-touch: [20.00] first checksum pass
pager-touch: [25.00] first pass md5 abc -
pager-touch: [30.00] second pass md5 abc -
pager-touch: ok
PAGER-BENCH-END variant=ours rep=0 rc=0 start=5.00 end=45.50 l1_pswpin=0 l1_pswpout=0
PAGER-BENCH-RUN variant=qemu rep=0
pager-touch: [10.00] writing 100 MiB of random data to tmpfs
pager-touch: [30.00] first checksum pass
pager-touch: [40.00] first pass md5 abc -
pager-touch: [50.00] second pass md5 abc -
pager-touch: ok
PAGER-BENCH-END variant=qemu rep=0 rc=1 start=50.00 end=110.00 l1_pswpin=5 l1_pswpout=9 cgroup_peak_kib=262144
PAGER-BENCH-RUN variant=ours rep=1
pager-touch: [10.00] writing 100 MiB of random data to tmpfs
PAGER-BENCH-END variant=ours rep=1 rc=143 start=1 end=2
PAGER-BENCH-RUN variant=ours-nolimit rep=0
pager-touch: [8.00] writing 100 MiB of random data to tmpfs
pager-touch: [13.00] first checksum pass
pager-touch: [15.00] first pass md5 abc -
pager-touch: [17.00] second pass md5 abc -
pager-touch: ok
PAGER-BENCH-END variant=ours-nolimit rep=0 rc=0 start=110.00 end=130.00 l1_pswpin=0 l1_pswpout=0
";

    #[test]
    fn runs_are_parsed_and_tabulated() {
        let runs = parse(CONSOLE);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[0].boot_s, Some(10.0));
        assert_eq!(runs[0].phases, vec![Some(10.0), Some(5.0), Some(5.0)]);
        assert_eq!(runs[0].wall_s, Some(40.5));
        assert!(runs[0].ok && runs[1].ok);
        assert!(!runs[2].ok, "timed out run counted");
        assert_eq!(runs[2].phases, vec![None, None, None]);
        let t = render_table(&runs, 100);
        assert!(
            t.contains("| write | 10.0 (1) | 10.0 | 20.0 (1) | 5.0 | 2.00x |"),
            "{t}"
        );
        assert!(
            t.contains("| workload (all three) | 20.0 (1) | - | 40.0 (1) | - | 2.00x |"),
            "{t}"
        );
        assert_eq!(workload_ratio(&runs), Some(2.0));
        let t = render_limit_table(&runs);
        assert!(
            t.contains("| boot to init (guest uptime at the scenario's start) | 10.0 (1) | n/a (0) | n/a (0) | 8.0 (1) | 1.25x | n/a | n/a |"),
            "{t}"
        );
        assert!(
            t.contains("| write | 10.0 (1) | n/a (0) | n/a (0) | 5.0 (1) | 2.00x | n/a | n/a |"),
            "{t}"
        );
    }

    #[test]
    fn script_limits_qemu_by_cgroup_and_ours_by_option() {
        let run = GuestRun::new(Scenario::inline("t", "true")).memory_mib(512);
        let v = variants(&run, "c", 256);
        assert!(v[0]
            .argv
            .contains(&format!("size=512M,limit=256M,swap={SWAP_FILE}")));
        assert!(v[1].argv.iter().any(|a| a == "512"));
        assert_eq!(v[2].name, UNLIMITED);
        assert!(
            !v[2].argv.iter().any(|a| a.contains("limit=")),
            "{:?}",
            v[2].argv
        );
        let s = script(2, 600, 256, 512, &v);
        assert!(s.contains("echo 512M > /sys/block/zram0/disksize"), "{s}");
        assert!(
            s.contains("echo 256M > /sys/fs/cgroup/bench$r/memory.max"),
            "{s}"
        );
        assert!(s.contains("timeout 600 sh -c"), "{s}");
        assert!(s.contains("(sleep 600; kill $t 2>/dev/null) &"), "{s}");
        assert!(s.contains("PAGER-BENCH-CPU variant=ours rep=$r"), "{s}");
    }
}
