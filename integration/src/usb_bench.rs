//! The USB disk benchmark (not a test): the `usb-bench` scenario (fio in the
//! guest) on the same raw image in L1's tmpfs, plugged into our xHCI as a
//! USB 3 mass-storage disk and into QEMU's `qemu-xhci` + `usb-storage`,
//! round-robin in one L1. The L1 script marks each run with
//! `USB-BENCH-RUN variant=<name> rep=<n>`; the `FIO-RESULT` lines after it
//! belong to that run.

use std::fmt::Write as _;
use std::path::Path;

use guest_image::initramfs::InitramfsError;
use guest_image::scenario::FileMapping;

use crate::bench::{kv, median, ours_argv, ours_vs, qemu_argv, Variant};
use crate::harness::GuestRun;
use crate::l1::{
    sh_quote, L2_KERNEL, QEMU_FIRMWARE, QEMU_FIRMWARE_DIRS, QEMU_FIRMWARE_PATH, QEMU_PATH,
};
use crate::usb::host_binary_files;

/// The benchmark image in L1's tmpfs.
pub const IMAGE: &str = "/tmp/usb-bench.img";
/// The USB serial (and our API id) of the benchmark disk.
pub const SERIAL: &str = "bench";
/// The jobs of the `usb-bench` scenario, in its order.
pub const JOBS: &[&str] = &["randread-4k-qd32", "read-1m-qd8", "write-1m-qd8"];
/// QEMU drive options matching our raw image I/O (host page cache, no
/// O_DIRECT: L1's tmpfs has none), I/O on worker threads.
pub const QEMU_DRIVE_OPTS: &str = "format=raw,cache=writeback,aio=threads";
/// Marks the start of one run in the console.
pub const MARK_RUN: &str = "USB-BENCH-RUN";

/// Our variants, each compared with QEMU in the table: transfers on the
/// controller's I/O thread and on the vCPU thread (the default).
pub const OURS: &[(&str, &str)] = &[
    ("ours", "ours --usb-io thread"),
    ("ours-vcpu", "ours --usb-io vcpu (default)"),
];

/// Ours (USB 3 port 5; transfers on the I/O thread and on the vCPU thread)
/// and QEMU `-M pc` with `qemu-xhci` + `usb-storage`.
pub fn variants(run: &GuestRun, cmdline: &str) -> Vec<Variant> {
    let mut ours = ours_argv(run, cmdline, L2_KERNEL);
    ours.extend([
        "--usb-storage".to_string(),
        format!("path={IMAGE},port=5,id={SERIAL}"),
    ]);
    let mut qemu = qemu_argv(run, cmdline, "pc", L2_KERNEL);
    qemu.extend(qemu_disk_args());
    let mut vcpu = ours.clone();
    vcpu.push("--usb-io=vcpu".into());
    ours.push("--usb-io=thread".into());
    let mut all = ours_vs(ours, "qemu", qemu);
    all.push(Variant {
        name: OURS[1].0,
        argv: vcpu,
    });
    all
}

/// QEMU's `qemu-xhci` with the benchmark image as a `usb-storage` disk.
pub fn qemu_disk_args() -> Vec<String> {
    vec![
        "-device".into(),
        "qemu-xhci,id=xhci".into(),
        "-drive".into(),
        format!("file={IMAGE},if=none,id=d0,{QEMU_DRIVE_OPTS}"),
        "-device".into(),
        format!("usb-storage,bus=xhci.0,drive=d0,serial={SERIAL}"),
    ]
}

/// QEMU, its libraries and firmware as L1 files (QEMU at [`QEMU_PATH`]).
pub fn qemu_l1_files(qemu: &Path) -> Result<Vec<FileMapping>, InitramfsError> {
    let mut files = host_binary_files(qemu, QEMU_PATH)?;
    for name in QEMU_FIRMWARE {
        let found = QEMU_FIRMWARE_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file());
        if let Some(src) = found {
            files.push(FileMapping {
                src,
                dst: format!("{QEMU_FIRMWARE_PATH}/{name}"),
            });
        }
    }
    Ok(files)
}

/// The L1 script: fill the image with random data once, then `reps`
/// rounds of every variant, each bounded by `per_run_s`.
pub fn script(image_mib: u64, reps: u32, per_run_s: u64, variants: &[Variant]) -> String {
    let mut s = format!(
        "export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu\n\
         dd if=/dev/urandom of={IMAGE} bs=1M count={image_mib} 2>/dev/null || exit 90\n"
    );
    let _ = writeln!(s, "r=0\nwhile [ \"$r\" -lt {reps} ]; do");
    for v in variants {
        let argv: Vec<String> = v.argv.iter().map(|a| sh_quote(a)).collect();
        let _ = writeln!(
            s,
            "    echo \"{MARK_RUN} variant={} rep=$r\"\n    \
             timeout {per_run_s} {} </dev/null 2>&1\n    \
             echo \"USB-BENCH-END variant={} rep=$r rc=$?\"",
            v.name,
            argv.join(" "),
            v.name
        );
    }
    s.push_str("    r=$((r + 1))\ndone\n");
    s
}

/// One `FIO-RESULT` line with the run it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Result1 {
    pub variant: String,
    pub rep: u32,
    pub job: String,
    pub iops: u64,
    pub bw_kib: u64,
}

