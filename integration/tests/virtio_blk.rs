//! Nested end-to-end virtio-blk tests: the VMM's host (L1 in the nested
//! mode) creates raw images, our VMM gives them to the Debian guest as
//! `--disk`, guest scenarios (`blk-data`, `blk-multi`) check the data path,
//! and after the VMM exits the host checksums the image files and the test
//! compares them with what the guest reported. Needs the static VMM
//! (scripts/build-vmm-static.sh) and util-linux's `blkdiscard` on this host
//! (copied into the guest for `blkdiscard -z`, i.e. BLKZEROOUT).

use guest_image::Scenario;
use integration::disk::{
    self, DiskImage, Md5Range, MARK_GUEST_MD5_BLK as MARK_GUEST_MD5, MARK_HOST_BLOCKS,
    MARK_HOST_MD5,
};
use integration::harness::vmm_args_with;
use integration::testing::{check, harness, mode};
use integration::{GuestRun, RunResult, Verdict};
use std::path::Path;

/// Modules the guest loads for virtio-blk over virtio-pci.
const BLK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// util-linux blkdiscard (Debian 12 host), and where it goes in the guest.
const HOST_BLKDISCARD: &str = "/usr/sbin/blkdiscard";
const GUEST_BLKDISCARD: &str = "usr/local/sbin/blkdiscard";

/// Runs `run` with `disks` created by the VMM's host, printing the
/// `after` ranges once the VMM has exited.
fn run_with_disks(
    run: &GuestRun,
    disks: &[DiskImage],
    before: &[Md5Range],
    after: &[Md5Range],
) -> RunResult {
    let cmdline = run
        .l2_cmdline()
        .unwrap_or_else(|e| panic!("command line: {e}"));
    let r = harness()
        .run_vmm_script(run, mode(), |p| {
            let mut argv = vec![p.vmm.clone()];
            argv.extend(vmm_args_with(run, &cmdline, &p.kernel, &p.initrd));
            disk::blk_script(&p.scratch, disks, before, &argv, after)
        })
        .unwrap_or_else(|e| panic!("cannot run the guest: {e}"));
    eprintln!("{}", r.summary());
    r
}

fn passed(r: &RunResult) {
    check(!r.timed_out, "timed out", r);
    check(r.verdict == Verdict::Pass, "scenario did not pass", r);
    check(r.vmm_exit == Some(0), "VMM exit code is not 0", r);
    // What the guest and the host measured, for the test log.
    for l in r
        .console
        .lines()
        .filter(|l| l.contains("blk: ") || l.contains(MARK_GUEST_MD5) || l.contains("HOST-"))
    {
        eprintln!("  {}", l.trim_end());
    }
}

fn md5(r: &RunResult, mark: &str, tag: &str) -> String {
    disk::tagged(&r.console, mark, tag).unwrap_or_else(|| {
        check(false, &format!("no '{mark} {tag}' line"), r);
        unreachable!()
    })
}

const DATA_MIB: u64 = 64;
const PAT_OFF: u64 = 1;
const PAT_MIB: u64 = 8;
const DISC_OFF: u64 = 16;
const DISC_MIB: u64 = 4;
const WZ_OFF: u64 = 24;
const WZ_MIB: u64 = 4;

