//! A USB mass-storage disk: Bulk-Only Transport (class 0x08, subclass 0x06
//! SCSI transparent, protocol 0x50) over one bulk IN and one bulk OUT pipe,
//! backed by a [`RawImage`] (so all file I/O goes through its volume).
//!
//! Runtime PM: while suspended (its port in U3, or the controller in D3hot)
//! the device drops its bounce buffer and its image's volume is quiesced, so
//! no host I/O runs for it (and swap sharing the volume waits, as I/O to a
//! sleeping USB disk would); a bulk transfer that arrives anyway fails with a
//! transaction error instead of waiting on the quiesced volume.

pub mod bot;
pub mod scsi;

use std::sync::Arc;

use crate::block::RawImage;
use crate::usb::descriptor::{self, kind, ConfigurationBuilder, DeviceDescriptor};
use crate::usb::{
    feature, request, Direction, EndpointInfo, EndpointType, Recipient, RequestKind, SetupPacket,
    TransferBuffer, TransferResult, UsbDevice, UsbSpeed,
};
use bot::Bot;
use scsi::{Disk, Identity};

/// Endpoint addresses of the two bulk pipes.
pub const BULK_IN: u8 = 0x81;
pub const BULK_OUT: u8 = 0x02;
/// Interface class triple: mass storage, SCSI transparent, Bulk-Only.
pub const INTERFACE_CLASS: [u8; 3] = [0x08, 0x06, 0x50];
/// Class-specific requests (BOT section 3).
pub const REQ_GET_MAX_LUN: u8 = 0xfe;
pub const REQ_MASS_STORAGE_RESET: u8 = 0xff;
/// The only configuration's bConfigurationValue.
const CONFIG_VALUE: u8 = 1;
/// SuperSpeed bulk endpoints burst 16 packets (bMaxBurst = 15).
const SS_MAX_BURST: u8 = 15;
/// bmAttributes of the configuration: bus powered (bit 7 is reserved-one),
/// remote wakeup supported (bit 5).
const CONFIG_ATTRIBUTES: u8 = 0xa0;
/// GET_STATUS (device) bit of DEVICE_REMOTE_WAKEUP.
const STATUS_REMOTE_WAKEUP: u16 = 1 << 1;
/// idVendor/idProduct: pid.codes test identifiers.
const VENDOR_ID: u16 = 0x1209;
const PRODUCT_ID: u16 = 0x0001;
/// String descriptor indices.
const STR_MANUFACTURER: u8 = 1;
const STR_PRODUCT: u8 = 2;
const STR_SERIAL: u8 = 3;

/// How the disk presents itself.
#[derive(Debug, Clone)]
pub struct MassStorageConfig {
    /// The fastest speed it offers (SuperSpeed devices fall back to high speed
    /// on a USB 2 port).
    pub max_speed: UsbSpeed,
    /// iSerialNumber and INQUIRY VPD page 0x80.
    pub serial: String,
    pub vendor: String,
    pub product: String,
}

impl Default for MassStorageConfig {
    fn default() -> Self {
        Self {
            max_speed: UsbSpeed::Super,
            serial: "0001".into(),
            vendor: "RVMM".into(),
            product: "USB DISK".into(),
        }
    }
}

/// The mass-storage device.
pub struct MassStorage {
    config: MassStorageConfig,
    speed: UsbSpeed,
    configured: bool,
    /// Device features set by SET_FEATURE (remote wakeup, U1/U2 enable) as
    /// GET_STATUS bits.
    device_status: u16,
    disk: Disk,
    bot: Bot,
    suspended: bool,
}

impl MassStorage {
    pub fn new(image: Arc<RawImage>, config: MassStorageConfig) -> Self {
        let identity = Identity {
            vendor: config.vendor.clone(),
            product: config.product.clone(),
            revision: "0001".into(),
            serial: config.serial.clone(),
        };
        Self {
            speed: config.max_speed,
            config,
            configured: false,
            device_status: 0,
            disk: Disk::new(image, identity),
            bot: Bot::new(),
            suspended: false,
        }
    }

