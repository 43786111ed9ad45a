//! Legacy PC devices: the 16550 serial port, the CMOS real-time clock, the i8042 keyboard controller
//! (only as the guest's reset line) and a debug-exit port for test verdicts.

mod cmos;
mod debug_exit;
mod i8042;
#[cfg(test)]
mod random_port_io;
mod serial;

pub use cmos::{Cmos, CMOS_LEN, CMOS_PORT};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT};
pub use i8042::{I8042, I8042_DATA_PORT, I8042_LEN};
pub use serial::{EventFdTrigger, SerialPort, COM1_BASE, COM1_IRQ, SERIAL_LEN};

/// How a legacy device tells the VMM that the guest asked it to stop.
pub trait StopRequest: Send + Sync {
    /// The guest wants the VM to end with process exit status `code`.
    fn request_stop(&self, code: i32);

    /// The guest reset the machine (reboot, or a panic's reboot: the VMM
    /// tells them apart). Without an override, a stop with status 0.
    fn request_reset(&self) {
        self.request_stop(0);
    }
}
