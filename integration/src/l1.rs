//! The L1 initramfs: busybox, the kvm_amd module closure, the L2 kernel and
//! initramfs, the payload that boots L2 (our static VMM, or QEMU with its
//! libraries and firmware), extra files, and the L1 `/init`.

use std::path::{Path, PathBuf};

use guest_image::initramfs::{Initramfs, InitramfsError};
use guest_image::scenario::{base_image, FileMapping};
use guest_image::GuestAssets;

/// The L1 `/init`.
pub const L1_INIT: &str = include_str!("../guest/init-l1.sh");
/// Modules L1 loads: `kvm_amd` for `/dev/kvm` (closure: irqbypass, kvm, ccp,
/// kvm-amd), and `zram` (with zsmalloc; its lzo-rle compressor is built in)
/// for a swap device in L1's RAM, which the pager benchmark gives QEMU.
pub const L1_MODULES: &[&str] = &["kvm_amd", "zram"];
/// Paths inside the L1 image.
pub const L2_KERNEL: &str = "/l2/vmlinuz";
pub const L2_INITRD: &str = "/l2/initrd.gz";
pub const VMM_PATH: &str = "/vmm";
pub const PAYLOAD_SCRIPT: &str = "l1/run.sh";
pub const BENCH_PATH: &str = "/l1-bench";
pub const BENCH_SPEC: &str = "l1/bench.spec";
/// QEMU and its firmware inside the L1 image.
pub const QEMU_PATH: &str = "/usr/bin/qemu-system-x86_64";
pub const QEMU_FIRMWARE_PATH: &str = "/usr/share/qemu";

/// Where QEMU looks for firmware on Debian (its configured firmware path).
pub const QEMU_FIRMWARE_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios"];
/// Firmware a direct-kernel boot of `pc`, `q35` or `microvm` reads.
pub const QEMU_FIRMWARE: &[&str] = &[
    "bios-256k.bin",
    "bios.bin",
    "bios-microvm.bin",
    "qboot.rom",
    "kvmvapic.bin",
    "linuxboot.bin",
    "linuxboot_dma.bin",
    "pvh.bin",
    "vgabios-stdvga.bin",
    "vgabios.bin",
];

/// What L1 runs once `/dev/kvm` is there.
#[derive(Clone, Debug)]
pub enum L1Payload {
    /// Our VMM (a static binary) with these arguments.
    Vmm { binary: PathBuf, args: Vec<String> },
    /// QEMU (copied with its shared libraries and firmware) with these
    /// arguments.
    Qemu { binary: PathBuf, args: Vec<String> },
    /// A shell script (harness self-checks).
    Script(String),
    /// `l1-bench` (static) running `spec` against our VMM and QEMU, both in
    /// the image: every variant boots in the same L1. `setup` is shell run
    /// first (e.g. creating a disk image in L1's tmpfs; empty for none).
    Bench {
        vmm: PathBuf,
        qemu: PathBuf,
        bench: PathBuf,
        spec: String,
        setup: String,
    },
    /// A shell script with our VMM installed at [`VMM_PATH`] (tests that
    /// call the VMM several times, e.g. with bad input).
    VmmScript { binary: PathBuf, script: String },
}

/// Quotes a word for POSIX sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn exec_line(program: &str, args: &[String]) -> String {
    let mut line = format!("exec {}", sh_quote(program));
    for a in args {
        line.push(' ');
        line.push_str(&sh_quote(a));
    }
    line.push('\n');
    line
}

/// Adds QEMU, its libraries (at their own paths) and firmware.
fn add_qemu(img: &mut Initramfs, binary: &Path) -> Result<(), InitramfsError> {
    img.add_host_binary(binary, "usr/bin/qemu-system-x86_64")?;
    for name in QEMU_FIRMWARE {
        let found = QEMU_FIRMWARE_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file());
        if let Some(src) = found {
            img.add_file(&src, &format!("usr/share/qemu/{name}"))?;
        }
    }
    Ok(())
}

/// Builds the L1 image in memory.
pub fn build(
    assets: &GuestAssets,
    l2_initrd: &Path,
    payload: &L1Payload,
    files: &[FileMapping],
) -> Result<Initramfs, InitramfsError> {
    let mut img = base_image(assets)?;
    img.add_modules(&assets.kernel, L1_MODULES)?;
    img.add_bytes("init", 0o755, L1_INIT)?;
    img.add_file(&assets.kernel.vmlinuz, L2_KERNEL)?;
    img.add_file(l2_initrd, L2_INITRD)?;
    let script = match payload {
        L1Payload::Vmm { binary, args } => {
            img.add_file(binary, VMM_PATH)?;
            exec_line(VMM_PATH, args)
        }
        L1Payload::Qemu { binary, args } => {
            add_qemu(&mut img, binary)?;
            let mut all = vec!["-L".to_string(), "/usr/share/qemu".to_string()];
            all.extend(args.iter().cloned());
            format!(
                "export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu\n{}",
                exec_line("/usr/bin/qemu-system-x86_64", &all)
            )
        }
        L1Payload::Script(s) => s.clone(),
        L1Payload::Bench {
            vmm,
            qemu,
            bench,
            spec,
            setup,
        } => {
            img.add_file(vmm, VMM_PATH)?;
            add_qemu(&mut img, qemu)?;
            img.add_file(bench, BENCH_PATH)?;
            img.add_bytes(BENCH_SPEC, 0o644, spec.clone())?;
            format!(
                "{setup}\nexport LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu\n{}",
                exec_line(BENCH_PATH, &[format!("/{BENCH_SPEC}")])
            )
        }
        L1Payload::VmmScript { binary, script } => {
            img.add_file(binary, VMM_PATH)?;
            script.clone()
        }
    };
    img.add_bytes(PAYLOAD_SCRIPT, 0o755, script)?;
    for f in files {
        img.add_file(&f.src, &f.dst)?;
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn quoting_survives_the_shell() {
        let args = vec!["a b".to_string(), "it's".to_string(), "x=1 y=2".to_string()];
        let line = exec_line("printf", &[vec!["%s|".to_string()], args].concat());
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|it's|x=1 y=2|");
    }
}