    pub fn image(&self) -> &Arc<RawImage> {
        self.disk.image()
    }

    pub fn configured(&self) -> bool {
        self.configured
    }

    /// True while a BOT command is between its CBW and its CSW.
    pub fn command_in_progress(&self) -> bool {
        !self.bot.idle()
    }

    fn max_packet(&self) -> u16 {
        match self.speed {
            UsbSpeed::Super => 1024,
            UsbSpeed::High => 512,
            UsbSpeed::Full => 64,
        }
    }

    pub fn device_descriptor(&self) -> Vec<u8> {
        let (bcd_usb, mps0) = match self.speed {
            UsbSpeed::Super => (0x0300, 9), // 2^9 = 512
            _ => (0x0200, 64),
        };
        DeviceDescriptor {
            bcd_usb,
            class: 0,
            subclass: 0,
            protocol: 0,
            max_packet_size0: mps0,
            vendor: VENDOR_ID,
            product: PRODUCT_ID,
            bcd_device: 0x0100,
            manufacturer: STR_MANUFACTURER,
            product_string: STR_PRODUCT,
            serial: STR_SERIAL,
            num_configurations: 1,
        }
        .to_bytes()
    }

    pub fn configuration_descriptor(&self) -> Vec<u8> {
        let mp = self.max_packet();
        let ss = self.speed == UsbSpeed::Super;
        let mut b = ConfigurationBuilder::default()
            .interface(0, 2, INTERFACE_CLASS)
            .endpoint(BULK_IN, 2, mp, 0);
        if ss {
            b = b.ss_companion(SS_MAX_BURST, 0, 0);
        }
        b = b.endpoint(BULK_OUT, 2, mp, 0);
        if ss {
            b = b.ss_companion(SS_MAX_BURST, 0, 0);
        }
        // 100 mA: 50 units of 2 mA, or 13 units of 8 mA at SuperSpeed.
        b.build(CONFIG_VALUE, CONFIG_ATTRIBUTES, if ss { 13 } else { 50 })
    }

    fn descriptor(&self, kind_: u8, index: u8) -> Option<Vec<u8>> {
        match kind_ {
            kind::DEVICE => Some(self.device_descriptor()),
            kind::CONFIGURATION if index == 0 => Some(self.configuration_descriptor()),
            kind::STRING => match index {
                0 => Some(descriptor::languages()),
                STR_MANUFACTURER => Some(descriptor::string(&self.config.vendor)),
                STR_PRODUCT => Some(descriptor::string(&self.config.product)),
                STR_SERIAL => Some(descriptor::string(&self.config.serial)),
                _ => None,
            },
            kind::BOS if self.speed == UsbSpeed::Super => Some(descriptor::superspeed_bos()),
            kind::DEVICE_QUALIFIER if self.speed == UsbSpeed::High => Some(vec![
                10,
                kind::DEVICE_QUALIFIER,
                0x00,
                0x02,
                0,
                0,
                0,
                64,
                1,
                0,
            ]),
            _ => None,
        }
    }

    fn is_bulk(ep: u16) -> Option<bool> {
        match ep as u8 {
            BULK_IN => Some(true),
            BULK_OUT => Some(false),
            _ => None,
        }
    }

