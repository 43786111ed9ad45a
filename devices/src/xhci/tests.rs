//! Tests that drive the controller the way Linux's xhci-hcd, usbcore and
//! usb-storage do: registers, rings and contexts in a GuestMemoryMmap.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::regs::{cap, op, port as ps, rt, DB_BASE, OP_BASE, PORT_BASE, RT_BASE, XECP_BASE};
use super::slot::{EpState, SlotState};
use super::trb::*;
use super::*;
use crate::interrupt::Interrupt;
use crate::usb::mass_storage::tests::{cbw, TempImage};
use crate::usb::mass_storage::{MassStorage, MassStorageConfig};
use crate::usb::{request, SetupPacket, UsbSpeed};

mod intx_interleaving;
mod power;
mod random_guest;

use super::test_utils::*;

/// Plugs a disk on `img` into `port`.
impl Driver {
    pub(crate) fn attach_disk(&mut self, port: u8, img: &TempImage, readonly: bool) {
        let dev = MassStorage::new(img.open(readonly), MassStorageConfig::default());
        self.xhci.attach(port, Box::new(dev)).unwrap();
    }
}

#[test]
fn capabilities_advertise_ports_protocols_and_one_erst_segment() {
    let mut d = Driver::new(2, 3);
    assert_eq!(d.r32(cap::CAPLENGTH_HCIVERSION), 0x0120_0040);
    let hcs1 = d.r32(cap::HCSPARAMS1);
    assert_eq!((hcs1 >> 24, (hcs1 >> 8) & 0x7ff), (5, 1));
    assert_eq!((d.r32(cap::HCSPARAMS2) >> 4) & 0xf, 0);
    let hcc1 = d.r32(cap::HCCPARAMS1);
    assert_eq!(hcc1 & 4, 0, "32-byte contexts");
    let xecp = u64::from(hcc1 >> 16) * 4;
    assert_eq!(xecp, XECP_BASE);
    // First Supported Protocol: USB 2.0, ports 1-2; next: USB 3.0, ports 3-5.
    let c0 = d.r32(xecp);
    assert_eq!((c0 & 0xff, c0 >> 24), (2, 2));
    assert_eq!(d.r32(xecp + 4), 0x2042_5355);
    assert_eq!(d.r32(xecp + 8) & 0xffff, 1 | (2 << 8));
    let next = xecp + u64::from((c0 >> 8) & 0xff) * 4;
    let c1 = d.r32(next);
    assert_eq!((c1 & 0xff, (c1 >> 8) & 0xff, c1 >> 24), (2, 0, 3));
    assert_eq!(d.r32(next + 8) & 0xffff, 3 | (3 << 8));
    assert_eq!(Xhci::mmio_size(), 0x4000);
}

