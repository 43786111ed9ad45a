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

use crate::bench::{
    add_free_page_reporting, kv, median, ours_argv, ours_vs, qemu_argv, Variant, CPU_SH,
};
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
/// L1's memory and KVM counters (`l1_mm` of [`CPU_SH`]) right after each
/// `pager-touch: [T]` line the guest prints: the L1 script passes the
/// console through a loop that stamps them, so each phase's exits, NPT
/// faults and huge-page events are the difference of two such lines.
pub const MARK_MM: &str = "PAGER-BENCH-MM";
/// CPU seconds of every thread name in L1 (all processes and kernel
/// threads, `name=user/system/guest`), stamped with [`MARK_MM`]: a
/// phase's CPU time per thread is the difference of two such lines.
pub const MARK_TCPU: &str = "PAGER-BENCH-TCPU";
/// The counters of [`MARK_MM`] tabulated per phase, with their meaning.
pub const MM_COUNTERS: &[(&str, &str)] = &[
    ("kvm_exits", "L2 exits to L1's KVM"),
    ("kvm_pf_fixed", "NPT faults L1's KVM fixed"),
    ("kvm_pages_2m", "2 MiB NPT mappings (gauge)"),
    ("thp_fault_alloc", "huge pages L1 faulted in"),
    ("thp_split_pmd", "huge page mappings L1 split"),
    ("thp_collapse_alloc", "huge pages L1 collapsed into"),
    ("compact_stall", "direct compactions in L1"),
];
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
/// Ours and QEMU as `ours` and `qemu`, each with a virtio-balloon that
/// reports free guest pages: memory the guest frees is discarded instead
/// of written to swap and read back when the guest reuses it.
pub const OURS_REPORTING: &str = "ours-fpr";
pub const QEMU_REPORTING: &str = "qemu-fpr";

/// Whether a variant is QEMU's (it runs in a cgroup with the limit).
pub fn is_qemu(variant: &str) -> bool {
    variant.starts_with("qemu")
}

/// Ours with the pager (limit `limit_mib`), QEMU `-M pc` (its limit is the
/// cgroup's, set by [`script`]), ours without a limit, ours with a limit
/// of all guest RAM, ours in 4 KiB pages, and ours and QEMU with free page
/// reporting. `run.memory_opts` is ignored; `run` needs
/// [`crate::bench::BALLOON_MODULES`] for the last two.
pub fn variants(run: &GuestRun, cmdline: &str, limit_mib: u32) -> Vec<Variant> {
    let mut paged = run.clone();
    paged.memory_opts = Some(format!("limit={limit_mib}M,swap={SWAP_FILE}"));
    let ours = ours_argv(&paged, cmdline, L2_KERNEL);
    let qemu = qemu_argv(run, cmdline, "pc", L2_KERNEL);
    let reporting = [
        (OURS_REPORTING, ours.clone()),
        (QEMU_REPORTING, qemu.clone()),
    ];
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
    for (name, mut argv) in reporting {
        add_free_page_reporting(&mut argv, is_qemu(name));
        v.push(Variant { name, argv });
    }
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
         stamp_mm() {{ while IFS= read -r l; do printf '%s\\n' \"$l\"; case \"$l\" in *'pager-touch: ['*) echo \"{MARK_MM} $(l1_mm)\"; echo \"{MARK_TCPU} $(cat /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null | thread_cpu | tr ' ' '\\n' | grep -v '=0.00/0.00/' | tr '\\n' ' ')l1=$(head -1 /proc/stat | tr -s ' ' ,)\";; esac; done; }}\n\
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
             rm -f {SWAP_FILE} /tmp/con && mkfifo /tmp/con || exit 96\n    \
             stamp_mm < /tmp/con &\n    \
             stamper=$!\n    \
             in0=$(vm pswpin); out0=$(vm pswpout); t0=$(up)",
            name = v.name
        );
        if is_qemu(v.name) {
            // One cgroup per QEMU variant and round: `memory.peak` per run.
            let cg = format!("{CGROUP_ROOT}/{}$r", v.name);
            let _ = writeln!(
                s,
                "    mkdir {cg} && echo {limit_mib}M > {cg}/memory.max || exit 95\n    \
                 timeout {per_run_s} sh -c 'echo $$ > \"$0/cgroup.procs\" && exec \"$@\"' {cg} {argv} </dev/null >/tmp/con 2>&1\n    \
                 rc=$?\n    \
                 extra=\"cgroup_peak_kib=$(($(cat {cg}/memory.peak) / 1024)) events=$(tr '\\n' ' ' < {cg}/memory.events | tr ' ' ',')\"",
            );
        } else {
            let _ = writeln!(
                s,
                "    cpu0=$(head -1 /proc/stat)\n    \
                 {argv} </dev/null >/tmp/con 2>&1 &\n    \
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
            "    wait $stamper\n    \
             echo \"{MARK_END} variant={name} rep=$r rc=$rc start=$t0 end=$(up) \
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
    /// Per entry of [`PHASES`]: how much each of [`MM_COUNTERS`] grew over
    /// it (the gauge `kvm_pages_2m`: its change), when both stamps exist.
    pub phase_mm: Vec<Option<Vec<i64>>>,
    /// Per entry of [`PHASES`]: L1's CPU seconds in system and in guest
    /// mode over it (from the [`MARK_TCPU`] stamps).
    pub phase_cpu: Vec<Option<(f64, f64)>>,
}

/// The `mark` line ([`MARK_MM`], [`MARK_TCPU`]) stamped right after the
/// first line containing `what`.
fn stamp_after<'a>(lines: &[&'a str], what: &str, mark: &str) -> Option<&'a str> {
    let at = lines.iter().position(|l| l.contains(what))?;
    lines[at + 1..].iter().find(|l| l.contains(mark)).copied()
}

