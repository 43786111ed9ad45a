//! Root hub ports (xHCI 1.2 section 4.19, PORTSC section 5.4.8).
//!
//! A port owns the device plugged into it. Change bits are true RW1C; the
//! controller posts a Port Status Change Event when their OR goes 0 -> 1.
//! The link state is kept as PLS so U3 suspend / resume (runtime PM) and
//! save/restore only need this struct.
//!
//! Link power management reaches the device: entering U3 suspends it
//! ([`UsbDevice::suspend`]: host I/O stopped, backing volume quiesced),
//! leaving U3 (host resume, a device-initiated remote wake, a port reset)
//! resumes it. Resume runs in a NOIO scope: the thread coming back from a
//! suspend must not wait on backing I/O (see `crate::noio`).

use super::regs::port::*;
use crate::noio::NoioScope;
use crate::usb::{UsbDevice, UsbSpeed};

/// Which Supported Protocol range a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Usb2,
    Usb3,
}

pub struct Port {
    pub protocol: PortProtocol,
    /// PORTSC without LWS (write-only) and with PR/WPR always read as 0
    /// (resets complete at once).
    portsc: u32,
    pub device: Option<Box<dyn UsbDevice>>,
    /// Bumped on every attach so a slot can tell a new device from the one
    /// it addressed.
    pub generation: u64,
}

fn speed_id(speed: UsbSpeed) -> u32 {
    match speed {
        UsbSpeed::Full => SPEED_FULL,
        UsbSpeed::High => SPEED_HIGH,
        UsbSpeed::Super => SPEED_SUPER,
    }
}

impl Port {
    pub fn new(protocol: PortProtocol) -> Self {
        Self {
            protocol,
            portsc: PP | (PLS_RX_DETECT << PLS_SHIFT),
            device: None,
            generation: 0,
        }
    }

    pub fn portsc(&self) -> u32 {
        self.portsc
    }

    pub fn link_state(&self) -> u32 {
        (self.portsc & PLS_MASK) >> PLS_SHIFT
    }

    fn set_link_state(&mut self, pls: u32) {
        self.portsc = (self.portsc & !PLS_MASK) | ((pls << PLS_SHIFT) & PLS_MASK);
    }

    pub fn enabled(&self) -> bool {
        self.portsc & PED != 0
    }

    /// Sets change bits; true if their OR went from 0 to 1.
    fn set_change(&mut self, bits: u32) -> bool {
        let before = self.portsc & CHANGE_MASK;
        self.portsc |= bits & CHANGE_MASK;
        before == 0 && self.portsc & CHANGE_MASK != 0
    }

    pub fn has_change(&self) -> bool {
        self.portsc & CHANGE_MASK != 0
    }

    /// The highest speed this port runs.
    pub fn max_speed(&self) -> UsbSpeed {
        match self.protocol {
            PortProtocol::Usb2 => UsbSpeed::High,
            PortProtocol::Usb3 => UsbSpeed::Super,
        }
    }

    /// The device was connected: a USB 3 link trains to U0 and is enabled at
    /// once; a USB 2 port waits for a port reset (section 4.19.1).
    pub fn connect(&mut self, mut device: Box<dyn UsbDevice>) -> bool {
        let speed = device.max_speed().min(self.max_speed());
        device.set_speed(speed);
        self.device = Some(device);
        self.generation += 1;
        self.portsc &= !(SPEED_MASK | PED);
        self.portsc |= CCS | (speed_id(speed) << SPEED_SHIFT);
        match self.protocol {
            PortProtocol::Usb3 => {
                self.portsc |= PED;
                self.set_link_state(PLS_U0);
            }
            PortProtocol::Usb2 => self.set_link_state(PLS_POLLING),
        }
        self.set_change(CSC)
    }

    /// The device was unplugged: returns it and whether an event is due.
    pub fn disconnect(&mut self) -> (Option<Box<dyn UsbDevice>>, bool) {
        let dev = self.device.take();
        if dev.is_none() {
            return (None, false);
        }
        self.portsc &= !(CCS | PED | SPEED_MASK);
        self.set_link_state(PLS_RX_DETECT);
        (dev, self.set_change(CSC))
    }

    /// A completed port reset; `warm` for a USB 3 Warm Port Reset.
    fn reset(&mut self, warm: bool) -> bool {
        let mut change = PRC;
        if warm {
            change |= WRC;
        }
        if let Some(dev) = self.device.as_mut() {
            // A reset wakes a suspended device (USB 3.2 section 7.5.3).
            let _noio = NoioScope::enter();
            dev.resume();
            dev.reset();
            self.portsc |= PED;
            self.set_link_state(PLS_U0);
        }
        self.set_change(change)
    }