#[test]
fn enumerates_and_runs_bot_on_usb3_port() {
    let img = TempImage::new(8192);
    let mut d = Driver::new(2, 2);
    d.attach_disk(3, &img, false);
    d.start();
    // The connection made while halted is reported on run.
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .unwrap();
    assert_eq!(ev.parameter >> 24, 3);
    let sc = d.portsc(3);
    assert_eq!(
        sc & (ps::CCS | ps::PED | ps::CSC),
        ps::CCS | ps::PED | ps::CSC
    );
    assert_eq!((sc & ps::SPEED_MASK) >> ps::SPEED_SHIFT, ps::SPEED_SUPER);
    d.write_portsc(3, ps::PP | ps::CSC);
    assert_eq!(d.portsc(3) & ps::CSC, 0);
    let slot = d.enumerate(3);
    assert_eq!(d.xhci.slot_state(slot), Some(SlotState::Configured));
    assert_eq!(d.out_ctx(slot, 0).slot_state(), slot_ctx_state::CONFIGURED);
    assert_eq!(d.out_ctx(slot, 0).device_address(), slot);
    assert_eq!(d.out_ctx(slot, DCI_IN).ep_state(), EpState::Running as u32);
    let (desc, _) = d.control(slot, get_descriptor(1, 18), None);
    assert_eq!(u16::from_le_bytes([desc[2], desc[3]]), 0x0300);
    let (bos, code) = d.control(slot, get_descriptor(15, 64), None);
    assert_eq!((bos.len(), code), (22, CompletionCode::Success as u8));

    // INQUIRY.
    let (code, csw) = d.bot(slot, &[0x12, 0, 0, 0, 36, 0], 36, true);
    assert_eq!((code, csw[12]), (CompletionCode::Success as u8, 0));
    let mut inq = [0u8; 36];
    d.mem.read_slice(&mut inq, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(&inq[8..12], b"RVMM");
    // READ CAPACITY(10).
    let (_, csw) = d.bot(slot, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, true);
    assert_eq!(csw[12], 0);
    let mut cap10 = [0u8; 8];
    d.mem
        .read_slice(&mut cap10, GuestAddress(0x40_0000))
        .unwrap();
    assert_eq!(u32::from_be_bytes(cap10[..4].try_into().unwrap()), 8191);
    // WRITE(10) 1 MiB in 64 KiB TRBs, READ(10) it back into another buffer.
    let payload: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    d.mem
        .write_slice(&payload, GuestAddress(0x40_0000))
        .unwrap();
    let (code, csw) = d.bot(
        slot,
        &[0x2a, 0, 0, 0, 0, 100, 0, 0x08, 0, 0],
        1 << 20,
        false,
    );
    assert_eq!((code, csw[12]), (CompletionCode::Success as u8, 0));
    d.mem
        .write_slice(&vec![0u8; 1 << 20], GuestAddress(0x40_0000))
        .unwrap();
    let (code, csw) = d.bot(slot, &[0x28, 0, 0, 0, 0, 100, 0, 0x08, 0, 0], 1 << 20, true);
    assert_eq!((code, csw[12]), (CompletionCode::Success as u8, 0));
    let mut back = vec![0u8; 1 << 20];
    d.mem
        .read_slice(&mut back, GuestAddress(0x40_0000))
        .unwrap();
    assert!(back == payload, "read-back differs");
    let raw = std::fs::read(&img.0).unwrap();
    assert!(raw[100 * 512..100 * 512 + (1 << 20)] == payload[..]);
    assert!(d.irq.0.load(Ordering::SeqCst) > 0);
}

#[test]
fn usb2_port_needs_reset_and_runs_high_speed() {
    let img = TempImage::new(64);
    let mut d = Driver::new(2, 2);
    d.start();
    d.attach_disk(1, &img, false);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .unwrap();
    assert_eq!(ev.parameter >> 24, 1);
    let sc = d.portsc(1);
    assert_eq!(
        sc & (ps::CCS | ps::PED),
        ps::CCS,
        "USB 2 port enabled only by reset"
    );
    assert_eq!((sc & ps::SPEED_MASK) >> ps::SPEED_SHIFT, ps::SPEED_HIGH);
    // A slot enabled earlier does not disturb the enumeration that follows.
    let ev = d.command(Driver::cmd(trb_type::ENABLE_SLOT, 0, 0, 0));
    let s0 = ev.slot_id();
    let slot = d.enumerate(1);
    assert_ne!(slot, s0);
    let (desc, _) = d.control(slot, get_descriptor(1, 18), None);
    assert_eq!(
        (u16::from_le_bytes([desc[2], desc[3]]), desc[7]),
        (0x0200, 64)
    );
    let (_, csw) = d.bot(slot, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, true);
    assert_eq!(csw[12], 0);
}

#[test]
fn short_read_reports_residual_and_stall_recovers() {
    let img = TempImage::new(64);
    let mut d = Driver::new(0, 1);
    d.attach_disk(1, &img, false);
    d.start();
    let slot = d.enumerate(1);
    // INQUIRY into a 512-byte buffer: Short Packet with residual 476.
    d.mem
        .write_slice(
            &cbw(1, 512, true, &[0x12, 0, 0, 0, 36, 0]),
            GuestAddress(DATA),
        )
        .unwrap();
    d.bulk(slot, DCI_OUT, DATA, 31, 64);
    let (code, residual) = d.bulk(slot, DCI_IN, 0x40_0000, 512, 512);
    assert_eq!((code, residual), (CompletionCode::ShortPacket as u8, 476));
    d.bulk(slot, DCI_IN, DATA + 0x100, 13, 13);
    // Unknown opcode with a data-in phase: the IN pipe STALLs.
    d.mem
        .write_slice(
            &cbw(2, 64, true, &[0xc7, 0, 0, 0, 0, 0]),
            GuestAddress(DATA),
        )
        .unwrap();
    d.bulk(slot, DCI_OUT, DATA, 31, 64);
    let (code, _) = d.bulk(slot, DCI_IN, 0x40_0000, 64, 64);
    assert_eq!(code, CompletionCode::StallError as u8);
    assert_eq!(d.xhci.endpoint_state(slot, DCI_IN), Some(EpState::Halted));
    assert_eq!(d.out_ctx(slot, DCI_IN).ep_state(), EpState::Halted as u32);
    // Doorbells on a halted endpoint do nothing.
    d.doorbell(slot, DCI_IN);
    // Linux: Reset Endpoint, Set TR Dequeue past the TD, CLEAR_FEATURE(HALT).
    let ev = d.command(Driver::cmd(
        trb_type::RESET_ENDPOINT,
        slot,
        0,
        u32::from(DCI_IN) << 16,
    ));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    let p = d.ring(slot, DCI_IN);
    let deq = p.base + p.index * 16;
    let cyc = u64::from(p.cycle);
    let ev = d.command(Driver::cmd(
        trb_type::SET_TR_DEQUEUE,
        slot,
        deq | cyc,
        u32::from(DCI_IN) << 16,
    ));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    let clear = SetupPacket {
        request_type: 2,
        request: request::CLEAR_FEATURE,
        value: 0,
        index: 0x81,
        length: 0,
    };
    assert_eq!(
        d.control(slot, clear, None).1,
        CompletionCode::Success as u8
    );
    let (code, _) = d.bulk(slot, DCI_IN, DATA + 0x100, 13, 13);
    assert_eq!(code, CompletionCode::Success as u8);
    let mut csw = [0u8; 13];
    d.mem
        .read_slice(&mut csw, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!((csw[4], csw[12]), (2, 1));
    // REQUEST SENSE says INVALID COMMAND OPCODE.
    let (_, csw) = d.bot(slot, &[0x03, 0, 0, 0, 18, 0], 18, true);
    assert_eq!(csw[12], 0);
    let mut sense = [0u8; 18];
    d.mem
        .read_slice(&mut sense, GuestAddress(0x40_0000))
        .unwrap();
    assert_eq!((sense[2], sense[12]), (5, 0x20));
}

#[test]
fn port_reset_and_reset_device_then_reenumerate() {
    let img = TempImage::new(64);
    let mut d = Driver::new(0, 1);
    d.attach_disk(1, &img, false);
    d.start();
    let slot = d.enumerate(1);
    d.events();
    // usb_reset_device: port reset, Reset Device, Address Device, configure.
    d.write_portsc(1, ps::PP | ps::PR);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .unwrap();
    assert_eq!(ev.parameter >> 24, 1);
    assert_ne!(d.portsc(1) & ps::PRC, 0);
    d.write_portsc(1, ps::PP | ps::PRC);
    // Warm reset sets WRC as well.
    d.write_portsc(1, ps::PP | ps::WPR);
    assert_eq!(d.portsc(1) & (ps::WRC | ps::PRC), ps::WRC | ps::PRC);
    d.write_portsc(1, ps::PP | ps::WRC | ps::PRC);
    let ev = d.command(Driver::cmd(trb_type::RESET_DEVICE, slot, 0, 0));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    assert_eq!(d.xhci.slot_state(slot), Some(SlotState::Default));
    assert_eq!(d.xhci.endpoint_state(slot, DCI_IN), Some(EpState::Disabled));
    // The device lost its configuration; BOT on it is refused until configured.
    let mut ctx = [Context::default(); 3];
    ctx[0].0[1] = 3;
    ctx[1].0[1] = 1 << 16;
    ctx[2].0[1] = (ep_type::CONTROL << 3) | (512 << 16);
    d.rings.remove(&(slot, 1));
    ctx[2].set_dequeue(ring_base(slot, 1), true);
    for (i, c) in ctx.iter().enumerate() {
        d.mem
            .write_obj(*c, GuestAddress(INPUT_CTX + 32 * i as u64))
            .unwrap();
    }
    let ev = d.command(Driver::cmd(trb_type::ADDRESS_DEVICE, slot, INPUT_CTX, 0));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    d.configure(slot, 1024);
    let (_, csw) = d.bot(slot, &[0, 0, 0, 0, 0, 0], 0, false);
    assert_eq!(csw[12], 0);
}

#[test]
fn detach_mid_transfer_fails_it_and_commands_still_complete() {
    let img = TempImage::new(64);
    let mut d = Driver::new(0, 2);
    d.attach_disk(2, &img, false);
    d.start();
    let slot = d.enumerate(2);
    d.events();
    // A CSW read with no command: the device NAKs and the TD stays in flight.
    let td = d.queue_bulk(slot, DCI_IN, DATA, 13, 13);
    d.doorbell(slot, DCI_IN);
    assert!(d.events().is_empty());
    let dev = d.xhci.detach(2).unwrap();
    drop(dev);
    let evs = d.events();
    let xfer = evs
        .iter()
        .find(|e| e.trb_type() == trb_type::TRANSFER_EVENT)
        .unwrap();
    assert_eq!(
        (xfer.parameter, xfer.completion_code()),
        (td, CompletionCode::UsbTransactionError as u8)
    );
    assert!(evs
        .iter()
        .any(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE && e.parameter >> 24 == 2));
    let sc = d.portsc(2);
    assert_eq!(sc & (ps::CCS | ps::PED | ps::CSC), ps::CSC);
    assert_eq!((sc & ps::PLS_MASK) >> ps::PLS_SHIFT, ps::PLS_RX_DETECT);
    // Transfers to the vanished device fail, commands still complete.
    let (code, _) = d.bulk(slot, DCI_OUT, DATA, 31, 64);
    assert_eq!(code, CompletionCode::UsbTransactionError as u8);
    let ev = d.command(Driver::cmd(trb_type::STOP_ENDPOINT, slot, 0, 1 << 16));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    let ev = d.command(Driver::cmd(trb_type::DISABLE_SLOT, slot, 0, 0));
    assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
    assert_eq!(d.xhci.slot_state(slot), Some(SlotState::Disabled));
    assert!(matches!(d.xhci.detach(2), Err(XhciError::PortEmpty(2))));
    // Re-attach: a new connection, enumerates again.
    d.attach_disk(2, &img, false);
    let slot = d.enumerate(2);
    let (_, csw) = d.bot(slot, &[0, 0, 0, 0, 0, 0], 0, false);
    assert_eq!(csw[12], 0);
}

#[test]
fn erdp_write_with_pending_events_reraises_the_interrupt() {
    let mut d = Driver::new(0, 1);
    d.start();
    let base = d.irq.0.load(Ordering::SeqCst);
    let a = d
        .cmd
        .push(&d.mem.clone(), Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    let b = d
        .cmd
        .push(&d.mem.clone(), Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    d.w32(DB_BASE, 0);
    // Two events, one interrupt: EHB blocks the second.
    assert_eq!(d.irq.0.load(Ordering::SeqCst), base + 1);
    let erdp = d.r32(RT_BASE + rt::IR0 + rt::ERDP_LO);
    assert_ne!(u64::from(erdp) & rt::ERDP_EHB, 0);
    // Consume only the first event, clear EHB: the interrupt fires again.
    let e0: Trb = d.mem.read_obj(GuestAddress(EVENT_RING)).unwrap();
    assert_eq!(e0.parameter, a);
    d.w32(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE | rt::IMAN_IP);
    // The handler acknowledged EINT before reading the ring (xhci_irq)...
    d.w32(OP_BASE + op::USBSTS, op::STS_EINT);
    assert_eq!(d.r32(OP_BASE + op::USBSTS) & op::STS_EINT, 0);
    d.w64(
        RT_BASE + rt::IR0 + rt::ERDP_LO,
        (EVENT_RING + 16) | rt::ERDP_EHB,
    );
    assert_eq!(d.irq.0.load(Ordering::SeqCst), base + 2);
    // ...and the re-raised interrupt sets it again, or Linux's handler
    // would see EINT clear and return IRQ_NONE.
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_EINT, 0);
    d.ev_index = 1;
    let evs = d.drain();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].parameter, b);
    // Everything consumed: no further interrupt.
    assert_eq!(d.irq.0.load(Ordering::SeqCst), base + 2);
    // IE clear: events post but no interrupt.
    d.w32(RT_BASE + rt::IR0 + rt::IMAN, 0);
    d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    assert_eq!(d.irq.0.load(Ordering::SeqCst), base + 2);
}

#[test]
fn event_ring_full_queues_events_until_erdp_moves() {
    let mut d = Driver::new(0, 1);
    d.start();
    let mut addrs = Vec::new();
    for _ in 0..40 {
        addrs.push(
            d.cmd
                .push(&d.mem.clone(), Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0)),
        );
    }
    d.w32(DB_BASE, 0);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(d.drain().into_iter().map(|e| e.parameter));
    }
    assert_eq!(got, addrs, "every completion arrives, in order");
}