/// L1's system and guest CPU seconds so far, from a [`MARK_TCPU`] line's
/// `l1=` field (`/proc/stat`'s first line, commas for spaces, in 1/100 s).
fn l1_cpu(line: &str) -> Option<(f64, f64)> {
    let f: Vec<f64> = kv(line, "l1")?
        .split(',')
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    Some((*f.get(2)? / 100.0, *f.get(8)? / 100.0))
}

/// How much each of [`MM_COUNTERS`] changed from stamp `from` to `to`.
fn mm_delta(from: &str, to: &str) -> Option<Vec<i64>> {
    MM_COUNTERS
        .iter()
        .map(|(k, _)| {
            let v = |l: &str| kv(l, k).and_then(|v| v.parse::<i64>().ok());
            Some(v(to)? - v(from)?)
        })
        .collect()
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
                phase_mm: PHASES
                    .iter()
                    .map(|(_, from, to)| {
                        mm_delta(
                            stamp_after(&lines, from, MARK_MM)?,
                            stamp_after(&lines, to, MARK_MM)?,
                        )
                    })
                    .collect(),
                phase_cpu: PHASES
                    .iter()
                    .map(|(_, from, to)| {
                        let (s0, g0) = l1_cpu(stamp_after(&lines, from, MARK_TCPU)?)?;
                        let (s1, g1) = l1_cpu(stamp_after(&lines, to, MARK_TCPU)?)?;
                        Some((s1 - s0, g1 - g0))
                    })
                    .collect(),
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

/// The markdown table: per phase, median seconds and MiB/s of variant
/// `ours` and of QEMU's `qemu`, and ours / QEMU throughput (= QEMU time /
/// our time).
pub fn render_table(runs: &[PagerRun], touch_mib: u32, ours: &str, qemu: &str) -> String {
    let mut t = String::from(
        "| phase | ours s (runs) | ours MiB/s | QEMU + cgroup s (runs) | QEMU MiB/s | ours / QEMU throughput |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut rows: Vec<&str> = PHASES.iter().map(|(name, _, _)| *name).collect();
    rows.extend(["workload (all three)", "L1 wall time, boot to exit"]);
    let phases = PHASES.len();
    for (i, name) in rows.iter().enumerate() {
        let f = |r: &PagerRun| row_value(r, i);
        let (o, on) = med(runs, ours, f);
        let (q, qn) = med(runs, qemu, f);
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

/// Where each phase's time went in L1: per variant that stamped
/// [`MARK_MM`] lines and phase, the median change of each of
/// [`MM_COUNTERS`] over its successful runs.
pub fn render_mm_table(runs: &[PagerRun]) -> String {
    let mut t = String::from("| variant | phase |");
    for (_, what) in MM_COUNTERS {
        let _ = write!(t, " {what} |");
    }
    t.push_str(" L1 CPU s in system | L1 CPU s in guest mode |\n|---|---|");
    t.push_str(&"---|".repeat(MM_COUNTERS.len() + 2));
    t.push('\n');
    let mut variants: Vec<&str> = Vec::new();
    for r in runs {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
    }
    for variant in variants {
        for (p, (phase, _, _)) in PHASES.iter().enumerate() {
            let deltas: Vec<&Vec<i64>> = runs
                .iter()
                .filter(|r| r.variant == variant && r.ok)
                .filter_map(|r| r.phase_mm.get(p)?.as_ref())
                .collect();
            if deltas.is_empty() {
                continue;
            }
            let _ = write!(t, "| {variant} | {phase} |");
            for c in 0..MM_COUNTERS.len() {
                let m = median(deltas.iter().map(|d| d[c]).collect::<Vec<_>>());
                let _ = write!(t, " {} |", m.map_or("n/a".into(), |m| m.to_string()));
            }
            let cpu: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.variant == variant && r.ok)
                .filter_map(|r| *r.phase_cpu.get(p)?)
                .collect();
            for m in [
                median(cpu.iter().map(|c| c.0).collect::<Vec<_>>()),
                median(cpu.iter().map(|c| c.1).collect::<Vec<_>>()),
            ] {
                let _ = write!(t, " {} |", m.map_or("n/a".into(), |m| format!("{m:.2}")));
            }
            t.push('\n');
        }
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
        let t = render_table(&runs, 100, "ours", "qemu");
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
    fn phase_counters_are_the_change_between_stamps() {
        let mm = |e: u64, pf: u64| {
            format!("{MARK_MM} kvm_exits={e} kvm_pf_fixed={pf} kvm_pages_2m=3 thp_fault_alloc=1 thp_split_pmd=0 thp_collapse_alloc=2 compact_stall={pf}")
        };
        let console = format!(
            "PAGER-BENCH-RUN variant=ours rep=0\n\
             pager-touch: [1.00] writing 1 MiB of random data to tmpfs\n{}\n\
             {MARK_TCPU} vcpu0=1.00/0.50/1.00 l1=cpu,100,0,200,50,0,0,0,0,90,0\n\
             pager-touch: [2.00] first checksum pass\n[ 2.1] a kernel line\n{}\n\
             {MARK_TCPU} vcpu0=2.00/0.50/2.00 l1=cpu,300,0,250,50,0,0,0,0,240,0\n\
             pager-touch: [3.00] first pass md5 abc -\n{}\n\
             pager-touch: [4.00] second pass md5 abc -\n\
             pager-touch: ok\n\
             PAGER-BENCH-END variant=ours rep=0 rc=0 start=0 end=5\n",
            mm(100, 10),
            mm(1100, 510),
            mm(1200, 520),
        );
        let runs = parse(&console);
        assert_eq!(
            runs[0].phase_mm,
            vec![
                Some(vec![1000, 500, 0, 0, 0, 0, 500]),
                Some(vec![100, 10, 0, 0, 0, 0, 10]),
                None
            ]
        );
        let t = render_mm_table(&runs);
        assert_eq!(runs[0].phase_cpu, vec![Some((0.5, 1.5)), None, None]);
        assert!(
            t.contains("| ours | write | 1000 | 500 | 0 | 0 | 0 | 0 | 500 | 0.50 | 1.50 |"),
            "{t}"
        );
        assert!(!t.contains("checksum 2"), "{t}");
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
            s.contains("echo 256M > /sys/fs/cgroup/qemu$r/memory.max"),
            "{s}"
        );
        assert!(
            s.contains("echo 256M > /sys/fs/cgroup/qemu-fpr$r/memory.max"),
            "{s}"
        );
        let fpr = |name: &str| v.iter().find(|x| x.name == name).unwrap().argv.clone();
        let ours_fpr = fpr(OURS_REPORTING);
        assert!(ours_fpr.contains(&format!("size=512M,limit=256M,swap={SWAP_FILE}")));
        assert!(ours_fpr.ends_with(&["--balloon".into(), "size=0,free_page_reporting=on".into()]));
        assert!(fpr(QEMU_REPORTING).ends_with(&[
            "-device".into(),
            "virtio-balloon-pci,free-page-reporting=on".into()
        ]));
        assert!(s.contains("timeout 600 sh -c"), "{s}");
        assert!(s.contains("(sleep 600; kill $t 2>/dev/null) &"), "{s}");
        assert!(s.contains("PAGER-BENCH-CPU variant=ours rep=$r"), "{s}");
        assert!(s.contains(">/tmp/con 2>&1 &"), "{s}");
        assert!(s.contains("stamp_mm < /tmp/con &"), "{s}");
    }
}
