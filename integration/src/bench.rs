//! Benchmarks (not tests): our VMM against QEMU on the same work, in the same
//! L1, in the same run, round-robin, with medians and ratios for
//! `BENCHMARKS.md`.
//!
//! The boot benchmark measures, per VMM, the wall time from spawning it to
//! the guest's init printing `GUEST-INIT`, split by the guest's uptime at
//! that line into the guest kernel's own time and what came before its
//! clock started (VMM start-up, firmware, decompression), and the VMM's
//! peak resident memory outside guest RAM (the largest mapping), sampled by
//! `l1-bench`.
//!
//! The disk benchmark boots the `blk-bench` scenario (fio in the guest) with
//! the same raw image in L1's tmpfs given to our VMM (`--disk`) and to QEMU
//! (`virtio-blk-pci`), and reports median IOPS and bandwidth per fio job.

use std::fmt::Write as _;
use std::path::Path;

use crate::harness::{qemu_l2_args, vmm_args_with, GuestRun};
use crate::l1::{L2_INITRD, L2_KERNEL, QEMU_FIRMWARE_PATH, QEMU_PATH, VMM_PATH};

/// Shell functions for L1 scripts that say where CPU time went:
/// `thread_cpu < stat-lines` sums `/proc/PID/task/*/stat` lines per thread
/// name as `name=user/system/guest` seconds; `l1_cpu "$before"` prints
/// L1's user, system, idle and guest seconds since `before`, a copy of
/// `/proc/stat`'s first line.
pub const CPU_SH: &str = r#"thread_cpu() { awk '{ n = substr($0, index($0, "(") + 1); n = substr(n, 1, index(n, ")") - 1); gsub(/ /, "_", n); sub(/^.*\) /, ""); u[n] += $12; s[n] += $13; g[n] += $41 } END { for (n in u) printf "%s=%.2f/%.2f/%.2f ", n, u[n] / 100, s[n] / 100, g[n] / 100 }'; }
l1_cpu() { head -1 /proc/stat | awk -v a="$1" '{ split(a, o, " "); printf "user=%.2f system=%.2f idle=%.2f guest=%.2f", ($2 - o[2]) / 100, ($4 - o[4]) / 100, ($5 - o[5]) / 100, ($10 - o[10]) / 100 }'; }
mount -t debugfs none /sys/kernel/debug 2>/dev/null
l1_mm() { { grep -E '^(thp_fault_alloc|thp_fault_fallback|thp_split_pmd|thp_collapse_alloc|compact_stall|pgfault) ' /proc/vmstat; for k in exits pf_taken pf_fixed halt_exits mmio_exits io_exits pages_4k pages_2m; do [ -r /sys/kernel/debug/kvm/$k ] && echo "kvm_$k $(cat /sys/kernel/debug/kvm/$k)"; done; } | tr ' ' '=' | tr '\n' ' '; }
"#;

/// One variant of the same work: a name and its argv inside L1.
pub struct Variant {
    pub name: &'static str,
    pub argv: Vec<String>,
}

/// Keeps only the variants named in `only` (all of them when it is empty);
/// an unknown name is an error.
pub fn retain_only(variants: &mut Vec<Variant>, only: &[String]) -> anyhow::Result<()> {
    if let Some(bad) = only.iter().find(|o| !variants.iter().any(|v| v.name == *o)) {
        let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
        anyhow::bail!(
            "--only: no variant named {bad:?} (there are {})",
            names.join(", ")
        );
    }
    if !only.is_empty() {
        variants.retain(|v| only.iter().any(|o| o == v.name));
    }
    Ok(())
}

/// Guest modules a virtio-balloon needs.
pub const BALLOON_MODULES: &[&str] = &["virtio_pci", "virtio_balloon"];