#[test]
fn command_errors_and_abort() {
    let mut d = Driver::new(0, 1);
    d.start();
    let code = |e: Trb| e.completion_code();
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::DISABLE_SLOT, 5, 0, 0))),
        CompletionCode::SlotNotEnabled as u8
    );
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::DISABLE_SLOT, 200, 0, 0))),
        CompletionCode::SlotNotEnabled as u8
    );
    assert_eq!(
        code(d.command(Driver::cmd(22, 0, 0, 0))),
        CompletionCode::TrbError as u8
    );
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::NORMAL, 0, 0, 0))),
        CompletionCode::TrbError as u8
    );
    let slot = d
        .command(Driver::cmd(trb_type::ENABLE_SLOT, 0, 0, 0))
        .slot_id();
    // Input context outside guest memory.
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::ADDRESS_DEVICE, slot, 0xffff_ff00, 0))),
        CompletionCode::TrbError as u8
    );
    // Port with no device, BSR = 0: the device does not answer.
    let mut ctx = [Context::default(); 3];
    ctx[0].0[1] = 3;
    ctx[1].0[1] = 1 << 16;
    ctx[2].0[1] = ep_type::CONTROL << 3 | (512 << 16);
    ctx[2].set_dequeue(0x9000, true);
    for (i, c) in ctx.iter().enumerate() {
        d.mem
            .write_obj(*c, GuestAddress(INPUT_CTX + 32 * i as u64))
            .unwrap();
    }
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::ADDRESS_DEVICE, slot, INPUT_CTX, 0))),
        CompletionCode::UsbTransactionError as u8
    );
    // Configure Endpoint before Address Device: wrong state.
    assert_eq!(
        code(d.command(Driver::cmd(
            trb_type::CONFIGURE_ENDPOINT,
            slot,
            INPUT_CTX,
            0
        ))),
        CompletionCode::ContextStateError as u8
    );
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::RESET_ENDPOINT, slot, 0, 3 << 16))),
        CompletionCode::EndpointNotEnabled as u8
    );
    // Slots run out.
    for _ in 1..8 {
        assert_eq!(
            code(d.command(Driver::cmd(trb_type::ENABLE_SLOT, 0, 0, 0))),
            1
        );
    }
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::ENABLE_SLOT, 0, 0, 0))),
        CompletionCode::NoSlotsAvailable as u8
    );
    // CRCR.CA stops the running ring with a Command Ring Stopped event.
    assert_ne!(d.r32(OP_BASE + op::CRCR_LO) & op::CRCR_CRR as u32, 0);
    d.w64(OP_BASE + op::CRCR_LO, op::CRCR_CA);
    assert_eq!(d.r32(OP_BASE + op::CRCR_LO) & op::CRCR_CRR as u32, 0);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::COMMAND_COMPLETION)
        .unwrap();
    assert_eq!(
        ev.completion_code(),
        CompletionCode::CommandRingStopped as u8
    );
    // The ring restarts where it stopped on the next doorbell.
    assert_eq!(
        code(d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0))),
        1
    );
}

