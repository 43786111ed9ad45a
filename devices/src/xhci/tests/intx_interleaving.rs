//! A guest of two vCPUs on the INTx pin, with every VMM feature on (read
//! shadow, coalesced USBSTS / ERDP-high writes, interrupt moderation),
//! stepped in a pseudo-random interleaving: one vCPU runs Linux 6.1's
//! xhci_irq for the legacy IRQ (USBSTS read from the shadow, EINT
//! acknowledged by a coalesced write, IMAN read-modify-write, events, ERDP
//! read from the shadow and written low (trapped) then high (coalesced),
//! EOI), the other rings the command doorbell at any point (as the I/O
//! thread of `--usb-io thread` may post events at any point), the
//! moderation timer fires when due and any vCPU exit drains the coalesced
//! ring. The IOAPIC input is level-triggered with Remote IRR. Every event
//! must reach the handler and the handler must not see an asserted line
//! without EINT (an interrupt storm, then "nobody cared"). The check fails
//! if a trapped write stops draining the coalesced ring first, if an ERDP
//! write stops re-raising for pending events, or if an IMAN acknowledge
//! stops dropping the pin.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;
use crate::pci::intx::tests::RecordingLine;
use crate::pci::msix::test_router::RecordingRouter;
use crate::pci::{PciDevice, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE};
use crate::test_rng::Rng;
use crate::xhci::pci::XHCI_BAR;

const RING: u32 = 64;

#[derive(Default)]
struct Timer(Mutex<Option<Instant>>);
impl moderation::ModerationTimer for Timer {
    fn arm(&self, at: Instant) {
        *self.0.lock().unwrap() = Some(at);
    }
}

#[derive(Debug, Clone, Copy)]
enum H {
    ReadSts,
    WriteSts(u32),
    ReadIman,
    WriteIman(u32),
    Events(u64),
    ReadErdp(u64),
    WriteErdpLo(u64),
    WriteErdpHi(u64),
    Eoi,
}