/// Adds a virtio-balloon that never inflates but reports free guest pages
/// (the host discards them) to `argv`, ours or QEMU's: freed guest memory
/// then costs neither VMM a write to swap nor a read back.
pub fn add_free_page_reporting(argv: &mut Vec<String>, qemu: bool) {
    let (flag, value) = if qemu {
        ("-device", "virtio-balloon-pci,free-page-reporting=on")
    } else {
        ("--balloon", "size=0,free_page_reporting=on")
    };
    argv.extend([flag.to_string(), value.to_string()]);
}

/// Our VMM's argv inside L1: `run` booting `kernel` (an L1 path).
pub fn ours_argv(run: &GuestRun, cmdline: &str, kernel: &str) -> Vec<String> {
    let mut argv = vec![VMM_PATH.to_string()];
    argv.extend(vmm_args_with(run, cmdline, kernel, L2_INITRD));
    argv
}

/// QEMU's argv inside L1: machine `machine` booting `kernel` with `run`'s
/// resources on L1's KVM.
pub fn qemu_argv(run: &GuestRun, cmdline: &str, machine: &str, kernel: &str) -> Vec<String> {
    let mut argv = vec![
        QEMU_PATH.to_string(),
        "-L".into(),
        QEMU_FIRMWARE_PATH.into(),
        "-M".into(),
        machine.into(),
    ];
    argv.extend(qemu_l2_args(run, kernel, L2_INITRD, cmdline, "kvm"));
    argv
}

/// Our VMM (`ours`) and one peer, in that order.
pub fn ours_vs(ours: Vec<String>, peer: &'static str, peer_argv: Vec<String>) -> Vec<Variant> {
    vec![
        Variant {
            name: "ours",
            argv: ours,
        },
        Variant {
            name: peer,
            argv: peer_argv,
        },
    ]
}

/// The boot variants: our VMM with the uncompressed kernel and with the
/// bzImage, QEMU's default machine with each, and QEMU microvm (bzImage).
/// `vmlinux` is the ELF's path inside L1 (QEMU boots it through its PVH
/// entry note, our VMM through its ELF entry point).
pub fn boot_variants(run: &GuestRun, cmdline: &str, vmlinux: &str) -> Vec<Variant> {
    let ours = |kernel: &str| ours_argv(run, cmdline, kernel);
    let qemu = |machine: &str, kernel: &str| qemu_argv(run, cmdline, machine, kernel);
    vec![
        Variant {
            name: "ours-vmlinux",
            argv: ours(vmlinux),
        },
        Variant {
            name: "ours-bzimage",
            argv: ours(L2_KERNEL),
        },
        Variant {
            name: "qemu-pc",
            argv: qemu("pc", L2_KERNEL),
        },
        Variant {
            name: "qemu-pc-vmlinux",
            argv: qemu("pc", vmlinux),
        },
        Variant {
            name: "qemu-microvm",
            argv: qemu("microvm", L2_KERNEL),
        },
    ]
}

/// The fio jobs of the `blk-bench` scenario, in the order it runs them.
pub const DISK_JOBS: &[&str] = &["randread-4k-qd32", "read-1m-qd8", "write-1m-qd8"];
/// The QEMU drive options equivalent to our VMM's raw-image I/O: the host
/// page cache with flushes as `fdatasync` (our `RawImage` opens the file
/// without O_DIRECT), I/O on worker threads. `cache=none` is not an option
/// on L1's tmpfs (no O_DIRECT on tmpfs before Linux 6.6).
pub const QEMU_DISK_CACHE: &str = "cache=writeback,aio=threads";

/// The disk variants: our VMM and QEMU `-M pc`, each with `image` as a
/// virtio-blk-pci disk (one queue per vCPU on both).
pub fn disk_variants(run: &GuestRun, cmdline: &str, image: &str) -> Vec<Variant> {
    let mut ours = ours_argv(run, cmdline, L2_KERNEL);
    ours.push("--disk".into());
    ours.push(format!("path={image},id=bench"));
    let mut qemu = qemu_argv(run, cmdline, "pc", L2_KERNEL);
    qemu.extend([
        "-drive".into(),
        format!("file={image},if=none,id=d0,format=raw,{QEMU_DISK_CACHE}"),
        "-device".into(),
        format!(
            "virtio-blk-pci,drive=d0,num-queues={},serial=bench",
            run.cpus
        ),
    ]);
    ours_vs(ours, "qemu-pc", qemu)
}

