//! A guest driver for the controller, written the way Linux's xhci-hcd,
//! usbcore and usb-storage drive it: registers, rings and contexts in a
//! GuestMemoryMmap. Used by the xHCI tests and the fuzz crate in ../fuzz.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::regs::{op, port as ps, rt, DB_BASE, OP_BASE, PORT_BASE, RT_BASE};
use super::trb::*;
use super::*;
use crate::interrupt::Interrupt;
use crate::usb::mass_storage::test_utils::cbw;
use crate::usb::{request, SetupPacket};

pub const MEM_SIZE: usize = 16 << 20;
pub const DCBAA: u64 = 0x1000;
pub const CMD_RING: u64 = 0x2000;
pub const ERST: u64 = 0x3000;
pub const EVENT_RING: u64 = 0x4000;
pub const EVENT_TRBS: u32 = 32;
pub const INPUT_CTX: u64 = 0x5000;
pub const OUTPUT_CTX: u64 = 0x6000;
pub const RING_TRBS: u64 = 64;
pub const DATA: u64 = 0x10_0000;
pub const DCI_IN: u8 = 3; // EP1 IN
pub const DCI_OUT: u8 = 4; // EP2 OUT

/// Registers a driver writes, for random writes that reach real handlers
/// more often than a random offset would.
pub const REGISTERS: &[u64] = &[
    OP_BASE + op::USBCMD,
    OP_BASE + op::USBSTS,
    OP_BASE + op::DNCTRL,
    OP_BASE + op::CRCR_LO,
    OP_BASE + op::CRCR_HI,
    OP_BASE + op::DCBAAP_LO,
    OP_BASE + op::DCBAAP_HI,
    OP_BASE + op::CONFIG,
    RT_BASE + rt::IR0 + rt::IMAN,
    RT_BASE + rt::IR0 + rt::IMOD,
    RT_BASE + rt::IR0 + rt::ERSTSZ,
    RT_BASE + rt::IR0 + rt::ERSTBA_LO,
    RT_BASE + rt::IR0 + rt::ERSTBA_HI,
    RT_BASE + rt::IR0 + rt::ERDP_LO,
    RT_BASE + rt::IR0 + rt::ERDP_HI,
];

