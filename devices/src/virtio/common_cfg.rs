//! The common configuration structure (§4.1.4.3): feature negotiation, queue
//! setup registers and the device status state machine. Side effects that
//! need the device (reset, activation) are returned as an [`Action`] for the
//! transport to carry out.

use super::{
    VirtioInterrupt, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};
use crate::pci::Msix;

// Field offsets of struct virtio_pci_common_cfg (§4.1.4.3).
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const CONFIG_GENERATION: u64 = 0x15;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;
/// Length of the structure as of virtio 1.0.
pub const COMMON_CFG_LEN: u64 = 0x38;

/// What the transport must do after a common configuration write.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// The driver wrote 0 to device_status (§4.1.4.3.1).
    Reset,
    /// The driver set DRIVER_OK.
    Activate,
}

/// Driver-programmed configuration of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Registers of the common configuration structure.
pub struct CommonCfg {
    pub device_features: u64,
    pub acked_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub queues: Vec<QueueConfig>,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

/// One 32-bit half of a 64-bit register.
fn get_half(reg: u64, high: bool) -> u64 {
    if high {
        reg >> 32
    } else {
        reg & 0xffff_ffff
    }
}

/// Replaces the 32-bit half `sel` of a 64-bit register.
fn set_half(reg: &mut u64, sel_high: bool, v: u32) {
    if sel_high {
        *reg = (*reg & 0xffff_ffff) | u64::from(v) << 32;
    } else {
        *reg = (*reg & !0xffff_ffff) | u64::from(v);
    }
}

impl CommonCfg {
    pub fn new(device_features: u64, queue_max_sizes: &[u16]) -> Self {
        Self {
            device_features,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueConfig::new(m))
                .collect(),
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
        }
    }

    /// Back to the state after device reset (§2.4): status 0, nothing acked,
    /// queues unconfigured.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Queue registers are writable until the queue is enabled and before
    /// DRIVER_OK (§4.1.4.3.2).
    fn selected_writable(&mut self) -> Option<&mut QueueConfig> {
        let live = self.status & STATUS_DRIVER_OK != 0;
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled && !live)
    }

    /// A field read. Each field has its natural width; 64-bit fields may be
    /// read as two 32-bit halves (§4.1.3.1). Other accesses read 0.
    pub fn read(&self, offset: u64, data: &mut [u8], irq: &VirtioInterrupt) {
        data.fill(0);
        let q = self.selected();
        let v = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.acked_features & 0xffff_ffff,
                1 => self.acked_features >> 32,
                _ => 0,
            },
            (CONFIG_MSIX_VECTOR, 2) => u64::from(irq.config_vector()),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.status),
            (CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            // A nonexistent queue reads size 0 (§4.1.4.3.2).
            (QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(irq.queue_vector(self.queue_select)),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (QUEUE_NOTIFY_OFF, 2) => u64::from(self.queue_select),
            (QUEUE_DESC, 8) => q.map_or(0, |q| q.desc),
            (QUEUE_DRIVER, 8) => q.map_or(0, |q| q.driver),
            (QUEUE_DEVICE, 8) => q.map_or(0, |q| q.device),
            (o @ (0x20 | 0x24), 4) => q.map_or(0, |q| get_half(q.desc, o == 0x24)),
            (o @ (0x28 | 0x2c), 4) => q.map_or(0, |q| get_half(q.driver, o == 0x2c)),
            (o @ (0x30 | 0x34), 4) => q.map_or(0, |q| get_half(q.device, o == 0x34)),
            _ => 0,
        };
        put(data, v);
    }

    /// A field write; returns what the transport must do.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        irq: &VirtioInterrupt,
        msix: &Msix,
    ) -> Action {
        let v = le(data);
        let valid_vector = |v: u64| {
            let v = v as u16;
            if v == VIRTIO_MSI_NO_VECTOR || msix.has_vector(v) {
                v
            } else {
                // An unusable vector reads back as NO_VECTOR (§4.1.5.1.2).
                VIRTIO_MSI_NO_VECTOR
            }
        };
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(v as u32),
            (CONFIG_MSIX_VECTOR, 2) => irq.set_config_vector(valid_vector(v)),
            (DEVICE_STATUS, 1) => return self.write_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_SIZE, 2) => {
                if let Some(q) = self.selected_writable() {
                    // Split virtqueue sizes are powers of two up to the
                    // maximum (§2.7); other values are ignored.
                    let s = v as u16;
                    if s.is_power_of_two() && s <= q.max_size {
                        q.size = s;
                    }
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                if usize::from(self.queue_select) < self.queues.len() {
                    irq.set_queue_vector(self.queue_select, valid_vector(v));
                }
            }
            (QUEUE_ENABLE, 2) => {
                // Writing 0 is not allowed (§4.1.4.3.2); it is ignored.
                if v == 1 {
                    if let Some(q) = self.selected_writable() {
                        q.enabled = true;
                    }
                }
            }
            (QUEUE_DESC, 8) => self.with_queue(|q| q.desc = v),
            (QUEUE_DRIVER, 8) => self.with_queue(|q| q.driver = v),
            (QUEUE_DEVICE, 8) => self.with_queue(|q| q.device = v),
            (o @ (0x20 | 0x24), 4) => {
                self.with_queue(|q| set_half(&mut q.desc, o == 0x24, v as u32))
            }
            (o @ (0x28 | 0x2c), 4) => {
                self.with_queue(|q| set_half(&mut q.driver, o == 0x2c, v as u32))
            }
            (o @ (0x30 | 0x34), 4) => {
                self.with_queue(|q| set_half(&mut q.device, o == 0x34, v as u32))
            }
            _ => log::debug!(
                "virtio-pci: ignored common cfg write at {offset:#x}/{}",
                data.len()
            ),
        }
        Action::None
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if let Some(q) = self.selected_writable() {
            f(q);
        }
    }

    /// Features are written between DRIVER and FEATURES_OK (§3.1.1). Bits the
    /// device did not offer are dropped, so they can never be negotiated.
    fn write_driver_features(&mut self, v: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let high = match self.driver_feature_select {
            0 => false,
            1 => true,
            _ => return,
        };
        let offered = if high {
            (self.device_features >> 32) as u32
        } else {
            self.device_features as u32
        };
        set_half(&mut self.acked_features, high, v & offered);
    }

    /// The status state machine (§2.1, §3.1.1).
    fn write_status(&mut self, v: u8) -> Action {
        if v == 0 {
            return Action::Reset;
        }
        let old = self.status;
        // The driver only ever adds bits; clearing one needs a reset.
        if v & old != old {
            log::warn!("virtio-pci: status {old:#x} -> {v:#x} clears bits; ignored");
            return Action::None;
        }
        let mut new = v;
        let added = new & !old;
        // Each step needs the previous ones.
        if added & STATUS_DRIVER != 0 && new & STATUS_ACKNOWLEDGE == 0 {
            new &= !STATUS_DRIVER;
        }
        if added & STATUS_FEATURES_OK != 0 {
            // Modern-only: refuse a driver that did not accept VERSION_1
            // by leaving FEATURES_OK clear (§3.1.1 step 6).
            let ok = new & STATUS_DRIVER != 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                new &= !STATUS_FEATURES_OK;
            }
        }
        let mut action = Action::None;
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 || new & STATUS_FAILED != 0 {
                new &= !STATUS_DRIVER_OK;
            } else {
                action = Action::Activate;
            }
        }
        self.status = new;
        action
    }
}