/// One `FIO-RESULT` line, attributed to the `BENCH-START` before it.
#[derive(Debug, Clone, PartialEq)]
pub struct FioResult {
    pub variant: String,
    pub rep: u32,
    pub job: String,
    pub iops: u64,
    pub bw_kib: u64,
}

/// Every `FIO-RESULT job=.. iops=.. bw_kib=..` line of a console, with the
/// variant and round of the `BENCH-START variant=.. rep=..` line before it.
pub fn parse_fio(console: &str) -> Vec<FioResult> {
    let mut current: Option<(String, u32)> = None;
    let mut out = Vec::new();
    for l in console.lines() {
        let kv = |rest: &str, k: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        if let Some(pos) = l.find("BENCH-START ") {
            let rest = &l[pos..];
            current = kv(rest, "variant").zip(kv(rest, "rep").and_then(|r| r.parse().ok()));
        } else if let Some(pos) = l.find("FIO-RESULT ") {
            let rest = &l[pos..];
            let (Some((variant, rep)), Some(job)) = (current.clone(), kv(rest, "job")) else {
                continue;
            };
            let (Some(iops), Some(bw_kib)) = (
                kv(rest, "iops").and_then(|v| v.parse().ok()),
                kv(rest, "bw_kib").and_then(|v| v.parse().ok()),
            ) else {
                continue;
            };
            out.push(FioResult {
                variant,
                rep,
                job,
                iops,
                bw_kib,
            });
        }
    }
    out
}

/// The disk table: one row per job, median IOPS (with the min-max range
/// over rounds) and median MiB/s per variant, and ours / peer bandwidth
/// (above 1 = ours is faster). `variants[0]` is ours, `variants[1]` the
/// peer.
pub fn render_disk_table(results: &[FioResult], variants: &[&str]) -> String {
    let of = |v: &str, job: &str, f: fn(&FioResult) -> u64| -> Vec<u64> {
        results
            .iter()
            .filter(|r| r.variant == v && r.job == job)
            .map(f)
            .collect()
    };
    let (ours, peer) = (variants[0], variants.get(1).copied().unwrap_or(""));
    let mut t = format!(
        "| fio job | runs {ours}/{peer} | {ours} IOPS (min-max) | {peer} IOPS (min-max) | {ours} MiB/s | {peer} MiB/s | {ours} / {peer} |\n|---|---|---|---|---|---|---|\n"
    );
    let iops = |v: &[u64]| match (median(v.to_vec()), v.iter().min(), v.iter().max()) {
        (Some(m), Some(lo), Some(hi)) => format!("{m} ({lo}-{hi})"),
        _ => "n/a".into(),
    };
    let mib = |b: Option<u64>| b.map_or("n/a".into(), |b| format!("{:.1}", b as f64 / 1024.0));
    for job in DISK_JOBS {
        let (oi, pi) = (of(ours, job, |r| r.iops), of(peer, job, |r| r.iops));
        let ob = median(of(ours, job, |r| r.bw_kib));
        let pb = median(of(peer, job, |r| r.bw_kib));
        let _ = writeln!(
            t,
            "| {job} | {}/{} | {} | {} | {} | {} | {} |",
            oi.len(),
            pi.len(),
            iops(&oi),
            iops(&pi),
            mib(ob),
            mib(pb),
            ratio(ob, pb),
        );
    }
    t
}

