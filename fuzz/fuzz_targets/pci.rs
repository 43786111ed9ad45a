//! PCI: configuration space through the 0xcf8/0xcfc ports and directly,
//! and the BARs (MSI-X table and PBA, xHCI registers, virtio-pci common
//! and device configuration, notifications) of an xHCI controller and a
//! two-queue virtio-blk function, with device-side MSI-X triggers and the
//! virtio worker run between accesses; a bring-up move takes the virtio
//! function to DRIVER_OK on two rings that the usual queue moves then fill
//! and notify through the BAR.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::msix::test_router::RecordingRouter;
use devices::pci::{
    BarAllocation, PciBus, PciConfigIo, SharedPciDevice, COMMAND, COMMAND_BUS_MASTER,
    COMMAND_MEMORY_SPACE,
};
use devices::virtio::block::{Block, BlockOptions};
use devices::virtio::common_cfg_offsets::*;
use devices::virtio::test_utils::guest_memory;
use devices::virtio::{
    VirtioPciDevice, VirtioPciOptions, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, STATUS_ACKNOWLEDGE,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_BAR,
};
use devices::xhci::{XhciConfig, XhciPci};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_fuzz::virtq::{QueueOp, Virtqueues, MEM_SIZE};
use vmm_fuzz::{scratch_disk, Arbitrary, InlineWorkers, NoLine};

/// The 32-bit MMIO hole the BARs are allocated in.
const HOLE: (u64, u64) = (0xc000_0000, 0x1000_0000);

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
    /// The virtio driver's bring-up as Linux does it (memory decoding and
    /// bus mastering on, features acked from `features`, both queues on
    /// the rings of [`Virtqueues`], DRIVER_OK), each step a BAR write.
    BringUp { features: u64 },
    /// A move on the virtio rings; a notification goes through the BAR.
    Queue(QueueOp),
}

/// The virtio function's device number and its first BAR (the
/// common configuration, notifications) in the allocation list.
const VIRTIO_DEVICE: u8 = 2;
const VIRTIO_BARS: usize = 2;

fn bring_up(bus: &PciBus, bar: &mut BarAllocation, vq: &Virtqueues, features: u64) {
    let command = COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;
    bus.config_write(VIRTIO_DEVICE, 0, COMMAND, &command.to_le_bytes());
    let mut w = |offset: u64, value: u64, len: usize| {
        bar.region
            .write(bar.address, offset, &value.to_le_bytes()[..len]);
    };
    let ack = u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(DEVICE_STATUS, u64::from(STATUS_ACKNOWLEDGE), 1);
    w(DEVICE_STATUS, ack, 1);
    for half in 0..2u64 {
        w(DRIVER_FEATURE_SELECT, half, 4);
        w(DRIVER_FEATURE, (features >> (32 * half)) & 0xffff_ffff, 4);
    }
    w(DEVICE_STATUS, ack | u64::from(STATUS_FEATURES_OK), 1);
    w(CONFIG_MSIX_VECTOR, 0, 2);
    for (i, ring) in vq.rings.iter().enumerate() {
        w(QUEUE_SELECT, i as u64, 2);
        w(QUEUE_SIZE, u64::from(ring.size), 2);
        w(QUEUE_MSIX_VECTOR, i as u64 + 1, 2);
        w(QUEUE_DESC, ring.desc, 8);
        w(QUEUE_DRIVER, ring.avail, 8);
        w(QUEUE_DEVICE, ring.used, 8);
        w(QUEUE_ENABLE, 1, 2);
    }
    let ok = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    w(DEVICE_STATUS, ack | u64::from(ok), 1);
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
    let virtio_bar = &bars[VIRTIO_BARS];
    assert_eq!(
        (virtio_bar.device_number, virtio_bar.index),
        (VIRTIO_DEVICE, VIRTIO_BAR)
    );
    let mut cfg_io = PciConfigIo::new(bus.clone());
    let mut vq = Virtqueues::in_memory(mem.clone(), 2, 16);

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
            Op::BringUp { features } => bring_up(&bus, &mut bars[VIRTIO_BARS], &vq, features),
            Op::Queue(op) => vq.apply(op, false, &mut |slot| {
                let notify = NOTIFY_OFFSET + slot as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                let b = &mut bars[VIRTIO_BARS];
                b.region
                    .write(b.address, notify, &(slot as u16).to_le_bytes());
                workers.run();
                None
            }),
        }
    }
});
