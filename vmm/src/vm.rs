//! The VM: guest memory, in-kernel irqchip and PIT, legacy devices, vCPU
//! threads, and the wait for the guest (or an error) to end it.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{
    Cmos, DebugExit, SerialPort, CMOS_LEN, CMOS_PORT, COM1_BASE, COM1_IRQ, DEBUG_EXIT_PORT, I8042,
    I8042_DATA_PORT, I8042_LEN, SERIAL_LEN,
};
use kvm_bindings::KVM_PIT_SPEAKER_DUMMY;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{layout, mptable};
use crate::boot::{BootError, BootPlan};
use crate::config::{
    check_disk_ids, BalloonConfig, ConfigError, DiskConfig, MemoryConfig, SerialConfig, UsbIo,
    UsbStorageConfig,
};
use crate::control::{Control, ControlError, VmFacts, VmHandler};
use crate::device_manager::{DeviceError, DeviceManager, KvmFeatures};
use crate::guest_ram;
use crate::host::{self, HostError};
use crate::paging;
use crate::serial_input;
use crate::vcpu::{self, ExitHandlers, StopReason, Vcpu, VcpuError, VmStop};

/// KVM wants a three-page TSS and a one-page identity map below 4 GiB, out of
/// RAM and out of the MMIO devices' way (the usual place, below the BIOS ROM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Most vCPUs this VMM configures: APIC ids and the MP table use one byte, and
/// the IOAPIC takes the id after the last CPU.
pub const MAX_CPUS: u8 = 254;

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot map the coalesced MMIO ring")]
    CoalescedRing(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("guest memory pager")]
    Pager(#[from] crate::memory::PagerError),
    #[error("the guest memory pager failed: {0}")]
    PagerFailed(String),
    #[error(transparent)]
    Usb(#[from] crate::usb::UsbSetupError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("--cpus {want}: this host's KVM allows at most {max} vCPUs (and this VMM {MAX_CPUS})")]
    TooManyCpus { want: u8, max: usize },
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size_mib} MiB of guest memory")]
    GuestMemory {
        size_mib: u64,
        #[source]
        source: crate::guest_ram::GuestRamError,
    },
    #[error("cannot write the MP table")]
    MpTable(#[source] vm_memory::GuestMemoryError),
    #[error("cannot open the serial output file {path}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the serial input thread")]
    SerialInput(#[source] std::io::Error),
    #[error("cannot start the stall watchdog thread")]
    Watchdog(#[source] std::io::Error),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("cannot register {what} on the bus")]
    Bus {
        what: &'static str,
        #[source]
        source: devices::bus::BusError,
    },
}

/// Everything needed to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: MemoryConfig,
    pub serial: SerialConfig,
    pub disks: Vec<DiskConfig>,
    /// USB mass-storage disks on the xHCI controller.
    pub usb: Vec<UsbStorageConfig>,
    /// Control API socket (also adds the xHCI controller, for hotplug).
    pub api_socket: Option<PathBuf>,
    /// Try to run on a PVM /dev/kvm anyway (stock kernels hang there).
    pub allow_pvm: bool,
    /// Which thread runs USB transfers.
    pub usb_io: UsbIo,
    /// A virtio-balloon device (`--balloon`).
    pub balloon: Option<BalloonConfig>,
    /// Bound of the stall watchdog (`None`: off).
    pub stall_watchdog: Option<std::time::Duration>,
    /// Test aid: resume/reset paths without NOIO (see `devices::noio`).
    pub unsafe_disable_noio: bool,
}

/// The default guest command line: serial console, reboot through the
/// keyboard controller (which ends the VM), a panic reboots at once and
/// warm (which tells it from a clean reboot, see `exit_status`), no waiting
/// for absent PS/2 devices.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k,panic_warm panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Builds and runs the VM until the guest stops it; returns the exit status
/// the VMM should end with.
pub fn run(cfg: &VmConfig) -> Result<i32, VmError> {
    if cfg.cpus == 0 {
        return Err(VmError::NoCpus);
    }
    let started = std::time::Instant::now();
    let phase = |name: &str| log::debug!("startup: {name} done after {:?}", started.elapsed());
    // Everything that can be checked without KVM comes first.
    let plan = BootPlan::new(
        &cfg.kernel,
        cfg.initramfs.as_deref(),
        &cfg.cmdline,
        cfg.memory.size,
    )?;
    check_disk_ids(&cfg.disks)?;
    crate::preflight::check_vm(cfg)?;
    if let Some(b) = &cfg.balloon {
        b.validate(&cfg.memory)?;
    }
    phase("checking the kernel and initramfs");

    let kvm = host::open_kvm(cfg.allow_pvm)?;
    let max = kvm.get_max_vcpus().min(usize::from(MAX_CPUS));
    if usize::from(cfg.cpus) > max {
        return Err(VmError::TooManyCpus {
            want: cfg.cpus,
            max,
        });
    }
    // Created only once every check passed and KVM is there.
    let console_marks = Arc::new(crate::exit_status::ConsoleMarks::default());
    let serial_out: Box<dyn Write + Send> = Box::new(crate::exit_status::ConsoleWatch::new(
        serial_writer(&cfg.serial)?,
        console_marks.clone(),
    ));
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let mem = create_guest_memory(&vm, &cfg.memory)?;
    setup_irqchip(&vm)?;
    phase("creating the VM and its memory");

    let entry = plan.load(&mem)?;
    phase("loading the kernel");
    mptable::write(&mem, cfg.cpus, layout::MPTABLE_START).map_err(VmError::MpTable)?;

    let stop = VmStop::new().map_err(VmError::EventFd)?;
    crate::signals::watch(stop.clone()).map_err(|e| VmError::Thread("signals", e))?;
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let serial = add_legacy_devices(&vm, &pio, &stop, serial_out)?;
    // The console's keyboard: stdin feeds COM1 (raw mode on a terminal).
    let (_raw_terminal, serial_input) = match cfg.serial {
        SerialConfig::Stdout => (
            Some(serial_input::RawTerminal::enter()),
            Some(serial_input::start(serial.clone(), stop.clone()).map_err(VmError::SerialInput)?),
        ),
        _ => (None, None),
    };
    // Batching deferrable register writes needs the ring page every vCPU
    // maps (see coalesced.rs).
    let coalesced_mmio = kvm.check_extension(Cap::CoalescedMmio);
    let features = KvmFeatures {
        coalesced_mmio,
        readonly_mem: kvm.check_extension(Cap::ReadonlyMem),
    };
    let devices = DeviceManager::new(
        vm.clone(),
        GuestMemoryAtomic::new(mem.clone()),
        &pio,
        mmio.clone(),
        features,
        cfg.usb_io,
    )?;
    for disk in &cfg.disks {
        devices.add_disk(disk, &mmio, cfg.cpus)?;
    }
    let usb = crate::usb::setup(&devices, &mmio, &cfg.usb, cfg.api_socket.is_some())?;
    // After the kernel is loaded (the pager counts those pages as resident)
    // and before any vCPU runs. Swap may share a virtio or a USB disk's volume.
    let volume_of = |id: &str| {
        devices
            .volume(id)
            .or_else(|| usb.as_ref().and_then(|u| u.volume(id)))
    };
    let pager = paging::start(&cfg.memory, &mem, volume_of, &stop)?;
    let probe = pager.as_ref().map(crate::memory::Pager::probe);
    devices::noio::set_unsafe_disabled(cfg.unsafe_disable_noio);
    if let Some(bound) = cfg.stall_watchdog {
        crate::watchdog::start(bound, probe.clone()).map_err(VmError::Watchdog)?;
    }
    // After the pager, so that its discards go through it.
    let (balloon, mut balloon_policy) = match &cfg.balloon {
        Some(b) => {
            let (control, policy) =
                crate::balloon::add(b, &cfg.memory, &devices, &mmio, &mem, probe.as_ref())?;
            (Some(control), policy)
        }
        None => (None, None),
    };
    let facts = VmFacts {
        cpus: cfg.cpus,
        memory_bytes: cfg.memory.size,
    };
    let control = Control::new(
        cfg.api_socket.as_deref(),
        VmHandler::new(usb, stop.clone(), facts, probe.clone()).with_balloon(balloon.clone()),
    )?;

    phase("adding the devices");
    let vcpus = create_vcpus(&kvm, &vm, cfg.cpus, entry)?;
    let coalesced = match (coalesced_mmio, vcpus.first()) {
        (true, Some(v)) => Some(Arc::new(
            v.map_coalesced_ring().map_err(VmError::CoalescedRing)?,
        )),
        _ => None,
    };
    vcpu::install_kick_handler()?;
    let halt_probe = crate::halt::HaltProbe::new(cfg.cpus);
    let handlers = ExitHandlers {
        pio,
        mmio,
        stop: stop.clone(),
        coalesced,
        halt_probe: Some(halt_probe.clone()),
    };
    let mut threads = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match v.start(handlers.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop.stop(StopReason::Error);
                vcpu::stop_and_join(threads);
                return Err(e.into());
            }
        }
    }
    let halt_watch = {
        use std::os::unix::thread::JoinHandleExt;
        let ids = threads.iter().map(|t| t.as_pthread_t()).collect();
        let faults = probe.clone();
        let busy = move || {
            faults
                .as_ref()
                .is_some_and(|p| !p.blocked_faults().is_empty())
        };
        let (marks, grace) = (
            console_marks.clone(),
            crate::exit_status::panic_grace(&cfg.cmdline),
        );
        let panic_stuck = move || marks.stuck_in_panic(grace);
        crate::halt::watch(
            halt_probe,
            ids,
            stop.clone(),
            Box::new(busy),
            Box::new(panic_stuck),
        )
    };
    let halt_watch = match halt_watch {
        Ok(t) => t,
        Err(e) => {
            stop.stop(StopReason::Error);
            vcpu::stop_and_join(threads);
            return Err(VmError::Thread("halt-watch", e));
        }
    };
    log::info!(
        "VM running: {} vCPU(s), {} MiB",
        cfg.cpus,
        cfg.memory.size >> 20
    );

    // Every start-up thread exists (none inherits this filter) and the main
    // thread creates none from here on (see seccomp.rs).
    crate::seccomp::apply(crate::seccomp::ThreadKind::Main);
    // Wait for the guest, a device, a vCPU or the API to ask for the end.
    control.run_until_stopped(&stop);
    // Before the vCPU threads are joined: it signals them by thread id.
    let _ = halt_watch.join();
    vcpu::stop_and_join(threads);
    // Linux writes its warm-reboot flag just before it resets (exit_status).
    // Read only then, and not past a failed pager (the read could fault on
    // a page nobody serves any more).
    let pager_failed = pager.as_ref().is_some_and(|p| p.fatal_error().is_some());
    let warm_flag = (stop.reason() == Some(StopReason::Reset) && !pager_failed)
        .then(|| {
            vm_memory::Bytes::read_obj::<u16>(
                &mem,
                vm_memory::GuestAddress(crate::exit_status::WARM_REBOOT_FLAG_ADDR),
            )
            .ok()
        })
        .flatten();
    if pager.is_some() {
        // Quiesce counters of every volume (swap may share a disk's).
        let volumes: Vec<_> = devices::block::all_volumes()
            .iter()
            .map(|v| v.info())
            .collect();
        eprintln!(
            "volume-stats {}",
            serde_json::to_string(&volumes).unwrap_or_default()
        );
    }
    if serial.lock().is_ok_and(|mut s| s.guest_output_pending()) {
        log::warn!(
            "the guest stopped while its serial driver still had console output to send; \
             that output is lost (a guest reporting its status should wait for the console \
             to drain, e.g. tcdrain or `stty` on it)"
        );
    }
    if let Some(t) = serial_input {
        let _ = t.join();
    }
    // No more target changes once the VM is down.
    if let Some(p) = balloon_policy.as_mut() {
        p.stop();
    }
    devices.shutdown();
    // Written images reach the disk even if the guest did not flush them
    // (a stop by signal or vm.shutdown).
    let synced = devices::block::sync_all_images();
    log::debug!("synced {synced} written disk image(s) at stop");
    if let Some(b) = &balloon {
        // Before the pager stops: its counters are part of the report.
        eprintln!("balloon-stats {}", b.report_json());
    }
    let times = devices::noio::path_times();
    if pager.is_some() && !times.is_empty() {
        // With paged memory, how long the device's own resume and reset
        // paths took (what NOIO keeps short).
        eprintln!(
            "pm-paths {}",
            serde_json::to_string(&times).unwrap_or_default()
        );
    }
    if let Some(err) = pager.and_then(paging::finish) {
        return Err(VmError::PagerFailed(err));
    }
    // Keep guest memory alive until every vCPU has stopped using it.
    drop(mem);
    let status = crate::exit_status::decide(stop.reason(), warm_flag, &console_marks);
    log::info!("VM stopped ({:?}); exit status {status}", stop.reason());
    Ok(status)
}

