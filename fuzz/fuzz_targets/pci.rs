//! PCI: configuration space through the 0xcf8/0xcfc ports and directly,
//! and the BARs (MSI-X table and PBA, xHCI registers, virtio-pci common
//! and device configuration, notifications) of an xHCI controller and a
//! two-queue virtio-blk function, with device-side MSI-X triggers and the
//! virtio worker run between accesses. Covers BAR sizing and moves,
//! command-register decoding, PMCSR D0/D3hot, MSI-X enable, function and
//! vector masking, and the virtio status state machine.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::msix::test_router::RecordingRouter;
use devices::pci::{BarAllocation, PciBus, PciConfigIo, SharedPciDevice};
use devices::virtio::block::{Block, BlockOptions};
use devices::virtio::test_utils::guest_memory;
use devices::virtio::{VirtioPciDevice, VirtioPciOptions};
use devices::xhci::{XhciConfig, XhciPci};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_fuzz::{scratch_disk, Arbitrary, InlineWorkers, NoLine};

/// The 32-bit MMIO hole the BARs are allocated in.
const HOLE: (u64, u64) = (0xc000_0000, 0x1000_0000);
const MEM_SIZE: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    /// CONFIG_ADDRESS, or a CONFIG_DATA access at byte `port - 4`.
    ConfigPort {
        port: u8,
        width: u8,
        value: u32,
        write: bool,
    },
    /// A configuration access to device `device` (0: host bridge, 1:
    /// xHCI, 2: virtio-blk, others empty), any function.
    Config {
        device: u8,
        function: u8,
        offset: u8,
        width: u8,
        value: u32,
        write: bool,
    },
    /// An access inside one of the BARs (decoded only with Memory Space
    /// on and in D0, as on the MMIO bus).
    Bar {
        bar: u8,
        offset: u32,
        width: u8,
        value: u64,
        write: bool,
    },
    /// The xHCI controller raises MSI-X vector `vector` (any number).
    Trigger { vector: u16 },
    /// Guest memory (virtqueues the driver set up through the BAR).
    Memory { offset: u32, bytes: Vec<u8> },
    /// The event loop runs the virtio worker.
    RunWorkers,
}

/// 1, 2, 4 or 8 bytes (up to `max`).
fn width(w: u8, max: usize) -> usize {
    (1usize << (w % 4)).min(max)
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = guest_memory(MEM_SIZE);
    let bus = Arc::new(PciBus::new(HOLE.0, HOLE.1).unwrap());
    let router = Arc::new(RecordingRouter::default());
    let mut xhci = XhciPci::new(XhciConfig::default(), mem.clone(), router.clone()).unwrap();
    xhci.add_intx(5, Arc::new(NoLine));
    let msix = xhci.msix().clone();
    let workers = InlineWorkers::new();
    let block = Block::new(
        scratch_disk(false),
        BlockOptions {
            id: "fuzz".into(),
            num_queues: 2,
            queue_size: 16,
        },
    )
    .unwrap();
    let virtio = VirtioPciDevice::new(
        Box::new(block),
        VirtioPciOptions {
            mem: mem.clone(),
            msi_router: router.clone(),
            workers: workers.clone(),
        },
    )
    .unwrap();
    let mut bars: Vec<BarAllocation> = Vec::new();
    for dev in [
        Arc::new(Mutex::new(xhci)) as SharedPciDevice,
        Arc::new(Mutex::new(virtio)) as SharedPciDevice,
    ] {
        bars.extend(bus.attach(dev).unwrap().1);
    }
    let mut cfg_io = PciConfigIo::new(bus.clone());

    for op in ops {
        match op {
            Op::ConfigPort {
                port,
                width: w,
                value,
                write,
            } => {
                let (offset, w) = (u64::from(port % 8), width(w, 4));
                if write {
                    cfg_io.write(0xcf8, offset, &value.to_le_bytes()[..w]);
                } else {
                    cfg_io.read(0xcf8, offset, &mut [0u8; 4][..w]);
                }
            }
            Op::Config {
                device,
                function,
                offset,
                width: w,
                value,
                write,
            } => {
                let (device, function) = (device % 4, function % 8);
                let w = width(w, 4);
                let offset = usize::from(offset);
                if write {
                    bus.config_write(device, function, offset, &value.to_le_bytes()[..w]);
                } else {
                    bus.config_read(device, function, offset, &mut [0u8; 4][..w]);
                }
            }
            Op::Bar {
                bar,
                offset,
                width: w,
                value,
                write,
            } => {
                let b = &mut bars[usize::from(bar) % 4];
                let (offset, w) = (u64::from(offset) % b.size, width(w, 8));
                if write {
                    b.region.write(b.address, offset, &value.to_le_bytes()[..w]);
                } else {
                    b.region.read(b.address, offset, &mut [0u8; 8][..w]);
                }
            }
            Op::Trigger { vector } => msix.trigger(vector),
            Op::Memory { offset, bytes } => {
                let _ = mem
                    .memory()
                    .write(&bytes, GuestAddress(u64::from(offset) % MEM_SIZE as u64));
            }
            Op::RunWorkers => workers.run(),
        }
    }
});
