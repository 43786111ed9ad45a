//! Runtime power management as Linux drives it: USB link PM (U3 / U0 /
//! Resume), a device's remote wake, and the controller's Save / Restore
//! State around a runtime suspend (xhci_suspend / xhci_resume).

use std::sync::Arc;

use super::*;
use crate::block::Volume;

/// Attaches a disk on `port` and returns its volume (to watch it quiesce).
fn attach_watched(d: &mut Driver, port: u8, img: &TempImage) -> Arc<Volume> {
    let image = img.open(false);
    let volume = image.volume().clone();
    let dev = MassStorage::new(image, MassStorageConfig::default());
    d.xhci.attach(port, Box::new(dev)).unwrap();
    volume
}

/// A started controller with a watched disk on `port`, enumerated and its
/// events consumed: (driver, slot, volume).
fn enumerated(usb2: u8, usb3: u8, port: u8, img: &TempImage) -> (Driver, u8, Arc<Volume>) {
    let mut d = Driver::new(usb2, usb3);
    let vol = attach_watched(&mut d, port, img);
    d.start();
    let slot = d.enumerate(port);
    d.events();
    (d, slot, vol)
}

/// The guest's side of a U0 transition: the PLC event, then PLC cleared.
fn expect_plc_event(d: &mut Driver, port: u8) {
    assert_ne!(d.portsc(port) & ps::PLC, 0);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .expect("port status change for the link change");
    assert_eq!(ev.parameter >> 24, u64::from(port));
    d.write_portsc(port, ps::PP | ps::PLC);
}

fn link_state(d: &mut Driver, port: u8) -> u32 {
    (d.portsc(port) & ps::PLS_MASK) >> ps::PLS_SHIFT
}

fn write_link(d: &mut Driver, port: u8, pls: u32) {
    d.write_portsc(port, ps::PP | ps::LWS | (pls << ps::PLS_SHIFT));
}

/// usb_port_suspend on a USB 3 port: Stop Endpoint (Suspend) on both bulk
/// endpoints, then PLS = U3.
fn suspend_port(d: &mut Driver, slot: u8, port: u8) {
    for dci in [DCI_IN, DCI_OUT] {
        let ev = d.command(Driver::cmd(
            trb_type::STOP_ENDPOINT,
            slot,
            0,
            SP | (u32::from(dci) << 16),
        ));
        assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
        assert_eq!(d.xhci.endpoint_state(slot, dci), Some(EpState::Stopped));
    }
    write_link(d, port, ps::PLS_U3);
    assert_eq!(link_state(d, port), ps::PLS_U3);
    assert_eq!(d.portsc(port) & ps::PLC, 0, "entering U3 sets no PLC");
}

/// READ(10) of 8 sectors at LBA 8: checks the data against the image pattern.
fn read_checked(d: &mut Driver, slot: u8) {
    let (code, csw) = d.bot(slot, &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], 4096, true);
    assert_eq!(code, CompletionCode::Success as u8);
    assert_eq!(csw[12], 0, "CSW status");
    let mut buf = vec![0u8; 4096];
    d.mem.read_slice(&mut buf, GuestAddress(0x40_0000)).unwrap();
    for (i, s) in buf.chunks(512).enumerate() {
        assert!(
            s.iter().all(|&b| b == ((8 + i) % 251) as u8),
            "sector {}",
            8 + i
        );
    }
}

#[test]
fn u3_suspends_the_device_and_quiesces_its_volume_u0_resumes_with_plc() {
    let img = TempImage::new(64);
    let (mut d, slot, vol) = enumerated(0, 1, 1, &img);
    read_checked(&mut d, slot);
    suspend_port(&mut d, slot, 1);
    assert!(vol.is_quiesced(), "U3 quiesces the device's volume");
    assert_eq!(d.xhci.port_power()[0].device_suspended, Some(true));
    assert!(d.events().is_empty(), "no event for entering U3");
    // usb_port_resume: PLS = U0, then the driver waits for PLC.
    write_link(&mut d, 1, ps::PLS_U0);
    assert!(!vol.is_quiesced(), "U0 resumes the volume");
    assert_eq!(link_state(&mut d, 1), ps::PLS_U0);
    expect_plc_event(&mut d, 1);
    // Stopped endpoints restart on the doorbells the resume rings.
    read_checked(&mut d, slot);
    assert_eq!(d.xhci.endpoint_state(slot, DCI_IN), Some(EpState::Running));
    let info = vol.info();
    assert_eq!((info.quiesces, info.resumes), (1, 1), "{info:?}");
}

