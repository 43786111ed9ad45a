//! `nested-run`: boot a scenario guest with the harness and show its console.
//! Used by scripts/demo.sh; exits 0 when the scenario passed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use guest_image::{Param, Scenario};
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
    #[arg(long, default_value_t = 2)]
    cpus: u32,
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
    /// Timeout in seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
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
    let mut run = GuestRun::new(Scenario::load(&cli.scenario)?)
        .cpus(cli.cpus)
        .memory_mib(cli.memory)
        .param("expect_cpus", cli.cpus)
        .param("expect_mem_mib", cli.memory)
        .timeout(Duration::from_secs(cli.timeout));
    run.params.extend(cli.params);
    run.modules = cli.modules;
    run.echo_console = true;
    eprintln!(
        "[nested-run] mode {mode:?}, scenario {}, {} vCPU(s), {} MiB",
        run.scenario.name, cli.cpus, cli.memory
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
