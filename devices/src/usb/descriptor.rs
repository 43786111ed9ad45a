//! Standard descriptor encoding (USB 3.2 section 9.6; USB 2.0 section 9.6).

/// Descriptor types (USB 3.2 table 9-6).
pub mod kind {
    pub const DEVICE: u8 = 1;
    pub const CONFIGURATION: u8 = 2;
    pub const STRING: u8 = 3;
    pub const INTERFACE: u8 = 4;
    pub const ENDPOINT: u8 = 5;
    pub const DEVICE_QUALIFIER: u8 = 6;
    pub const BOS: u8 = 15;
    pub const DEVICE_CAPABILITY: u8 = 16;
    pub const SS_ENDPOINT_COMPANION: u8 = 48;
}

/// Device capability types inside a BOS (USB 3.2 table 9-14).
pub mod capability {
    pub const USB2_EXTENSION: u8 = 2;
    pub const SUPERSPEED_USB: u8 = 3;
}

/// US English, the only language we offer (USB LANGIDs).
pub const LANGID_EN_US: u16 = 0x0409;

/// Fields of a device descriptor (USB 3.2 table 9-11).
#[derive(Debug, Clone, Copy)]
pub struct DeviceDescriptor {
    pub bcd_usb: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    /// For SuperSpeed this is an exponent (9 = 512 bytes).
    pub max_packet_size0: u8,
    pub vendor: u16,
    pub product: u16,
    pub bcd_device: u16,
    pub manufacturer: u8,
    pub product_string: u8,
    pub serial: u8,
    pub num_configurations: u8,
}

impl DeviceDescriptor {
    pub const LEN: u8 = 18;

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![Self::LEN, kind::DEVICE];
        b.extend_from_slice(&self.bcd_usb.to_le_bytes());
        b.extend_from_slice(&[
            self.class,
            self.subclass,
            self.protocol,
            self.max_packet_size0,
        ]);
        b.extend_from_slice(&self.vendor.to_le_bytes());
        b.extend_from_slice(&self.product.to_le_bytes());
        b.extend_from_slice(&self.bcd_device.to_le_bytes());
        b.extend_from_slice(&[
            self.manufacturer,
            self.product_string,
            self.serial,
            self.num_configurations,
        ]);
        b
    }
}

/// Builds a configuration descriptor followed by its interface and endpoint
/// descriptors, with wTotalLength filled in.
#[derive(Debug, Default)]
pub struct ConfigurationBuilder {
    body: Vec<u8>,
    num_interfaces: u8,
}

impl ConfigurationBuilder {
    pub const HEADER_LEN: u8 = 9;

    pub fn interface(mut self, number: u8, num_endpoints: u8, class: [u8; 3]) -> Self {
        self.num_interfaces += 1;
        self.body.extend_from_slice(&[
            9,
            kind::INTERFACE,
            number,
            0, // bAlternateSetting
            num_endpoints,
            class[0],
            class[1],
            class[2],
            0, // iInterface
        ]);
        self
    }

    /// An endpoint descriptor (USB 3.2 table 9-24).
    pub fn endpoint(mut self, address: u8, attributes: u8, max_packet: u16, interval: u8) -> Self {
        let mp = max_packet.to_le_bytes();
        self.body.extend_from_slice(&[
            7,
            kind::ENDPOINT,
            address,
            attributes,
            mp[0],
            mp[1],
            interval,
        ]);
        self
    }

    /// A SuperSpeed endpoint companion (USB 3.2 table 9-27); `max_burst` is
    /// packets per burst minus one.
    pub fn ss_companion(mut self, max_burst: u8, attributes: u8, bytes_per_interval: u16) -> Self {
        let bpi = bytes_per_interval.to_le_bytes();
        self.body.extend_from_slice(&[
            6,
            kind::SS_ENDPOINT_COMPANION,
            max_burst,
            attributes,
            bpi[0],
            bpi[1],
        ]);
        self
    }

    /// Finishes the set. `max_power` is in the speed's units (2 mA for USB 2,
    /// 8 mA for SuperSpeed).
    pub fn build(self, value: u8, attributes: u8, max_power: u8) -> Vec<u8> {
        let total = (usize::from(Self::HEADER_LEN) + self.body.len()) as u16;
        let t = total.to_le_bytes();
        let mut b = vec![
            Self::HEADER_LEN,
            kind::CONFIGURATION,
            t[0],
            t[1],
            self.num_interfaces,
            value,
            0, // iConfiguration
            attributes,
            max_power,
        ];
        b.extend_from_slice(&self.body);
        b
    }
}

/// The BOS descriptor of a SuperSpeed device: USB 2.0 extension (LPM) and
/// the SuperSpeed USB device capability (USB 3.2 tables 9-12, 9-15, 9-16).
pub fn superspeed_bos() -> Vec<u8> {
    let usb2_ext: [u8; 7] = [
        7,
        kind::DEVICE_CAPABILITY,
        capability::USB2_EXTENSION,
        0x02, // bmAttributes: LPM supported
        0,
        0,
        0,
    ];
    let ss_cap: [u8; 10] = [
        10,
        kind::DEVICE_CAPABILITY,
        capability::SUPERSPEED_USB,
        0,    // bmAttributes: no LTM
        0x0e, // wSpeedsSupported: full, high, super
        0x00,
        1,    // bFunctionalitySupport: full speed and up
        0x0a, // bU1DevExitLat (us)
        0xff, // wU2DevExitLat (us)
        0x07,
    ];
    let total = (5 + usb2_ext.len() + ss_cap.len()) as u16;
    let t = total.to_le_bytes();
    let mut b = vec![5, kind::BOS, t[0], t[1], 2];
    b.extend_from_slice(&usb2_ext);
    b.extend_from_slice(&ss_cap);
    b
}

/// A string descriptor holding `s` in UTF-16LE (truncated to fit 255 bytes).
pub fn string(s: &str) -> Vec<u8> {
    let mut b = vec![0, kind::STRING];
    for unit in s.encode_utf16().take(126) {
        b.extend_from_slice(&unit.to_le_bytes());
    }
    b[0] = b.len() as u8;
    b
}

/// String descriptor zero: the supported language IDs.
pub fn languages() -> Vec<u8> {
    let l = LANGID_EN_US.to_le_bytes();
    vec![4, kind::STRING, l[0], l[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_total_length_and_counts() {
        let c = ConfigurationBuilder::default()
            .interface(0, 2, [8, 6, 0x50])
            .endpoint(0x81, 2, 1024, 0)
            .ss_companion(15, 0, 0)
            .endpoint(0x02, 2, 1024, 0)
            .ss_companion(15, 0, 0)
            .build(1, 0x80, 25);
        assert_eq!(c.len(), 9 + 9 + 2 * (7 + 6));
        assert_eq!(u16::from_le_bytes([c[2], c[3]]) as usize, c.len());
        assert_eq!(c[4], 1);
        assert_eq!(&c[9..18], &[9, 4, 0, 0, 2, 8, 6, 0x50, 0]);
    }

    #[test]
    fn bos_and_strings_are_self_consistent() {
        let b = superspeed_bos();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]) as usize, b.len());
        assert_eq!(b[4], 2);
        let s = string("ab");
        assert_eq!(s, vec![6, 3, b'a', 0, b'b', 0]);
        assert_eq!(string(&"x".repeat(500))[0], 254);
    }
}
