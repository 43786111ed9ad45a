//! Just enough of the i8042 keyboard controller for Linux to find it quickly
//! and to reset the machine through it (`reboot=k`).
//!
//! Controller commands answered: read/write the command byte (0x20/0x60),
//! self test (0xAA → 0x55), port tests (0xAB/0xA9 → 0), output port
//! (0xD0/0xD1) and pulse reset (0xFE). Keyboard data bytes are acknowledged
//! (0xFA) so no probe waits for a timeout. There is no keyboard input.

use std::collections::VecDeque;
use std::sync::Arc;

use super::StopRequest;
use crate::bus::BusDevice;

/// Data port; the status/command port is `I8042_DATA_PORT + 4`.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Span from the data port through the command port (0x60..=0x64).
pub const I8042_LEN: u64 = 5;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xA7;
const CMD_ENABLE_AUX: u8 = 0xA8;
const CMD_TEST_AUX: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_TEST_KBD: u8 = 0xAB;
const CMD_DISABLE_KBD: u8 = 0xAD;
const CMD_ENABLE_KBD: u8 = 0xAE;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_PULSE_RESET: u8 = 0xFE;

const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xFA;
const KBD_RESET: u8 = 0xFF;
const KBD_SELF_TEST_OK: u8 = 0xAA;
/// Output-port bit 0 low means "hold the CPU in reset".
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;

pub struct I8042 {
    stop: Arc<dyn StopRequest>,
    status: u8,
    ctr: u8,
    output_port: u8,
    /// A command whose parameter byte comes on the data port next.
    pending: Option<u8>,
    output: VecDeque<u8>,
}

impl I8042 {
    pub fn new(stop: Arc<dyn StopRequest>) -> Self {
        Self {
            stop,
            status: STATUS_SYSTEM_FLAG,
            ctr: 0,
            output_port: OUTPUT_PORT_RESET_LINE,
            pending: None,
            output: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8) {
        // A real controller holds one byte; a small bound keeps a misbehaving
        // guest from growing the queue.
        if self.output.len() < 16 {
            self.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_empty() {
            0
        } else {
            STATUS_OUTPUT_FULL
        };
        self.status | full
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0),
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            CMD_PULSE_RESET => self.reset(),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            other => log::debug!("i8042: ignoring controller command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET_LINE == 0 {
                    self.reset();
                }
            }
            _ => {
                self.push(KBD_ACK);
                if byte == KBD_RESET {
                    self.push(KBD_SELF_TEST_OK);
                }
            }
        }
    }

    fn reset(&mut self) {
        log::info!("guest reset the machine through the i8042 controller");
        self.stop.request_reset();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => self.output.pop_front().unwrap_or(0),
            OFFSET_COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            OFFSET_DATA => self.data(byte),
            OFFSET_COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct Stops(pub(crate) Mutex<Vec<i32>>);
    impl StopRequest for Stops {
        fn request_stop(&self, code: i32) {
            self.0.lock().unwrap().push(code);
        }
        fn request_reset(&self) {
            self.0.lock().unwrap().push(-1);
        }
    }

    fn rd(dev: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(0x60, off, &mut b);
        b[0]
    }

    #[test]
    fn answers_linux_probe_sequence() {
        let stops = Arc::new(Stops::default());
        let mut dev = I8042::new(stops.clone());
        assert_eq!(rd(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        dev.write(0x60, 4, &[CMD_SELF_TEST]);
        assert_ne!(rd(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(rd(&mut dev, 0), SELF_TEST_OK);
        dev.write(0x60, 4, &[CMD_WRITE_CTR]);
        dev.write(0x60, 0, &[0x47]);
        dev.write(0x60, 4, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut dev, 0), 0x47);
        dev.write(0x60, 0, &[KBD_RESET]);
        assert_eq!(rd(&mut dev, 0), KBD_ACK);
        assert_eq!(rd(&mut dev, 0), KBD_SELF_TEST_OK);
        assert_eq!(rd(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        assert!(stops.0.lock().unwrap().is_empty());
    }

    #[test]
    fn pulse_reset_and_output_port_reset_stop_the_vm() {
        let stops = Arc::new(Stops::default());
        let mut dev = I8042::new(stops.clone());
        dev.write(0x60, 4, &[CMD_PULSE_RESET]);
        dev.write(0x60, 4, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(0x60, 0, &[0xfe]);
        assert_eq!(*stops.0.lock().unwrap(), vec![-1, -1], "two resets");
    }

    #[test]
    fn output_queue_is_bounded() {
        let mut dev = I8042::new(Arc::new(Stops::default()));
        for _ in 0..1000 {
            dev.write(0x60, 0, &[0x00]);
        }
        assert_eq!(dev.output.len(), 16);
    }
}