#[test]
fn malformed_transfer_rings_halt_the_endpoint() {
    let img = TempImage::new(64);
    let mut d = Driver::new(0, 1);
    d.attach_disk(1, &img, false);
    d.start();
    let slot = d.enumerate(1);
    d.events();
    let reset = |d: &mut Driver, dci: u8| {
        let ev = d.command(Driver::cmd(
            trb_type::RESET_ENDPOINT,
            slot,
            0,
            u32::from(dci) << 16,
        ));
        assert_eq!(ev.completion_code(), 1);
        d.rings.remove(&(slot, dci));
        let base = ring_base(slot, dci);
        d.mem.write_slice(&[0u8; 4096], GuestAddress(base)).unwrap();
        let ev = d.command(Driver::cmd(
            trb_type::SET_TR_DEQUEUE,
            slot,
            base | 1,
            u32::from(dci) << 16,
        ));
        assert_eq!(ev.completion_code(), 1);
    };
    // 1. A buffer beyond guest memory.
    let (code, _) = d.bulk(slot, DCI_OUT, (MEM_SIZE - 8) as u64, 31, 64);
    assert_eq!(code, CompletionCode::TrbError as u8);
    assert_eq!(d.xhci.endpoint_state(slot, DCI_OUT), Some(EpState::Halted));
    reset(&mut d, DCI_OUT);
    // 2. A chained TD whose link points at itself (never ends).
    let base = ring_base(slot, DCI_OUT);
    let normal = Trb {
        parameter: DATA,
        status: 31,
        control: CYCLE | CHAIN,
    }
    .with_type(trb_type::NORMAL);
    let link = Trb {
        parameter: base + 16,
        status: 0,
        control: CYCLE | CHAIN,
    }
    .with_type(trb_type::LINK);
    d.mem.write_obj(normal, GuestAddress(base)).unwrap();
    d.mem.write_obj(link, GuestAddress(base + 16)).unwrap();
    d.doorbell(slot, DCI_OUT);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::TRANSFER_EVENT)
        .unwrap();
    assert_eq!(ev.completion_code(), CompletionCode::TrbError as u8);
    reset(&mut d, DCI_OUT);
    // 3. A link to nowhere.
    let link = Trb {
        parameter: 0xdead_beef_0000,
        status: 0,
        control: CYCLE,
    }
    .with_type(trb_type::LINK);
    d.mem.write_obj(link, GuestAddress(base)).unwrap();
    d.doorbell(slot, DCI_OUT);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::TRANSFER_EVENT)
        .unwrap();
    assert_eq!(
        (ev.completion_code(), ev.parameter),
        (CompletionCode::TrbError as u8, 0xdead_beef_0000)
    );
    reset(&mut d, DCI_OUT);
    // 4. A Setup Stage TRB on a bulk ring, an oversize immediate TRB.
    let bad = Trb {
        parameter: 0,
        status: 8,
        control: CYCLE | IDT | IOC,
    }
    .with_type(trb_type::SETUP_STAGE);
    d.mem.write_obj(bad, GuestAddress(base)).unwrap();
    d.doorbell(slot, DCI_OUT);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::TRANSFER_EVENT)
        .unwrap();
    assert_eq!(ev.completion_code(), CompletionCode::TrbError as u8);
    // 5. A control TD without a proper Setup Stage.
    d.push(
        slot,
        1,
        Trb {
            parameter: 0,
            status: 4,
            control: IOC,
        }
        .with_type(trb_type::SETUP_STAGE),
    );
    d.push(
        slot,
        1,
        Trb {
            parameter: 0,
            status: 0,
            control: IOC,
        }
        .with_type(trb_type::STATUS_STAGE),
    );
    d.doorbell(slot, 1);
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::TRANSFER_EVENT)
        .unwrap();
    assert_eq!(ev.completion_code(), CompletionCode::TrbError as u8);
    assert_eq!(d.xhci.endpoint_state(slot, 1), Some(EpState::Halted));
    // 6. Valid TDs on a ring that links back to itself without toggling:
    // bounded work per doorbell, then the controller keeps answering.
    let ev = d.command(Driver::cmd(
        trb_type::STOP_ENDPOINT,
        slot,
        0,
        u32::from(DCI_IN) << 16,
    ));
    assert_eq!(ev.completion_code(), 1);
    let base_in = ring_base(slot, DCI_IN);
    let ev = d.command(Driver::cmd(
        trb_type::SET_TR_DEQUEUE,
        slot,
        base_in | 1,
        u32::from(DCI_IN) << 16,
    ));
    assert_eq!(ev.completion_code(), 1);
    let noop = Trb {
        parameter: 0,
        status: 0,
        control: CYCLE,
    }
    .with_type(trb_type::NOOP);
    let link = Trb {
        parameter: base_in,
        status: 0,
        control: CYCLE,
    }
    .with_type(trb_type::LINK);
    d.mem.write_obj(noop, GuestAddress(base_in)).unwrap();
    d.mem.write_obj(link, GuestAddress(base_in + 16)).unwrap();
    d.doorbell(slot, DCI_IN);
    assert_eq!(
        d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0))
            .completion_code(),
        1
    );
}

