//! vCPU threads: configuration for the 64-bit boot and the `KVM_RUN` loop
//! that dispatches port and MMIO exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use devices::legacy::StopRequest;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch;
use crate::coalesced::CoalescedRing;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed")]
    Kvm {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM set {set} of {want} boot MSRs")]
    Msrs { id: u8, set: usize, want: usize },
    #[error("cannot start vCPU thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// How the VM ended, decided by whoever asked first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest chose an exit status (debug-exit port, `vm.shutdown` = 0).
    Guest(i32),
    /// Something failed; the VMM exits non-zero.
    Error,
    /// The guest reset the machine (i8042): a clean reboot, or a panic's
    /// (see `exit_status::decide`).
    Reset,
    /// KVM reported a shutdown (triple fault).
    TripleFault,
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    GuestCrash,
    /// Every vCPU halted with interrupts off, nothing can wake it.
    HaltedDead,
    /// The VMM got this signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
}

/// The VM-wide stop request: first writer wins, everyone else sees it.
pub struct VmStop {
    stopping: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    event: EventFd,
}

impl VmStop {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
            event: EventFd::new(0)?,
        }))
    }

    pub fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        // An EventFd write fails only when its counter would overflow, and
        // then the event is already pending.
        let _ = self.event.write(1);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readable once a stop has been requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl StopRequest for VmStop {
    fn request_stop(&self, code: i32) {
        self.stop(StopReason::Guest(code));
    }

    fn request_reset(&self) {
        self.stop(StopReason::Reset);
    }
}

/// Everything a vCPU thread dispatches to.
#[derive(Clone)]
pub struct ExitHandlers {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<VmStop>,
    /// The VM's coalesced MMIO ring, drained after every KVM_RUN return.
    pub coalesced: Option<Arc<CoalescedRing>>,
    /// Where a kicked vCPU records whether it can still run.
    pub halt_probe: Option<Arc<crate::halt::HaltProbe>>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

impl Vcpu {
    /// Configures CPUID, MSRs, FPU and LAPIC; the boot vCPU also gets the
    /// registers for the kernel entry. The others wait for INIT/SIPI.
    pub fn new(
        fd: VcpuFd,
        id: u8,
        cpus: u8,
        base_cpuid: &CpuId,
        entry: Option<u64>,
    ) -> Result<Self, VcpuError> {
        let mut cpuid = base_cpuid.clone();
        arch::cpuid::fixup(cpuid.as_mut_slice(), id, cpus);
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        let msrs = arch::regs::boot_msrs();
        let set = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                want: msrs.as_slice().len(),
            });
        }
        fd.set_fpu(&arch::regs::fpu())
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        arch::regs::set_lint(&mut lapic.regs);
        fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        if let Some(entry) = entry {
            let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
            fd.set_sregs(&arch::regs::sregs(sregs))
                .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
            fd.set_regs(&arch::regs::regs(entry))
                .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        }
        Ok(Self { id, fd })
    }

    /// Maps the VM's coalesced MMIO ring through this vCPU's fd.
    pub fn map_coalesced_ring(&self) -> std::io::Result<CoalescedRing> {
        CoalescedRing::map(&self.fd)
    }

    /// Runs the vCPU on its own thread until the VM stops.
    pub fn start(self, handlers: ExitHandlers) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run(handlers))
            .map_err(VcpuError::Spawn)
    }

    fn run(mut self, h: ExitHandlers) {
        crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
        let id = self.id;
        // The pager reads this thread's NOIO flag by tid when it faults.
        let _noio_registration = devices::noio::register_current_thread();
        if let Some(p) = &h.halt_probe {
            p.register(id);
        }
        let mut exits = ExitCounts::default();
        while !h.stop.is_stopping() {
            // While in KVM_RUN a fault is the guest's own access (see
            // devices::noio::is_thread_running_guest); after it, emulation.
            devices::noio::set_running_guest(true);
            let result = self.fd.run();
            devices::noio::set_running_guest(false);
            exits.count(&result);
            if let Some(ring) = &h.coalesced {
                // Before this exit is handled: it may read what they wrote.
                let n = ring.drain(|addr, data| {
                    if !h.mmio.write(addr, data) {
                        log::debug!("vCPU {id}: unclaimed coalesced write {addr:#x}");
                    }
                });
                exits.coalesced += n as u64;
            }
            match result {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        if !h.pio.write(u64::from(port), data) {
                            log::trace!("vCPU {id}: unclaimed out {port:#x} <- {data:x?}");
                        }
                    }
                    VcpuExit::IoIn(port, data) => {
                        h.pio.read(u64::from(port), data);
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !h.mmio.write(addr, data) {
                            log::debug!("vCPU {id}: unclaimed MMIO write {addr:#x}");
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !h.mmio.read(addr, data) {
                            log::debug!("vCPU {id}: unclaimed MMIO read {addr:#x}");
                        }
                    }
                    VcpuExit::Hlt => {
                        // Only without an in-kernel LAPIC, which this VMM
                        // always has: KVM waits for interrupts itself.
                        log::error!("vCPU {id}: unexpected HLT exit; stopping the VM");
                        h.stop.stop(StopReason::Error);
                    }
                    VcpuExit::Shutdown => {
                        log::warn!("vCPU {id}: triple fault (KVM shutdown exit); stopping the VM");
                        h.stop.stop(StopReason::TripleFault);
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        log::info!("vCPU {id}: system event {kind}; stopping the VM");
                        h.stop.stop(match kind {
                            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => StopReason::GuestCrash,
                            kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                            _ => StopReason::Guest(0),
                        });
                    }
                    VcpuExit::Intr => {
                        if let Some(p) = &h.halt_probe {
                            p.record(id, &self.fd);
                        }
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        log::error!(
                            "vCPU {id}: KVM_RUN failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                        );
                        h.stop.stop(StopReason::Error);
                    }
                    VcpuExit::InternalError => {
                        log::error!(
                            "vCPU {id}: KVM internal error (emulation failure?); regs: {:x?}",
                            self.fd.get_regs().ok()
                        );
                        h.stop.stop(StopReason::Error);
                    }
                    other => {
                        log::error!("vCPU {id}: unexpected exit {other:?}");
                        h.stop.stop(StopReason::Error);
                    }
                },
                Err(e) if e.errno() == libc::EINTR => {
                    if let Some(p) = &h.halt_probe {
                        p.record(id, &self.fd);
                    }
                }
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    log::error!("vCPU {id}: KVM_RUN: {e}");
                    h.stop.stop(StopReason::Error);
                }
            }
        }
        log::debug!("vCPU {id}: thread done; exits: {exits}");
    }
}