fn create_guest_memory(vm: &VmFd, cfg: &MemoryConfig) -> Result<GuestMemoryMmap, VmError> {
    // Huge pages for RAM the pager does not manage (it pages in 4 KiB).
    let huge_pages = cfg.limit.is_none();
    let mem = guest_ram::map(&layout::ram_ranges(cfg.size), huge_pages).map_err(|source| {
        VmError::GuestMemory {
            size_mib: cfg.size >> 20,
            source,
        }
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping described by `region_desc` is owned by `mem`,
        // which outlives every vCPU (they are joined before `mem` drops in
        // `run`), and it is not unmapped or remapped while the VM exists.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

fn setup_irqchip(vm: &VmFd) -> Result<(), VmError> {
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// Writes each chunk straight through, so partial lines (prompts) show.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn serial_writer(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(Unbuffered(std::io::stdout())),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

fn add_legacy_devices(
    vm: &VmFd,
    pio: &Bus,
    stop: &Arc<VmStop>,
    serial_out: Box<dyn Write + Send>,
) -> Result<Arc<Mutex<SerialPort>>, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(irq, serial_out)));
    let bus = |what| move |source| VmError::Bus { what, source };
    pio.insert(serial.clone(), COM1_BASE, SERIAL_LEN)
        .map_err(bus("serial port"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone())));
    pio.insert(i8042, I8042_DATA_PORT, I8042_LEN)
        .map_err(bus("i8042"))?;
    pio.insert(Arc::new(Mutex::new(Cmos::new())), CMOS_PORT, CMOS_LEN)
        .map_err(bus("CMOS RTC"))?;
    let debug_exit = Arc::new(Mutex::new(DebugExit::new(stop.clone())));
    pio.insert(debug_exit, DEBUG_EXIT_PORT, 1)
        .map_err(bus("debug-exit port"))?;
    Ok(serial)
}

fn create_vcpus(kvm: &Kvm, vm: &VmFd, cpus: u8, entry: u64) -> Result<Vec<Vcpu>, VmError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    (0..cpus)
        .map(|id| {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let boot_entry = (id == 0).then_some(entry);
            Ok(Vcpu::new(fd, id, cpus, &cpuid, boot_entry)?)
        })
        .collect()
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}
