//! USB storage of the VM: the one xHCI controller's root hub and the
//! mass-storage disks plugged into it, at start (`--usb-storage`) and while
//! the guest runs (control API `usb.attach` / `usb.detach`).
//!
//! Root hub layout: ports 1..=[`USB2_PORTS`] are USB 2 (high speed), the next
//! [`USB3_PORTS`] are USB 3 (SuperSpeed). A disk offers SuperSpeed and falls
//! back to high speed on a USB 2 port. Each disk is a [`RawImage`] with its
//! own I/O volume named after the device id.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use devices::block::{RawImage, RawImageError, Volume};
use devices::usb::mass_storage::{MassStorage, MassStorageConfig};
use devices::usb::UsbSpeed;
use devices::xhci::{
    link_state_name, InterruptDelivery, PortProtocol, XhciConfig, XhciError, XhciPci,
};
use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;

use crate::api::{ErrorCode, UsbTarget};
use crate::config::{valid_usb_id, UsbStorageConfig, MAX_USB_ID};

/// USB 2 root hub ports, numbered 1..=USB2_PORTS.
pub const USB2_PORTS: u8 = 4;
/// USB 3 root hub ports, numbered after the USB 2 ones.
pub const USB3_PORTS: u8 = 4;

/// The controller layout every VM gets.
pub fn xhci_config() -> XhciConfig {
    XhciConfig {
        usb2_ports: USB2_PORTS,
        usb3_ports: USB3_PORTS,
    }
}

#[derive(Debug, Error)]
pub enum UsbError {
    #[error("there is no root hub port {0} (ports are 1..={max})", max = USB2_PORTS + USB3_PORTS)]
    NoSuchPort(u8),
    #[error("port {port} already holds device '{id}'")]
    PortTaken { port: u8, id: String },
    #[error("a USB device with id '{0}' is already attached")]
    IdTaken(String),
    #[error("every root hub port is taken")]
    NoFreePort,
    #[error("id '{0}' is not 1..={MAX_USB_ID} characters of A-Z a-z 0-9 . _ -")]
    BadId(String),
    #[error("no USB device {0}")]
    NotFound(String),
    #[error("cannot open USB disk image")]
    Image(#[from] RawImageError),
    #[error("xHCI controller")]
    Xhci(#[from] XhciError),
}

impl UsbError {
    /// The API error class.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NoSuchPort(_) | Self::BadId(_) => ErrorCode::BadRequest,
            Self::PortTaken { .. } | Self::IdTaken(_) | Self::NoFreePort => ErrorCode::Conflict,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Xhci(XhciError::NotSuspended(_)) => ErrorCode::Conflict,
            // Another disk, the swap file or another process holds it.
            Self::Image(RawImageError::Locked { .. }) => ErrorCode::Conflict,
            Self::Image(
                RawImageError::TooSmall { .. }
                | RawImageError::Unaligned { .. }
                | RawImageError::NotAnImage { .. },
            ) => ErrorCode::BadRequest,
            Self::Image(_) | Self::Xhci(_) => ErrorCode::Internal,
        }
    }
}

/// Why the VM's USB storage could not be set up at start.
#[derive(Debug, Error)]
pub enum UsbSetupError {
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceError),
    #[error("--usb-storage {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: UsbError,
    },
}

/// Adds the xHCI controller when a USB disk or the control API (for hotplug)
/// is configured, and plugs in the `--usb-storage` disks. Without either the
/// VM gets no controller: the guest sees no device it cannot use.
pub fn setup(
    devices: &crate::device_manager::DeviceManager,
    mmio: &devices::bus::Bus,
    disks: &[UsbStorageConfig],
    hotplug: bool,
) -> Result<Option<UsbManager>, UsbSetupError> {
    if disks.is_empty() && !hotplug {
        return Ok(None);
    }
    let (xhci, devnum) = devices.add_xhci(xhci_config(), mmio)?;
    let mut usb = UsbManager::new(xhci, devnum);
    // Disks with a fixed port first, so automatic choices do not take them.
    let (fixed, auto): (Vec<_>, Vec<_>) = disks.iter().partition(|d| d.port.is_some());
    for d in fixed.into_iter().chain(auto) {
        usb.attach(d).map_err(|source| UsbSetupError::Disk {
            path: d.path.clone(),
            source,
        })?;
    }
    Ok(Some(usb))
}

/// An attached disk as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsbDeviceInfo {
    pub id: String,
    pub port: u8,
    /// "usb2" or "usb3": the port's protocol.
    pub speed: &'static str,
    pub path: PathBuf,
    pub readonly: bool,
    pub size_bytes: u64,
}

