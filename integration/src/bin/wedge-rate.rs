//! `wedge-rate`: how often the nested harness's L1 wedges under a given L1
//! QEMU. Runs the wedge-prone nested scenarios round-robin (`boot`: the
//! boot test's 2-vCPU guest; `blk`: fio on a virtio-blk disk; `usb`: fio on
//! a USB 3 disk; `pager`: an overcommitted guest touching more than its
//! resident limit), each under every `--qemu` in turn (alternating which
//! goes first), with no retry of a wedged L1, and counts what the harness
//! itself says: completions (the scenario's checks passed), wedges (the
//! monitor's verdict), key presses the monitor needed (`kicked`), and every
//! other failure with its reason. Each run is one `WEDGE-RUN` line on
//! stdout and in `--log` as it ends; the tables follow at the end
//! (`--table LOG` prints them from a saved log). Used by
//! scripts/wedge-rate.sh; see HARNESS.md.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use guest_image::scenario::FileMapping;
use guest_image::Scenario;
use integration::disk::{self, DiskImage, MARK_HOST_VMM_RC};
use integration::harness::{vmm_args_with, L1Tick};
use integration::l1::{L1Payload, L2_INITRD, L2_KERNEL, VMM_PATH};
use integration::usb::{find_program, guest_usb_lib, UsbScript, GUEST_MODULES, VMM_CTL_PATH};
use integration::wedge::{self, Outcome, Record};
use integration::{host, GuestRun, Harness, Mode, RunResult, Verdict};

const SCENARIOS: &[&str] = &["boot", "blk", "usb", "pager"];

#[derive(Parser)]
#[command(about = "Count L1 wedges of the nested harness under one or more L1 QEMUs")]
struct Cli {
    /// L1 QEMU binary (repeatable: runs alternate between them). Default:
    /// $QEMU or qemu-system-x86_64 on PATH.
    #[arg(long = "qemu")]
    qemus: Vec<PathBuf>,
    /// Runs per QEMU.
    #[arg(long, default_value_t = 8)]
    runs: usize,
    /// Scenarios, round-robin: boot, blk, usb, pager.
    #[arg(long, value_delimiter = ',', default_value = "boot,blk,usb,pager")]
    scenarios: Vec<String>,
    /// Seconds of each fio job (blk, usb).
    #[arg(long, default_value_t = 3)]
    fio_runtime: u64,
    /// MiB the pager scenario touches (256 MiB guest, 64 MiB limit).
    #[arg(long, default_value_t = 96)]
    pager_touch: u32,
    /// Drop a QEMU from the rotation once it has wedged this often (0:
    /// never): the others go on to their --runs.
    #[arg(long, default_value_t = 0)]
    stop_after_wedges: usize,
    /// Appends each WEDGE-RUN line here as the runs end.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Writes the console of every run that did not pass here.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// L1's timer: periodic (the harness's default) or one-shot (the
    /// kernel's default, dynamic ticks). A one-shot run's QEMU label ends
    /// in "/one-shot".
    #[arg(long, value_parser = ["periodic", "one-shot"], default_value = "periodic")]
    l1_tick: String,
    /// Print the tables of the WEDGE-RUN lines in these saved logs and exit.
    #[arg(long, num_args = 1..)]
    table: Vec<PathBuf>,
}

/// One L1 QEMU under test.
struct L1Qemu {
    path: PathBuf,
    label: String,
}

