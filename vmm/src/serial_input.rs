//! The user's keyboard for the guest: bytes read from the VMM's stdin go to
//! COM1's receive FIFO, so a login prompt on the serial console can be used.
//!
//! One thread polls stdin and the VM's stop event; it moves input only as
//! fast as the guest drains the 64-byte FIFO (nothing is dropped), and ends
//! at EOF or when the VM stops. When stdin is a terminal it is put in raw
//! mode (keys reach the guest unprocessed, Ctrl-C included) and restored by
//! [`RawTerminal`]'s drop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::SerialPort;
use vmm_sys_util::terminal::Terminal;

use crate::vcpu::VmStop;

/// How long to wait before retrying when the FIFO is full or nothing came.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Stdin in raw mode for as long as this lives (a no-op off a terminal).
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    pub fn enter() -> Self {
        let stdin = io::stdin().lock();
        let active = std::io::IsTerminal::is_terminal(&io::stdin()) && stdin.set_raw_mode().is_ok();
        Self { active }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

/// Puts a terminal on stdin back in canonical mode with echo, for an exit
/// that skips [`RawTerminal`]'s drop (a second stop signal).
pub fn restore_terminal() {
    if std::io::IsTerminal::is_terminal(&io::stdin()) {
        let _ = io::stdin().lock().set_canon_mode();
    }
}

/// Copies `input` into `serial` until EOF, an error, or `stop`.
pub fn pump(input: RawFd, serial: &Mutex<SerialPort>, stop: &VmStop) {
    let mut buf = [0u8; 64];
    while !stop.is_stopping() {
        let room = serial.lock().map_or(0, |s| s.input_room()).min(buf.len());
        if room == 0 {
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        match crate::fd_wait::readable(input, Some(POLL_INTERVAL)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("serial input: poll failed: {e}");
                return;
            }
        }
        // SAFETY: reads into a buffer we own, at most its length.
        let n = unsafe { libc::read(input, buf.as_mut_ptr().cast(), room) };
        match n {
            0 => return, // EOF: the guest just stops getting input
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    log::warn!("serial input: read failed: {e}");
                    return;
                }
            }
            n => {
                if let Ok(mut s) = serial.lock() {
                    s.enqueue_input(&buf[..n as usize]);
                }
            }
        }
    }
}

/// Starts the stdin pump thread for `serial`.
pub fn start(serial: Arc<Mutex<SerialPort>>, stop: Arc<VmStop>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Helper);
            pump(io::stdin().as_raw_fd(), &serial, &stop)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use std::io::Write;
    use vmm_sys_util::eventfd::EventFd;

    const RBR: u64 = 0;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn read_reg(s: &Mutex<SerialPort>, off: u64) -> u8 {
        let mut b = [0u8];
        s.lock().unwrap().read(0, off, &mut b);
        b[0]
    }

    #[test]
    fn piped_input_reaches_the_receive_fifo_without_loss_until_eof() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialPort::new(irq, Box::new(io::sink()))));
        let stop = VmStop::new().unwrap();
        let (rx, mut tx) = std::io::pipe().unwrap();
        // More than the FIFO holds: the pump must wait for the guest.
        let text: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        tx.write_all(&text).unwrap();
        drop(tx);
        let pump_serial = serial.clone();
        let pump_stop = stop.clone();
        let t = std::thread::spawn(move || pump(rx.as_raw_fd(), &pump_serial, &pump_stop));
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < text.len() && std::time::Instant::now() < deadline {
            if read_reg(&serial, LSR) & LSR_DATA_READY != 0 {
                got.push(read_reg(&serial, RBR));
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(got, text);
        t.join().unwrap(); // EOF ended it
    }

    #[test]
    fn stops_with_the_vm() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialPort::new(irq, Box::new(io::sink()))));
        let stop = VmStop::new().unwrap();
        let (rx, _tx) = std::io::pipe().unwrap();
        let (s2, st2) = (serial.clone(), stop.clone());
        let t = std::thread::spawn(move || pump(rx.as_raw_fd(), &s2, &st2));
        stop.stop(crate::vcpu::StopReason::Guest(0));
        t.join().unwrap();
    }
}