    /// Answers a request; `Err(())` means STALL.
    fn handle_control(
        &mut self,
        s: &SetupPacket,
        data: &mut dyn TransferBuffer,
    ) -> Result<Option<Vec<u8>>, ()> {
        use request::*;
        match (s.kind(), s.recipient(), s.request) {
            (RequestKind::Standard, Recipient::Device, GET_DESCRIPTOR) => self
                .descriptor((s.value >> 8) as u8, s.value as u8)
                .map(Some)
                .ok_or(()),
            (RequestKind::Standard, Recipient::Device, SET_ADDRESS) => Ok(None),
            (RequestKind::Standard, Recipient::Device, SET_CONFIGURATION) => {
                match s.value {
                    0 => self.configured = false,
                    v if v == u16::from(CONFIG_VALUE) => self.configured = true,
                    _ => return Err(()),
                }
                // A (re)configuration resets the pipes (USB 3.2 section 9.1.1.5).
                self.bot.reset();
                Ok(None)
            }
            (RequestKind::Standard, Recipient::Device, GET_CONFIGURATION) => {
                Ok(Some(vec![if self.configured { CONFIG_VALUE } else { 0 }]))
            }
            (RequestKind::Standard, Recipient::Device, GET_STATUS) => {
                Ok(Some(self.device_status.to_le_bytes().to_vec()))
            }
            (RequestKind::Standard, Recipient::Interface, GET_STATUS) if s.index == 0 => {
                Ok(Some(vec![0, 0]))
            }
            (RequestKind::Standard, Recipient::Endpoint, GET_STATUS) => {
                let halted = match s.index as u8 {
                    0 | 0x80 => false,
                    _ => self.bot.halted(Self::is_bulk(s.index).ok_or(())?),
                };
                Ok(Some(vec![u8::from(halted), 0]))
            }
            (RequestKind::Standard, Recipient::Endpoint, CLEAR_FEATURE | SET_FEATURE)
                if s.value == feature::ENDPOINT_HALT =>
            {
                if s.index & 0x7f == 0 {
                    return Ok(None);
                }
                let data_in = Self::is_bulk(s.index).ok_or(())?;
                if s.request == SET_FEATURE {
                    self.bot.set_halt(data_in);
                } else {
                    self.bot.clear_halt(data_in);
                }
                Ok(None)
            }
            (RequestKind::Standard, Recipient::Device, CLEAR_FEATURE | SET_FEATURE) => {
                let bit = match s.value {
                    feature::DEVICE_REMOTE_WAKEUP => STATUS_REMOTE_WAKEUP,
                    feature::U1_ENABLE => 1 << 2,
                    feature::U2_ENABLE => 1 << 3,
                    feature::LTM_ENABLE => 1 << 4,
                    _ => return Err(()),
                };
                if s.request == SET_FEATURE {
                    self.device_status |= bit;
                } else {
                    self.device_status &= !bit;
                }
                Ok(None)
            }
            (RequestKind::Standard, Recipient::Interface, CLEAR_FEATURE | SET_FEATURE)
                if s.value == feature::FUNCTION_SUSPEND && s.index & 0xff == 0 =>
            {
                Ok(None)
            }
            (RequestKind::Standard, Recipient::Interface, GET_INTERFACE) if s.index == 0 => {
                Ok(Some(vec![0]))
            }
            (RequestKind::Standard, Recipient::Interface, SET_INTERFACE)
                if s.index == 0 && s.value == 0 =>
            {
                self.bot.reset();
                Ok(None)
            }
            (RequestKind::Standard, Recipient::Device, SET_SEL) => {
                // Six bytes of exit latencies; there is no link power state to tune.
                let mut sel = [0u8; 6];
                let n = data.len().min(sel.len());
                data.read_at(0, &mut sel[..n]).map_err(|_| ())?;
                Ok(None)
            }
            (RequestKind::Standard, Recipient::Device, SET_ISOCH_DELAY) => Ok(None),
            (RequestKind::Class, Recipient::Interface, REQ_GET_MAX_LUN)
                if s.index == 0 && s.value == 0 && s.direction() == Direction::In =>
            {
                Ok(Some(vec![0]))
            }
            (RequestKind::Class, Recipient::Interface, REQ_MASS_STORAGE_RESET)
                if s.index == 0 && s.value == 0 && s.length == 0 =>
            {
                self.bot.mass_storage_reset();
                Ok(None)
            }
            _ => Err(()),
        }
    }
}

impl UsbDevice for MassStorage {
    fn max_speed(&self) -> UsbSpeed {
        self.config.max_speed
    }

