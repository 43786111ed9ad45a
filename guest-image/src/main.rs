//! `guest-image`: fetch the Debian guest kernel and build scenario initramfs
//! images. Progress goes to stderr; the resulting path to stdout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use guest_image::{build_dir, fetch_assets, fetch_kernel, FileMapping, Scenario, ScenarioImage};

#[derive(Parser)]
#[command(
    version,
    about = "Builds guest kernels and initramfs images from Debian packages"
)]
struct Cli {
    /// Cache directory (default: $VMM_BUILD_DIR or <workspace>/build).
    #[arg(long, global = true)]
    build_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the kernel linux-image-amd64 depends on; print the vmlinuz path.
    Kernel,
    /// Like `kernel`, but print the path of the uncompressed vmlinux ELF
    /// extracted from it (boots faster: no in-guest decompression).
    Vmlinux,
    /// Fetch busybox-static; print the binary's path.
    Busybox,
    /// Print the insmod order (dependency closure) of the given modules.
    Modules {
        /// Comma-separated module names (e.g. virtio_blk,kvm-amd).
        #[arg(value_delimiter = ',', required = true)]
        names: Vec<String>,
    },
    /// Build a scenario initramfs; print its path.
    Initramfs {
        /// Comma-separated modules to load (their closure is added).
        #[arg(long, value_delimiter = ',')]
        modules: Vec<String>,
        /// Scenario script: a path, or a name in guest-image/scenarios.
        #[arg(long)]
        scenario: String,
        /// Output file (.cpio.gz).
        #[arg(long)]
        out: PathBuf,
        /// Extra file SRC:DST to copy into the image (repeatable).
        #[arg(long = "file")]
        files: Vec<FileMapping>,
        /// Host program SRC:DST to copy with its shared libraries (repeatable).
        #[arg(long = "binary")]
        binaries: Vec<FileMapping>,
    },
}

fn main() -> Result<()> {
    env_logger::init();
    let cli = Cli::parse();
    let build = cli.build_dir.unwrap_or_else(build_dir);
    match cli.cmd {
        Cmd::Kernel => {
            let k = fetch_kernel(&build)?;
            println!("{}", k.vmlinuz.display());
        }
        Cmd::Vmlinux => {
            let k = fetch_kernel(&build)?;
            println!("{}", k.vmlinux.display());
        }
        Cmd::Busybox => {
            let b = guest_image::fetch_busybox(&build)?;
            println!("{}", b.path.display());
        }
        Cmd::Modules { names } => {
            let k = fetch_kernel(&build)?;
            for m in k.module_db()?.closure(&names)? {
                println!("{m}");
            }
        }
        Cmd::Initramfs {
            modules,
            scenario,
            out,
            files,
            binaries,
        } => {
            let assets = fetch_assets(&build)?;
            let spec = ScenarioImage {
                modules,
                scenario: Scenario::load(&scenario)?,
                files,
                binaries,
            };
            let img = guest_image::build_l2(&assets, &spec)?;
            img.write_gz(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
