//! Detecting a dead guest: every vCPU halted with interrupts off (only an
//! NMI, SMI or INIT could wake it, and no one is left to send one) or still
//! waiting for its start-up IPI. With the in-kernel LAPIC such a vCPU never
//! leaves KVM_RUN, so the VMM would wait forever; a guest that crashed early
//! (the decompressor's "System halted", an early `cli; hlt`) or called
//! `halt` / `poweroff` (which Linux turns into a halt without ACPI) ends up
//! here.
//!
//! A watcher thread kicks every vCPU that is in KVM_RUN out of it once a
//! period with the kick signal; each vCPU records its KVM multiprocessing
//! state and IF flag before it re-enters. [`STRIKES`] dead observations in
//! a row stop the VM with [`StopReason::HaltedDead`]. A vCPU thread that is
//! emulating a device is not kicked (it is not halted), and no vCPU is
//! kicked while the guest-memory pager has a fault waiting: a kick would
//! restart that fault, which the stall watchdog times from its start.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::SIGRTMIN;

use crate::vcpu::{StopReason, VmStop};

/// Not recorded since the last kick (it was running in the VMM, say).
const UNKNOWN: u8 = 0;
const RUNNING: u8 = 1;
/// Halted with RFLAGS.IF clear.
const HALTED_IF_OFF: u8 = 2;
/// An application processor waiting for INIT/SIPI.
const WAITING_FOR_SIPI: u8 = 3;

/// How often the vCPUs are looked at.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Consecutive dead observations before the VM is stopped.
pub const STRIKES: u32 = 3;
const RFLAGS_IF: u64 = 1 << 9;

/// The last recorded state of each vCPU.
pub struct HaltProbe {
    states: Vec<AtomicU8>,
    /// Each vCPU thread's id (0 until it started).
    tids: Vec<std::sync::atomic::AtomicI32>,
}

impl HaltProbe {
    pub fn new(cpus: u8) -> Arc<Self> {
        Arc::new(Self {
            states: (0..cpus).map(|_| AtomicU8::new(UNKNOWN)).collect(),
            tids: (0..cpus).map(|_| Default::default()).collect(),
        })
    }

    /// Called by vCPU `id`'s thread when it starts.
    pub fn register(&self, id: u8) {
        if let Some(t) = self.tids.get(usize::from(id)) {
            t.store(devices::noio::gettid(), Ordering::SeqCst);
        }
    }

    /// Whether vCPU `i`'s thread is inside KVM_RUN (where a halt waits).
    fn in_guest(&self, i: usize) -> bool {
        self.tids
            .get(i)
            .map(|t| t.load(Ordering::SeqCst))
            .is_some_and(|tid| tid != 0 && devices::noio::is_thread_running_guest(tid))
    }

    /// Called by vCPU `id`'s thread when KVM_RUN returned for a signal.
    pub fn record(&self, id: u8, fd: &VcpuFd) {
        let state = match fd.get_mp_state() {
            Ok(mp) if mp.mp_state == KVM_MP_STATE_HALTED => match fd.get_regs() {
                Ok(regs) if regs.rflags & RFLAGS_IF == 0 => HALTED_IF_OFF,
                _ => RUNNING,
            },
            Ok(mp)
                if mp.mp_state == KVM_MP_STATE_UNINITIALIZED
                    || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED =>
            {
                WAITING_FOR_SIPI
            }
            _ => RUNNING,
        };
        self.set(id, state);
    }

    fn set(&self, id: u8, state: u8) {
        if let Some(s) = self.states.get(usize::from(id)) {
            s.store(state, Ordering::SeqCst);
        }
    }

    fn forget(&self) {
        for s in &self.states {
            s.store(UNKNOWN, Ordering::SeqCst);
        }
    }

    /// Whether no vCPU can run again: each halted with interrupts off or
    /// waiting to be started, and at least one halted.
    pub fn all_dead(&self) -> bool {
        let states: Vec<u8> = self
            .states
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .collect();
        states.contains(&HALTED_IF_OFF)
            && states
                .iter()
                .all(|&s| s == HALTED_IF_OFF || s == WAITING_FOR_SIPI)
    }
}

