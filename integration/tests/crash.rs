//! Crash consistency (issue 17): the guest writes 4 KiB blocks with
//! O_DIRECT + fsync to a virtio-blk disk and a USB mass-storage disk and
//! logs each block once fsync (FLUSH / SYNCHRONIZE CACHE) has returned; the
//! L1 script kills the VMM with SIGKILL in the middle of that, starts it
//! again on the same images, and the guest reads every block back. Every
//! block the first run acknowledged must read back exactly as written.
//! Each round kills at a different moment (a random delay after a minimum
//! number of acknowledged blocks).
//!
//! CI runs two rounds; `cargo test -p integration --test crash -- --ignored`
//! runs ten in one L1 boot.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use guest_image::Scenario;
use integration::disk::{self, DiskImage, OPT_USB_STORAGE, OPT_VIRTIO_BLK};
use integration::harness::vmm_args_with;
use integration::l1::sh_quote;
use integration::testing::{check, harness, mode, nested};
use integration::usb::{guest_usb_lib, GUEST_MODULES};
use integration::{GuestRun, RunResult, Verdict};

/// Blocks per disk the guest would write if never killed: far more than
/// are written before the kill.
const BLOCKS: u32 = 2000;
/// What the L1 script puts in the verifier's command line for the number of
/// blocks to read back: the highest acknowledged block + 3 (a block or two
/// past what was acknowledged may hold anything).
const UPTO: &str = "@UPTO@";
/// Acknowledged USB blocks the script waits for before the kill.
const MIN_ACKS: u32 = 8;
/// The USB disk's serial (its `id`).
const USB_SERIAL: &str = "crash-usb";
/// Marks the L1 script prints.
const MARK_ROUND: &str = "CRASH-ROUND";
const MARK_KILLED_RC: &str = "CRASH-KILLED-RC";
const MARK_VERIFY_RC: &str = "CRASH-VERIFY-RC";

#[test]
fn acknowledged_writes_survive_sigkill() {
    crash_rounds(2);
}

#[test]
#[ignore = "longer variant: run on demand with --ignored"]
fn acknowledged_writes_survive_sigkill_ten_rounds() {
    crash_rounds(10);
}

fn crash_rounds(rounds: u32) {
    if !nested() {
        return;
    }
    let mut base = GuestRun::new(Scenario::load("crash-write").unwrap())
        .cpus(1)
        .memory_mib(512)
        .param("usb_serial", USB_SERIAL)
        .timeout(Duration::from_secs(600 + 300 * u64::from(rounds)));
    base.modules = ["virtio_pci", "virtio_blk"]
        .iter()
        .chain(GUEST_MODULES)
        .map(|m| m.to_string())
        .collect();
    base.l2_files.push(guest_usb_lib());
    let write = base.clone().param("mode", "write").param("blocks", BLOCKS);
    let verify_cmdline = base
        .param("mode", "verify")
        .param("blocks", UPTO)
        .l2_cmdline()
        .unwrap();
    let write_cmdline = write.l2_cmdline().unwrap();
    let blk = [DiskImage::new("crash-blk.img", 16)];
    let usb = [DiskImage::with_id(USB_SERIAL, 16)];

    let r = harness()
        .run_vmm_script(&write, mode(), |p| {
            let vmm_line = |cmdline: &str| {
                let mut argv = vec![p.vmm.clone()];
                argv.extend(vmm_args_with(&write, cmdline, &p.kernel, &p.initrd));
                argv.extend(disk::vmm_disk_args(OPT_VIRTIO_BLK, &p.scratch, &blk));
                argv.extend(disk::vmm_disk_args(OPT_USB_STORAGE, &p.scratch, &usb));
                argv.iter()
                    .map(|a| sh_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            kill_script(
                &p.scratch,
                &blk,
                &usb,
                &vmm_line(&write_cmdline),
                &vmm_line(&verify_cmdline),
                rounds,
            )
        })
        .unwrap_or_else(|e| panic!("cannot run the guest: {e}"));
    eprintln!("{}", r.summary());
    check(!r.timed_out, "timed out", &r);

    let consoles: Vec<&str> = r.console.split(MARK_ROUND).skip(1).collect();
    check(
        consoles.len() == rounds as usize,
        &format!("{} of {rounds} rounds ran", consoles.len()),
        &r,
    );
    let mut verified = 0;
    for (n, round) in consoles.iter().enumerate() {
        verified += check_round(n + 1, round, &r);
    }
    check(
        r.verdict == Verdict::Pass,
        "the last verify run did not pass",
        &r,
    );
    eprintln!("crash: {rounds} rounds, {verified} acknowledged blocks read back intact");
}

/// The L1 script: for each round, run the writer in the background with
/// its console in a file, wait for `MIN_ACKS` acknowledged USB blocks,
/// wait a random fraction of a second more, SIGKILL it, print its console,
/// then run the verifier on the same images (its command line, with
/// [`UPTO`] filled in, kept in a file).
fn kill_script(
    dir: &str,
    blk: &[DiskImage],
    usb: &[DiskImage],
    writer: &str,
    verifier: &str,
    rounds: u32,
) -> String {
    let mut s = String::new();
    for d in blk.iter().chain(usb) {
        s.push_str(&d.create_lines(dir));
    }
    let log = format!("{dir}/crash-writer.log");
    let template = format!("{dir}/crash-verify.tmpl");
    let _ = write!(
        s,
        "# L1's kernel messages on the console would split the lines printed below.\n\
         echo 1 > /proc/sys/kernel/printk\n\
         cat > {template} <<'VERIFIER'\n{verifier}\nVERIFIER\n\
         r=1\n\
         while [ $r -le {rounds} ]; do\n\
         echo \"{MARK_ROUND} $r\"\n\
         : > {log}\n\
         {writer} > {log} 2>&1 </dev/null &\n\
         pid=$!\n\
         t=0\n\
         while [ \"$(grep -c 'CRASH-ACK usb ' {log})\" -lt {MIN_ACKS} ] && kill -0 $pid 2>/dev/null && [ $t -lt 3000 ]; do\n\
         \x20 sleep 0.1; t=$((t + 1))\n\
         done\n\
         sleep $(awk 'BEGIN {{ srand(); printf \"%.2f\", rand() }}')\n\
         kill -9 $pid\n\
         wait $pid\n\
         echo \"{MARK_KILLED_RC}=$?\"\n\
         cat {log}\n\
         upto=$(grep -o 'CRASH-ACK [a-z]* [0-9]*' {log} | awk '{{ if ($3 + 0 > m) m = $3 + 0 }} END {{ print m + 3 }}')\n\
         sed \"s/{UPTO}/$upto/\" {template} > {dir}/crash-verify.sh\n\
         sh {dir}/crash-verify.sh </dev/null\n\
         rc=$?\n\
         echo \"{MARK_VERIFY_RC}=$rc\"\n\
         [ $rc -eq 0 ] || exit $rc\n\
         r=$((r + 1))\n\
         done\n\
         exit 0\n"
    );
    s
}

/// The number after `mark` (`MARK=N`) in `text`.
fn rc_after(text: &str, mark: &str) -> Option<i32> {
    let key = format!("{mark}=");
    let at = text.find(&key)? + key.len();
    text[at..].split_whitespace().next()?.parse().ok()
}

/// `(disk, block) -> md5` of the lines `MARK disk block md5`.
fn blocks(text: &str, mark: &str) -> HashMap<(String, u32), String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l[l.find(mark)? + mark.len()..].split_whitespace();
            let disk = w.next()?.to_string();
            let block = w.next()?.parse().ok()?;
            let md5 = w.next()?;
            let md5_like = md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit());
            md5_like.then(|| ((disk, block), md5.to_string()))
        })
        .collect()
}

