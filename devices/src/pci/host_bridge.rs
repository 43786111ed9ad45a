//! The host bridge at device 0 of bus 0. Linux's configuration mechanism #1
//! sanity check (`pci_sanity_check`) wants a host bridge or VGA class on bus 0.

use super::{PciConfig, PciDevice, PciFunction, PciIds};

/// Red Hat, Inc. vendor ID and its "QEMU PCIe host bridge" device ID.
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Class code: bridge device (0x06), host bridge (0x00) (PCI Code and ID §1).
pub const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// A host bridge function with no BARs.
pub struct HostBridge {
    function: PciFunction,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            function: PciFunction::new(PciConfig::new(PciIds {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                revision: 0,
                class_code: CLASS_HOST_BRIDGE,
                subsystem_vendor_id: HOST_BRIDGE_VENDOR,
                subsystem_id: 0x1100,
            })),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn function(&self) -> &PciFunction {
        &self.function
    }
    fn function_mut(&mut self) -> &mut PciFunction {
        &mut self.function
    }
    fn bar_read(&mut self, _index: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _index: u8, _offset: u64, _data: &[u8]) {}
}
