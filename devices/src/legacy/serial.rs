//! The 16550A UART on COM1, built on vm-superio, with its interrupt line
//! delivered through an EventFd (an irqfd on the KVM side).

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// Eight byte-wide registers.
pub const SERIAL_LEN: u64 = 8;
/// Interrupt Enable Register offset and its transmitter-empty bit.
const IER: u8 = 1;
const IER_THRI: u8 = 0x02;

/// Raises an interrupt by writing to an EventFd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A serial port whose output goes to any writer (stdout, a file, a buffer).
pub struct SerialPort {
    inner: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Serial::new(EventFdTrigger(interrupt), out),
        }
    }

    /// Free space in the receive FIFO: how many input bytes fit now.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Whether the guest's driver still waits to send console output: it
    /// keeps the transmitter-empty interrupt enabled only while its own
    /// buffer holds bytes for the port. Asked once the vCPUs have stopped,
    /// so that a VM ending mid-output says why its console was cut short.
    pub fn guest_output_pending(&mut self) -> bool {
        self.inner.read(IER) & IER_THRI != 0
    }

    /// Queues bytes typed by the user for the guest to read.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(input).unwrap_or_else(|e| {
            log::warn!("serial input dropped: {e:?}");
            0
        })
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.inner.write(off, b) {
            log::warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_interrupts() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        // IER: enable THR-empty interrupt, then send "hi".
        port.write(COM1_BASE, 1, &[0x02]);
        port.write(COM1_BASE, 0, b"h");
        port.write(COM1_BASE, 0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn output_is_pending_while_the_driver_waits_to_send() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq, Box::new(io::sink()));
        assert!(!port.guest_output_pending());
        // The driver enables the THR-empty interrupt when its buffer fills
        // and disables it once everything has been sent.
        port.write(COM1_BASE, 1, &[0x03]);
        assert!(port.guest_output_pending());
        port.write(COM1_BASE, 0, b"x");
        port.write(COM1_BASE, 1, &[0x01]);
        assert!(!port.guest_output_pending());
    }

    #[test]
    fn received_bytes_are_readable() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq, Box::new(io::sink()));
        assert_eq!(port.enqueue_input(b"ok"), 2);
        let mut b = [0u8];
        port.read(COM1_BASE, 5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data-ready bit");
        port.read(COM1_BASE, 0, &mut b);
        assert_eq!(b[0], b'o');
    }
}