/// Checks one round's console; the number of acknowledged blocks verified.
fn check_round(n: usize, text: &str, r: &RunResult) -> usize {
    let what = |s: &str| format!("round {n}: {s}");
    check(
        rc_after(text, MARK_KILLED_RC) == Some(128 + 9),
        &what("the writer VMM did not die of SIGKILL"),
        r,
    );
    check(
        !text.contains("crash: all"),
        &what("the writer finished before the kill: raise BLOCKS"),
        r,
    );
    check(
        rc_after(text, MARK_VERIFY_RC) == Some(0),
        &what("the VMM restarted on the killed VMM's images did not run the verifier to the end"),
        r,
    );
    let acked = blocks(text, "CRASH-ACK ");
    let read = blocks(text, "CRASH-READ ");
    for disk in ["vda", "usb"] {
        let n_acked = acked.keys().filter(|(d, _)| d == disk).count();
        check(
            n_acked >= MIN_ACKS as usize,
            &what(&format!("only {n_acked} blocks of {disk} acknowledged")),
            r,
        );
        let last_acked = acked
            .keys()
            .filter(|(d, _)| d == disk)
            .map(|(_, b)| *b)
            .max()
            .unwrap_or(0);
        let n_read = read.keys().filter(|(d, _)| d == disk).count();
        check(
            n_read > last_acked as usize,
            &what(&format!(
                "{n_read} blocks of {disk} read back, up to block {last_acked} acknowledged"
            )),
            r,
        );
    }
    for ((disk, block), md5) in &acked {
        let got = read.get(&(disk.clone(), *block));
        check(
            got == Some(md5),
            &what(&format!(
                "{disk} block {block}: acknowledged {md5}, read back {got:?}"
            )),
            r,
        );
    }
    eprintln!(
        "crash: round {n}: {} blocks acknowledged before the kill, all intact",
        acked.len()
    );
    acked.len()
}

#[test]
fn block_lines_are_parsed_per_disk() {
    let text = "x CRASH-ACK vda 0 0123456789abcdef0123456789abcdef\n\
                CRASH-ACK usb 0 fedcba9876543210fedcba9876543210\r\n\
                CRASH-ACK usb 1 short\n\
                CRASH-ACK usb 2 0123456789abcdef0123456789abcde[\n\
                [ 3.2] noise\n";
    let b = blocks(text, "CRASH-ACK ");
    assert_eq!(b.len(), 2);
    assert_eq!(
        b[&("usb".to_string(), 0)],
        "fedcba9876543210fedcba9876543210"
    );
    assert_eq!(rc_after("CRASH-KILLED-RC=137\n", MARK_KILLED_RC), Some(137));
    assert_eq!(rc_after("nothing", MARK_KILLED_RC), None);
}
