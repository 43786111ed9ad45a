//! The legacy PC devices on their port bus (COM1, the i8042, the CMOS RTC,
//! the debug-exit port): port reads and writes of any width at any port
//! near them, as a guest's `in`/`out` instructions reach them. Nothing may
//! panic, and afterwards each device still does its job: COM1 transmits,
//! the clock reads as BCD once BCD is chosen, the i8042 passes its
//! self-test.

#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{
    Cmos, DebugExit, SerialPort, StopRequest, CMOS_LEN, CMOS_PORT, COM1_BASE, DEBUG_EXIT_PORT,
    I8042, I8042_DATA_PORT, I8042_LEN, SERIAL_LEN,
};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::Arbitrary;
use vmm_sys_util::eventfd::EventFd;

/// Each device's ports and a little around them.
const AROUND: &[(u64, u64)] = &[
    (COM1_BASE, SERIAL_LEN),
    (I8042_DATA_PORT, I8042_LEN),
    (CMOS_PORT, CMOS_LEN),
    (DEBUG_EXIT_PORT, 1),
];

#[derive(Debug, Arbitrary)]
struct Access {
    device: u8,
    /// Offset from two ports below the device's range.
    offset: u8,
    /// 1, 2 or 4 bytes (by `width % 3`).
    width: u8,
    write: Option<u32>,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the tail only: a long input must not grow it without bound.
        if out.len() > 1 << 16 {
            out.clear();
        }
        out.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Stops;

impl StopRequest for Stops {
    fn request_stop(&self, _code: i32) {}
}

fn read8(bus: &Bus, port: u64) -> u8 {
    let mut b = [0u8; 1];
    bus.read(port, &mut b);
    b[0]
}

fuzz_target!(|accesses: Vec<Access>| {
    let sink = Sink::default();
    let stops: Arc<dyn StopRequest> = Arc::new(Stops);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let bus = Bus::new();
    let serial = SerialPort::new(irq, Box::new(sink.clone()));
    bus.insert(Arc::new(Mutex::new(serial)), COM1_BASE, SERIAL_LEN)
        .expect("COM1");
    bus.insert(
        Arc::new(Mutex::new(I8042::new(stops.clone()))),
        I8042_DATA_PORT,
        I8042_LEN,
    )
    .expect("i8042");
    bus.insert(Arc::new(Mutex::new(Cmos::new())), CMOS_PORT, CMOS_LEN)
        .expect("CMOS");
    bus.insert(
        Arc::new(Mutex::new(DebugExit::new(stops))),
        DEBUG_EXIT_PORT,
        1,
    )
    .expect("debug exit");
    for a in accesses.iter().take(4096) {
        let (base, len) = AROUND[usize::from(a.device) % AROUND.len()];
        let port = (base + u64::from(a.offset) % (len + 4)).saturating_sub(2);
        let width = [1usize, 2, 4][usize::from(a.width) % 3];
        // Whether a device took the access does not matter here.
        let _ = match a.write {
            Some(v) => bus.write(port, &v.to_le_bytes()[..width]),
            None => bus.read(port, &mut [0u8; 4][..width]),
        };
    }
    // COM1: 8N1, DLAB clear, no loopback: a byte goes out.
    bus.write(COM1_BASE + 3, &[0x03]);
    bus.write(COM1_BASE + 4, &[0x00]);
    sink.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    bus.write(COM1_BASE, b"Z");
    assert_eq!(
        sink.0.lock().unwrap_or_else(|e| e.into_inner()).as_slice(),
        b"Z",
        "COM1 did not transmit"
    );
    // CMOS: choose BCD and 24-hour mode; the seconds read as BCD.
    bus.write(CMOS_PORT, &[0x0b]);
    bus.write(CMOS_PORT + 1, &[0x02]);
    bus.write(CMOS_PORT, &[0x00]);
    let sec = read8(&bus, CMOS_PORT + 1);
    assert!(sec >> 4 <= 5 && sec & 0xf <= 9, "seconds {sec:#x} not BCD");
    // i8042: drain its output buffer, then the controller self-test.
    for _ in 0..32 {
        if read8(&bus, I8042_DATA_PORT + 4) & 1 == 0 {
            break;
        }
        read8(&bus, I8042_DATA_PORT);
    }
    bus.write(I8042_DATA_PORT + 4, &[0xaa]);
    assert_eq!(read8(&bus, I8042_DATA_PORT), 0x55, "i8042 self-test");
});
