//! Seeded random port I/O to every legacy device on one bus (COM1, the
//! i8042, the CMOS RTC, the debug-exit port): any port near them, any
//! width, any value. Nothing may panic, and afterwards each device still
//! does its job: COM1 transmits, the CMOS clock reads as BCD, the i8042
//! still answers its self-test.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::i8042::tests::Stops;
use super::serial::tests::Sink;
use super::*;
use crate::bus::Bus;
use crate::test_rng::Rng;

/// Ports the accesses go to: each device's range and a little around it.
const AROUND: &[(u64, u64)] = &[
    (COM1_BASE, SERIAL_LEN),
    (I8042_DATA_PORT, I8042_LEN),
    (CMOS_PORT, CMOS_LEN),
    (DEBUG_EXIT_PORT, 1),
];

fn read8(bus: &Bus, port: u64) -> u8 {
    let mut b = [0u8; 1];
    bus.read(port, &mut b);
    b[0]
}

#[test]
fn random_port_io_never_panics_and_every_device_still_works() {
    for seed in 0..20 {
        let sink = Sink::default();
        let stops = Arc::new(Stops::default());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = Bus::new();
        let serial = SerialPort::new(irq, Box::new(sink.clone()));
        bus.insert(Arc::new(Mutex::new(serial)), COM1_BASE, SERIAL_LEN)
            .unwrap();
        bus.insert(
            Arc::new(Mutex::new(I8042::new(stops.clone()))),
            I8042_DATA_PORT,
            I8042_LEN,
        )
        .unwrap();
        bus.insert(Arc::new(Mutex::new(Cmos::new())), CMOS_PORT, CMOS_LEN)
            .unwrap();
        bus.insert(
            Arc::new(Mutex::new(DebugExit::new(stops.clone()))),
            DEBUG_EXIT_PORT,
            1,
        )
        .unwrap();
        let mut rng = Rng::new(seed);
        for _ in 0..5000 {
            let (base, len) = rng.pick(AROUND);
            let port = (base + rng.below(len + 4)).saturating_sub(2);
            let width = rng.pick(&[1usize, 2, 4]);
            if rng.chance(50) {
                bus.write(port, &rng.bytes(width));
            } else {
                bus.read(port, &mut vec![0u8; width]);
            }
        }
        // COM1: 8N1 with DLAB clear and no loopback, then a byte goes out.
        bus.write(COM1_BASE + 3, &[0x03]);
        bus.write(COM1_BASE + 4, &[0x00]);
        let before = sink.0.lock().unwrap().len();
        bus.write(COM1_BASE, b"Z");
        let out = sink.0.lock().unwrap();
        assert_eq!(out.len(), before + 1, "seed {seed}: COM1 did not transmit");
        assert_eq!(out.last(), Some(&b'Z'), "seed {seed}");
        drop(out);
        // CMOS: binary mode may have been chosen (register B bit 2); choose
        // BCD again and the seconds read as BCD.
        bus.write(CMOS_PORT, &[0x0b]);
        bus.write(CMOS_PORT + 1, &[0x02]);
        bus.write(CMOS_PORT, &[0x00]);
        let sec = read8(&bus, CMOS_PORT + 1);
        assert!(
            sec >> 4 <= 5 && sec & 0xf <= 9,
            "seed {seed}: seconds {sec:#x} are not BCD"
        );
        // i8042: drain the output buffer, then the controller self-test.
        for _ in 0..32 {
            if read8(&bus, I8042_DATA_PORT + 4) & 1 == 0 {
                break;
            }
            read8(&bus, I8042_DATA_PORT);
        }
        bus.write(I8042_DATA_PORT + 4, &[0xaa]);
        assert_eq!(
            read8(&bus, I8042_DATA_PORT),
            0x55,
            "seed {seed}: i8042 self-test"
        );
    }
}