#[test]
fn broken_command_and_event_rings_raise_host_system_error() {
    let mut d = Driver::new(0, 1);
    d.start();
    let link = Trb {
        parameter: 0x7fff_0000_0000,
        status: 0,
        control: CYCLE,
    }
    .with_type(trb_type::LINK);
    d.mem.write_obj(link, GuestAddress(CMD_RING)).unwrap();
    d.w32(DB_BASE, 0);
    let sts = d.r32(OP_BASE + op::USBSTS);
    assert_eq!(sts & (op::STS_HSE | op::STS_HCH), op::STS_HSE | op::STS_HCH);
    // HCRST recovers; an ERST outside memory leaves no ring: the first event is an HSE.
    d.cmd = Producer::new(CMD_RING);
    d.mem
        .write_slice(&[0u8; 1024], GuestAddress(CMD_RING))
        .unwrap();
    d.start();
    d.w64(RT_BASE + rt::IR0 + rt::ERSTBA_LO, 0x7fff_0000_0000);
    d.cmd
        .push(&d.mem.clone(), Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    d.w32(DB_BASE, 0);
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_HSE, 0);
}

#[test]
fn portsc_change_bits_are_rw1c_and_link_states_follow_pls_writes() {
    let img = TempImage::new(64);
    let mut d = Driver::new(1, 1);
    d.start();
    d.attach_disk(2, &img, false);
    assert_eq!(d.events().len(), 1);
    // Writing 0 to CSC keeps it; a second change while CSC is set posts no event.
    d.write_portsc(2, ps::PP);
    assert_ne!(d.portsc(2) & ps::CSC, 0);
    d.write_portsc(2, ps::PP | ps::PR);
    assert!(d.events().is_empty(), "OR of change bits did not go 0 -> 1");
    d.write_portsc(2, ps::PP | ps::CSC | ps::PRC);
    assert_eq!(d.portsc(2) & ps::CHANGE_MASK, 0);
    // U3 with LWS: no event; U0 from U3: PLC and an event.
    d.write_portsc(2, ps::PP | ps::LWS | (ps::PLS_U3 << ps::PLS_SHIFT));
    assert_eq!((d.portsc(2) & ps::PLS_MASK) >> ps::PLS_SHIFT, ps::PLS_U3);
    assert!(d.events().is_empty());
    // PLS without LWS is ignored.
    d.write_portsc(2, ps::PP | (ps::PLS_U0 << ps::PLS_SHIFT));
    assert_eq!((d.portsc(2) & ps::PLS_MASK) >> ps::PLS_SHIFT, ps::PLS_U3);
    d.write_portsc(2, ps::PP | ps::LWS | (ps::PLS_U0 << ps::PLS_SHIFT));
    let sc = d.portsc(2);
    assert_eq!(
        ((sc & ps::PLS_MASK) >> ps::PLS_SHIFT, sc & ps::PLC),
        (ps::PLS_U0, ps::PLC)
    );
    let ev = d
        .take_event(|e| e.trb_type() == trb_type::PORT_STATUS_CHANGE)
        .unwrap();
    assert_eq!(ev.parameter >> 24, 2);
    // USBSTS.PCD is RW1C.
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_PCD, 0);
    d.w32(OP_BASE + op::USBSTS, op::STS_PCD);
    assert_eq!(d.r32(OP_BASE + op::USBSTS) & op::STS_PCD, 0);
    // Errors of the host-side API (another image: this one is locked).
    let other = TempImage::new(8);
    assert!(matches!(
        d.xhci.attach(
            2,
            Box::new(MassStorage::new(
                other.open(false),
                MassStorageConfig::default()
            ))
        ),
        Err(XhciError::PortOccupied(2))
    ));
    assert!(matches!(d.xhci.detach(9), Err(XhciError::InvalidPort(9))));
    let _ = UsbSpeed::Super;
}

