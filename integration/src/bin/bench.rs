//! `bench`: runs a benchmark in the nested L1 and writes its table into
//! BENCHMARKS.md (between `<!-- NAME:begin/end -->` markers).
//!
//! `bench boot [--reps 5] [--cpus 1] [--memory 256] [--write BENCHMARKS.md]`
//! boots the same L2 kernel + initramfs with our VMM, QEMU `-M pc` and QEMU
//! `-M microvm`, round-robin in one L1, and reports median time to guest
//! init and RSS outside guest RAM, with ratios.
//!
//! `bench disk [--reps 3] [--cpus 1] [--memory 512] [--image-mib 128]
//! [--runtime 10] [--write BENCHMARKS.md]` runs fio in the guest (scenario
//! `blk-bench`) on the same raw image in L1's tmpfs, given to our VMM and to
//! QEMU's virtio-blk-pci, round-robin in one L1, and reports median IOPS and
//! MiB/s per job with ratios.
//!
//! `bench usb [--reps 3] [--runtime 10] [--image-mib 128] [--write BENCHMARKS.md]`
//! runs fio in the guest (scenario `usb-bench`) on the same raw image in
//! L1's tmpfs, plugged into our xHCI (USB 3 port) and into QEMU's
//! `qemu-xhci` + `usb-storage`, round-robin in one L1.
//!
//! `bench pager [--reps 1] [--memory 1024] [--touch 700] [--only ours,qemu] [--write BENCHMARKS.md]
//! [--console SAVED-OUTPUT]`
//! runs the `pager-touch` scenario in a guest whose host memory is limited
//! to half its RAM: ours with `--memory limit=`, QEMU in a cgroup v2 with
//! `memory.max` and zram swap, round-robin in one L1. `--console` tabulates
//! the output of an earlier run instead of running.
//!
//! `bench density [--guests 2,4,8] [--reps 1] [--memory 256] [--ws 48]
//! [--seconds 30] [--budget 512] [--allowance 8] [--no-balloon]
//! [--write BENCHMARKS.md] [--console SAVED-OUTPUT]`
//! runs N guests at once (scenario `density-work`) for each N, ours and
//! QEMU, each without a limit and under a host memory budget (ours: pager
//! limits; QEMU: one cgroup v2 `memory.max` with zram swap), all in one L1,
//! and reports per-guest throughput, host memory used and the density.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use guest_image::Scenario;
use integration::bench;
use integration::l1::{L1Payload, L2_VMLINUX};
use integration::{host, GuestRun, Harness};