fn label_of(qemu: &Path) -> Result<String> {
    let mut cmd = Command::new(qemu);
    cmd.arg("--version");
    let out = cmd
        .output()
        .with_context(|| format!("running {} --version", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    wedge::qemu_version(&text)
        .with_context(|| format!("{} --version printed {text:?}", qemu.display()))
}

fn main() -> Result<ExitCode> {
    env_logger::init();
    let cli = Cli::parse();
    if !cli.table.is_empty() {
        let mut records = Vec::new();
        for f in &cli.table {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            records.extend(wedge::parse_all(&text));
        }
        println!("{}", wedge::render(&records));
        return Ok(ExitCode::SUCCESS);
    }
    for s in &cli.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s:?}: one of {}", SCENARIOS.join(", "));
        }
    }
    let paths = if cli.qemus.is_empty() {
        vec![host::qemu_binary()?]
    } else {
        cli.qemus.clone()
    };
    let tick = if cli.l1_tick == "one-shot" {
        L1Tick::OneShot
    } else {
        L1Tick::Periodic
    };
    let mut qemus = Vec::new();
    for path in paths {
        let mut label = label_of(&path)?;
        if tick == L1Tick::OneShot {
            label.push_str("/one-shot");
        }
        eprintln!(
            "[wedge-rate] L1 QEMU {label}: {} {}{}",
            path.display(),
            host::qemu_data_dirs(&path)
                .iter()
                .map(|d| format!("-L {}", d.display()))
                .collect::<Vec<_>>()
                .join(" "),
            host::qemu_module_dir(&path)
                .map(|d| format!(" QEMU_MODULE_DIR={}", d.display()))
                .unwrap_or_default()
        );
        qemus.push(L1Qemu { path, label });
    }
    if let Some(dir) = &cli.keep {
        std::fs::create_dir_all(dir)?;
    }
    let base = Harness::new().context("harness")?;
    let mut records = Vec::new();
    for i in 0..cli.runs {
        let scenario = cli.scenarios[i % cli.scenarios.len()].as_str();
        // Alternate which QEMU goes first, so neither always follows the
        // other's load.
        let mut order: Vec<&L1Qemu> = if i % 2 == 0 {
            qemus.iter().collect()
        } else {
            qemus.iter().rev().collect()
        };
        if cli.stop_after_wedges > 0 {
            order.retain(|q| {
                let wedges = records
                    .iter()
                    .filter(|r: &&Record| r.qemu == q.label && r.outcome == Outcome::Wedged)
                    .count();
                wedges < cli.stop_after_wedges
            });
        }
        for q in order {
            let harness = Harness {
                build: base.build.clone(),
                assets: base.assets.clone(),
                l1_qemu: None,
                l1_tick: tick,
            }
            .with_l1_qemu(&q.path);
            eprintln!(
                "[wedge-rate] run {}/{} {scenario} under QEMU {}",
                i + 1,
                cli.runs,
                q.label
            );
            let (r, passed) = run_scenario(&harness, scenario, &cli)?;
            eprintln!("[wedge-rate] {}", r.summary());
            let record = Record {
                qemu: q.label.clone(),
                scenario: scenario.into(),
                outcome: wedge::classify(&r, passed),
                kicked: r.l1_kicked,
                wall_s: r.wall.as_secs_f64(),
            };
            let line = record.line();
            println!("{line}");
            if let Some(log) = &cli.log {
                let mut f = OpenOptions::new().create(true).append(true).open(log)?;
                writeln!(f, "{line}")?;
            }
            if let (Some(dir), false) = (&cli.keep, record.outcome == Outcome::Pass) {
                let name = format!("{}-{}-{}.console", q.label, i + 1, scenario);
                std::fs::write(dir.join(name), &r.console)?;
            }
            if r.l1_kicked || record.outcome != Outcome::Pass {
                // What the monitor saw, for the log.
                for l in r.console.lines().filter(|l| l.starts_with("[harness]")) {
                    eprintln!("  {l}");
                }
            }
            records.push(record);
        }
    }
    println!("{}", wedge::render(&records));
    let clean = records.iter().all(|r| r.outcome == Outcome::Pass);
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs one scenario once; the result and whether its own checks passed.
fn run_scenario(h: &Harness, scenario: &str, cli: &Cli) -> Result<(RunResult, bool)> {
    let fio = || find_program("fio").context("fio is not on PATH: run scripts/setup.sh");
    match scenario {
        // tests/boot.rs boots_with_two_vcpus.
        "boot" => {
            let run = GuestRun::new(Scenario::load("boot")?)
                .cpus(2)
                .memory_mib(512)
                .param("expect_cpus", 2)
                .param("expect_mem_mib", 512)
                .timeout(Duration::from_secs(360))
                .l1_retries(0)
                .emulator_fault_retries(0);
            let r = h.run(&run, Mode::Nested)?;
            let ok = r.passed() && r.console.contains("nproc=2 ");
            Ok((r, ok))
        }
        // The disk benchmark's guest (blk-bench), our VMM only.
        "blk" => {
            let run = GuestRun::new(Scenario::load("blk-bench")?)
                .cpus(1)
                .memory_mib(512)
                .modules(&["virtio_pci", "virtio_blk"])
                .l2_binary(fio()?, "usr/local/bin/fio")
                .param("fio_runtime", cli.fio_runtime)
                .param("fio_size_mib", 64)
                .timeout(Duration::from_secs(600))
                .l1_retries(0)
                .emulator_fault_retries(0);
            let cmdline = run.l2_cmdline()?;
            let disks = [DiskImage::with_id("bench", 64).random_head(64)];
            let r = h.run_vmm_script(&run, Mode::Nested, |p| {
                let mut argv = vec![p.vmm.clone()];
                argv.extend(vmm_args_with(&run, &cmdline, &p.kernel, &p.initrd));
                disk::blk_script(&p.scratch, &disks, &[], &argv, &[])
            })?;
            let ok = r.passed() && fio_done(&r);
            Ok((r, ok))
        }
        // tests/usb.rs usb_bench_scenario_runs_on_our_vmm.
        "usb" => {
            let mut run = GuestRun::new(Scenario::load("usb-bench")?)
                .cpus(1)
                .memory_mib(512)
                .param("bench_serial", "bench")
                .param("fio_runtime", cli.fio_runtime)
                .param("fio_size_mib", 64)
                .l2_binary(fio()?, "usr/local/bin/fio")
                .timeout(Duration::from_secs(900))
                .l1_retries(0)
                .emulator_fault_retries(0);
            run.modules = GUEST_MODULES.iter().map(|m| m.to_string()).collect();
            run.l2_files.push(guest_usb_lib());
            run.l1_files.push(FileMapping {
                src: host::vmm_ctl_binary(true)?,
                dst: VMM_CTL_PATH.into(),
            });
            let cmdline = run.l2_cmdline()?;
            let mut argv = vec![VMM_PATH.to_string()];
            argv.extend(vmm_args_with(&run, &cmdline, L2_KERNEL, L2_INITRD));
            let script = UsbScript {
                disks: vec![DiskImage::with_id("bench", 64).port(5).random_head(64)],
                vmm_argv: argv,
                exit_wait_s: 600,
                ..Default::default()
            };
            let payload = L1Payload::VmmScript {
                binary: host::vmm_binary(true)?,
                script: script.render(),
            };
            let r = h.run_l1_payload(&run, payload)?;
            let ok = !r.timed_out
                && r.verdict == Verdict::Pass
                && r.console.contains(&format!("{MARK_HOST_VMM_RC}0"))
                && fio_done(&r);
            Ok((r, ok))
        }
        // tests/pager.rs, smaller: 256 MiB guest, 64 MiB resident limit.
        "pager" => {
            let mut run = GuestRun::new(Scenario::load("pager-touch")?)
                .cpus(2)
                .memory_mib(256)
                .param("touch_mib", cli.pager_touch)
                .timeout(Duration::from_secs(1200))
                .l1_retries(0)
                .emulator_fault_retries(0);
            run.memory_opts = Some("limit=64M,swap=/tmp/guest.swap".into());
            let r = h.run(&run, Mode::Nested)?;
            let ok = r.passed() && r.console.contains("pager-touch: ok");
            Ok((r, ok))
        }
        other => bail!("unknown scenario {other:?}"),
    }
}

/// One FIO-RESULT per job of the fio scenarios and their FIO-DONE.
fn fio_done(r: &RunResult) -> bool {
    r.console.matches("FIO-RESULT job=").count() == 3 && r.console.contains("FIO-DONE")
}
