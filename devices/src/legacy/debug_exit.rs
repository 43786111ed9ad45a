//! A one-byte port through which a guest ends the VM with a chosen exit status.
//!
//! Writing byte `v` to port 0xf4 stops the VM and the VMM exits with status
//! `v` (0 = success). Test scenarios report their verdict this way; unlike
//! QEMU's isa-debug-exit the value is passed through unchanged.

use std::sync::Arc;

use super::StopRequest;
use crate::bus::BusDevice;

/// The port, as QEMU's isa-debug-exit uses by convention.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

pub struct DebugExit {
    stop: Arc<dyn StopRequest>,
}

impl DebugExit {
    pub fn new(stop: Arc<dyn StopRequest>) -> Self {
        Self { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        // Only the low byte counts, whatever the access width.
        if let Some(&code) = data.first() {
            log::info!("guest wrote {code} to the debug-exit port");
            self.stop.request_stop(i32::from(code));
        }
    }
}