struct Sim {
    dev: XhciPci,
    mem: GuestMemoryMmap,
    sh: Arc<MapShadow>,
    line: Arc<RecordingLine>,
    clock: Arc<ManualClock>,
    timer: Arc<Timer>,
    /// KVM's coalesced MMIO ring.
    fifo: VecDeque<(u64, u32)>,
    /// IOAPIC Remote IRR, and an interrupt delivered but not yet taken.
    remote_irr: bool,
    delivered: bool,
    h: Option<H>,
    deq: u64,
    cycle: bool,
    consumed: Vec<u64>,
    unhandled: u32,
    cmd: Producer,
    submitted: usize,
    rng: Rng,
    /// The handler only gets one step in six (the event ring fills).
    slow_handler: bool,
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut dev = XhciPci::new(
            XhciConfig {
                usb2_ports: 1,
                usb3_ports: 1,
            },
            GuestMemoryAtomic::new(mem.clone()),
            Arc::new(RecordingRouter::default()),
        )
        .unwrap();
        let line = Arc::new(RecordingLine::default());
        dev.add_intx(18, line.clone());
        let sh = Arc::new(MapShadow::default());
        dev.set_read_shadow(sh.clone());
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let timer = Arc::new(Timer::default());
        dev.set_moderation(timer.clone(), clock.clone());
        let mut s = Self {
            dev,
            mem,
            sh,
            line,
            clock,
            timer,
            fifo: VecDeque::new(),
            remote_irr: false,
            delivered: false,
            h: None,
            deq: EVENT_RING,
            cycle: true,
            consumed: Vec::new(),
            unhandled: 0,
            cmd: Producer::new(CMD_RING),
            submitted: 0,
            rng: Rng::new(seed),
            slow_handler: false,
            trace: Vec::new(),
        };
        let cmd = COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;
        s.dev.config_write(COMMAND, &cmd.to_le_bytes());
        s.trap(OP_BASE + op::CONFIG, 8);
        s.trap(OP_BASE + op::DCBAAP_LO, DCBAA as u32);
        s.trap(OP_BASE + op::CRCR_LO, CMD_RING as u32 | op::CRCR_RCS as u32);
        let entry = ErstEntry {
            base: EVENT_RING,
            size: RING,
            reserved: 0,
        };
        s.mem.write_obj(entry, GuestAddress(ERST)).unwrap();
        s.trap(RT_BASE + rt::IR0 + rt::ERSTSZ, 1);
        s.trap(RT_BASE + rt::IR0 + rt::ERDP_LO, EVENT_RING as u32);
        s.trap(RT_BASE + rt::IR0 + rt::ERSTBA_LO, ERST as u32);
        s.trap(RT_BASE + rt::IR0 + rt::IMOD, 160);
        s.trap(RT_BASE + rt::IR0 + rt::IMAN, rt::IMAN_IE);
        s.trap(OP_BASE + op::USBCMD, op::CMD_RUN | op::CMD_INTE);
        s
    }

    /// A write that exits: the vCPU drains the coalesced ring first.
    fn trap(&mut self, off: u64, v: u32) {
        self.drain_coalesced();
        self.dev.bar_write(XHCI_BAR, off, &v.to_le_bytes());
        self.ioapic();
    }

    fn drain_coalesced(&mut self) {
        while let Some((off, v)) = self.fifo.pop_front() {
            self.dev.bar_write(XHCI_BAR, off, &v.to_le_bytes());
        }
        self.ioapic();
    }

    /// KVM's IOAPIC, level-triggered: delivers while the line is high
    /// and Remote IRR is clear.
    fn ioapic(&mut self) {
        if self.line_level() && !self.remote_irr {
            self.remote_irr = true;
            self.delivered = true;
        }
    }

    /// The level the pin last drove the IOAPIC input to.
    fn line_level(&self) -> bool {
        self.line.0.lock().unwrap().last() == Some(&true)
    }

    fn shadow(&self, off: u64) -> u32 {
        self.sh.get(off)
    }

    /// One step of Linux 6.1's xhci_irq on the handling vCPU.
    fn handler_step(&mut self) {
        let h = match self.h {
            Some(h) => h,
            None => {
                self.delivered = false;
                H::ReadSts
            }
        };
        self.trace.push(format!("{h:?}"));
        self.h = match h {
            H::ReadSts => {
                let sts = self.shadow(OP_BASE + op::USBSTS);
                if sts & op::STS_EINT == 0 {
                    self.unhandled += 1;
                    Some(H::Eoi)
                } else {
                    Some(H::WriteSts(sts | op::STS_EINT))
                }
            }
            H::WriteSts(v) => {
                self.fifo.push_back((OP_BASE + op::USBSTS, v));
                Some(H::ReadIman)
            }
            H::ReadIman => Some(H::WriteIman(self.shadow(RT_BASE + rt::IR0 + rt::IMAN))),
            H::WriteIman(v) => {
                self.trap(RT_BASE + rt::IR0 + rt::IMAN, v | rt::IMAN_IP);
                Some(H::Events(self.deq))
            }
            H::Events(start) => {
                let trb: Trb = self.mem.read_obj(GuestAddress(self.deq)).unwrap();
                if trb.cycle() == self.cycle {
                    self.consumed.push(trb.parameter);
                    self.deq += 16;
                    if self.deq == EVENT_RING + u64::from(RING) * 16 {
                        self.deq = EVENT_RING;
                        self.cycle = !self.cycle;
                    }
                    Some(H::Events(start))
                } else {
                    Some(H::ReadErdp(start))
                }
            }
            H::ReadErdp(start) => {
                let lo = self.shadow(RT_BASE + rt::IR0 + rt::ERDP_LO);
                let hi = self.shadow(RT_BASE + rt::IR0 + rt::ERDP_HI);
                let mut temp = u64::from(lo) | (u64::from(hi) << 32);
                if start != self.deq {
                    if temp & !0xf == self.deq {
                        self.trace.push("early return".into());
                        // Back to the caller: EOI.
                        self.h = Some(H::Eoi);
                        return;
                    }
                    temp = (temp & 0xf) | self.deq;
                }
                Some(H::WriteErdpLo(temp | rt::ERDP_EHB))
            }
            H::WriteErdpLo(v) => {
                self.trap(RT_BASE + rt::IR0 + rt::ERDP_LO, v as u32);
                Some(H::WriteErdpHi(v))
            }
            H::WriteErdpHi(v) => {
                self.fifo
                    .push_back((RT_BASE + rt::IR0 + rt::ERDP_HI, (v >> 32) as u32));
                Some(H::Eoi)
            }
            H::Eoi => {
                self.remote_irr = false;
                self.ioapic();
                None
            }
        };
    }

    /// The other vCPU queues a No Op command and rings the doorbell.
    fn submit(&mut self) {
        let mem = self.mem.clone();
        let addr = self
            .cmd
            .push(&mem, Driver::cmd(trb_type::NOOP_COMMAND, 0, 0, 0));
        self.trace.push(format!("doorbell {addr:#x}"));
        self.submitted += 1;
        self.trap(DB_BASE, 0);
    }

    fn timer_due(&self) -> bool {
        self.timer
            .0
            .lock()
            .unwrap()
            .is_some_and(|at| at <= self.clock.now())
    }

    fn fire_timer(&mut self) {
        self.trace.push("timer".into());
        *self.timer.0.lock().unwrap() = None;
        self.dev.on_moderation_timer();
        self.ioapic();
    }

    fn step(&mut self, submit: bool) {
        match self.rng.below(6) {
            0 if self.h.is_some() || self.delivered => self.handler_step(),
            1 if submit => self.submit(),
            2 if self.timer_due() => self.fire_timer(),
            3 => {
                let us = self.rng.below(30);
                self.clock.advance(Duration::from_micros(us));
            }
            4 => {
                // Any other exit of any vCPU (serial, PIO, ...).
                self.drain_coalesced();
            }
            _ if !self.slow_handler && (self.h.is_some() || self.delivered) => self.handler_step(),
            _ => {}
        }
    }
}