/// Every `FIO-RESULT` of the console, attributed to the last
/// `USB-BENCH-RUN` before it.
pub fn parse(console: &str) -> Vec<Result1> {
    let mut cur: Option<(String, u32)> = None;
    let mut out = Vec::new();
    for l in console.lines() {
        if let Some(at) = l.find(MARK_RUN) {
            let rest = &l[at..];
            cur = kv(rest, "variant")
                .zip(kv(rest, "rep").and_then(|r| r.parse().ok()))
                .map(|(v, r)| (v.to_string(), r));
        } else if let (Some(at), Some((variant, rep))) = (l.find("FIO-RESULT "), &cur) {
            let rest = &l[at..];
            let parsed = (|| {
                Some(Result1 {
                    variant: variant.clone(),
                    rep: *rep,
                    job: kv(rest, "job")?.to_string(),
                    iops: kv(rest, "iops")?.parse().ok()?,
                    bw_kib: kv(rest, "bw_kib")?.parse().ok()?,
                })
            })();
            out.extend(parsed);
        }
    }
    out
}

/// Median of a job's metric for a variant (IOPS for random jobs, KiB/s
/// for sequential ones), with the number of runs it came from.
fn metric(results: &[Result1], variant: &str, job: &str) -> (Option<u64>, usize) {
    let v: Vec<u64> = results
        .iter()
        .filter(|r| r.variant == variant && r.job == job)
        .map(|r| {
            if job.starts_with("rand") {
                r.iops
            } else {
                r.bw_kib
            }
        })
        .collect();
    let n = v.len();
    (median(v), n)
}

/// The markdown table: one row per job and variant of ours, against QEMU,
/// with the ratio.
pub fn render_table(results: &[Result1]) -> String {
    let mut t = String::from(
        "| job | metric | VMM | ours (runs) | QEMU qemu-xhci + usb-storage (runs) | ours / QEMU |\n|---|---|---|---|---|---|\n",
    );
    for job in JOBS {
        for (variant, label) in OURS {
            row(&mut t, results, job, variant, label);
        }
    }
    t
}

fn row(t: &mut String, results: &[Result1], job: &str, variant: &str, label: &str) {
    {
        let rand = job.starts_with("rand");
        let fmt = |m: Option<u64>| match m {
            Some(x) if rand => format!("{x}"),
            Some(x) => format!("{:.1}", x as f64 * 1024.0 / 1e6),
            None => "n/a".into(),
        };
        let (o, on) = metric(results, variant, job);
        let (q, qn) = metric(results, "qemu", job);
        let ratio = match (o, q) {
            (Some(o), Some(q)) if q > 0 => format!("{:.2}x", o as f64 / q as f64),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            t,
            "| {job} | {} | {label} | {} ({on}) | {} ({qn}) | {ratio} |",
            if rand { "IOPS" } else { "MB/s" },
            fmt(o),
            fmt(q)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_image::Scenario;

    #[test]
    fn results_belong_to_their_run_and_tabulate() {
        let c = "\
USB-BENCH-RUN variant=ours rep=0
FIO-RESULT job=randread-4k-qd32 iops=100 bw_kib=400
FIO-RESULT job=read-1m-qd8 iops=20 bw_kib=20000
USB-BENCH-RUN variant=qemu rep=0
[ 1.0] FIO-RESULT job=randread-4k-qd32 iops=50 bw_kib=200
FIO-RESULT job=read-1m-qd8 iops=10 bw_kib=10000
USB-BENCH-RUN variant=ours rep=1
FIO-RESULT job=randread-4k-qd32 iops=300 bw_kib=1200
FIO-RESULT job=bad iops=x bw_kib=1
USB-BENCH-RUN variant=ours-vcpu rep=0
FIO-RESULT job=randread-4k-qd32 iops=75 bw_kib=300
";
        let r = parse(c);
        assert_eq!(r.len(), 6);
        assert_eq!(r[2].variant, "qemu");
        assert_eq!(r[4].rep, 1);
        let t = render_table(&r);
        assert!(
            t.contains(
                "| randread-4k-qd32 | IOPS | ours --usb-io thread | 200 (2) | 50 (1) | 4.00x |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| randread-4k-qd32 | IOPS | ours --usb-io vcpu (default) | 75 (1) | 50 (1) | 1.50x |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| read-1m-qd8 | MB/s | ours --usb-io thread | 20.5 (1) | 10.2 (1) | 2.00x |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| write-1m-qd8 | MB/s | ours --usb-io thread | n/a (0) | n/a (0) | n/a |"),
            "{t}"
        );
    }

    #[test]
    fn variants_share_the_image() {
        let run = GuestRun::new(Scenario::inline("t", "true"));
        let v = variants(&run, "c");
        assert!(v[0]
            .argv
            .contains(&format!("path={IMAGE},port=5,id={SERIAL}")));
        assert!(v[1]
            .argv
            .iter()
            .any(|a| a.starts_with(&format!("file={IMAGE},"))));
        assert!(v[1].argv.contains(&"qemu-xhci,id=xhci".to_string()));
        assert_eq!(v[2].name, "ours-vcpu");
        assert!(v[2].argv.contains(&"--usb-io=vcpu".to_string()));
        assert!(v[0].argv.contains(&"--usb-io=thread".to_string()));
        let s = script(8, 2, 60, &v);
        assert!(s.contains("timeout 60 '/vmm'"));
        assert!(s.contains("USB-BENCH-RUN variant=qemu rep=$r"));
    }
}