#[test]
fn hcrst_resets_slots_and_keeps_devices_plugged() {
    let img = TempImage::new(64);
    let mut d = Driver::new(0, 1);
    d.attach_disk(1, &img, false);
    d.start();
    let slot = d.enumerate(1);
    assert_eq!(d.xhci.slot_state(slot), Some(SlotState::Configured));
    d.w32(OP_BASE + op::USBCMD, 0);
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_HCH, 0);
    d.w32(OP_BASE + op::USBCMD, op::CMD_HCRST);
    assert_eq!(d.xhci.slot_state(slot), Some(SlotState::Disabled));
    assert_eq!(d.r32(RT_BASE + rt::IR0 + rt::IMAN), 0);
    assert_eq!(d.portsc(1) & (ps::CCS | ps::CSC), ps::CCS | ps::CSC);
    // A fresh driver instance enumerates again.
    d.cmd = Producer::new(CMD_RING);
    d.mem
        .write_slice(&[0u8; 1024], GuestAddress(CMD_RING))
        .unwrap();
    d.mem
        .write_slice(&[0u8; 512], GuestAddress(EVENT_RING))
        .unwrap();
    d.ev_index = 0;
    d.ev_cycle = true;
    d.backlog.clear();
    d.start();
    let slot = d.enumerate(1);
    let (_, csw) = d.bot(slot, &[0, 0, 0, 0, 0, 0], 0, false);
    assert_eq!(csw[12], 0);
}

/// A read shadow in a map, as a VMM's read-only page would hold it.
#[derive(Default)]
struct MapShadow(std::sync::Mutex<std::collections::HashMap<u64, u32>>);

impl shadow::ReadShadow for MapShadow {
    fn store(&self, offset: u64, value: u32) {
        self.0.lock().unwrap().insert(offset, value);
    }
}

impl MapShadow {
    fn get(&self, offset: u64) -> u32 {
        self.0.lock().unwrap().get(&offset).copied().unwrap_or(0)
    }
}

/// Records ERDP as the shadow shows it when the interrupt fires.
struct ShadowCheckingIrq(Arc<MapShadow>, std::sync::Mutex<Vec<u32>>);

impl Interrupt for ShadowCheckingIrq {
    fn trigger(&self, _vector: u16) {
        let erdp = self.0.get(RT_BASE + rt::IR0 + rt::ERDP_LO);
        self.1.lock().unwrap().push(erdp);
    }
}

#[test]
fn read_shadow_matches_register_reads_and_is_current_when_the_interrupt_fires() {
    let mut d = Driver::new(0, 1);
    let sh = Arc::new(MapShadow::default());
    let irq = Arc::new(ShadowCheckingIrq(sh.clone(), Default::default()));
    d.xhci.set_interrupt(irq.clone());
    d.xhci.set_read_shadow(sh.clone());
    d.start();
    let img = TempImage::new(64);
    d.attach_disk(1, &img, false);
    d.command(Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
    // Every interrupt saw EHB set in the shadowed ERDP (the handler's view).
    let seen = irq.1.lock().unwrap().clone();
    assert!(!seen.is_empty(), "no interrupt");
    assert!(
        seen.iter().all(|e| u64::from(*e) & rt::ERDP_EHB != 0),
        "{seen:x?}"
    );
    // After the handler's ERDP write the shadow equals what a trapped read
    // returns, register by register.
    assert_shadow_current(&mut d, &sh, "after the handler");
    assert_eq!(
        u64::from(sh.get(RT_BASE + rt::IR0 + rt::ERDP_LO)) & rt::ERDP_EHB,
        0,
        "EHB cleared by the handler's ERDP write"
    );
}

/// A clock the test moves by hand.
struct ManualClock(std::sync::Mutex<std::time::Instant>);

impl moderation::Clock for ManualClock {
    fn now(&self) -> std::time::Instant {
        *self.0.lock().unwrap()
    }
}

impl ManualClock {
    fn advance(&self, d: std::time::Duration) {
        *self.0.lock().unwrap() += d;
    }
}

/// Records every arm of the moderation timer.
#[derive(Default)]
struct RecordingTimer(std::sync::Mutex<Vec<std::time::Instant>>);

impl moderation::ModerationTimer for RecordingTimer {
    fn arm(&self, at: std::time::Instant) {
        self.0.lock().unwrap().push(at);
    }
}

/// A started driver with moderation on and IMODI = `imodi` (Linux: 160).
fn moderated_driver(imodi: u32) -> (Driver, Arc<ManualClock>, Arc<RecordingTimer>) {
    let mut d = Driver::new(0, 1);
    let clock = Arc::new(ManualClock(
        std::sync::Mutex::new(std::time::Instant::now()),
    ));
    let timer = Arc::new(RecordingTimer::default());
    d.xhci.set_moderation(timer.clone(), clock.clone());
    d.start();
    d.w32(RT_BASE + rt::IR0 + rt::IMOD, imodi);
    (d, clock, timer)
}

impl Driver {
    fn irqs(&self) -> u32 {
        self.irq.0.load(Ordering::SeqCst)
    }

    /// Rings the command doorbell for one No Op command.
    fn noop(&mut self) -> u64 {
        let mem = self.mem.clone();
        let addr = self
            .cmd
            .push(&mem, Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
        self.w32(DB_BASE, 0);
        addr
    }
}

#[test]
fn moderation_defers_the_second_interrupt_until_the_interval_has_passed() {
    let (mut d, clock, timer) = moderated_driver(160); // 40 us
    let t0 = clock.now();
    let base = d.irqs();
    let a = d.noop();
    assert_eq!(d.irqs(), base + 1, "the first interrupt is not delayed");
    assert_eq!(
        d.r32(RT_BASE + rt::IR0 + rt::IMOD),
        160 | (160 << 16),
        "IMODC loaded"
    );
    assert_eq!(
        d.drain().iter().map(|e| e.parameter).collect::<Vec<_>>(),
        vec![a]
    );
    // 10 us later the next event is due 30 us early: no interrupt, no IP,
    // and the timer is armed for the end of the interval.
    clock.advance(std::time::Duration::from_micros(10));
    let b = d.noop();
    assert_eq!(d.irqs(), base + 1);
    assert_eq!(d.r32(RT_BASE + rt::IR0 + rt::IMAN) & rt::IMAN_IP, 0);
    assert_eq!(
        d.r32(RT_BASE + rt::IR0 + rt::IMOD) >> 16,
        120,
        "IMODC counts down"
    );
    let due = t0 + std::time::Duration::from_micros(40);
    assert_eq!(d.xhci.next_interrupt_deadline(), Some(due));
    assert_eq!(*timer.0.lock().unwrap(), vec![due]);
    // A third event in the same window neither interrupts nor re-arms.
    let c = d.noop();
    assert_eq!((d.irqs(), timer.0.lock().unwrap().len()), (base + 1, 1));
    // A timer that fires early (or late work) delivers nothing before the deadline.
    clock.advance(std::time::Duration::from_micros(29));
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), base + 1);
    assert_eq!(
        timer.0.lock().unwrap().len(),
        2,
        "re-armed for the same deadline"
    );
    clock.advance(std::time::Duration::from_micros(1));
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), base + 2, "delivered at the deadline");
    assert_ne!(d.r32(RT_BASE + rt::IR0 + rt::IMAN) & rt::IMAN_IP, 0);
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_EINT, 0);
    assert_eq!(d.xhci.next_interrupt_deadline(), None);
    let got: Vec<_> = d.drain().iter().map(|e| e.parameter).collect();
    assert_eq!(got, vec![b, c], "both deferred events in one interrupt");
    // A second timer call has nothing left to deliver.
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), base + 2);
    // Once the interval has passed, the next event interrupts at once.
    clock.advance(std::time::Duration::from_micros(40));
    d.noop();
    assert_eq!(d.irqs(), base + 3);
}