#[test]
fn usb2_resume_goes_through_resume_state_then_u0_with_plc() {
    let img = TempImage::new(64);
    let (mut d, slot, vol) = enumerated(1, 0, 1, &img);
    write_link(&mut d, 1, ps::PLS_U3);
    assert!(vol.is_quiesced());
    write_link(&mut d, 1, ps::PLS_RESUME);
    assert_eq!(link_state(&mut d, 1), ps::PLS_RESUME);
    assert!(!vol.is_quiesced(), "resume signalling wakes the device");
    assert_eq!(d.portsc(1) & ps::PLC, 0);
    write_link(&mut d, 1, ps::PLS_U0);
    expect_plc_event(&mut d, 1);
    read_checked(&mut d, slot);
}

#[test]
fn bulk_transfer_to_a_suspended_device_fails_without_waiting_on_its_volume() {
    let img = TempImage::new(64);
    let (mut d, slot, vol) = enumerated(0, 1, 1, &img);
    suspend_port(&mut d, slot, 1);
    // A guest that rings a doorbell anyway: the doorbell restarts the
    // endpoint and the device answers with a transaction error at once.
    let cbw = cbw(0x77, 512, true, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    d.mem.write_slice(&cbw, GuestAddress(DATA)).unwrap();
    let (code, _) = d.bulk(slot, DCI_OUT, DATA, 31, 64);
    assert_eq!(code, CompletionCode::UsbTransactionError as u8);
    assert!(vol.is_quiesced(), "still asleep");
}

#[test]
fn remote_wake_reports_resume_with_plc_and_wakes_the_device() {
    let img = TempImage::new(64);
    let (mut d, slot, vol) = enumerated(1, 1, 2, &img);
    assert!(matches!(
        d.xhci.remote_wake(2),
        Err(XhciError::NotSuspended(2))
    ));
    assert!(matches!(
        d.xhci.remote_wake(1),
        Err(XhciError::NotSuspended(1))
    ));
    assert!(matches!(
        d.xhci.remote_wake(9),
        Err(XhciError::InvalidPort(9))
    ));
    suspend_port(&mut d, slot, 2);
    d.xhci.remote_wake(2).unwrap();
    assert!(!vol.is_quiesced(), "the waking device resumes its volume");
    assert_eq!(link_state(&mut d, 2), ps::PLS_RESUME);
    // Linux (SS port): clear PLC, write U0, wait for the next PLC.
    expect_plc_event(&mut d, 2);
    write_link(&mut d, 2, ps::PLS_U0);
    expect_plc_event(&mut d, 2);
    read_checked(&mut d, slot);
}

#[test]
fn detaching_a_suspended_device_resumes_its_volume_and_returns() {
    let img = TempImage::new(64);
    let (mut d, slot, vol) = enumerated(0, 1, 1, &img);
    suspend_port(&mut d, slot, 1);
    let mut dev = d.xhci.detach(1).unwrap();
    assert!(dev.suspended());
    // The owner's detach (flush) would wait on a quiesced volume forever
    // if the device did not let go of it first.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        dev.detach();
        tx.send(dev.suspended()).unwrap();
    });
    let suspended = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("detach of a suspended device hung");
    assert!(!suspended);
    assert!(!vol.is_quiesced());
}

/// xhci_suspend: R/S cleared, HCH awaited, CSS, SSS awaited.
fn linux_suspend(d: &mut Driver) -> u32 {
    let cmd = d.r32(OP_BASE + op::USBCMD) & !op::CMD_RUN;
    d.w32(OP_BASE + op::USBCMD, cmd);
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_HCH, 0);
    d.w32(OP_BASE + op::USBCMD, cmd | op::CMD_CSS);
    let sts = d.r32(OP_BASE + op::USBSTS);
    assert_eq!(
        sts & (op::STS_SSS | op::STS_SRE | op::STS_HCE),
        0,
        "{sts:#x}"
    );
    cmd
}