/// Issue 3: the guest sees /dev/vda of the right size, serial and queue
/// count; a random pattern written with O_DIRECT reads back after dropping
/// caches; discard and write-zeroes read back as zeroes; after the VM
/// exits the image file holds the same bytes the guest wrote, zeroes where
/// it discarded/zeroed, and the discarded range was deallocated.
#[test]
fn data_round_trips_to_the_image_file() {
    assert!(
        Path::new(HOST_BLKDISCARD).is_file(),
        "{HOST_BLKDISCARD} (util-linux) is needed for the guest's BLKZEROOUT"
    );
    let cpus = 2;
    let run = GuestRun::new(Scenario::load("blk-data").unwrap())
        .cpus(cpus)
        .modules(BLK_MODULES)
        .l2_binary(HOST_BLKDISCARD, GUEST_BLKDISCARD)
        .param("blk_bytes", DATA_MIB << 20)
        .param("blk_serial", "blk-data-0")
        .param("blk_queues", cpus)
        .param("pat_off", PAT_OFF)
        .param("pat_mib", PAT_MIB)
        .param("disc_off", DISC_OFF)
        .param("disc_mib", DISC_MIB)
        .param("wz_off", WZ_OFF)
        .param("wz_mib", WZ_MIB);
    let disks = [DiskImage::new("data.img", DATA_MIB).id("blk-data-0")];
    let r = run_with_disks(
        &run,
        &disks,
        &[],
        &[
            Md5Range::of("pattern", "data.img", PAT_OFF, PAT_MIB),
            Md5Range::of("discarded", "data.img", DISC_OFF, DISC_MIB),
            Md5Range::of("zeroed", "data.img", WZ_OFF, WZ_MIB),
            Md5Range::zeroes("zeroes-disc", DISC_MIB),
            Md5Range::zeroes("zeroes-wz", WZ_MIB),
        ],
    );
    passed(&r);
    check(
        r.console.contains("hardware queues=2 expected=2"),
        "guest did not report 2 queues",
        &r,
    );
    let guest = md5(&r, MARK_GUEST_MD5, "pattern");
    check(
        md5(&r, MARK_HOST_MD5, "pattern") == guest,
        "the image file does not hold the pattern the guest wrote",
        &r,
    );
    check(
        md5(&r, MARK_HOST_MD5, "discarded") == md5(&r, MARK_HOST_MD5, "zeroes-disc"),
        "the discarded range is not zero in the image file",
        &r,
    );
    check(
        md5(&r, MARK_HOST_MD5, "zeroed") == md5(&r, MARK_HOST_MD5, "zeroes-wz"),
        "the write-zeroed range is not zero in the image file",
        &r,
    );
    // The guest wrote PAT + DISC + WZ MiB to a sparse file; discard punches
    // a hole (README: "discard punches holes"), so at most PAT + WZ MiB
    // (plus slack for metadata) stay allocated.
    let blocks: u64 = md5(&r, MARK_HOST_BLOCKS, "data.img")
        .parse()
        .unwrap_or(u64::MAX);
    let allocated_mib = blocks * 512 / (1 << 20);
    eprintln!("data.img: {allocated_mib} MiB allocated after the run");
    check(
        allocated_mib < PAT_MIB + WZ_MIB + DISC_MIB,
        &format!("{allocated_mib} MiB allocated: discard did not deallocate"),
        &r,
    );
}

const RW_MIB: u64 = 32;
const RO_MIB: u64 = 16;
const RO_HEAD_MIB: u64 = 2;
const MULTI_PAT_MIB: u64 = 2;

/// Issue 3: two disks at once with distinct serials; the read-only one
/// refuses writes in the guest (and its image is unchanged on the host);
/// PCI remove + rescan and driver unbind + bind of the other keep its data
/// and it still writes afterwards, which the host sees in the image.
#[test]
fn two_disks_read_only_and_pci_rescan() {
    let run = GuestRun::new(Scenario::load("blk-multi").unwrap())
        .cpus(1)
        .modules(BLK_MODULES)
        .param("rw_serial", "blk-rw")
        .param("rw_bytes", RW_MIB << 20)
        .param("ro_serial", "blk-ro")
        .param("ro_bytes", RO_MIB << 20)
        .param("ro_mib", RO_HEAD_MIB)
        .param("pat_mib", MULTI_PAT_MIB);
    let disks = [
        DiskImage::new("rw.img", RW_MIB).id("blk-rw"),
        DiskImage::new("ro.img", RO_MIB)
            .id("blk-ro")
            .readonly()
            .random_head(RO_HEAD_MIB),
    ];
    let r = run_with_disks(
        &run,
        &disks,
        &[Md5Range::of("ro-before", "ro.img", 0, RO_HEAD_MIB)],
        &[
            Md5Range::of("ro-after", "ro.img", 0, RO_HEAD_MIB),
            Md5Range::of("before", "rw.img", 0, MULTI_PAT_MIB),
            Md5Range::of("after", "rw.img", MULTI_PAT_MIB, MULTI_PAT_MIB),
        ],
    );
    passed(&r);
    let ro_host = md5(&r, MARK_HOST_MD5, "ro-before");
    check(
        md5(&r, MARK_GUEST_MD5, "ro") == ro_host,
        "the guest read different bytes from the read-only disk",
        &r,
    );
    check(
        md5(&r, MARK_HOST_MD5, "ro-after") == ro_host,
        "the read-only image changed",
        &r,
    );
    for tag in ["before", "after"] {
        check(
            md5(&r, MARK_HOST_MD5, tag) == md5(&r, MARK_GUEST_MD5, tag),
            &format!("the image file does not hold the '{tag}' pattern"),
            &r,
        );
    }
}
