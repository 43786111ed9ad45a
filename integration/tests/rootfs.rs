//! A real Debian guest: the root disk guest-image builds (debootstrap
//! minbase + systemd, ext4) boots from virtio-blk with our VMM to systemd's
//! multi-user target and a serial login prompt, then reboots through the
//! keyboard controller (the VMM exits 0). A second boot of the same image
//! must find the file system clean (the initramfs's `e2fsck -n` verdict),
//! and so must a full `e2fsck -fn` of the image file on this host after the
//! run. Nested: the image is L1's virtio disk, the VMM's `/dev/vda` in L1.
//! Needs root (debootstrap, on the first run only) and e2fsprogs.

use std::process::Command;
use std::time::Duration;

use guest_image::rootfs::boot::{self, MARK_FSCK, MARK_FSCK_CLEAN, MARK_LOGIN};
use guest_image::rootfs::recipe::{AUTOREBOOT_PARAM, MARK_AUTOREBOOT};
use integration::harness::qemu_l2_args;
use integration::l1::{self, L1Payload};
use integration::rootfs::{self, RemoveOnDrop, RootDisk};
use integration::testing::{check, harness, mode};
use integration::verdict::MARK_L1_KVM_READY;
use integration::{host, RunResult};

const BOOTS: u32 = 2;
/// Both boots and shutdowns and the L1 boot: 3.5-7 minutes measured on
/// the shared two-core machine under load; generous against its swings.
const TIMEOUT: Duration = Duration::from_secs(900);

#[test]
fn debian_rootfs_boots_to_login_and_reboots_clean() {
    let h = harness();
    let copy = h
        .build
        .join("rootfs")
        .join(format!("test-{}.ext4", std::process::id()));
    let _remove = RemoveOnDrop(copy.clone());
    let disk = RootDisk::prepare(h, &copy).unwrap_or_else(|e| panic!("root disk: {e}"));
    let run = disk.run(1).timeout(TIMEOUT);
    let cmdline = boot::cmdline(&[AUTOREBOOT_PARAM]);
    let r = h
        .run_vmm_script(&run, mode(), |p| rootfs::script(&run, p, &cmdline, BOOTS))
        .unwrap_or_else(|e| panic!("run: {e}"));
    let host_fsck = Command::new("e2fsck")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .arg("-fn")
        .arg(&disk.image)
        .output();

    for n in 1..=BOOTS {
        let section = rootfs::boot_section(&r.console, n);
        let what = |s: &str| format!("boot {n}: {s}");
        check(!section.is_empty(), &what("never started"), &r);
        check(
            section.contains(MARK_FSCK_CLEAN),
            &what(&format!(
                "the initramfs's e2fsck -n did not say clean ({MARK_FSCK})"
            )),
            &r,
        );
        let login = section.find(MARK_LOGIN);
        check(login.is_some(), &what("no serial login prompt"), &r);
        let reboot_line = section
            .lines()
            .find(|l| l.contains(MARK_AUTOREBOOT))
            .unwrap_or_default();
        check(
            reboot_line.contains("multi-user=active") && reboot_line.contains("getty=active"),
            &what("the reboot hook did not see multi-user.target and the getty active"),
            &r,
        );
        check(
            login < section.find(MARK_AUTOREBOOT),
            &what("the hook rebooted before the login prompt"),
            &r,
        );
        check(
            rootfs::vmm_rc(&r.console, n) == Some(0),
            &what("the VMM did not exit 0 after the guest rebooted"),
            &r,
        );
        println!(
            "boot {n}: login prompt {:.1} s after VMM launch, initramfs {:.1} s, {}",
            rootfs::time_to(&r.events, n, MARK_LOGIN)
                .unwrap_or_default()
                .as_secs_f64(),
            rootfs::time_to(&r.events, n, boot::MARK_INITRAMFS)
                .unwrap_or_default()
                .as_secs_f64(),
            reboot_line.trim()
        );
    }
    check(r.vmm_exit == Some(0), "the VMM script failed", &r);
    let fsck = host_fsck.unwrap_or_else(|e| panic!("e2fsck on the host: {e}"));
    check(
        fsck.status.success(),
        &format!(
            "host e2fsck -fn {}: {:?}\n{}",
            disk.image.display(),
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout)
        ),
        &r,
    );
    print_l1_timing("ours", &r);
    println!("{}; host e2fsck -fn: clean", r.summary());
}

/// Time from L1 having `/dev/kvm` to the first login prompt: comparable
/// between our VMM and QEMU booting the same disk in the same kind of L1.
fn print_l1_timing(who: &str, r: &RunResult) {
    let ready = r.time_to(MARK_L1_KVM_READY).unwrap_or_default();
    if let Some(login) = r.time_to(MARK_LOGIN) {
        println!(
            "{who}: first login prompt {:.1} s after L1 had /dev/kvm",
            login.saturating_sub(ready).as_secs_f64()
        );
    }
    for e in &r.events {
        println!("  {:>7.2}s  {}", e.at.as_secs_f64(), e.line.trim());
    }
}

/// The peer, for reference: QEMU (`-accel kvm`, the same kernel, initramfs,
/// command line and disk) boots the root disk once in the same kind of L1.
/// Not a test of ours, so `--ignored`:
/// `cargo test -p integration --test rootfs -- --ignored --nocapture`.
#[test]
#[ignore]
fn qemu_reference_boot_time() {
    let h = harness();
    let copy = h
        .build
        .join("rootfs")
        .join(format!("qemu-{}.ext4", std::process::id()));
    let _remove = RemoveOnDrop(copy.clone());
    let disk = RootDisk::prepare(h, &copy).unwrap_or_else(|e| panic!("root disk: {e}"));
    let run = disk.run(1).timeout(TIMEOUT);
    let cmdline = boot::cmdline(&[AUTOREBOOT_PARAM]);
    let mut args = qemu_l2_args(&run, l1::L2_KERNEL, l1::L2_INITRD, &cmdline, "kvm");
    args.push("-drive".into());
    args.push(format!(
        "file={},format=raw,if=virtio,cache=writeback",
        l1::disk_device(0)
    ));
    let qemu = host::qemu_binary().unwrap_or_else(|e| panic!("{e}"));
    let r = h
        .run_l1_payload(&run, L1Payload::Qemu { binary: qemu, args })
        .unwrap_or_else(|e| panic!("run: {e}"));
    check(
        r.console.contains(MARK_AUTOREBOOT),
        "QEMU: the guest never reached its login prompt",
        &r,
    );
    print_l1_timing("qemu", &r);
}