/// xhci_resume without re-init: the registers written back as saved
/// (ERSTBA last reloads the segment table), CRCR at the driver's dequeue,
/// CRS, RSS awaited; then returns USBSTS for the SRE check.
fn linux_resume_registers(d: &mut Driver, cmd: u32) -> u32 {
    d.w32(OP_BASE + op::USBCMD, cmd);
    d.w32(OP_BASE + op::DNCTRL, 0);
    d.w64(OP_BASE + op::DCBAAP_LO, DCBAA);
    d.w32(OP_BASE + op::CONFIG, 8);
    d.w32(RT_BASE + rt::IR0 + rt::ERSTSZ, 1);
    d.w64(RT_BASE + rt::IR0 + rt::ERSTBA_LO, ERST);
    let erdp = EVENT_RING + u64::from(d.ev_index) * 16;
    d.w64(RT_BASE + rt::IR0 + rt::ERDP_LO, erdp);
    d.w32(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE);
    d.w32(RT_BASE + rt::IR0 + rt::IMOD, 0);
    let crcr = d.cmd.base + d.cmd.index * 16;
    d.w64(OP_BASE + op::CRCR_LO, crcr | u64::from(d.cmd.cycle));
    d.w32(OP_BASE + op::USBCMD, cmd | op::CMD_CRS);
    let sts = d.r32(OP_BASE + op::USBSTS);
    assert_eq!(sts & op::STS_RSS, 0);
    sts
}

#[test]
fn save_restore_keeps_the_event_ring_position_across_a_runtime_suspend() {
    let img = TempImage::new(64);
    let mut d = Driver::new(0, 2);
    d.attach_disk(1, &img, false);
    d.start();
    let slot = d.enumerate(1);
    d.events();
    // Events before the save moved the enqueue pointer well past the start.
    assert!(d.ev_index > 4, "index {}", d.ev_index);
    suspend_port(&mut d, slot, 1);
    let cmd = linux_suspend(&mut d);
    // A connect while suspended waits in the port's change bits.
    let img2 = TempImage::new(64);
    d.attach_disk(2, &img2, false);
    let sts = linux_resume_registers(&mut d, cmd);
    assert_eq!(
        sts & (op::STS_SRE | op::STS_HCE),
        0,
        "no xHC error in resume: {sts:#x}"
    );
    d.w32(OP_BASE + op::USBCMD, cmd | op::CMD_RUN);
    // The connect is reported where the driver's dequeue pointer looks.
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .expect("port 2 connect after resume");
    assert_eq!(ev.parameter >> 24, 2);
    // Commands complete where the driver expects them, with its cycle.
    let ev = d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    write_link(&mut d, 1, ps::PLS_U0);
    d.write_portsc(1, ps::PP | ps::PLC);
    read_checked(&mut d, slot);
    // Enough traffic to wrap the 32-entry ring: the cycle bit still agrees.
    for _ in 0..40 {
        let ev = d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
        assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    }
}

#[test]
fn events_queued_for_room_survive_save_and_restore() {
    let mut d = Driver::new(0, 1);
    d.start();
    // Fill the event ring without consuming: the rest waits in overflow.
    let mut addrs = Vec::new();
    for _ in 0..EVENT_TRBS + 4 {
        let addr = d
            .cmd
            .push(&d.mem, Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
        addrs.push(addr);
    }
    d.w32(DB_BASE, 0);
    let cmd = linux_suspend(&mut d);
    let sts = linux_resume_registers(&mut d, cmd);
    assert_eq!(sts & op::STS_SRE, 0);
    d.w32(OP_BASE + op::USBCMD, cmd | op::CMD_RUN);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.extend(d.events().into_iter().map(|e| e.parameter));
    }
    assert_eq!(seen, addrs, "every completion once, in order");
}