    /// Resumes the device unless its link is in U3 (D3hot -> D0: devices
    /// the controller suspended come back; those the guest suspended stay).
    pub fn resume_unless_u3(&mut self) {
        if self.link_state() != PLS_U3 {
            self.resume_device();
        }
    }

    /// Suspends the device, if any (link in U3, or the controller in D3hot).
    pub fn suspend_device(&mut self) {
        if let Some(dev) = self.device.as_mut() {
            dev.suspend();
        }
    }

    /// Resumes the device, if any (the caller runs a resume path).
    pub fn resume_device(&mut self) {
        if let Some(dev) = self.device.as_mut() {
            let _noio = NoioScope::enter();
            dev.resume();
        }
    }

    /// Whether the attached device is suspended.
    pub fn device_suspended(&self) -> Option<bool> {
        self.device.as_ref().map(|d| d.suspended())
    }

    /// A device-initiated remote wake (section 4.15.2.2): a device on a
    /// port in U3 signals Resume; the port reports PLS = Resume with PLC
    /// and the guest answers with a U0 write. Returns whether an event is
    /// due, or `None` when the port is not suspended.
    pub fn remote_wake(&mut self) -> Option<bool> {
        if self.portsc & CCS == 0 || self.link_state() != PLS_U3 {
            return None;
        }
        // The controller resumes the device once the change is reported.
        self.set_link_state(PLS_RESUME);
        Some(self.set_change(PLC))
    }

    /// Whether a pending change is one the guest armed this port to wake
    /// the system for (WCE/WDE/WOE, section 4.15.2.3), or a remote wake.
    pub fn wake_pending(&self) -> bool {
        // A connect change wakes with WCE, a disconnect change with WDE.
        let armed = if self.portsc & CCS != 0 { WCE } else { WDE };
        (self.portsc & CSC != 0 && self.portsc & armed != 0)
            || (self.portsc & OCC != 0 && self.portsc & WOE != 0)
            || (self.portsc & PLC != 0 && self.link_state() == PLS_RESUME)
    }

    /// A guest write to PORTSC; returns true if a Port Status Change Event is due.
    pub fn write_portsc(&mut self, value: u32) -> bool {
        // RW1C change bits first, so the 0 -> 1 test below sees the cleared state.
        self.portsc &= !(value & CHANGE_MASK);
        self.portsc = (self.portsc & !RWS_MASK) | (value & RWS_MASK);
        let mut event = false;
        if value & PED != 0 && self.protocol == PortProtocol::Usb2 {
            // Writing 1 disables the port (section 5.4.8, PED).
            self.portsc &= !PED;
        }
        if value & PR != 0 {
            event |= self.reset(false);
        } else if value & WPR != 0 && self.protocol == PortProtocol::Usb3 {
            event |= self.reset(true);
        }
        if value & LWS != 0 {
            event |= self.write_link_state((value & PLS_MASK) >> PLS_SHIFT);
        }
        event
    }

    /// Software link state requests (section 4.19.1.2, table 4-??: U0, U3,
    /// Resume, RxDetect). Entering U3 sets no PLC; leaving it does.
    fn write_link_state(&mut self, pls: u32) -> bool {
        if self.portsc & CCS == 0 {
            return false;
        }
        let current = self.link_state();
        match pls {
            PLS_U3 if self.enabled() => {
                self.set_link_state(PLS_U3);
                if current != PLS_U3 {
                    self.suspend_device();
                }
                false
            }
            PLS_U0 if current == PLS_U3 || current == PLS_RESUME => {
                // Out of U3 the controller resumes the device once it has
                // reported the change; from Resume it already runs.
                self.set_link_state(PLS_U0);
                self.set_change(PLC)
            }
            PLS_U0 | PLS_U2 => {
                self.set_link_state(pls);
                false
            }
            PLS_RESUME if self.protocol == PortProtocol::Usb2 && current == PLS_U3 => {
                // Resume signalling wakes the device (the controller resumes
                // it after this write); U0 follows ~20 ms later.
                self.set_link_state(PLS_RESUME);
                false
            }
            PLS_RX_DETECT if self.protocol == PortProtocol::Usb3 => {
                self.portsc &= !PED;
                self.set_link_state(PLS_RX_DETECT);
                false
            }
            _ => {
                log::debug!("xhci: ignored PLS write {pls} in state {current}");
                false
            }
        }
    }

    /// HCRST: change and wake bits cleared, an attached device is reset and
    /// reported as a fresh connection.
    pub fn hc_reset(&mut self) {
        self.portsc = PP | (PLS_RX_DETECT << PLS_SHIFT);
        if let Some(mut dev) = self.device.take() {
            let _noio = NoioScope::enter();
            dev.resume();
            dev.reset();
            self.connect(dev);
        }
    }
}