fn run(seed: u64, commands: usize, slow_handler: bool) {
    let mut s = Sim::new(seed);
    s.slow_handler = slow_handler;
    let mut steps = 0;
    while s.submitted < commands && steps < 100_000 {
        let submit = s.submitted < commands;
        s.step(submit);
        steps += 1;
    }
    // No more work: the guest must get every event, without a storm.
    s.slow_handler = false;
    for _ in 0..20_000 {
        s.step(false);
    }
    let ok = s.consumed.len() == commands && !s.line_level();
    if !ok || s.unhandled > 2 * commands as u32 {
        let tail: Vec<_> = s.trace.iter().rev().take(60).rev().collect();
        panic!(
            "seed {seed}: consumed {} of {commands}, line {}, remote_irr {}, unhandled {}, \
             USBSTS {:#x} IMAN {:#x} ERDP {:#x} (model USBSTS {:#x}), deadline {:?}, fifo {:x?}\n{tail:#?}",
            s.consumed.len(),
            s.line_level(),
            s.remote_irr,
            s.unhandled,
            s.shadow(OP_BASE + op::USBSTS),
            s.shadow(RT_BASE + rt::IR0 + rt::IMAN),
            s.shadow(RT_BASE + rt::IR0 + rt::ERDP_LO),
            {
                let mut b = [0u8; 4];
                s.dev.bar_read(XHCI_BAR, OP_BASE + op::USBSTS, &mut b);
                u32::from_le_bytes(b)
            },
            s.dev.xhci().next_interrupt_deadline(),
            s.fifo,
        );
    }
}

#[test]
fn every_event_reaches_the_handler_in_any_interleaving() {
    for seed in 0..1000 {
        run(seed, 40, false);
    }
    // A slow handler and enough commands to fill the 64-TRB event
    // ring: events wait in the overflow queue too.
    for seed in 0..100 {
        run(seed, 300, true);
    }
}