#[test]
fn moderation_off_with_imodi_zero_and_ehb_still_gates() {
    let (mut d, clock, timer) = moderated_driver(0);
    let base = d.irqs();
    d.noop();
    d.drain();
    d.noop();
    assert_eq!(d.irqs(), base + 2, "IMODI = 0: every interrupt at once");
    assert_eq!(d.xhci.next_interrupt_deadline(), None);
    // EHB: the handler has not written ERDP yet, so a further event neither
    // interrupts nor defers, whatever the interval.
    d.w32(RT_BASE + rt::IR0 + rt::IMOD, 160);
    clock.advance(std::time::Duration::from_millis(1));
    d.noop();
    assert_eq!(d.irqs(), base + 2);
    assert_eq!(d.xhci.next_interrupt_deadline(), None);
    assert!(timer.0.lock().unwrap().is_empty());
    // Deferred at the ERDP write (events left, counter running), then
    // delivered by the timer only while EHB is clear.
    let evs = d.drain();
    assert_eq!(evs.len(), 2);
    assert_eq!(d.irqs(), base + 2);
    let e = d.noop();
    assert_eq!(d.irqs(), base + 3, "counter was 0: at once");
    // Leave the event unconsumed and clear EHB: the re-raise is moderated.
    d.w32(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE | rt::IMAN_IP);
    d.w64(
        RT_BASE + rt::IR0 + rt::ERDP_LO,
        (EVENT_RING + u64::from(d.ev_index) * 16) | rt::ERDP_EHB,
    );
    assert_eq!(d.irqs(), base + 3);
    assert!(d.xhci.next_interrupt_deadline().is_some());
    clock.advance(std::time::Duration::from_micros(40));
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), base + 4);
    assert_eq!(d.drain()[0].parameter, e);
}

#[test]
fn run_stop_and_hcrst_drop_a_deferred_interrupt() {
    let (mut d, clock, _timer) = moderated_driver(160);
    let base = d.irqs();
    d.noop();
    d.drain();
    d.noop();
    assert!(d.xhci.next_interrupt_deadline().is_some());
    d.w32(OP_BASE + op::USBCMD, op::CMD_INTE);
    assert_eq!(
        d.xhci.next_interrupt_deadline(),
        None,
        "Run/Stop cleared it"
    );
    clock.advance(std::time::Duration::from_micros(40));
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), base + 1, "halted: nothing delivered");
    // Running again: the halt also reset the counter, so the first
    // interrupt is immediate and the one after it deferred again...
    d.w32(OP_BASE + op::USBCMD, op::CMD_RUN | op::CMD_INTE);
    d.drain();
    d.noop();
    assert_eq!(d.irqs(), base + 2);
    d.drain();
    d.noop();
    assert_eq!(d.irqs(), base + 2);
    assert!(d.xhci.next_interrupt_deadline().is_some());
    // ...until HCRST drops it.
    d.w32(OP_BASE + op::USBCMD, op::CMD_HCRST);
    assert_eq!(d.xhci.next_interrupt_deadline(), None, "HCRST cleared it");
    assert_eq!(d.r32(RT_BASE + rt::IR0 + rt::IMOD), moderation::IMODI_RESET);
    let before = d.irqs();
    clock.advance(std::time::Duration::from_millis(1));
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), before);
}

#[test]
fn host_system_error_drops_a_deferred_interrupt_and_the_timer_stops() {
    let (mut d, clock, timer) = moderated_driver(160);
    d.noop();
    d.drain();
    d.noop();
    let due = d.xhci.next_interrupt_deadline().expect("deferred");
    // The command ring stops (CA) and is pointed outside guest memory: the
    // next doorbell is a Host System Error, which halts the controller.
    d.w64(OP_BASE + op::CRCR_LO, op::CRCR_CA);
    d.w64(OP_BASE + op::CRCR_LO, MEM_SIZE as u64 | op::CRCR_RCS);
    d.w32(DB_BASE, 0);
    assert_ne!(d.r32(OP_BASE + op::USBSTS) & op::STS_HSE, 0);
    assert!(!d.xhci.running());
    assert_eq!(
        d.xhci.next_interrupt_deadline(),
        None,
        "a halted controller signals nothing"
    );
    // The timer armed before the error fires: nothing to deliver, and it is
    // not armed again (before, it re-armed for the past deadline at every
    // expiry: the xhci thread spun until the guest halted the controller).
    let arms = timer.0.lock().unwrap().len();
    clock.advance(std::time::Duration::from_micros(40));
    assert!(clock.now() >= due);
    let irqs = d.irqs();
    d.xhci.on_moderation_timer();
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), irqs);
    assert_eq!(timer.0.lock().unwrap().len(), arms, "not re-armed");
    // HCRST and a fresh start work as before.
    d.w32(OP_BASE + op::USBCMD, op::CMD_HCRST);
    d.cmd = Producer::new(CMD_RING);
    d.ev_index = 0;
    d.ev_cycle = true;
    d.start();
    d.w32(RT_BASE + rt::IR0 + rt::IMOD, 160);
    let base = d.irqs();
    d.noop();
    assert_eq!(d.irqs(), base + 1);
}