/// Starts the watcher over the vCPU threads `vcpus` (their pthread ids, in
/// vCPU order). `busy` says when not to kick at all (a pager fault waits);
/// `panic_stuck` when the guest panicked and stays so (exit_status), which
/// is checked once a period too.
/// It ends when the VM stops; join it before joining the vCPU threads.
pub fn watch(
    probe: Arc<HaltProbe>,
    vcpus: Vec<libc::pthread_t>,
    stop: Arc<VmStop>,
    busy: Box<dyn Fn() -> bool + Send>,
    panic_stuck: Box<dyn Fn() -> bool + Send>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("halt-watch".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Helper);
            let mut strikes = 0;
            let tick = Duration::from_millis(50);
            'outer: while !stop.is_stopping() {
                probe.forget();
                let kick = !busy();
                for (i, &t) in vcpus.iter().enumerate() {
                    if kick && probe.in_guest(i) {
                        // SAFETY: `t` is a vCPU thread that is not joined
                        // before this watcher is (see vm::run), so the id
                        // is valid.
                        unsafe { libc::pthread_kill(t, SIGRTMIN()) };
                    }
                }
                let mut waited = Duration::ZERO;
                while waited < PERIOD {
                    if stop.is_stopping() {
                        break 'outer;
                    }
                    std::thread::sleep(tick);
                    waited += tick;
                }
                if panic_stuck() {
                    log::info!("the guest kernel panicked and stays in its panic; stopping the VM");
                    stop.stop(StopReason::GuestCrash);
                } else if probe.all_dead() {
                    strikes += 1;
                    if strikes >= STRIKES {
                        log::info!(
                            "every vCPU is halted with interrupts off (or waiting to be \
                             started) and nothing can wake it; stopping the VM"
                        );
                        stop.stop(StopReason::HaltedDead);
                    }
                } else {
                    strikes = 0;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher kicks vCPU threads while they may be in a system call
    /// other than KVM_RUN: that call must go on, not fail with EINTR.
    #[test]
    fn a_kick_restarts_the_system_call_it_interrupts() {
        use std::os::unix::thread::JoinHandleExt;
        crate::vcpu::install_kick_handler().unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (rd, wr) = (fds[0], fds[1]);
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            // SAFETY: reads at most one byte into `b`; `rd` stays open
            // until this thread is joined.
            let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
            (n, std::io::Error::last_os_error().raw_os_error())
        });
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..5 {
            // SAFETY: the reader thread is joined below, after the kicks.
            unsafe { libc::pthread_kill(reader.as_pthread_t(), SIGRTMIN()) };
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: writes one byte from a local to the pipe we own.
        assert_eq!(unsafe { libc::write(wr, [7u8].as_ptr().cast(), 1) }, 1);
        let (n, errno) = reader.join().unwrap();
        assert_eq!(n, 1, "read failed after a kick: errno {errno:?}");
        // SAFETY: both fds are ours and no longer used.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
    }

    #[test]
    fn dead_only_when_no_vcpu_can_run() {
        let p = HaltProbe::new(3);
        assert!(!p.all_dead(), "nothing recorded");
        p.set(0, HALTED_IF_OFF);
        p.set(1, WAITING_FOR_SIPI);
        p.set(2, WAITING_FOR_SIPI);
        assert!(p.all_dead());
        p.set(2, RUNNING);
        assert!(!p.all_dead(), "one vCPU runs");
        p.set(2, UNKNOWN);
        assert!(!p.all_dead(), "one vCPU was not seen in KVM_RUN");
        p.set(2, HALTED_IF_OFF);
        assert!(p.all_dead());
        p.forget();
        assert!(!p.all_dead());
        // Threads are kicked only inside KVM_RUN.
        assert!(!p.in_guest(0), "not started");
        p.register(0);
        assert!(!p.in_guest(0), "registered, outside KVM_RUN");
        let _noio = devices::noio::register_current_thread();
        devices::noio::set_running_guest(true);
        assert!(p.in_guest(0));
        devices::noio::set_running_guest(false);
        assert!(!p.in_guest(0));
        let waiting = HaltProbe::new(2);
        waiting.set(0, WAITING_FOR_SIPI);
        waiting.set(1, WAITING_FOR_SIPI);
        assert!(!waiting.all_dead(), "no vCPU halted: not started yet");
    }
}