/// Userspace exits of one vCPU by kind and address, for `--log-level debug`:
/// every exit here is a round trip through the VMM, the first thing to look
/// at when a guest is slow.
struct ExitCounts {
    by_key: std::collections::BTreeMap<(&'static str, u64), u64>,
    started: std::time::Instant,
    /// When the first exit came: for the boot vCPU, roughly how long the
    /// kernel's decompressor ran (it makes no exits).
    first: Option<Duration>,
    /// Coalesced MMIO writes applied (they cost no exit to userspace).
    coalesced: u64,
}

impl Default for ExitCounts {
    fn default() -> Self {
        Self {
            by_key: Default::default(),
            started: std::time::Instant::now(),
            first: None,
            coalesced: 0,
        }
    }
}

impl ExitCounts {
    fn count(&mut self, exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        if self.first.is_none() {
            self.first = Some(self.started.elapsed());
        }
        let key = match exit {
            Ok(VcpuExit::IoIn(port, _)) => ("pio-in", u64::from(*port)),
            Ok(VcpuExit::IoOut(port, _)) => ("pio-out", u64::from(*port)),
            Ok(VcpuExit::MmioRead(addr, _)) => ("mmio-read", *addr),
            Ok(VcpuExit::MmioWrite(addr, _)) => ("mmio-write", *addr),
            Ok(_) => ("other", 0),
            Err(_) => ("error", 0),
        };
        *self.by_key.entry(key).or_default() += 1;
    }
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut top: Vec<_> = self.by_key.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let total: u64 = self.by_key.values().sum();
        write!(f, "{total} total, {} coalesced writes", self.coalesced)?;
        if let Some(first) = self.first {
            write!(f, " (first after {} ms)", first.as_millis())?;
        }
        for ((kind, addr), n) in top.into_iter().take(12) {
            write!(f, ", {kind} {addr:#x}: {n}")?;
        }
        Ok(())
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the signal that kicks vCPUs out of KVM_RUN.
/// With SA_RESTART: a kick that lands while the vCPU thread is in another
/// system call (disk I/O for a doorbell, console output) restarts that call
/// instead of failing it with EINTR. KVM_RUN itself still returns EINTR
/// (KVM does not ask for a restart), which is what the kick is for. The
/// halt watcher (`crate::halt`) kicks once a second, so this matters.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal)?;
    // SAFETY: sigaction reads and writes the struct on this stack frame
    // only; the handler stays the one registered above, only its flags
    // change.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(SIGRTMIN(), std::ptr::null(), &mut act) != 0 {
            return Err(VcpuError::Signal(vmm_sys_util::errno::Error::last()));
        }
        act.sa_flags |= libc::SA_RESTART;
        if libc::sigaction(SIGRTMIN(), &act, std::ptr::null_mut()) != 0 {
            return Err(VcpuError::Signal(vmm_sys_util::errno::Error::last()));
        }
    }
    Ok(())
}

/// Kicks every vCPU thread until it has seen the stop and exited, then joins.
/// The signal is repeated because one sent just before a thread re-enters
/// KVM_RUN would otherwise be lost.
pub fn stop_and_join(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        while !t.is_finished() {
            if let Err(e) = t.kill(SIGRTMIN()) {
                log::warn!("cannot signal a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}