#[derive(Parser)]
#[command(about = "Benchmarks against QEMU in the same nested L1 (not tests)")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Time to guest init and VMM memory overhead: ours vs QEMU pc/microvm.
    Boot {
        #[arg(long, default_value_t = 5)]
        reps: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Update this markdown file's "boot" section.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// fio in the guest on a virtio-blk disk: ours vs QEMU virtio-blk-pci.
    Disk {
        #[arg(long, default_value_t = 3)]
        reps: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Size of the raw image in L1's tmpfs, MiB (filled with random data).
        #[arg(long, default_value_t = 128)]
        image_mib: u64,
        /// Seconds per fio job (after 1 s of ramp).
        #[arg(long, default_value_t = 10)]
        runtime: u64,
        /// Update this markdown file's "disk" section.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// fio in the guest on a USB disk: ours vs QEMU qemu-xhci + usb-storage.
    Usb {
        #[arg(long, default_value_t = 3)]
        reps: u32,
        /// Seconds per fio job (after 1 s of ramp).
        #[arg(long, default_value_t = 10)]
        runtime: u64,
        /// Size of the raw image in L1's tmpfs, MiB (random data).
        #[arg(long, default_value_t = 128)]
        image_mib: u64,
        /// Update this markdown file's "usb" section.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// USB runtime PM: resume latency after each autosuspend (ours, ours
    /// under memory pressure with swap on the disk's volume, QEMU
    /// qemu-xhci) and the controller's D3hot share of an idle stretch.
    UsbPm {
        #[arg(long, default_value_t = 1)]
        reps: u32,
        /// Suspend/resume cycles per run.
        #[arg(long, default_value_t = 100)]
        cycles: u32,
        /// Seconds of idle at the end of each run.
        #[arg(long, default_value_t = 60)]
        idle: u32,
        /// Print the kernel's runtime-PM trace of every cycle slower than
        /// this many ms, and the kernel log and scheduler events of every
        /// reset slower than that, on stderr (0: none).
        #[arg(long, default_value_t = 0)]
        trace_ms: u32,
        /// Run only these variants (comma-separated: ours, ours-d0,
        /// ours-loop, ours-pressure, qemu); all by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Update this markdown file's "usb-pm" section.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Overcommitted guest memory: ours (pager) vs QEMU under a cgroup
    /// memory.max with zram swap, limit = half the guest's RAM.
    Pager {
        #[arg(long, default_value_t = 1)]
        reps: u32,
        /// Guest memory in MiB (the limit is half of it).
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// MiB the guest writes and checksums twice.
        #[arg(long, default_value_t = 700)]
        touch: u32,
        /// Run only these variants (comma-separated: ours, qemu,
        /// ours-nolimit, ours-limit100, ours-4k); diagnostics, the section
        /// is then not rewritten.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Update this markdown file's "pager" section.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Tabulate the L1 console saved from an earlier run (the command's
        /// output) instead of running.
        #[arg(long)]
        console: Option<PathBuf>,
    },
    /// Density: N guests at once under a host memory budget (ours: pager
    /// limits; QEMU: cgroup memory.max + zram), per-guest throughput
    /// against the same N without a limit, host memory used.
    Density {
        /// Numbers of guests run at once, ascending.
        #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
        guests: Vec<u32>,
        #[arg(long, default_value_t = 1)]
        reps: u32,
        /// RAM of each guest, MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Working set of each guest (random data in its tmpfs), MiB.
        #[arg(long, default_value_t = 48)]
        ws: u32,
        /// Seconds of measured checksum passes.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
        /// Host memory budget of all guests of a set together, MiB.
        #[arg(long, default_value_t = 512)]
        budget: u32,
        /// MiB of each of our guests' share of the budget left for the
        /// VMM's own memory (outside the pager's limit).
        #[arg(long, default_value_t = 8)]
        allowance: u32,
        /// No virtio-balloon (by default every guest, ours and QEMU's, has
        /// one with free page reporting).
        #[arg(long)]
        no_balloon: bool,
        /// Update this markdown file's "density" section.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Tabulate the L1 console saved from an earlier run instead of
        /// running.
        #[arg(long)]
        console: Option<PathBuf>,
    },
}

/// fio in the guest, from the host's Debian package (scripts/setup.sh).
const HOST_FIO: &str = "/usr/bin/fio";
/// The benchmark image in L1's tmpfs.
const BENCH_IMAGE: &str = "/tmp/bench.img";

/// Where scripts/bench.sh puts the static l1-bench.
fn l1_bench_binary() -> Result<PathBuf> {
    let p = host::default_vmm_path().with_file_name("l1-bench");
    if !p.is_file() {
        bail!(
            "{} is missing: run scripts/bench.sh (it builds the static VMM and l1-bench)",
            p.display()
        );
    }
    Ok(p)
}

fn main() -> Result<()> {
    env_logger::init();
    match Cli::parse().what {
        What::Boot {
            reps,
            cpus,
            memory,
            write,
        } => {
            let harness = Harness::new().context("harness")?;
            let per_boot = Duration::from_secs(120);
            // The vmlinux form puts the ELF into L1; the variants name both.
            let run = GuestRun::new(Scenario::inline("boot-bench", "true"))
                .vmlinux()
                .cpus(cpus)
                .memory_mib(memory)
                .timeout(per_boot * (5 * reps + 2));
            let cmdline = run.l2_cmdline()?;
            let variants = bench::boot_variants(&run, &cmdline, L2_VMLINUX);
            let spec = bench::spec(reps, "GUEST-INIT", per_boot.as_secs(), &variants);
            let payload = L1Payload::Bench {
                vmm: host::vmm_binary(true)?,
                qemu: host::qemu_binary()?,
                bench: l1_bench_binary()?,
                spec,
                setup: String::new(),
            };
            eprintln!(
                "bench boot: {reps} rounds of {} variants in one L1",
                variants.len()
            );
            let r = harness.run_l1_payload(&run, payload)?;
            let runs = bench::parse_runs(&r.console);
            if runs.is_empty() {
                bail!("no BENCH-RUN lines; console:\n{}", r.console);
            }
            let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
            let sum = bench::summarize(&runs, &names);
            let table = bench::render_boot_table(&sum);
            println!("{table}");
            if let Some(file) = write {
                let body = format!(
                    "## Boot time and memory overhead\n\n\
                     Command: `scripts/bench.sh boot --reps {reps} --cpus {cpus} --memory {memory}`\n\n\
                     Guest: Debian's kernel with a busybox initramfs, {cpus} vCPU(s), {memory} MiB; \
                     time from spawning the VMM to the guest's init printing `GUEST-INIT`, \
                     median of {reps} rounds run round-robin in the same nested L1 \
                     (QEMU TCG, one vCPU, `kvm_amd` nested). QEMU: `-accel kvm -cpu host -nic none`, \
                     direct kernel boot. Kernels: `ours-vmlinux` boots the uncompressed ELF that \
                     `guest-image vmlinux` extracts from the same Debian bzImage, `qemu-pc-vmlinux` \
                     boots that ELF through its PVH entry note, the others boot the bzImage. \
                     The time splits at the guest's uptime on its `GUEST-INIT` line \
                     (`/proc/uptime`, whose clock starts early in the kernel's `start_kernel`): \
                     the guest kernel's own time to init, and what came before its clock \
                     started (the VMM's start-up, firmware, the bzImage's decompression, the \
                     kernel's earliest setup); each column is its own median. \
                     Memory: peak RSS outside the largest mapping (guest RAM), \
                     sampled every 100 ms. Ratios: the first row divided by the row's value (below 1 = \
                     ours is faster / smaller).\n\n{table}\nRaw runs:\n\n```\n{}\n```\n",
                    r.console
                        .lines()
                        .filter(|l| l.contains("BENCH-RUN"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                bench::update_section(&file, "boot", &body)?;
                eprintln!("updated {}", file.display());
            }
            Ok(())
        }
        What::Disk {
            reps,
            cpus,
            memory,
            image_mib,
            runtime,
            write,
        } => disk(reps, cpus, memory, image_mib, runtime, write),
        What::Usb {
            reps,
            runtime,
            image_mib,
            write,
        } => usb(reps, runtime, image_mib, write),
        What::Pager {
            reps,
            memory,
            touch,
            only,
            write,
            console,
        } => pager(reps, memory, touch, &only, write, console),
        What::UsbPm {
            reps,
            cycles,
            idle,
            trace_ms,
            only,
            write,
        } => usb_pm(reps, cycles, idle, trace_ms, &only, write),
        What::Density {
            mut guests,
            reps,
            memory,
            ws,
            seconds,
            budget,
            allowance,
            no_balloon,
            write,
            console,
        } => {
            guests.sort_unstable();
            guests.dedup();
            if guests.is_empty() || guests[0] == 0 {
                bail!("--guests needs numbers of guests above 0, e.g. 2,4,8");
            }
            if ws + 64 >= memory {
                bail!("--ws {ws} does not fit a guest of {memory} MiB (its tmpfs holds it)");
            }
            let cfg = integration::density_bench::Config {
                guests,
                reps,
                memory_mib: memory,
                ws_mib: ws,
                seconds,
                budget_mib: budget,
                allowance_mib: allowance,
                balloon: !no_balloon,
            };
            density(&cfg, write, console)
        }
    }
}

/// The console lines holding any of `marks`, trimmed (a benchmark's raw lines).
fn marked_lines<'a>(console: &'a str, marks: &[&str]) -> Vec<&'a str> {
    console
        .lines()
        .filter(|l| marks.iter().any(|m| l.contains(m)))
        .map(str::trim)
        .collect()
}

/// Guest RAM, pressure file and resident limit of the USB PM benchmark:
/// the limit is half the working set (the pressure file and ~40 MiB of
/// guest kernel and init).
const PM_MEMORY_MIB: u32 = 384;
const PM_PRESSURE_MIB: u32 = 192;
const PM_LIMIT_MIB: u32 = 116;

fn usb_pm(
    reps: u32,
    cycles: u32,
    idle: u32,
    trace_ms: u32,
    only: &[String],
    write: Option<PathBuf>,
) -> Result<()> {
    use integration::usb::{self, find_program};
    use integration::{usb_bench, usb_pm_bench};
    let fio = find_program("fio").context("fio is not on PATH: run scripts/setup.sh")?;
    let sg_reset =
        find_program("sg_reset").context("sg_reset is not on PATH: run scripts/setup.sh")?;
    let harness = Harness::new().context("harness")?;
    let per_run = 240 + u64::from(cycles) * 12 + u64::from(idle);
    let mut run = GuestRun::new(Scenario::load("usb-pm-bench")?)
        .cpus(1)
        .memory_mib(PM_MEMORY_MIB)
        .param("pmb_serial", usb_bench::SERIAL)
        .param("pmb_cycles", cycles)
        // As many resets as resume cycles: a p99 over 20 is their maximum.
        .param("pmb_resets", cycles)
        .param("pmb_idle_s", idle)
        .param("pmb_trace_ms", trace_ms)
        .timeout(Duration::from_secs(
            per_run * u64::from(reps) * usb_pm_bench::VARIANTS.len() as u64 + 300,
        ))
        .l2_binary(fio, "usr/local/bin/fio")
        .l2_binary(sg_reset, "usr/bin/sg_reset");
    run.modules = usb::GUEST_MODULES.iter().map(|m| m.to_string()).collect();
    run.modules.push("sg".into());
    run.l2_files.push(usb::guest_usb_lib());
    run.l1_files = usb_bench::qemu_l1_files(&host::qemu_binary()?)?;
    let cmdline = run.l2_cmdline()?;
    let mut variants = usb_pm_bench::variants(&run, &cmdline, PM_PRESSURE_MIB, PM_LIMIT_MIB);
    bench::retain_only(&mut variants, only)?;
    let script = usb_bench::script(64, reps, per_run, &variants);
    let payload = L1Payload::VmmScript {
        binary: host::vmm_binary(true)?,
        script,
    };
    let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
    eprintln!(
        "bench usb-pm: {reps} round(s) of {} in one L1",
        names.join(", ")
    );
    let r = harness.run_l1_payload(&run, payload)?;
    let runs = usb_pm_bench::parse(&r.console);
    // Every cycle's line on stderr (the table keeps only quantiles).
    for l in marked_lines(
        &r.console,
        &["USB-BENCH-RUN", "PM-RESUME", "PM-RESET", "PM-TRACE"],
    ) {
        eprintln!("{l}");
    }
    if runs.iter().all(|r| r.resume_us.is_empty()) {
        bail!("no PM-RESUME lines; console:\n{}", r.console);
    }
    let table = usb_pm_bench::render_table(&runs);
    let ratios = usb_pm_bench::pressure_ratios(&runs);
    println!("{table}");
    let mut raw = marked_lines(
        &r.console,
        &[
            "USB-BENCH-",
            "PM-IDLE",
            "PM-BENCH",
            "STALL-WATCHDOG",
            "pager-stats",
            "pm-paths",
        ],
    );
    let slowest = usb_pm_bench::slowest(&runs, 5);
    raw.extend(slowest.iter().map(String::as_str));
    println!("{}", raw.join("\n"));
    if let Some(file) = write {
        let only_arg = if only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", only.join(","))
        };
        let body = format!(
            "## USB runtime PM: resume latency\n\n\
             Command: `scripts/bench.sh usb-pm --reps {reps} --cycles {cycles} --idle {idle}{only_arg}`\n\n\
             Guest: Debian's kernel with a busybox initramfs, 1 vCPU, {PM_MEMORY_MIB} MiB, one USB 3 \
             disk (64 MiB raw image in L1's tmpfs, the same file for every VMM) with autosuspend on \
             (`power/control=auto`, 300 ms delay on the disk and the USB device, root hubs 0 ms, \
             the xHCI PCI function `auto` too). Each cycle waits until the device has \
             autosuspended, then fio times one 4 KiB O_DIRECT read (total latency: the runtime \
             resume it triggers plus the read). p50/p99 over every cycle of every round, rounds \
             run round-robin in the same L1. `ours, limit + swap on the disk's volume, pressure`: \
             `--memory size={PM_MEMORY_MIB}M,limit={PM_LIMIT_MIB}M,swap=...,swap_volume=bench` (the \
             limit is half the working set) while the guest re-reads a {PM_PRESSURE_MIB} MiB tmpfs \
             file in a loop at nice 19 (so that the guest's one CPU runs the resume first; at nice 0 \
             the loop took half of it and the ratio measured the guest's scheduler): the resume paths run in NOIO scopes while the swap device is the \
             disk being resumed. `ours, the pressure loop without a limit`: the same guest loop with no \
             limit (the guest's own CPU contention, apart from the pager). `ours, controller kept in D0`: the same with the PCI function's \
             `power/control` left `on`, so only the link suspends, as with QEMU. QEMU: `-M pc -accel kvm -device qemu-xhci -device usb-storage` \
             (its controller never leaves D0). Last column: share of an idle stretch of {idle} s \
             after the cycles that the controller spent runtime-suspended (the PCI function's \
             `runtime_suspended_time`). Resets: {cycles} `sg_reset -b` per round (as many as resume cycles) on the awake \
             disk (usb-storage's port reset: port reset, Reset Device, re-enumeration), \
             timed between two kernel log markers.\n\n{table}\n{ratios}\n\nRaw lines:\n\n```\n{}\n```\n",
            raw.join("\n")
        );
        bench::update_section(&file, "usb-pm", &body)?;
        eprintln!("updated {}", file.display());
    }
    Ok(())
}

fn pager(
    reps: u32,
    memory: u32,
    touch: u32,
    only: &[String],
    write: Option<PathBuf>,
    saved: Option<PathBuf>,
) -> Result<()> {
    use integration::pager_bench;
    let limit = memory / 2;
    if touch + 64 >= memory {
        bail!("--touch {touch} does not fit a guest of {memory} MiB (its tmpfs holds it)");
    }
    let console = match saved {
        Some(path) => {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
        None => run_pager(reps, memory, touch, limit, only)?,
    };
    // A saved log may hold the runs twice (the command prints the raw
    // lines, then the console of failed runs): keep the first copy.
    let console = match console.match_indices("PAGER-BENCH-SETUP").nth(1) {
        Some((at, _)) => console[..at].to_string(),
        None => console,
    };
    let runs = pager_bench::parse(&console);
    if runs.is_empty() {
        bail!("no PAGER-BENCH-END lines; console:\n{console}");
    }
    let table = pager_bench::render_table(&runs, touch, "ours", "qemu");
    println!("{table}");
    let fpr_table = pager_bench::render_table(
        &runs,
        touch,
        pager_bench::OURS_REPORTING,
        pager_bench::QEMU_REPORTING,
    );
    println!("{fpr_table}");
    let limit_table = pager_bench::render_limit_table(&runs);
    println!("{limit_table}");
    let mm_table = pager_bench::render_mm_table(&runs);
    println!("{mm_table}");
    let raw_all: Vec<&str> = console
        .lines()
        .filter(|l| {
            ["PAGER-BENCH-", "pager-touch:", "pager-stats"]
                .iter()
                .any(|m| l.contains(m))
        })
        .map(str::trim)
        .collect();
    println!("{}", raw_all.join("\n"));
    // The per-phase stamps are in the last table, not in the file's raw lines.
    let raw: Vec<&str> = raw_all
        .into_iter()
        .filter(|l| {
            ![pager_bench::MARK_MM, pager_bench::MARK_TCPU]
                .iter()
                .any(|m| l.contains(m))
        })
        .collect();
    if runs.iter().any(|r| !r.ok) {
        eprintln!("some runs failed; console:\n{console}");
    }
    let write = match write {
        Some(file) if !only.is_empty() => {
            eprintln!(
                "--only: {} keeps its pager section (it needs every variant)",
                file.display()
            );
            None
        }
        w => w,
    };
    if let Some(file) = write {
        let body = format!(
            "## Overcommitted guest memory (pager)\n\n\
             Command: `scripts/bench.sh pager --reps {reps} --memory {memory} --touch {touch}`\n\n\
             Guest: Debian's kernel with a busybox initramfs, 2 vCPUs, {memory} MiB; scenario \
             `pager-touch`: `dd` of {touch} MiB from `/dev/urandom` into the guest's tmpfs \
             (write), then `md5sum` of it twice (checksum 1 and 2), timed by the guest's uptime \
             stamps. Host-side limit: {limit} MiB (half the guest's RAM). Ours: `--memory \
             size={memory}M,limit={limit}M,swap={}` (swap file in L1's tmpfs; the pager's \
             reserve of limit/64 comes on top). QEMU: `-M pc -accel kvm -cpu host -m {memory}` \
             run in a cgroup v2 with `memory.max={limit}M` (which also charges QEMU's own \
             memory), swapping to a {memory} MiB zram device in the same L1 (lzo-rle; the data \
             is random, so zram stores it uncompressed after trying). Both swap stores are RAM \
             of one L1 (QEMU TCG, one vCPU, `kvm_amd` nested, 2 GiB). Medians of {reps} \
             round(s) run round-robin in that L1. Ratio: ours / QEMU throughput (= QEMU time / \
             our time; the goal is >= 0.8).\n\n{table}\n\
             The same pair, each VMM with a virtio-balloon that never inflates but reports \
             free guest pages (ours `--balloon size=0,free_page_reporting=on`, QEMU \
             `-device virtio-balloon-pci,free-page-reporting=on`), so memory the guest frees \
             (2 MiB and larger free blocks, reported after a short delay) is discarded by the \
             host instead of written to swap and read back when the guest reuses it:\n\n\
             {fpr_table}\n\
             What the limit costs: the same guest and workload with our VMM and no limit \
             (`--memory size={memory}M`, guest RAM in transparent huge pages), and with a limit of \
             all guest RAM (`limit={memory}M`: the pager serves every first touch in 4 KiB host \
             pages, nothing is evicted, and blocks first written are backed by huge pages), and with \
             the limit and `huge_pages=off` (guest RAM in 4 KiB host pages throughout), in the same \
             L1 and rounds. Boot to init is the guest's uptime when the scenario starts (issue 16: \
             <= 1.2x).\n\n{limit_table}\n\
             Where each phase's time goes in L1: the change of L1's KVM and memory counters over \
             the phase (stamped by the L1 script as the guest prints each phase's line; medians \
             of the rounds). Every L2 exit and NPT fault is a world switch that L1's QEMU (TCG) \
             emulates, so their counts are a large part of a phase's cost.\n\n{mm_table}\n\
             Raw lines:\n\n```\n{}\n```\n",
            pager_bench::SWAP_FILE,
            raw.join("\n")
        );
        bench::update_section(&file, "pager", &body)?;
        eprintln!("updated {}", file.display());
    }
    Ok(())
}

/// Runs the pager benchmark in one L1; its console.
fn run_pager(reps: u32, memory: u32, touch: u32, limit: u32, only: &[String]) -> Result<String> {
    use integration::{pager_bench, usb_bench};
    let harness = Harness::new().context("harness")?;
    // Boot plus three passes over `touch` MiB at no less than 0.5 MiB/s.
    let per_run = 300 + u64::from(touch) * 3 * 2;
    let mut run = GuestRun::new(Scenario::load("pager-touch")?)
        .cpus(2)
        .memory_mib(memory)
        .param("touch_mib", touch)
        .modules(bench::BALLOON_MODULES);
    run.l1_files = usb_bench::qemu_l1_files(&host::qemu_binary()?)?;
    let cmdline = run.l2_cmdline()?;
    let mut variants = pager_bench::variants(&run, &cmdline, limit);
    bench::retain_only(&mut variants, only)?;
    let runs = variants.len() as u64 * u64::from(reps);
    run = run.timeout(Duration::from_secs(per_run * runs + 300));
    let script = pager_bench::script(reps, per_run, limit, memory, &variants);
    let payload = L1Payload::VmmScript {
        binary: host::vmm_binary(true)?,
        script,
    };
    let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
    eprintln!(
        "bench pager: {reps} rounds of {} in one L1 ({memory} MiB guest, limit {limit} MiB, {touch} MiB touched)",
        names.join(", ")
    );
    Ok(harness.run_l1_payload(&run, payload)?.console)
}

fn disk(
    reps: u32,
    cpus: u32,
    memory: u32,
    image_mib: u64,
    runtime: u64,
    write: Option<PathBuf>,
) -> Result<()> {
    if !std::path::Path::new(HOST_FIO).is_file() {
        bail!("{HOST_FIO} is missing: run scripts/setup.sh (installs fio)");
    }
    let harness = Harness::new().context("harness")?;
    // Boot + three jobs of (ramp + runtime) + slack for TCG.
    let per_run = Duration::from_secs(150 + 3 * (runtime + 1) * 2);
    let run = GuestRun::new(Scenario::load("blk-bench")?)
        .cpus(cpus)
        .memory_mib(memory)
        .modules(&["virtio_pci", "virtio_blk"])
        .l2_binary(HOST_FIO, "usr/local/bin/fio")
        .param("fio_runtime", runtime)
        .param("fio_size_mib", image_mib)
        .timeout(per_run * (2 * reps + 1));
    let cmdline = run.l2_cmdline()?;
    let variants = bench::disk_variants(&run, &cmdline, BENCH_IMAGE);
    let spec = bench::spec(reps, "FIO-DONE", per_run.as_secs(), &variants);
    let setup = format!(
        "dd if=/dev/urandom of={BENCH_IMAGE} bs=1M count={image_mib} 2>/dev/null || exit 90\n\
         echo \"bench image: $(ls -l {BENCH_IMAGE})\""
    );
    let payload = L1Payload::Bench {
        vmm: host::vmm_binary(true)?,
        qemu: host::qemu_binary()?,
        bench: l1_bench_binary()?,
        spec,
        setup,
    };
    eprintln!(
        "bench disk: {reps} rounds of {} variants in one L1",
        variants.len()
    );
    let r = harness.run_l1_payload(&run, payload)?;
    let results = bench::parse_fio(&r.console);
    if results.is_empty() {
        bail!("no FIO-RESULT lines; console:\n{}", r.console);
    }
    let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
    let table = bench::render_disk_table(&results, &names);
    println!("{table}");
    let raw = marked_lines(
        &r.console,
        &[
            "FIO-RESULT",
            "BENCH-START",
            "BENCH-RUN",
            "blk-bench:",
            "bench image:",
        ],
    );
    eprintln!("{}", raw.join("\n"));
    if let Some(file) = write {
        let body = format!(
            "## Disk I/O (virtio-blk)\n\n\
             Command: `scripts/bench.sh disk --reps {reps} --cpus {cpus} --memory {memory} \
             --image-mib {image_mib} --runtime {runtime}`\n\n\
             Guest: Debian's kernel with a busybox initramfs and Debian's fio, {cpus} vCPU(s), \
             {memory} MiB, `virtio_blk` over `virtio_pci`. Disk: one {image_mib} MiB raw image \
             filled with random data in the nested L1's tmpfs, the same file for both VMMs. \
             fio on `/dev/vda`: `--ioengine=libaio --direct=1 --numjobs=1 --size={image_mib}M \
             --ramp_time=1 --runtime={runtime} --time_based`; jobs: 4 KiB random read at \
             iodepth 32, 1 MiB sequential read and write at iodepth 8. Medians of {reps} rounds \
             run round-robin in the same L1 (QEMU TCG, one vCPU, `kvm_amd` nested). \
             Ours: `--disk path={BENCH_IMAGE},id=bench` (buffered I/O on the host page cache, \
             FLUSH = fdatasync, one queue per vCPU). QEMU: `-M pc -accel kvm -cpu host \
             -drive file={BENCH_IMAGE},if=none,format=raw,{} -device \
             virtio-blk-pci,num-queues={cpus}`: the same caching (host page cache, flush = \
             fdatasync); `cache=none,aio=native` is not possible here because L1's tmpfs has no \
             O_DIRECT (Linux 6.1). Ratio: ours / QEMU bandwidth (above 1 = ours is faster; \
             the goal is 1.2). Nested TCG on a shared two-core host is noisy: \
             single rounds vary by 2-3x, hence the min-max ranges.\n\n{table}\nRaw runs:\n\n```\n{}\n```\n",
            bench::QEMU_DISK_CACHE,
            raw.join("\n")
        );
        bench::update_section(&file, "disk", &body)?;
        eprintln!("updated {}", file.display());
    }
    Ok(())
}

fn usb(reps: u32, runtime: u64, image_mib: u64, write: Option<PathBuf>) -> Result<()> {
    use integration::usb::{self, find_program};
    use integration::usb_bench;
    let fio = find_program("fio").context("fio is not on PATH: run scripts/setup.sh")?;
    let harness = Harness::new().context("harness")?;
    // Boot + three jobs of (ramp + runtime) + slack for TCG.
    let per_run = 180 + 3 * (runtime + 1) * 2;
    let mut run = GuestRun::new(Scenario::load("usb-bench")?)
        .cpus(1)
        .memory_mib(512)
        .param("bench_serial", usb_bench::SERIAL)
        .param("fio_runtime", runtime)
        .param("fio_size_mib", image_mib)
        .timeout(Duration::from_secs(per_run * u64::from(2 * reps) + 300))
        .l2_binary(fio, "usr/local/bin/fio");
    run.modules = usb::GUEST_MODULES.iter().map(|m| m.to_string()).collect();
    run.l2_files.push(usb::guest_usb_lib());
    run.l1_files = usb_bench::qemu_l1_files(&host::qemu_binary()?)?;
    let cmdline = run.l2_cmdline()?;
    let variants = usb_bench::variants(&run, &cmdline);
    let script = usb_bench::script(image_mib, reps, per_run, &variants);
    let payload = L1Payload::VmmScript {
        binary: host::vmm_binary(true)?,
        script,
    };
    eprintln!("bench usb: {reps} rounds of ours and QEMU in one L1");
    let r = harness.run_l1_payload(&run, payload)?;
    let results = usb_bench::parse(&r.console);
    if results.is_empty() {
        bail!("no FIO-RESULT lines; console:\n{}", r.console);
    }
    let table = usb_bench::render_table(&results);
    println!("{table}");
    let raw = marked_lines(&r.console, &["USB-BENCH-", "FIO-RESULT", "usb-bench:"]);
    println!("{}", raw.join("\n"));
    if let Some(file) = write {
        let body = format!(
            "## USB mass-storage disk (xHCI)\n\n\
             Command: `scripts/bench.sh usb --reps {reps} --runtime {runtime} --image-mib {image_mib}`\n\n\
             Guest: Debian's kernel with a busybox initramfs and Debian's fio, 1 vCPU, 512 MiB, \
             `xhci-pci` + `usb-storage` + `sd_mod`. Disk: one {image_mib} MiB raw image filled with \
             random data in the nested L1's tmpfs, the same file for both VMMs, on a USB 3 \
             (SuperSpeed) port. fio on the disk: `--ioengine=libaio --direct=1 --numjobs=1 \
             --size={image_mib}M --ramp_time=1 --runtime={runtime} --time_based`; jobs: 4 KiB random \
             read (iodepth 32, but Bulk-Only runs one command at a time), 1 MiB sequential read and \
             write (iodepth 8). Medians of {reps} rounds run round-robin in the same L1 (QEMU TCG, \
             one vCPU, `kvm_amd` nested). Ours: `--usb-storage path=IMG,port=5,id=bench` (buffered \
             I/O on the host page cache), with `--usb-io thread` (transfers on the controller's \
             own I/O thread) and `--usb-io vcpu` (on the vCPU thread that rang the doorbell, the \
             default). QEMU: `-M pc -accel kvm -cpu host -device qemu-xhci \
             -drive file=IMG,if=none,{} -device usb-storage,drive=d0`. \
             MB/s = 10^6 bytes/s. Ratio above 1 = ours is faster.\n\n{table}\nRaw lines:\n\n```\n{}\n```\n",
            usb_bench::QEMU_DRIVE_OPTS,
            raw.join("\n")
        );
        bench::update_section(&file, "usb", &body)?;
        eprintln!("updated {}", file.display());
    }
    Ok(())
}

/// The `bench density` command line for `cfg` (as BENCHMARKS.md shows it).
fn density_command(cfg: &integration::density_bench::Config) -> String {
    let guests: Vec<String> = cfg.guests.iter().map(u32::to_string).collect();
    format!(
        "scripts/bench.sh density --guests {} --reps {} --memory {} --ws {} --seconds {} \
         --budget {} --allowance {}{}",
        guests.join(","),
        cfg.reps,
        cfg.memory_mib,
        cfg.ws_mib,
        cfg.seconds,
        cfg.budget_mib,
        cfg.allowance_mib,
        if cfg.balloon { "" } else { " --no-balloon" }
    )
}

fn density(
    cfg: &integration::density_bench::Config,
    write: Option<PathBuf>,
    saved: Option<PathBuf>,
) -> Result<()> {
    use integration::density_bench as db;
    let started = std::time::Instant::now();
    let console = match saved {
        Some(path) => {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
        None => run_density(cfg)?,
    };
    // A saved log may hold the lines twice (the command prints the raw
    // lines after the tables): keep the first copy.
    let console = match console.match_indices(db::MARK_SETUP).nth(1) {
        Some((at, _)) => console[..at].to_string(),
        None => console,
    };
    let sets = db::parse(&console);
    if sets.is_empty() {
        bail!("no DENSITY-END lines; console:\n{console}");
    }
    let rows = db::rows(&sets, &cfg.guests);
    let table = db::render_table(&rows, cfg.memory_mib);
    let noio = db::render_noio_table(&sets, &cfg.guests);
    let headline = db::headline(&rows, cfg.memory_mib);
    println!("{table}\n{noio}\nLargest N with every guest >= 0.5x: {headline}");
    // The guests' consoles without their balloon counters and progress
    // lines (the command's output, not the table, is the place for those).
    let raw: Vec<&str> = marked_lines(
        &console,
        &[
            db::MARK_SETUP,
            db::MARK_SET,
            db::MARK_GO,
            db::MARK_END,
            db::MARK_LOG,
            "DENSITY-TAIL",
        ],
    )
    .into_iter()
    .filter(|l| {
        !["balloon-stats", "] writing ", "SCENARIO-PASS"]
            .iter()
            .any(|m| l.contains(m))
    })
    .collect();
    println!("{}", raw.join("\n"));
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    eprintln!("bench density: {minutes:.1} min");
    if let Some(file) = write {
        let balloon = if cfg.balloon {
            "Every guest, ours and QEMU's, has a virtio-balloon with free page reporting (ours: \
             `--balloon size=0,free_page_reporting=on`, through the pager when there is a limit; \
             QEMU: `-device virtio-balloon-pci,free-page-reporting=on`); the balloon is never \
             inflated. "
        } else {
            "No balloon. "
        };
        let body = format!(
            "## Density: guests per host memory\n\n\
             Command: `{command}`\n\n\
             N guests run at once in one L1 (QEMU TCG, one vCPU, `kvm_amd` nested, 2 GiB), \
             each with Debian's kernel, a busybox initramfs, 1 vCPU and {g} MiB, running the \
             `density-work` scenario: {ws} MiB of random data written into its tmpfs (random, \
             so zram cannot compress it) and checksummed once (warm-up), then `md5sum` passes \
             over it for {secs} s. All guests of a set are released at once (each waits for a \
             line on its console, written when every guest is ready), so they measure over \
             the same stretch of time; a guest's throughput is MiB checksummed per second from \
             the release to the end of its last pass, and every pass must reproduce the \
             warm-up's checksum. For each N and VMM, the same N guests run once without a \
             limit (the unconstrained figure: they share L1's one CPU just the same) and once \
             under a host memory budget of {budget} MiB for all N together. Ours: \
             `--memory size={g}M,limit=L,swap=/tmp/densityK.swap` with L = ({budget}/N - \
             {allowance}) x 64/65 MiB (the allowance is left for the VMM's own memory, the \
             64/65 for the pager's reserve of limit/64 on top of the limit), swap files in L1's \
             tmpfs. QEMU: `-M pc -accel kvm -cpu host -m {g}`, all N in one cgroup v2 with \
             `memory.max={budget}M` (which also charges QEMU's own memory), swapping to a zram \
             device of N x {g} MiB in the same L1 (lzo-rle). {balloon}\
             Host memory used: every set runs in its own cgroup v2 (without a limit except \
             QEMU's budget), sampled once a second while it runs: resident memory = the \
             cgroup's `memory.current` less its `shmem` (guest RAM, the VMMs' own memory and \
             the kernel memory charged to them; the `shmem` pages are our swap files in \
             L1's tmpfs, which the VMMs write and are charged for), swap store = those \
             `shmem` pages for ours, zram's `mem_used_total` for QEMU (zram's memory is \
             charged to no cgroup). Both swap stores are L1 RAM, so the host memory used is \
             the peak of resident + swap store, and the density is N x {g} MiB over it; the \
             density of resident memory alone (what it would be with swap on a disk) is \
             shown beside it. The kernel's own peaks (`memory.peak`, which for ours \
             includes the swap files, and zram's `mem_used_max`) are in the raw `DENSITY-END` \
             lines. A guest holds when its throughput under the budget is at least 0.5x the \
             median guest of the unconstrained set of the same VMM and N (the guests are \
             alike; a guest that failed, timed out or was not ready at the release counts as \
             0). {reps} round(s).\n\n{table}\n\
             **Largest N with every guest >= 0.5x** (raising N from the smallest, stopping at \
             the first N that fails): {headline}.\n\n\
             NOIO evidence (ours with the budget; the stall column counts `STALL-WATCHDOG` \
             reports of our VMMs with and without a limit; issue 16's goal is 0 NOIO stalls):\n\n\
             {noio}\nRaw lines (`DENSITY-LOG` lines are the guests' consoles):\n\n```\n{}\n```\n",
            raw.join("\n"),
            command = density_command(cfg),
            g = cfg.memory_mib,
            ws = cfg.ws_mib,
            secs = cfg.seconds,
            budget = cfg.budget_mib,
            allowance = cfg.allowance_mib,
            reps = cfg.reps,
        );
        bench::update_section(&file, "density", &body)?;
        eprintln!("updated {}", file.display());
    }
    Ok(())
}

/// Runs the density benchmark in one L1; its console.
fn run_density(cfg: &integration::density_bench::Config) -> Result<String> {
    use integration::{density_bench as db, usb_bench};
    let harness = Harness::new().context("harness")?;
    let mut run = GuestRun::new(Scenario::load("density-work")?)
        .cpus(1)
        .memory_mib(cfg.memory_mib)
        .param("ws_mib", cfg.ws_mib)
        .param("seconds", cfg.seconds)
        .timeout(Duration::from_secs(cfg.total_timeout_s()));
    if cfg.balloon {
        run = run.modules(bench::BALLOON_MODULES);
    }
    run.l1_files = usb_bench::qemu_l1_files(&host::qemu_binary()?)?;
    let script = db::script(cfg, &run)?;
    let payload = L1Payload::VmmScript {
        binary: host::vmm_binary(true)?,
        script,
    };
    eprintln!(
        "bench density: {:?} guests of {} MiB, budget {} MiB, {} round(s) in one L1 (bound {} s)",
        cfg.guests,
        cfg.memory_mib,
        cfg.budget_mib,
        cfg.reps,
        cfg.total_timeout_s()
    );
    Ok(harness.run_l1_payload(&run, payload)?.console)
}