#[test]
fn restore_with_nothing_saved_reports_save_restore_error() {
    let mut d = Driver::new(0, 1);
    d.start();
    // CSS while running is ignored (nothing saved), so CRS has nothing.
    let run = d.r32(OP_BASE + op::USBCMD);
    d.w32(OP_BASE + op::USBCMD, run | op::CMD_CSS);
    let cmd = run & !op::CMD_RUN;
    d.w32(OP_BASE + op::USBCMD, cmd);
    d.w32(OP_BASE + op::USBCMD, cmd | op::CMD_CRS);
    let sts = d.r32(OP_BASE + op::USBSTS);
    assert_ne!(sts & op::STS_SRE, 0, "{sts:#x}");
    // SRE is RW1C; the guest re-initialises (HCRST) and may save again.
    d.w32(OP_BASE + op::USBSTS, op::STS_SRE);
    assert_eq!(d.r32(OP_BASE + op::USBSTS) & op::STS_SRE, 0);
    let cmd = linux_suspend(&mut d);
    // HCRST forgets what was saved.
    d.w32(OP_BASE + op::USBCMD, op::CMD_HCRST);
    d.w32(OP_BASE + op::USBCMD, cmd | op::CMD_CRS);
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_SRE, 0);
    // A different segment table than the saved one cannot be restored.
    let mut d = Driver::new(0, 1);
    d.start();
    let cmd = linux_suspend(&mut d);
    let entry = ErstEntry {
        base: EVENT_RING + 0x800,
        size: EVENT_TRBS,
        reserved: 0,
    };
    d.mem.write_obj(entry, GuestAddress(ERST)).unwrap();
    let sts = linux_resume_registers(&mut d, cmd);
    assert_ne!(sts & op::STS_SRE, 0, "{sts:#x}");
}

/// A device that records, for each hook, whether the calling thread was in
/// a NOIO scope, and at resume how many Port Status Change events for its
/// port were already in the event ring (guest memory touched first).
struct Probe {
    log: ProbeLog,
    mem: GuestMemoryMmap,
    suspended: bool,
}

fn psc_events_in_ring(mem: &GuestMemoryMmap) -> usize {
    (0..u64::from(EVENT_TRBS))
        .filter_map(|i| mem.read_obj::<Trb>(GuestAddress(EVENT_RING + 16 * i)).ok())
        .filter(|t| t.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .count()
}

impl Probe {
    fn note(&self, hook: &'static str) {
        let n = psc_events_in_ring(&self.mem);
        self.log
            .lock()
            .unwrap()
            .push((hook, crate::noio::is_noio(), n));
    }
}

impl crate::usb::UsbDevice for Probe {
    fn max_speed(&self) -> UsbSpeed {
        UsbSpeed::Super
    }
    fn set_speed(&mut self, _: UsbSpeed) {}
    fn speed(&self) -> UsbSpeed {
        UsbSpeed::Super
    }
    fn reset(&mut self) {
        self.note("reset");
    }
    fn control(
        &mut self,
        _: &SetupPacket,
        _: &mut dyn crate::usb::TransferBuffer,
    ) -> crate::usb::TransferResult {
        self.note("control");
        crate::usb::TransferResult::completed(0)
    }
    fn bulk(
        &mut self,
        _: u8,
        _: &mut dyn crate::usb::TransferBuffer,
    ) -> crate::usb::TransferResult {
        crate::usb::TransferResult::error(0)
    }
    fn halted(&self, _: u8) -> bool {
        false
    }
    fn clear_halt(&mut self, _: u8) {}
    fn endpoints(&self) -> Vec<crate::usb::EndpointInfo> {
        Vec::new()
    }
    fn suspend(&mut self) {
        self.suspended = true;
        self.note("suspend");
    }
    fn resume(&mut self) {
        if self.suspended {
            self.suspended = false;
            self.note("resume");
        }
    }
    fn suspended(&self) -> bool {
        self.suspended
    }
}

type ProbeLog = Arc<std::sync::Mutex<Vec<(&'static str, bool, usize)>>>;

fn probe_on(d: &mut Driver, port: u8) -> ProbeLog {
    let log = ProbeLog::default();
    let probe = Probe {
        log: log.clone(),
        mem: d.mem.clone(),
        suspended: false,
    };
    d.xhci.attach(port, Box::new(probe)).unwrap();
    log
}

/// Whether `hook` ran, each time in a NOIO scope.
fn ran_noio(log: &ProbeLog, hook: &str) -> Vec<bool> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == hook)
        .map(|e| e.1)
        .collect()
}

