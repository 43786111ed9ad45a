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
/// Modules L1 loads when the harness attaches disks to it.
pub const L1_DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// Seconds L1 waits for its disks before running the payload anyway.
pub const DISK_WAIT_SECS: u32 = 10;
/// Paths inside the L1 image.
pub const L2_KERNEL: &str = "/l2/vmlinuz";
pub const L2_INITRD: &str = "/l2/initrd.gz";
/// The uncompressed kernel, where a run adds it (see `guest_image::vmlinux`).
pub const L2_VMLINUX: &str = "/l2/vmlinux";
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

/// L1's device for its `index`th virtio disk: `/dev/vda`, `/dev/vdb`, ...
pub fn disk_device(index: usize) -> String {
    let letter = b"abcdefghijklmnopqrstuvwxyz"
        .get(index)
        .map(|&b| b as char)
        .unwrap_or('z');
    format!("/dev/vd{letter}")
}

/// Shell lines waiting (bounded) until L1's first `disks` virtio disks exist.
fn wait_for_disks(disks: usize) -> String {
    let tries = DISK_WAIT_SECS * 10;
    (0..disks)
        .map(disk_device)
        .map(|dev| {
            format!(
                "i=0; while [ ! -b {dev} ] && [ $i -lt {tries} ]; do sleep 0.1; i=$((i + 1)); done\n\
                 [ -b {dev} ] || echo \"L1-NO-DISK {dev}\"\n"
            )
        })
        .collect()
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

/// Builds the L1 image in memory; with `disks` > 0 it loads virtio-blk and
/// the payload starts once that many disks are there.
pub fn build(
    assets: &GuestAssets,
    l2_initrd: &Path,
    payload: &L1Payload,
    files: &[FileMapping],
    disks: usize,
) -> Result<Initramfs, InitramfsError> {
    let mut img = base_image(assets)?;
    if disks == 0 {
        img.add_modules(&assets.kernel, L1_MODULES)?;
    } else {
        let all: Vec<&str> = L1_MODULES.iter().chain(L1_DISK_MODULES).copied().collect();
        img.add_modules(&assets.kernel, &all)?;
    }
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
    let script = format!("{}{script}", wait_for_disks(disks));
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
    fn disk_devices_and_wait_lines() {
        assert_eq!(disk_device(0), "/dev/vda");
        assert_eq!(disk_device(2), "/dev/vdc");
        assert_eq!(wait_for_disks(0), "");
        let w = wait_for_disks(2);
        assert!(w.contains("[ ! -b /dev/vda ]") && w.contains("L1-NO-DISK /dev/vdb"));
        // Bounded: a missing disk costs DISK_WAIT_SECS, not a hang.
        let out = Command::new("sh")
            .arg("-c")
            .arg(
                wait_for_disks(1)
                    .replace("/dev/vda", "/nonexistent/vda")
                    .replace("sleep 0.1", "true"),
            )
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("L1-NO-DISK /nonexistent/vda"));
    }

    #[test]
    fn quoting_survives_the_shell() {
        let args = vec!["a b".to_string(), "it's".to_string(), "x=1 y=2".to_string()];
        let line = exec_line("printf", &[vec!["%s|".to_string()], args].concat());
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|it's|x=1 y=2|");
    }
}