    fn set_speed(&mut self, speed: UsbSpeed) {
        self.speed = speed.min(self.config.max_speed);
    }

    fn speed(&self) -> UsbSpeed {
        self.speed
    }

    fn reset(&mut self) {
        self.resume();
        self.configured = false;
        self.device_status = 0;
        self.bot.reset();
    }

    fn control(&mut self, setup: &SetupPacket, data: &mut dyn TransferBuffer) -> TransferResult {
        let in_dir = setup.direction() == Direction::In;
        match self.handle_control(setup, data) {
            Err(()) => {
                log::debug!("usb-storage: STALL control request {setup:?}");
                TransferResult::stall(0)
            }
            Ok(Some(reply)) if in_dir => {
                let n = reply.len().min(data.len()).min(usize::from(setup.length));
                match data.write_at(0, &reply[..n]) {
                    Ok(()) => TransferResult::completed(n),
                    Err(_) => TransferResult::error(0),
                }
            }
            Ok(_) => TransferResult::completed(if in_dir { 0 } else { data.len() }),
        }
    }

    fn bulk(&mut self, endpoint: u8, data: &mut dyn TransferBuffer) -> TransferResult {
        if !self.configured {
            return TransferResult::stall(0);
        }
        if self.suspended {
            // A suspended device does not answer (its volume is quiesced:
            // waiting for it here would hold the controller).
            log::debug!("usb-storage: bulk transfer while suspended");
            return TransferResult::error(0);
        }
        match endpoint {
            BULK_IN => self.bot.transfer_in(&mut self.disk, data),
            BULK_OUT => self.bot.transfer_out(&mut self.disk, data),
            _ => TransferResult::error(0),
        }
    }

    fn halted(&self, endpoint: u8) -> bool {
        match endpoint {
            BULK_IN => self.bot.halted(true),
            BULK_OUT => self.bot.halted(false),
            _ => false,
        }
    }

    fn clear_halt(&mut self, endpoint: u8) {
        match endpoint {
            BULK_IN => self.bot.clear_halt(true),
            BULK_OUT => self.bot.clear_halt(false),
            _ => {}
        }
    }

    fn endpoints(&self) -> Vec<EndpointInfo> {
        if !self.configured {
            return Vec::new();
        }
        let burst = if self.speed == UsbSpeed::Super {
            SS_MAX_BURST
        } else {
            0
        };
        [BULK_IN, BULK_OUT]
            .into_iter()
            .map(|address| EndpointInfo {
                address,
                kind: EndpointType::Bulk,
                max_packet_size: self.max_packet(),
                max_burst: burst,
            })
            .collect()
    }

    fn detach(&mut self) {
        // Unplugged: nothing sleeps on the volume any more.
        self.resume();
        if let Err(e) = self.disk.image().flush() {
            log::warn!("usb-storage: flush on detach failed: {e}");
        }
    }

    fn suspend(&mut self) {
        if self.suspended {
            return;
        }
        self.suspended = true;
        self.bot.release_buffers();
        let volume = self.disk.image().volume();
        volume.quiesce();
        log::debug!(
            "usb-storage {}: suspended, volume {} quiesced",
            self.config.serial,
            volume.name()
        );
    }

    fn resume(&mut self) {
        if !self.suspended {
            return;
        }
        self.suspended = false;
        let volume = self.disk.image().volume();
        volume.resume();
        log::debug!(
            "usb-storage {}: resumed, volume {} flows",
            self.config.serial,
            volume.name()
        );
    }

    fn suspended(&self) -> bool {
        self.suspended
    }

    fn remote_wakeup_enabled(&self) -> bool {
        self.device_status & STATUS_REMOTE_WAKEUP != 0
    }
}

/// A device dropped while suspended (VMM shutdown, a failed attach) lets go
/// of its volume's quiesce: the volume may outlive it (the pager's swap
/// store on the same image), and nothing would ever resume it.
impl Drop for MassStorage {
    fn drop(&mut self) {
        self.resume();
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
pub(crate) mod tests;