/// Every dword of the register space below the doorbells reads the same
/// from the shadow as through a trapped read (MFINDEX aside: it runs on its
/// own, see `shadow.rs`).
fn assert_shadow_current(d: &mut Driver, sh: &MapShadow, when: &str) {
    for off in (0..DB_BASE).step_by(4) {
        if off == RT_BASE + rt::MFINDEX {
            continue;
        }
        assert_eq!(sh.get(off), d.r32(off), "{when}: offset {off:#x}");
    }
}

/// Records USBSTS and every PORTSC as the shadow shows them when the
/// interrupt fires.
struct OperationalCheckingIrq(Arc<MapShadow>, u8, std::sync::Mutex<Vec<Vec<u32>>>);

impl Interrupt for OperationalCheckingIrq {
    fn trigger(&self, _vector: u16) {
        let mut seen = vec![self.0.get(OP_BASE + op::USBSTS)];
        seen.extend((0..u64::from(self.1)).map(|i| self.0.get(PORT_BASE + i * 0x10)));
        self.2.lock().unwrap().push(seen);
    }
}

#[test]
fn read_shadow_of_the_whole_register_space_follows_every_kind_of_change() {
    let mut d = Driver::new(1, 1);
    let sh = Arc::new(MapShadow::default());
    let irq = Arc::new(OperationalCheckingIrq(sh.clone(), 2, Default::default()));
    d.xhci.set_interrupt(irq.clone());
    d.xhci.set_read_shadow(sh.clone());
    assert_shadow_current(&mut d, &sh, "constants at start");
    assert_ne!(sh.get(cap::HCSPARAMS1), 0);
    assert_ne!(sh.get(XECP_BASE), 0, "Supported Protocol capability");
    // Hotplug while halted (control thread), then start (register writes).
    let img = TempImage::new(64);
    d.attach_disk(2, &img, false);
    assert_shadow_current(&mut d, &sh, "attach while halted");
    d.start();
    assert_shadow_current(&mut d, &sh, "started");
    // The port change interrupt saw PCD, EINT and the connect in the shadow.
    let first = irq.2.lock().unwrap()[0].clone();
    assert_ne!(first[0] & (op::STS_EINT | op::STS_PCD), 0, "{first:x?}");
    assert_ne!(first[2] & ps::CSC, 0, "{first:x?}");
    // Enumeration: commands on the doorbell path, PORTSC writes, events.
    let slot = d.enumerate(2);
    assert_shadow_current(&mut d, &sh, "enumerated");
    d.w32(OP_BASE + op::USBSTS, op::STS_EINT | op::STS_PCD);
    assert_shadow_current(&mut d, &sh, "USBSTS acknowledged");
    let (_, csw) = d.bot(slot, &[0, 0, 0, 0, 0, 0], 0, false);
    assert_eq!(csw[12], 0);
    assert_shadow_current(&mut d, &sh, "after a command");
    // Hot-unplug: the interrupt sees the disconnect in the shadow.
    let before = irq.2.lock().unwrap().len();
    d.xhci.detach(2).unwrap();
    let last = irq.2.lock().unwrap().last().cloned().unwrap();
    assert!(irq.2.lock().unwrap().len() > before, "detach interrupts");
    assert_eq!(last[2] & ps::CCS, 0, "{last:x?}");
    assert_ne!(last[2] & ps::CSC, 0, "{last:x?}");
    assert_shadow_current(&mut d, &sh, "detached");
    d.events();
    // Command ring running (CRCR.CRR) and stopped (Command Abort).
    d.w32(DB_BASE, 0);
    assert_shadow_current(&mut d, &sh, "command ring running");
    d.w64(OP_BASE + op::CRCR_LO, op::CRCR_CA);
    assert_shadow_current(&mut d, &sh, "command ring aborted");
    // Halt (HCH), host system error (HSE), reset.
    d.w32(OP_BASE + op::USBCMD, op::CMD_INTE);
    assert_ne!(sh.get(OP_BASE + op::USBSTS) & op::STS_HCH, 0);
    assert_shadow_current(&mut d, &sh, "halted");
    d.w32(RT_BASE + rt::IR0 + rt::ERSTSZ, 0);
    d.w64(RT_BASE + rt::IR0 + rt::ERSTBA_LO, ERST);
    d.w32(
        OP_BASE + op::USBCMD,
        op::CMD_RUN | op::CMD_INTE | op::CMD_HSEE,
    );
    d.w32(DB_BASE, 0);
    assert_ne!(
        sh.get(OP_BASE + op::USBSTS) & op::STS_HSE,
        0,
        "no event ring: HSE"
    );
    assert_shadow_current(&mut d, &sh, "host system error");
    d.w32(OP_BASE + op::USBCMD, op::CMD_HCRST);
    assert_eq!(sh.get(OP_BASE + op::USBSTS), op::STS_HCH);
    assert_shadow_current(&mut d, &sh, "reset");
}

#[test]
fn moderation_timer_keeps_the_read_shadow_current_with_ie_clear() {
    let (mut d, clock, _timer) = moderated_driver(160);
    let sh = Arc::new(MapShadow::default());
    d.xhci.set_read_shadow(sh.clone());
    let base = d.irqs();
    d.noop();
    d.drain();
    // IE off: the deferred assertion sets IP (polling drivers see it) but
    // delivers nothing; the shadow shows it all the same.
    d.w32(RT_BASE + rt::IR0 + rt::IMAN, 0);
    d.noop();
    assert!(d.xhci.next_interrupt_deadline().is_some());
    clock.advance(std::time::Duration::from_micros(40));
    d.xhci.on_moderation_timer();
    assert_eq!(d.irqs(), base + 1);
    assert_eq!(sh.get(RT_BASE + rt::IR0 + rt::IMAN), rt::IMAN_IP);
    assert_shadow_current(&mut d, &sh, "after the moderation timer");
}