/// The `l1-bench` spec for `variants`.
pub fn spec(reps: u32, marker: &str, timeout_secs: u64, variants: &[Variant]) -> String {
    let mut s = format!("reps {reps}\nmarker {marker}\ntimeout {timeout_secs}\n");
    for v in variants {
        let _ = writeln!(s, "variant {}", v.name);
        for a in &v.argv {
            let _ = writeln!(s, "arg {a}");
        }
    }
    s
}

/// One `BENCH-RUN` line.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    pub variant: String,
    pub rep: u32,
    pub to_marker_ms: Option<u64>,
    /// The guest's uptime on the marker line (absent in older lines).
    pub guest_uptime_ms: Option<u64>,
    pub total_ms: u64,
    pub exit: Option<i32>,
    pub maxrss_kib: u64,
    pub overhead_kib: u64,
}

/// Parses every `BENCH-RUN key=value ...` line of a console.
pub fn parse_runs(console: &str) -> Vec<BenchRun> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("BENCH-RUN ")? + "BENCH-RUN ".len()..];
            let get = |k: &str| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            };
            Some(BenchRun {
                variant: get("variant")?.to_string(),
                rep: get("rep")?.parse().ok()?,
                to_marker_ms: get("to_marker_ms")?.parse().ok(),
                guest_uptime_ms: get("guest_uptime_ms").and_then(|v| v.parse().ok()),
                total_ms: get("total_ms")?.parse().ok()?,
                exit: get("exit")?.parse().ok(),
                maxrss_kib: get("maxrss_kib")?.parse().ok()?,
                overhead_kib: get("overhead_kib")?.parse().ok()?,
            })
        })
        .collect()
}

/// The value of `key=value` among the words of a marker line.
pub fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The number right after the last `key` in `text`, e.g. after
/// `"pages_out":` in a `pager-stats {...}` line or `RSS-KB=` in a console.
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.rfind(key)? + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

pub fn median<T: Midpoint>(mut v: Vec<T>) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        T::midpoint_of(v[n / 2 - 1], v[n / 2])
    })
}

/// A number a median can be taken of (the middle of an even count is the
/// mean of the two middle values).
pub trait Midpoint: Copy + PartialOrd {
    fn midpoint_of(a: Self, b: Self) -> Self;
}

impl Midpoint for u64 {
    fn midpoint_of(a: Self, b: Self) -> Self {
        a / 2 + b / 2 + (a % 2 + b % 2) / 2
    }
}

impl Midpoint for i64 {
    fn midpoint_of(a: Self, b: Self) -> Self {
        ((i128::from(a) + i128::from(b)) / 2) as i64
    }
}

impl Midpoint for f64 {
    fn midpoint_of(a: Self, b: Self) -> Self {
        (a + b) / 2.0
    }
}

/// Per-variant medians.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSummary {
    pub name: String,
    pub runs: usize,
    pub reached: usize,
    pub to_marker_ms: Option<u64>,
    /// Median of the guest kernel's uptime at the marker.
    pub guest_uptime_ms: Option<u64>,
    /// Median, per run, of the time before the guest kernel's clock started
    /// (time to the marker minus the guest's uptime then).
    pub before_kernel_ms: Option<u64>,
    pub overhead_kib: Option<u64>,
    pub maxrss_kib: Option<u64>,
}

pub fn summarize(runs: &[BenchRun], order: &[&str]) -> Vec<VariantSummary> {
    order
        .iter()
        .map(|name| {
            let mine: Vec<_> = runs.iter().filter(|r| r.variant == *name).collect();
            let ok: Vec<_> = mine.iter().filter(|r| r.to_marker_ms.is_some()).collect();
            VariantSummary {
                name: name.to_string(),
                runs: mine.len(),
                reached: ok.len(),
                to_marker_ms: median(ok.iter().filter_map(|r| r.to_marker_ms).collect()),
                guest_uptime_ms: median(ok.iter().filter_map(|r| r.guest_uptime_ms).collect()),
                before_kernel_ms: median(
                    ok.iter()
                        .filter_map(|r| r.to_marker_ms?.checked_sub(r.guest_uptime_ms?))
                        .collect(),
                ),
                overhead_kib: median(ok.iter().map(|r| r.overhead_kib).collect()),
                maxrss_kib: median(ok.iter().map(|r| r.maxrss_kib).collect()),
            }
        })
        .collect()
}

