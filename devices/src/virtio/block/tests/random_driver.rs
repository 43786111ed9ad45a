//! A driver that writes garbage into the virtqueue: seeded random
//! descriptors (addresses in and out of memory, any length, any flags
//! including INDIRECT, any next index), random request headers and random
//! heads and avail indexes. Every queue run must finish within a bound,
//! complete no more chains than one ring's budget and account for each one
//! in the used ring; nothing may panic; a read-only image never changes and
//! no image grows.

use std::time::{Duration, Instant};

use super::*;
use crate::test_rng::Rng;

const SEEDS: u64 = 30;
const STEPS: usize = 300;
/// Bound on one queue run (a debug build on a loaded machine).
const RUN_BOUND: Duration = Duration::from_secs(5);
/// Request types, valid and not.
const TYPES: &[u32] = &[
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
    99,
];

/// A descriptor address: near the fixture's buffers, anywhere in memory,
/// at its very end, or outside it.
fn random_addr(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => rng.next(),
        1 => MEM_SIZE as u64 - rng.below(600),
        2 => rng.below(MEM_SIZE as u64),
        _ => rng.pick(&[HDR, DATA, STATUS]) + rng.below(4) * 512,
    }
}

fn random_len(rng: &mut Rng) -> u32 {
    match rng.below(6) {
        0 => rng.u32(),
        1 => rng.below(17) as u32,
        2 => 1,
        _ => rng.below(9) as u32 * 512,
    }
}

/// One round: scribble descriptors and a header, publish heads, run the
/// queue and check what it reports against the used ring. Returns the
/// chains completed and how many of them the device wrote data into
/// (reads and GET_ID that got through the checks).
fn round(f: &mut Fixture, rng: &mut Rng, seed: u64, n: usize) -> (u32, u32) {
    let m = f.mem.memory();
    for _ in 0..1 + rng.below(4) {
        let idx = rng.below(u64::from(QSIZE)) as u16;
        let flags = rng.below(8) as u16; // NEXT, WRITE, INDIRECT in any mix
        let next = if rng.chance(90) {
            rng.below(u64::from(QSIZE)) as u16
        } else {
            rng.next() as u16
        };
        f.rings[0].write_desc(&m, idx, random_addr(rng), random_len(rng), flags, next);
    }
    let sector = if rng.chance(80) {
        rng.below(IMAGE_SECTORS + 4)
    } else {
        rng.next()
    };
    m.write_obj(rng.pick(TYPES), GuestAddress(HDR)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    if rng.chance(30) {
        // Discard / write-zeroes segments with random fields.
        let seg = rng.bytes(32);
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
    }
    if rng.chance(50) {
        // A request shaped as a driver builds one (header, data, status),
        // in either direction, often with one field then spoiled.
        let len = rng.below(5) as u32 * 512;
        let writable = rng.chance(50);
        let head = f.rings[0].write_chain(
            &m,
            &[(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)],
        );
        if rng.chance(30) {
            let idx = (head + rng.below(3) as u16) % QSIZE;
            let field = f.rings[0].desc + 16 * u64::from(idx) + rng.pick(&[0u64, 8, 12, 14]);
            m.write_obj(rng.next() as u16, GuestAddress(field)).unwrap();
        }
        f.rings[0].publish(&m, head);
    }
    let published = rng.below(3) as u16;
    for _ in 0..published {
        let head = if rng.chance(90) {
            rng.below(u64::from(QSIZE)) as u16
        } else {
            rng.next() as u16
        };
        f.rings[0].publish(&m, head);
    }
    if rng.chance(3) {
        // A bogus avail index (far ahead or behind).
        m.write_obj(rng.next() as u16, GuestAddress(f.rings[0].avail + 2))
            .unwrap();
    }
    let before = f.rings[0].used_idx(&m);
    let t = Instant::now();
    let stats = f.worker.process_queue(0);
    let took = t.elapsed();
    assert!(took < RUN_BOUND, "seed {seed} round {n}: {took:?}");
    assert!(
        stats.completed <= u32::from(QSIZE),
        "seed {seed} round {n}: {stats:?}"
    );
    let after = f.rings[0].used_idx(&m);
    assert_eq!(
        after.wrapping_sub(before),
        stats.completed as u16,
        "seed {seed} round {n}: used index vs completed chains"
    );
    let mut with_data = 0;
    for i in 0..stats.completed as u16 {
        let (id, len) = f.rings[0].used_elem(&m, before.wrapping_add(i));
        assert!(id < u32::from(QSIZE), "seed {seed} round {n}: used id {id}");
        with_data += u32::from(len > 1);
    }
    (stats.completed, with_data)
}

#[test]
fn random_descriptors_never_panic_hang_or_touch_a_read_only_image() {
    let (mut completed, mut with_data) = (0u32, 0u32);
    for seed in 0..SEEDS {
        let readonly = seed % 2 == 0;
        let mut f = fixture_with(readonly, ALL, 1);
        let original = f.image.bytes();
        let mut rng = Rng::new(seed);
        for n in 0..STEPS {
            let (c, d) = round(&mut f, &mut rng, seed, n);
            completed += c;
            with_data += d;
        }
        let now = f.image.bytes();
        assert_eq!(now.len(), original.len(), "seed {seed}: the image grew");
        if readonly {
            assert!(now == original, "seed {seed}: a read-only image changed");
        }
    }
    eprintln!("{completed} chains completed, {with_data} with data");
    // The garbage reached the request handlers, not only the ring checks.
    assert!(completed > 1000, "only {completed} chains completed");
    assert!(with_data > 100, "only {with_data} chains got data");
}