#[test]
fn resume_paths_run_in_noio_scopes_and_touch_guest_memory_before_the_volume() {
    let mut d = Driver::new(0, 1);
    let log = probe_on(&mut d, 1);
    d.start();
    d.events();
    d.write_portsc(1, ps::PP | ps::CHANGE_MASK);
    write_link(&mut d, 1, ps::PLS_U3);
    let psc_before = psc_events_in_ring(&d.mem);
    write_link(&mut d, 1, ps::PLS_U0);
    let entries = log.lock().unwrap().clone();
    let resume = entries
        .iter()
        .find(|e| e.0 == "resume")
        .expect("device resumed");
    assert!(resume.1, "U3 -> U0 resume ran outside a NOIO scope");
    assert_eq!(
        resume.2,
        psc_before + 1,
        "the PLC event was not posted before the device resumed"
    );
    assert_eq!(
        ran_noio(&log, "suspend"),
        vec![false],
        "suspend is no resume path"
    );
    // The host-side remote wake resumes in a NOIO scope, event first.
    d.events();
    d.write_portsc(1, ps::PP | ps::CHANGE_MASK);
    write_link(&mut d, 1, ps::PLS_U3);
    let psc_before = psc_events_in_ring(&d.mem);
    d.xhci.remote_wake(1).unwrap();
    let last = *log.lock().unwrap().last().unwrap();
    assert_eq!(last.0, "resume");
    assert!(last.1, "remote wake resumed outside a NOIO scope");
    assert_eq!(last.2, psc_before + 1);
    assert!(!crate::noio::is_noio(), "a scope leaked past its handler");
}

#[test]
fn reset_paths_run_in_noio_scopes() {
    let mut d = Driver::new(0, 1);
    let log = probe_on(&mut d, 1);
    d.start();
    d.events();
    // start() began with HCRST, which resets attached devices in NOIO.
    assert_eq!(ran_noio(&log, "reset"), vec![true]);
    // Port reset (PR) and warm reset (WPR) reset the device in NOIO.
    d.write_portsc(1, ps::PP | ps::PR);
    d.write_portsc(1, ps::PP | ps::WPR);
    assert_eq!(ran_noio(&log, "reset"), vec![true, true, true]);
    // Control transfers (Bulk-Only reset, re-enumeration) run in NOIO.
    d.start();
    d.events();
    let slot = d.address(1);
    d.control(slot, get_descriptor(1, 18), None);
    let control = ran_noio(&log, "control");
    assert!(
        !control.is_empty() && control.iter().all(|&n| n),
        "{control:?}"
    );
    assert!(!crate::noio::is_noio(), "a scope leaked past its handler");
}

/// An interrupt line that records whether each trigger came from a NOIO
/// scope: the controller signals at the end of the handler that posted.
#[derive(Default)]
struct NoioIrq(std::sync::Mutex<Vec<bool>>);
impl Interrupt for NoioIrq {
    fn trigger(&self, _vector: u16) {
        self.0.lock().unwrap().push(crate::noio::is_noio());
    }
}

#[test]
fn command_ring_runs_in_a_noio_scope() {
    let mut d = Driver::new(0, 1);
    let irq = Arc::new(NoioIrq::default());
    d.xhci.set_interrupt(irq.clone());
    d.start();
    d.events();
    irq.0.lock().unwrap().clear();
    d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    assert_eq!(
        *irq.0.lock().unwrap(),
        vec![true],
        "command ring outside NOIO"
    );
    // An ERDP write is no resume or reset path.
    d.w32(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE);
    d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    assert!(!crate::noio::is_noio());
}