fn ratio(a: Option<u64>, b: Option<u64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
        _ => "n/a".into(),
    }
}

/// The markdown table: one row per variant, ratios against our VMM's row.
pub fn render_boot_table(sum: &[VariantSummary]) -> String {
    // The first variant is ours (the one the ratios are about).
    let ours = sum.first();
    let mut t = String::from(
        "| VMM | runs reaching init | median time to guest init | ours / this | before the guest kernel's clock started | guest kernel to init (its uptime) | median RSS outside guest RAM | ours / this |\n|---|---|---|---|---|---|---|---|\n",
    );
    let secs = |ms: Option<u64>| ms.map_or("n/a".into(), |m| format!("{:.2} s", m as f64 / 1000.0));
    for s in sum {
        let mib = s
            .overhead_kib
            .map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let _ = writeln!(
            t,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} |",
            s.name,
            s.reached,
            s.runs,
            secs(s.to_marker_ms),
            ratio(ours.and_then(|o| o.to_marker_ms), s.to_marker_ms),
            secs(s.before_kernel_ms),
            secs(s.guest_uptime_ms),
            mib,
            ratio(ours.and_then(|o| o.overhead_kib), s.overhead_kib),
        );
    }
    t
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// in `file` (appending the section if it is not there yet).
pub fn update_section(file: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let old = std::fs::read_to_string(file).unwrap_or_else(|_| "# Benchmarks\n".into());
    let section = format!("{begin}\n{body}{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &old[..b], &old[e + end.len()..]),
        _ => format!("{}\n{section}\n", old.trim_end()),
    };
    std::fs::write(file, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_after_finds_json_values() {
        let c = "x\npager-stats {\"pages_out\":12,\"peak_resident_pages\":65536}\nL1-GUEST-RSS-MAX-KB=1000\n";
        assert_eq!(number_after(c, "\"peak_resident_pages\":"), Some(65536));
        assert_eq!(number_after(c, "\"pages_out\":"), Some(12));
        assert_eq!(number_after(c, "L1-GUEST-RSS-MAX-KB="), Some(1000));
        assert_eq!(number_after(c, "missing"), None);
        assert_eq!(number_after("\"k\":x", "\"k\":"), None);
    }

    #[test]
    fn parses_runs_and_summarizes_medians() {
        let console = "\
noise
BENCH-RUN variant=ours rep=0 to_marker_ms=900 guest_uptime_ms=700 total_ms=1000 exit=0 timed_out=false maxrss_kib=90000 overhead_kib=4000
BENCH-RUN variant=qemu-pc rep=0 to_marker_ms=3000 guest_uptime_ms=800 total_ms=3100 exit=1 timed_out=false maxrss_kib=200000 overhead_kib=40000
BENCH-RUN variant=ours rep=1 to_marker_ms=1100 guest_uptime_ms=750 total_ms=1200 exit=0 timed_out=false maxrss_kib=90000 overhead_kib=6000
BENCH-RUN variant=ours rep=2 to_marker_ms=none total_ms=120000 exit=signal timed_out=true maxrss_kib=90000 overhead_kib=1
";
        let runs = parse_runs(console);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[3].to_marker_ms, None);
        assert_eq!(runs[3].exit, None);
        let sum = summarize(&runs, &["ours", "qemu-pc"]);
        assert_eq!((sum[0].runs, sum[0].reached), (3, 2));
        assert_eq!(sum[0].to_marker_ms, Some(1000));
        assert_eq!(sum[0].overhead_kib, Some(5000));
        // Uptimes 700 and 750: median 725; before the kernel 200 and 350.
        assert_eq!(sum[0].guest_uptime_ms, Some(725));
        assert_eq!(sum[0].before_kernel_ms, Some(275));
        let table = render_boot_table(&sum);
        assert!(
            table.contains("| qemu-pc | 1/1 | 3.00 s | 0.33x | 2.20 s | 0.80 s |"),
            "{table}"
        );
        // Lines from before the uptime field still parse, without it.
        let old = parse_runs("BENCH-RUN variant=a rep=0 to_marker_ms=5 total_ms=6 exit=0 timed_out=false maxrss_kib=1 overhead_kib=1");
        assert_eq!((old.len(), old[0].guest_uptime_ms), (1, None));
    }

    #[test]
    fn fio_results_belong_to_their_run() {
        let console = "\
BENCH-START variant=ours rep=0
  | FIO-RESULT job=randread-4k-qd32 iops=1000 bw_kib=4000
  | FIO-RESULT job=write-1m-qd8 iops=10 bw_kib=10240
BENCH-RUN variant=ours rep=0 to_marker_ms=1 total_ms=2 exit=0 timed_out=false maxrss_kib=1 overhead_kib=1
BENCH-START variant=qemu-pc rep=0
  | FIO-RESULT job=randread-4k-qd32 iops=500 bw_kib=2000
  | FIO-RESULT job=broken iops=x bw_kib=1
BENCH-START variant=ours rep=1
  | FIO-RESULT job=randread-4k-qd32 iops=3000 bw_kib=12000
";
        let r = parse_fio(console);
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[2].variant.as_str(), r[2].rep, r[2].iops),
            ("qemu-pc", 0, 500)
        );
        assert_eq!((r[3].variant.as_str(), r[3].rep), ("ours", 1));
        let t = render_disk_table(&r, &["ours", "qemu-pc"]);
        // Median of 1000 and 3000 IOPS; bandwidth 8000 vs 2000 KiB/s.
        assert!(
            t.contains(
                "| randread-4k-qd32 | 2/1 | 2000 (1000-3000) | 500 (500-500) | 7.8 | 2.0 | 4.00x |"
            ),
            "{t}"
        );
        assert!(t.contains("| read-1m-qd8 | 0/0 | n/a | n/a |"), "{t}");
    }

    #[test]
    fn disk_jobs_match_the_scenario() {
        let s = guest_image::Scenario::load("blk-bench").unwrap();
        for job in DISK_JOBS {
            assert!(
                s.script.contains(&format!("fio_job \"vda\" {job} ")),
                "{job}"
            );
        }
    }

    #[test]
    fn spec_lists_variants_and_args() {
        let v = vec![Variant {
            name: "x",
            argv: vec!["/bin/a".into(), "b c".into()],
        }];
        assert_eq!(
            spec(2, "M", 60, &v),
            "reps 2\nmarker M\ntimeout 60\nvariant x\narg /bin/a\narg b c\n"
        );
    }

    #[test]
    fn section_is_replaced_in_place() {
        let f = std::env::temp_dir().join(format!("bench-md-{}", std::process::id()));
        std::fs::write(
            &f,
            "# B\nintro\n<!-- boot:begin -->\nold\n<!-- boot:end -->\ntail\n",
        )
        .unwrap();
        update_section(&f, "boot", "new\n").unwrap();
        let s = std::fs::read_to_string(&f).unwrap();
        assert_eq!(
            s,
            "# B\nintro\n<!-- boot:begin -->\nnew\n<!-- boot:end -->\ntail\n"
        );
        update_section(&f, "disk", "d\n").unwrap();
        assert!(std::fs::read_to_string(&f)
            .unwrap()
            .ends_with("<!-- disk:begin -->\nd\n<!-- disk:end -->\n"));
        std::fs::remove_file(f).unwrap();
    }
}
