//! The balloon's host side on real userfaultfd-paged guest RAM (no KVM):
//! discards through `GuestRamSink` leave the pager's resident count and the
//! host's page tables, free swap slots, and read back as zeroes. Needs root
//! or /dev/userfaultfd.

use devices::virtio::balloon::BalloonSink;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::balloon::GuestRamSink;
use vmm::memory::{Pager, PagerConfig, PAGE_SIZE};

const MIB: usize = 1 << 20;

fn mincore_resident(mem: &GuestMemoryMmap, len: usize) -> usize {
    let base = mem.get_host_address(GuestAddress(0)).unwrap();
    let mut v = vec![0u8; len / PAGE_SIZE];
    // SAFETY: [base, base + len) is the test's guest RAM mapping, alive for
    // the call; mincore writes one byte per page into `v`.
    let rc = unsafe { libc::mincore(base.cast(), len, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|&&b| b & 1 != 0).count()
}

fn pager(mem: &GuestMemoryMmap, limit: usize, tag: &str) -> (Pager, std::path::PathBuf) {
    let swap = std::env::temp_dir().join(format!(
        "vmm-balloon-sink-{tag}-{}.swap",
        std::process::id()
    ));
    let cfg = PagerConfig::new(limit as u64, &swap, devices::block::Volume::new("swap"));
    let pager = Pager::start(&cfg, mem).expect("pager start (needs userfaultfd)");
    (pager, swap)
}

#[test]
fn discards_through_the_pager_leave_residency_and_read_zero() {
    let ram = 16 * MIB;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram)]).unwrap();
    // No overcommit: every touched page stays resident.
    let (pager, swap) = pager(&mem, ram, "resident");
    let sink = GuestRamSink::new(mem.clone(), Some(&pager.probe()));
    let filler = vec![0x5au8; 8 * MIB];
    mem.write_slice(&filler, GuestAddress(0)).unwrap();
    let before = pager.stats();
    let host_before = mincore_resident(&mem, ram);
    assert!(before.resident_pages >= 2048, "{before:?}");
    assert!(host_before >= 2048, "{host_before}");

    // The balloon hands over 4 MiB in two runs (from this thread, which is
    // not the pager's fault handler).
    assert_eq!(sink.discard(0, 2 * MIB as u64).unwrap(), 512);
    assert_eq!(sink.discard(4 * MIB as u64, 2 * MIB as u64).unwrap(), 512);
    let after = pager.stats();
    assert_eq!(after.counters.discarded_pages, 1024);
    assert_eq!(
        before.resident_pages - after.resident_pages,
        1024,
        "{after:?}"
    );
    let host_after = mincore_resident(&mem, ram);
    assert_eq!(host_before - host_after, 1024, "the host agrees");

    let mut b = [0xffu8; 64];
    mem.read_slice(&mut b, GuestAddress(MIB as u64)).unwrap();
    assert_eq!(b, [0; 64], "a discarded page reads zeroes");
    mem.read_slice(&mut b, GuestAddress(3 * MIB as u64))
        .unwrap();
    assert_eq!(b, [0x5a; 64], "between the runs: kept");
    // Deflate and reuse: the guest writes the pages again.
    mem.write_slice(&filler[..2 * MIB], GuestAddress(0))
        .unwrap();
    mem.read_slice(&mut b, GuestAddress(MIB as u64)).unwrap();
    assert_eq!(b, [0x5a; 64]);
    assert!(
        sink.discard(64 * MIB as u64, 4096).is_err(),
        "not guest RAM"
    );

    drop(sink);
    pager.stop();
    let _ = std::fs::remove_file(swap);
}

#[test]
fn discarding_swapped_pages_frees_their_slots() {
    let ram = 16 * MIB;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram)]).unwrap();
    let (pager, swap) = pager(&mem, MIB, "swapped");
    let sink = GuestRamSink::new(mem.clone(), Some(&pager.probe()));
    mem.write_slice(&vec![7u8; 8 * MIB], GuestAddress(0))
        .unwrap();
    // Let writeback settle.
    let mut used = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let now = pager.stats().swap_slots_used;
        if now == used && now > 0 {
            break;
        }
        used = now;
    }
    assert!(used >= 1500, "swap slots used {used}");
    assert_eq!(sink.discard(0, 8 * MIB as u64).unwrap(), 2048);
    let s = pager.stats();
    assert!(s.swap_slots_used < 64, "slots left: {}", s.swap_slots_used);
    let mut b = [1u8; 32];
    mem.read_slice(&mut b, GuestAddress(5 * MIB as u64))
        .unwrap();
    assert_eq!(b, [0; 32]);
    drop(sink);
    pager.stop();
    let _ = std::fs::remove_file(swap);
}