fn protocol_name(p: Option<PortProtocol>) -> &'static str {
    match p {
        Some(PortProtocol::Usb3) => "usb3",
        _ => "usb2",
    }
}

/// The xHCI controller of the VM and what is plugged into it.
pub struct UsbManager {
    xhci: Arc<Mutex<XhciPci>>,
    /// PCI device number of the controller on bus 0.
    pci_device: u8,
    attached: BTreeMap<u8, UsbDeviceInfo>,
    /// I/O volumes of attached disks by id (`swap_volume=ID` may name one).
    volumes: BTreeMap<String, Arc<Volume>>,
}

impl UsbManager {
    pub fn new(xhci: Arc<Mutex<XhciPci>>, pci_device: u8) -> Self {
        Self {
            xhci,
            pci_device,
            attached: BTreeMap::new(),
            volumes: BTreeMap::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, XhciPci> {
        self.xhci.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pci_device(&self) -> u8 {
        self.pci_device
    }

    /// The controller's interrupt state as JSON, waiting at most `wait` for
    /// the controller: a vCPU (or the xhci thread) holding it longer is
    /// itself the answer, `"busy"`, and the caller never hangs on it.
    pub fn controller_state(&self, wait: Duration) -> Value {
        let deadline = Instant::now() + wait;
        let x = loop {
            match self.xhci.try_lock() {
                Ok(x) => break x,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(TryLockError::WouldBlock) => {
                    return json!("busy: a vCPU or the xhci thread holds the controller")
                }
            }
        };
        let st = x.xhci().interrupt_state();
        let delivery = match x.delivery() {
            InterruptDelivery::Msix => json!("msix"),
            InterruptDelivery::Intx { asserted } => json!({ "intx_asserted": asserted }),
            InterruptDelivery::None => json!("none"),
        };
        let (pme_enabled, pme_status) = x.pme_bits();
        let ports: Vec<Value> = x
            .xhci()
            .port_power()
            .into_iter()
            .filter(|p| p.device_suspended.is_some() || p.portsc & 1 != 0)
            .map(|p| {
                let volume = self
                    .attached
                    .get(&p.port)
                    .and_then(|d| self.volumes.get(&d.id))
                    .map(|v| v.info());
                json!({
                    "port": p.port,
                    "link_state": link_state_name(p.link_state),
                    "portsc": format!("{:#010x}", p.portsc),
                    "device": self.attached.get(&p.port).map(|d| d.id.clone()),
                    "suspended": p.device_suspended,
                    "volume": volume,
                })
            })
            .collect();
        json!({
            "power_state": if x.xhci().in_d3hot() { "D3hot" } else { "D0" },
            "pme_enabled": pme_enabled,
            "pme_status": pme_status,
            "ports": ports,
            "usbcmd": format!("{:#010x}", st.usbcmd),
            "usbsts": format!("{:#010x}", st.usbsts),
            "iman": format!("{:#010x}", st.iman),
            "erdp": format!("{:#x}", st.erdp),
            "events_pending": st.events_pending,
            "events_dropped": st.events_dropped,
            "interrupt_asserted": st.asserted,
            "interrupt_deferred": st.deferred,
            "delivery": delivery,
        })
    }

    /// Picks a free port: USB 3 first (the disk is SuperSpeed), then USB 2.
    fn free_port(&self) -> Option<u8> {
        let usb3 = USB2_PORTS + 1..=USB2_PORTS + USB3_PORTS;
        usb3.chain(1..=USB2_PORTS)
            .find(|p| !self.attached.contains_key(p))
    }

    /// Opens the image and plugs a mass-storage disk into the chosen port.
    pub fn attach(&mut self, cfg: &UsbStorageConfig) -> Result<UsbDeviceInfo, UsbError> {
        let port = match cfg.port {
            Some(p) if p == 0 || p > USB2_PORTS + USB3_PORTS => {
                return Err(UsbError::NoSuchPort(p))
            }
            Some(p) => p,
            None => self.free_port().ok_or(UsbError::NoFreePort)?,
        };
        if let Some(d) = self.attached.get(&port) {
            return Err(UsbError::PortTaken {
                port,
                id: d.id.clone(),
            });
        }
        let id = cfg.id.clone().unwrap_or_else(|| format!("usb{port}"));
        if !valid_usb_id(&id) {
            return Err(UsbError::BadId(id));
        }
        if self.attached.values().any(|d| d.id == id) {
            return Err(UsbError::IdTaken(id));
        }
        let image = Arc::new(RawImage::open(&cfg.path, cfg.readonly, &id)?);
        let volume = image.volume().clone();
        volume.set_owner(format!("USB disk '{id}' on port {port}"));
        let info = UsbDeviceInfo {
            id: id.clone(),
            port,
            speed: "usb2",
            path: cfg.path.clone(),
            readonly: cfg.readonly,
            size_bytes: image.size(),
        };
        let disk = MassStorage::new(
            image,
            MassStorageConfig {
                max_speed: UsbSpeed::Super,
                serial: id,
                ..MassStorageConfig::default()
            },
        );
        let speed = {
            let mut x = self.lock();
            x.attach(port, Box::new(disk))?;
            protocol_name(x.xhci().port_protocol(port))
        };
        let info = UsbDeviceInfo { speed, ..info };
        log::info!(
            "usb: {} ({}, {}) on port {port} ({speed})",
            info.id,
            info.path.display(),
            if info.readonly {
                "read-only"
            } else {
                "read-write"
            }
        );
        // Host I/O that waits on the sleeping disk (swap on its volume)
        // asks it to signal remote wakeup, as I/O to a runtime-suspended
        // disk resumes it.
        let xhci = Arc::downgrade(&self.xhci);
        volume.set_waker(Arc::new(move || {
            if let Some(x) = xhci.upgrade() {
                let r = x
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remote_wake(port);
                if let Err(e) = r {
                    log::debug!("usb: wake for host I/O on port {port}: {e}");
                }
            }
        }));
        self.volumes.insert(info.id.clone(), volume);
        self.attached.insert(port, info.clone());
        Ok(info)
    }

    /// Unplugs a disk. The guest sees the disconnect at once; I/O it still
    /// had queued on the device fails.
    pub fn detach(&mut self, target: &UsbTarget) -> Result<UsbDeviceInfo, UsbError> {
        let port = self.port_of(target)?;
        let mut dev = self.lock().detach(port)?;
        // Outside the controller's lock: the device resumes its volume if
        // it slept and flushes its image; dropping it closes the image.
        dev.detach();
        drop(dev);
        let info = self
            .attached
            .remove(&port)
            .ok_or_else(|| UsbError::NotFound(format!("on port {port}")))?;
        if let Some(v) = self.volumes.remove(&info.id) {
            v.clear_waker();
        }
        log::info!("usb: {} detached from port {port}", info.id);
        Ok(info)
    }

    /// The port of an attached disk named by port or id.
    fn port_of(&self, target: &UsbTarget) -> Result<u8, UsbError> {
        Ok(match target {
            UsbTarget::Port(p) => {
                if !self.attached.contains_key(p) {
                    return Err(UsbError::NotFound(format!("on port {p}")));
                }
                *p
            }
            UsbTarget::Id(id) => self
                .attached
                .iter()
                .find(|(_, d)| &d.id == id)
                .map(|(p, _)| *p)
                .ok_or_else(|| UsbError::NotFound(format!("'{id}'")))?,
        })
    }

    /// A host-side wake request for a suspended disk: the device signals
    /// remote wakeup on its port (and PME if the controller sleeps).
    pub fn wake(&mut self, target: &UsbTarget) -> Result<UsbDeviceInfo, UsbError> {
        let port = self.port_of(target)?;
        self.lock().remote_wake(port)?;
        let info = self.attached.get(&port).cloned();
        info.ok_or_else(|| UsbError::NotFound(format!("on port {port}")))
    }

    /// The guest pages the controller works on (the evict test aid).
    pub fn controller_structures(&self) -> Vec<(u64, u64)> {
        self.lock().xhci().guest_structures()
    }

    /// The I/O volume of the attached disk with this id.
    pub fn volume(&self, id: &str) -> Option<Arc<Volume>> {
        self.volumes.get(id).cloned()
    }

    pub fn list(&self) -> Vec<UsbDeviceInfo> {
        self.attached.values().cloned().collect()
    }

    /// Ports with nothing plugged in.
    pub fn free_ports(&self) -> Vec<u8> {
        (1..=USB2_PORTS + USB3_PORTS)
            .filter(|p| !self.attached.contains_key(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use devices::pci::{MsiMessage, MsiRouter};
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    struct NoRouter;
    impl MsiRouter for NoRouter {
        fn set_route(&self, _: u16, _: MsiMessage) -> io::Result<()> {
            Ok(())
        }
        fn fire(&self, _: u16) -> io::Result<()> {
            Ok(())
        }
    }

    struct Image(PathBuf);
    impl Image {
        fn new(name: &str, size: u64) -> Self {
            let p = std::env::temp_dir().join(format!("vmm-usb-{}-{name}.img", std::process::id()));
            std::fs::File::create(&p).unwrap().set_len(size).unwrap();
            Self(p)
        }
    }
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn manager() -> (UsbManager, Arc<Mutex<XhciPci>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let x = XhciPci::new(
            xhci_config(),
            GuestMemoryAtomic::new(mem),
            Arc::new(NoRouter),
        )
        .unwrap();
        let x = Arc::new(Mutex::new(x));
        (UsbManager::new(x.clone(), 3), x)
    }

    fn cfg(img: &Image, port: Option<u8>, id: Option<&str>) -> UsbStorageConfig {
        UsbStorageConfig {
            path: img.0.clone(),
            port,
            readonly: false,
            id: id.map(String::from),
        }
    }

    fn ccs(x: &Arc<Mutex<XhciPci>>, port: u8) -> bool {
        x.lock().unwrap().xhci().portsc(port).unwrap() & 1 != 0
    }

    #[test]
    fn attach_list_detach_and_port_choice() {
        let (mut m, x) = manager();
        let img = Image::new("a", 1 << 20);
        let a = m.attach(&cfg(&img, None, None)).unwrap();
        assert_eq!((a.port, a.speed, a.id.as_str()), (5, "usb3", "usb5"));
        assert_eq!(a.size_bytes, 1 << 20);
        assert!(ccs(&x, 5), "connected on the controller");
        // The same image again is locked by the first disk.
        let e = m.attach(&cfg(&img, Some(2), Some("again"))).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict, "{e}");
        assert!(m.list().len() == 1 && !ccs(&x, 2), "nothing plugged");
        let img2 = Image::new("a2", 1 << 20);
        let b = m.attach(&cfg(&img2, Some(2), Some("stick"))).unwrap();
        assert_eq!((b.port, b.speed), (2, "usb2"));
        assert_eq!(m.list(), vec![b.clone(), a.clone()]);
        assert_eq!(m.free_ports(), vec![1, 3, 4, 6, 7, 8]);
        let d = m.detach(&UsbTarget::Id("stick".into())).unwrap();
        assert_eq!(d, b);
        assert!(!ccs(&x, 2));
        let d = m.detach(&UsbTarget::Port(5)).unwrap();
        assert_eq!(d.id, "usb5");
        assert!(m.list().is_empty());
        // A detached image is closed (its lock released): it attaches again.
        for _ in 0..3 {
            m.attach(&cfg(&img, Some(6), Some("again"))).unwrap();
            m.detach(&UsbTarget::Id("again".into())).unwrap();
        }
    }

    #[test]
    fn conflicts_and_bad_requests_have_codes() {
        let (mut m, x) = manager();
        let img = Image::new("b", 4096);
        // Read-only: any number of disks may share the image.
        let cfg = |img: &Image, port, id| UsbStorageConfig {
            readonly: true,
            ..cfg(img, port, id)
        };
        m.attach(&cfg(&img, Some(1), Some("a"))).unwrap();
        let e = m.attach(&cfg(&img, Some(1), Some("b"))).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict);
        let e = m.attach(&cfg(&img, Some(2), Some("a"))).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict);
        let e = m.attach(&cfg(&img, Some(9), None)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let e = m.attach(&cfg(&img, Some(2), Some("bad id"))).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let missing = UsbStorageConfig {
            path: "/nonexistent/x.img".into(),
            port: Some(2),
            readonly: true,
            id: None,
        };
        let e = m.attach(&missing).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(!ccs(&x, 2), "nothing plugged after a failed open");
        assert_eq!(
            m.detach(&UsbTarget::Id("zz".into())).unwrap_err().code(),
            ErrorCode::NotFound
        );
        assert_eq!(
            m.detach(&UsbTarget::Port(3)).unwrap_err().code(),
            ErrorCode::NotFound
        );
        // Fill every port: the next automatic attach has nowhere to go.
        for _ in 0..7 {
            m.attach(&cfg(&img, None, None)).unwrap();
        }
        assert_eq!(
            m.attach(&cfg(&img, None, None)).unwrap_err().code(),
            ErrorCode::Conflict
        );
    }

    #[test]
    fn controller_state_reports_registers_and_never_waits_on_a_held_lock() {
        let (m, x) = manager();
        let st = m.controller_state(Duration::from_millis(100));
        // Halted after reset (HCH), nothing pending, no MSI-X or pin yet.
        assert_eq!(st["usbsts"], json!("0x00000001"), "{st}");
        assert_eq!(st["events_pending"], json!(false), "{st}");
        assert_eq!(st["interrupt_asserted"], json!(false), "{st}");
        assert_eq!(st["delivery"], json!("none"), "{st}");
        let held = x.lock().unwrap();
        let t = Instant::now();
        let st = m.controller_state(Duration::from_millis(50));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(st.as_str().is_some_and(|s| s.starts_with("busy")), "{st}");
        drop(held);
    }
}