#[derive(Default)]
pub struct CountingIrq(pub AtomicU32);
impl Interrupt for CountingIrq {
    fn trigger(&self, vector: u16) {
        assert_eq!(vector, 0);
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A producer ring the "driver" writes, with a toggling link at the end.
pub struct Producer {
    pub base: u64,
    pub index: u64,
    pub cycle: bool,
}

impl Producer {
    pub fn new(base: u64) -> Self {
        Self {
            base,
            index: 0,
            cycle: true,
        }
    }

    pub fn push(&mut self, mem: &GuestMemoryMmap, mut trb: Trb) -> u64 {
        let addr = self.base + self.index * 16;
        trb.control = (trb.control & !CYCLE) | u32::from(self.cycle);
        mem.write_obj(trb, GuestAddress(addr)).unwrap();
        self.index += 1;
        if self.index == RING_TRBS - 1 {
            let link = Trb {
                parameter: self.base,
                status: 0,
                control: LINK_TC | u32::from(self.cycle),
            }
            .with_type(trb_type::LINK);
            mem.write_obj(link, GuestAddress(self.base + self.index * 16))
                .unwrap();
            self.index = 0;
            self.cycle = !self.cycle;
        }
        addr
    }
}

pub fn ring_base(slot: u8, dci: u8) -> u64 {
    0x20_0000 + (u64::from(slot) * 32 + u64::from(dci)) * 0x1000
}

pub struct Driver {
    pub xhci: Xhci,
    pub mem: GuestMemoryMmap,
    pub irq: Arc<CountingIrq>,
    pub cmd: Producer,
    pub ev_index: u32,
    pub ev_cycle: bool,
    pub rings: std::collections::HashMap<(u8, u8), Producer>,
    /// Events read but not yet claimed by a waiter.
    pub backlog: Vec<Trb>,
}

impl Driver {
    pub fn new(usb2: u8, usb3: u8) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let xhci = Xhci::new(
            XhciConfig {
                usb2_ports: usb2,
                usb3_ports: usb3,
            },
            GuestMemoryAtomic::new(mem.clone()),
            irq.clone(),
        )
        .unwrap();
        Self {
            xhci,
            mem,
            irq,
            cmd: Producer::new(CMD_RING),
            ev_index: 0,
            ev_cycle: true,
            rings: Default::default(),
            backlog: Vec::new(),
        }
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.xhci.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.xhci.mmio_write(off, &v.to_le_bytes());
    }

    pub fn w64(&mut self, off: u64, v: u64) {
        self.xhci.mmio_write(off, &v.to_le_bytes());
    }

    pub fn portsc(&mut self, port: u8) -> u32 {
        self.r32(PORT_BASE + (u64::from(port) - 1) * 0x10)
    }

    pub fn write_portsc(&mut self, port: u8, v: u32) {
        self.w32(PORT_BASE + (u64::from(port) - 1) * 0x10, v);
    }

    /// xhci_init + xhci_run as Linux does them.
    pub fn start(&mut self) {
        self.w32(OP_BASE + op::USBCMD, op::CMD_HCRST);
        assert_eq!(self.r32(OP_BASE + op::USBSTS) & op::STS_HCH, op::STS_HCH);
        self.w32(OP_BASE + op::CONFIG, 8);
        self.w64(OP_BASE + op::DCBAAP_LO, DCBAA);
        self.w64(OP_BASE + op::CRCR_LO, CMD_RING | op::CRCR_RCS);
        let entry = ErstEntry {
            base: EVENT_RING,
            size: EVENT_TRBS,
            reserved: 0,
        };
        self.mem.write_obj(entry, GuestAddress(ERST)).unwrap();
        self.w32(RT_BASE + rt::IR0 + rt::ERSTSZ, 1);
        self.w64(RT_BASE + rt::IR0 + rt::ERDP_LO, EVENT_RING);
        self.w64(RT_BASE + rt::IR0 + rt::ERSTBA_LO, ERST);
        self.w32(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE);
        self.w32(OP_BASE + op::USBCMD, op::CMD_RUN | op::CMD_INTE);
        assert_eq!(self.r32(OP_BASE + op::USBSTS) & op::STS_HCH, 0);
    }

    /// The interrupt handler: consume events, then ERDP with EHB.
    pub fn drain(&mut self) -> Vec<Trb> {
        let mut out = Vec::new();
        for _ in 0..EVENT_TRBS {
            let addr = EVENT_RING + u64::from(self.ev_index) * 16;
            let trb: Trb = self.mem.read_obj(GuestAddress(addr)).unwrap();
            if trb.cycle() != self.ev_cycle {
                break;
            }
            out.push(trb);
            self.ev_index += 1;
            if self.ev_index == EVENT_TRBS {
                self.ev_index = 0;
                self.ev_cycle = !self.ev_cycle;
            }
        }
        self.w32(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE | rt::IMAN_IP);
        let erdp = EVENT_RING + u64::from(self.ev_index) * 16;
        self.w64(RT_BASE + rt::IR0 + rt::ERDP_LO, erdp | rt::ERDP_EHB);
        out
    }

    pub fn events(&mut self) -> Vec<Trb> {
        let mut all = std::mem::take(&mut self.backlog);
        all.extend(self.drain());
        all
    }

    pub fn take_event(&mut self, pred: impl Fn(&Trb) -> bool) -> Option<Trb> {
        let mut evs = self.events();
        let pos = evs.iter().position(pred);
        let found = pos.map(|p| evs.remove(p));
        self.backlog = evs;
        found
    }

    pub fn command(&mut self, trb: Trb) -> Trb {
        let addr = self.cmd.push(&self.mem, trb);
        self.w32(DB_BASE, 0);
        self.take_event(|e| e.trb_type() == trb_type::COMMAND_COMPLETION && e.parameter == addr)
            .expect("no command completion")
    }

    pub fn cmd(t: u32, slot: u8, param: u64, flags: u32) -> Trb {
        Trb {
            parameter: param,
            status: 0,
            control: flags | (u32::from(slot) << 24),
        }
        .with_type(t)
    }

    /// The producer for (slot, dci); a new ring starts zeroed, as the
    /// driver allocates it.
    pub fn ring(&mut self, slot: u8, dci: u8) -> &mut Producer {
        let mem = &self.mem;
        self.rings.entry((slot, dci)).or_insert_with(|| {
            let base = ring_base(slot, dci);
            mem.write_slice(&[0u8; 0x1000], GuestAddress(base)).unwrap();
            Producer::new(base)
        })
    }

    pub fn push(&mut self, slot: u8, dci: u8, trb: Trb) -> u64 {
        let mem = self.mem.clone();
        self.ring(slot, dci).push(&mem, trb)
    }

    pub fn doorbell(&mut self, slot: u8, dci: u8) {
        self.w32(DB_BASE + 4 * u64::from(slot), u32::from(dci));
    }

    /// Enable Slot, port reset (USB 2), Address Device: returns the slot.
    pub fn address(&mut self, port: u8) -> u8 {
        // hub_wq acknowledges the connection change first.
        self.write_portsc(port, ps::PP | ps::CHANGE_MASK);
        let ev = self.command(Self::cmd(trb_type::ENABLE_SLOT, 0, 0, 0));
        assert_eq!(
            ev.completion_code(),
            CompletionCode::Success as u8,
            "{ev:x?}"
        );
        let slot = ev.slot_id();
        if self.xhci.port_protocol(port) == Some(PortProtocol::Usb2) {
            self.port_reset(port);
        }
        self.mem
            .write_obj(
                OUTPUT_CTX + u64::from(slot) * 0x1000,
                GuestAddress(DCBAA + 8 * u64::from(slot)),
            )
            .unwrap();
        let mut ctx = [Context::default(); 3];
        ctx[0].0[1] = 3; // A0 | A1
        ctx[1].0[0] = 1 << 27;
        ctx[1].0[1] = u32::from(port) << 16;
        ctx[2].0[1] = (ep_type::CONTROL << 3) | (3 << 1) | (512 << 16);
        self.rings.remove(&(slot, 1));
        ctx[2].set_dequeue(ring_base(slot, 1), true);
        for (i, c) in ctx.iter().enumerate() {
            self.mem
                .write_obj(*c, GuestAddress(INPUT_CTX + 32 * i as u64))
                .unwrap();
        }
        let ev = self.command(Self::cmd(trb_type::ADDRESS_DEVICE, slot, INPUT_CTX, 0));
        assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
        slot
    }

    pub fn out_ctx(&self, slot: u8, dci: u8) -> Context {
        let base = OUTPUT_CTX + u64::from(slot) * 0x1000;
        self.mem
            .read_obj(GuestAddress(base + 32 * u64::from(dci)))
            .unwrap()
    }

    pub fn port_reset(&mut self, port: u8) {
        self.write_portsc(port, ps::PP | ps::PR);
        let sc = self.portsc(port);
        assert_eq!(sc & (ps::PRC | ps::PED), ps::PRC | ps::PED);
        self.write_portsc(port, ps::PP | ps::PRC);
        assert_eq!(self.portsc(port) & ps::PRC, 0);
    }

    /// A control transfer; returns (data, completion code of the last event).
    pub fn control(&mut self, slot: u8, setup: SetupPacket, out: Option<&[u8]>) -> (Vec<u8>, u8) {
        let len = usize::from(setup.length);
        let data_in = setup.request_type & 0x80 != 0;
        let trt = if len == 0 {
            0
        } else if data_in {
            3
        } else {
            2
        };
        let st = Trb {
            parameter: u64::from_le_bytes(setup.to_bytes()),
            status: 8,
            control: IDT | (trt << TRT_SHIFT),
        }
        .with_type(trb_type::SETUP_STAGE);
        self.push(slot, 1, st);
        if len > 0 {
            if let Some(d) = out {
                self.mem.write_slice(d, GuestAddress(DATA)).unwrap();
            }
            let dir = if data_in { DIR_IN } else { 0 };
            let dt = Trb {
                parameter: DATA,
                status: len as u32,
                control: dir | ISP,
            }
            .with_type(trb_type::DATA_STAGE);
            self.push(slot, 1, dt);
        }
        let dir = if data_in && len > 0 { 0 } else { DIR_IN };
        let status = self.push(
            slot,
            1,
            Trb {
                parameter: 0,
                status: 0,
                control: dir | IOC,
            }
            .with_type(trb_type::STATUS_STAGE),
        );
        self.doorbell(slot, 1);
        let evs = self.events();
        let mut residual = 0;
        let mut code = 0;
        for e in evs
            .iter()
            .filter(|e| e.trb_type() == trb_type::TRANSFER_EVENT)
        {
            if e.completion_code() == CompletionCode::ShortPacket as u8 {
                residual = e.status & 0xff_ffff;
            }
            code = e.completion_code();
            if e.parameter == status {
                break;
            }
        }
        let mut buf = vec![0u8; len - residual as usize];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        (buf, code)
    }

    /// Configure Endpoint for the two bulk pipes and SET_CONFIGURATION.
    pub fn configure(&mut self, slot: u8, mps: u16) {
        let mut ctx = [Context::default(); 6];
        ctx[0].0[1] = 1 | (1 << DCI_IN) | (1 << DCI_OUT);
        ctx[1].0[0] = u32::from(DCI_OUT) << 27;
        ctx[1].0[1] = 0;
        for (dci, t) in [(DCI_IN, 6u32), (DCI_OUT, 2u32)] {
            let c = &mut ctx[usize::from(dci) + 1];
            c.0[1] = (t << 3) | (3 << 1) | (u32::from(mps) << 16) | (15 << 8);
            self.rings.remove(&(slot, dci));
            c.set_dequeue(ring_base(slot, dci), true);
        }
        for (i, c) in ctx.iter().enumerate() {
            self.mem
                .write_obj(*c, GuestAddress(INPUT_CTX + 32 * i as u64))
                .unwrap();
        }
        let ev = self.command(Self::cmd(trb_type::CONFIGURE_ENDPOINT, slot, INPUT_CTX, 0));
        assert_eq!(ev.completion_code(), CompletionCode::Success as u8);
        let set_config = SetupPacket {
            request_type: 0,
            request: request::SET_CONFIGURATION,
            value: 1,
            index: 0,
            length: 0,
        };
        assert_eq!(
            self.control(slot, set_config, None).1,
            CompletionCode::Success as u8
        );
    }

    /// The whole Linux enumeration sequence; returns the slot.
    pub fn enumerate(&mut self, port: u8) -> u8 {
        let slot = self.address(port);
        let (desc, code) = self.control(slot, get_descriptor(1, 18), None);
        assert_eq!(code, CompletionCode::Success as u8);
        assert_eq!(desc[1], 1);
        let mps = if self.xhci.port_protocol(port) == Some(PortProtocol::Usb3) {
            1024
        } else {
            512
        };
        self.configure(slot, mps);
        slot
    }

    /// Queues a bulk TD of `len` bytes at `addr`, split into TRBs of at most
    /// `piece` bytes; returns the address of its last TRB.
    pub fn queue_bulk(&mut self, slot: u8, dci: u8, addr: u64, len: usize, piece: usize) -> u64 {
        let mut off = 0;
        loop {
            let n = (len - off).min(piece);
            let end = off + n == len;
            let ctl = ISP | if end { IOC } else { CHAIN };
            let last = self.push(
                slot,
                dci,
                Trb {
                    parameter: addr.wrapping_add(off as u64),
                    status: n as u32,
                    control: ctl,
                }
                .with_type(trb_type::NORMAL),
            );
            off += n;
            if end {
                return last;
            }
        }
    }

    /// Runs a bulk TD; returns (completion code, residual) of its event.
    pub fn bulk(&mut self, slot: u8, dci: u8, addr: u64, len: usize, piece: usize) -> (u8, u32) {
        self.queue_bulk(slot, dci, addr, len, piece);
        self.doorbell(slot, dci);
        let ev = self
            .take_event(|e| e.trb_type() == trb_type::TRANSFER_EVENT && e.endpoint_id() == dci)
            .expect("no transfer event");
        (ev.completion_code(), ev.status & 0xff_ffff)
    }

    /// One BOT command; returns (data-phase code, CSW bytes).
    pub fn bot(&mut self, slot: u8, cdb: &[u8], len: usize, data_in: bool) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&cbw(0x55, len as u32, data_in, cdb), GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            self.bulk(slot, DCI_OUT, DATA, 31, 64).0,
            CompletionCode::Success as u8
        );
        let mut code = CompletionCode::Success as u8;
        if len > 0 {
            let dci = if data_in { DCI_IN } else { DCI_OUT };
            code = self.bulk(slot, dci, 0x40_0000, len, 64 * 1024).0;
        }
        let (c, _) = self.bulk(slot, DCI_IN, DATA + 0x100, 13, 13);
        assert_eq!(c, CompletionCode::Success as u8);
        let mut csw = vec![0u8; 13];
        self.mem
            .read_slice(&mut csw, GuestAddress(DATA + 0x100))
            .unwrap();
        (code, csw)
    }
}

pub fn get_descriptor(kind: u8, len: u16) -> SetupPacket {
    SetupPacket {
        request_type: 0x80,
        request: request::GET_DESCRIPTOR,
        value: u16::from(kind) << 8,
        index: 0,
        length: len,
    }
}
