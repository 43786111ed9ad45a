//! `nested-run`: boot a scenario guest (or, with `--rootfs`, the Debian root
//! disk) with the harness and show its console. Used by scripts/demo.sh;
//! exits 0 when the scenario passed (the root disk: when the VMM exited 0).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use guest_image::rootfs::boot;
use guest_image::rootfs::recipe::AUTOREBOOT_PARAM;
use guest_image::{Param, Scenario};
use integration::rootfs::{self, RootDisk};
use integration::{GuestRun, Harness, Mode};

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Direct on ordinary KVM, nested elsewhere (or $VMM_TEST_MODE).
    Auto,
    /// Our VMM inside an L1 QEMU TCG guest.
    Nested,
    /// Our VMM on the host's KVM.
    Direct,
    /// QEMU (-accel kvm) inside the L1 guest.
    NestedQemu,
    /// The guest under host QEMU TCG, no VMM.
    Qemu,
}

#[derive(Parser)]
#[command(about = "Boot a scenario guest in the nested harness and show its console")]
struct Cli {
    /// Scenario: a path, or a name in guest-image/scenarios.
    #[arg(long, default_value = "boot")]
    scenario: String,
    /// vCPUs (default 2; with --rootfs 1: on the one-vCPU L1, two made
    /// the Debian boot much slower, 392 s to the prompt against 80-158 s).
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Extra key=value for the guest command line (repeatable).
    #[arg(long = "param")]
    params: Vec<Param>,
    /// Modules for the guest initramfs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    modules: Vec<String>,
    /// Extra argument for our VMM, e.g. `--vmm-arg=--log-level=debug`
    /// (repeatable).
    #[arg(long = "vmm-arg", allow_hyphen_values = true)]
    vmm_args: Vec<String>,
    /// Boot the uncompressed vmlinux (guest-image extracts it from the
    /// bzImage) instead of the bzImage.
    #[arg(long)]
    vmlinux: bool,
    /// Timeout in seconds (default 180; with --rootfs 600).
    #[arg(long)]
    timeout: Option<u64>,
    /// Boot the Debian root disk (guest-image rootfs; a working copy in the
    /// build dir) from virtio-blk instead of a scenario: systemd up to the
    /// serial login prompt. Nested or direct mode only.
    #[arg(long)]
    rootfs: bool,
    /// With --rootfs: stay at the login prompt (stdin is the guest's
    /// keyboard: log in as root, `reboot` ends the run) instead of rebooting
    /// once it is up.
    #[arg(long, requires = "rootfs")]
    stay: bool,
}

fn main() -> Result<ExitCode> {
    env_logger::init();
    let cli = Cli::parse();
    let mode = match cli.mode {
        ModeArg::Auto => Mode::auto()?,
        ModeArg::Nested => Mode::Nested,
        ModeArg::Direct => Mode::Direct,
        ModeArg::NestedQemu => Mode::NestedQemu,
        ModeArg::Qemu => Mode::QemuTcg,
    };
    let harness = Harness::new()?;
    if cli.rootfs {
        return boot_rootfs(&harness, &cli, mode);
    }
    let cpus = cli.cpus.unwrap_or(2);
    let mut run = GuestRun::new(Scenario::load(&cli.scenario)?)
        .cpus(cpus)
        .memory_mib(cli.memory)
        .param("expect_cpus", cpus)
        .param("expect_mem_mib", cli.memory)
        .timeout(Duration::from_secs(cli.timeout.unwrap_or(180)));
    run.params.extend(cli.params);
    run.modules = cli.modules;
    run.vmm_args.extend(cli.vmm_args);
    if cli.vmlinux {
        run = run.vmlinux();
    }
    run.echo_console = true;
    eprintln!(
        "[nested-run] mode {mode:?}, scenario {}, {} vCPU(s), {} MiB",
        run.scenario.name, cpus, cli.memory
    );
    let result = harness.run(&run, mode)?;
    println!();
    for e in &result.events {
        eprintln!("[nested-run] {:>6.2}s  {}", e.at.as_secs_f64(), e.line);
    }
    eprintln!("[nested-run] {}", result.summary());
    Ok(if result.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Boots the Debian root disk once and reports the time to its login prompt.
fn boot_rootfs(harness: &Harness, cli: &Cli, mode: Mode) -> Result<ExitCode> {
    let cpus = cli.cpus.unwrap_or(1);
    let copy = harness.build.join("rootfs").join("demo.ext4");
    let disk = RootDisk::prepare(harness, &copy)?;
    let mut run = disk
        .run(cpus)
        .memory_mib(cli.memory)
        .timeout(Duration::from_secs(cli.timeout.unwrap_or(600)));
    run.echo_console = true;
    run.interactive = cli.stay;
    let extra: &[&str] = if cli.stay { &[] } else { &[AUTOREBOOT_PARAM] };
    let cmdline = boot::cmdline(extra);
    eprintln!(
        "[nested-run] mode {mode:?}, Debian root disk {} (copy of {}), {} vCPU(s), {} MiB",
        disk.image.display(),
        disk.pristine.display(),
        cpus,
        cli.memory
    );
    let result = harness.run_vmm_script(&run, mode, |p| rootfs::script(&run, p, &cmdline, 1))?;
    println!();
    if let Some(t) = rootfs::time_to(&result.events, 1, boot::MARK_LOGIN) {
        eprintln!(
            "[nested-run] login prompt {:.1}s after the VMM started",
            t.as_secs_f64()
        );
    }
    eprintln!("[nested-run] {}", result.summary());
    Ok(if result.vmm_exit == Some(0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
