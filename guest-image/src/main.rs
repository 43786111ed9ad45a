//! `guest-image`: fetch the Debian guest kernel, build scenario initramfs
//! images and the Debian root disk. Progress goes to stderr; the resulting path to stdout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use guest_image::rootfs::{boot, RootfsSpec};
use guest_image::{
    build_dir, fetch_assets, fetch_kernel, images_dir, FileMapping, Scenario, ScenarioImage,
};

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
    /// Print the insmod order of the given modules and their closure
    /// (modules.dep dependencies and soft dependencies).
    Modules {
        /// Comma-separated module names or aliases (e.g. virtio_blk,kvm-amd).
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
    /// Build the Debian root disk (debootstrap minbase + systemd, ext4,
    /// cached); print the image's path. Boot a copy: booting writes to it.
    Rootfs {
        /// Image size in MiB (sparse).
        #[arg(long, default_value_t = guest_image::rootfs::DEFAULT_SIZE_MIB)]
        size_mib: u64,
        /// Debian mirror (default: the host's apt source for the suite).
        #[arg(long)]
        mirror: Option<String>,
        /// Extra package to install (repeatable).
        #[arg(long = "package")]
        packages: Vec<String>,
    },
    /// Build the initramfs that boots the root disk from virtio-blk; print
    /// its path.
    RootfsInitramfs,
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
            for m in k.module_db()?.closure(&names)?.paths {
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
        Cmd::Rootfs {
            size_mib,
            mirror,
            packages,
        } => {
            let kernel = fetch_kernel(&build)?;
            let mut spec = RootfsSpec::host_default();
            spec.size_mib = size_mib;
            if let Some(m) = mirror {
                spec.mirror = m;
            }
            spec.packages.extend(packages);
            let rootfs = guest_image::rootfs::build(&build, &kernel, &spec)?;
            println!("{}", rootfs.image.display());
        }
        Cmd::RootfsInitramfs => {
            let assets = fetch_assets(&build)?;
            let out = boot::write_initramfs(&assets, &images_dir(&build))?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
