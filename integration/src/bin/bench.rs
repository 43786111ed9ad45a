//! `bench`: runs a benchmark in the nested L1 and writes its table into
//! BENCHMARKS.md (between `<!-- NAME:begin/end -->` markers).
//!
//! `bench boot [--reps 5] [--cpus 1] [--memory 256] [--write BENCHMARKS.md]`
//! boots the same L2 kernel + initramfs with our VMM, QEMU `-M pc` and QEMU
//! `-M microvm`, round-robin in one L1, and reports median time to guest
//! init and RSS outside guest RAM, with ratios.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use guest_image::Scenario;
use integration::bench;
use integration::l1::L1Payload;
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
}

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
            let run = GuestRun::new(Scenario::inline("boot-bench", "true"))
                .cpus(cpus)
                .memory_mib(memory)
                .timeout(per_boot * (3 * reps + 2));
            let cmdline = run.l2_cmdline()?;
            let variants = bench::boot_variants(&run, &cmdline);
            let spec = bench::spec(reps, "GUEST-INIT", per_boot.as_secs(), &variants);
            let payload = L1Payload::Bench {
                vmm: host::vmm_binary(true)?,
                qemu: host::qemu_binary()?,
                bench: l1_bench_binary()?,
                spec,
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
                     direct kernel boot. Memory: peak RSS outside the largest mapping (guest RAM), \
                     sampled every 100 ms. Ratios: ours divided by the row's value (below 1 = ours is \
                     faster / smaller).\n\n{table}\nRaw runs:\n\n```\n{}\n```\n",
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
    }
}
