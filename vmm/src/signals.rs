//! SIGTERM, SIGINT and SIGHUP stop the VM the orderly way.
//!
//! `main` blocks the three signals before any thread exists, so every
//! thread inherits the mask and no system call anywhere is interrupted by
//! them; one thread takes them with `sigwait`. The first one stops the VM
//! like any other stop request: vCPUs leave KVM_RUN, the serial input thread
//! ends and the terminal leaves raw mode, devices stop, dirty disk images
//! are synced and closed, the API socket file is removed, and the VMM exits
//! with 128 + the signal number (129 SIGHUP, 130 SIGINT, 143 SIGTERM). A
//! second one while that is under way, or a stop that takes longer than
//! [`STOP_GRACE`] (a thread stuck on I/O, say), restores the terminal and
//! exits at once with the same status: a signal always ends the VMM.
//!
//! A signal the VMM was started with ignored (SIGHUP under `nohup`, SIGINT
//! in a background job of a non-interactive shell) stays ignored: the
//! kernel discards it before `sigwait` could take it. The vCPU kick signal
//! (SIGRTMIN, see `vcpu.rs`) is not among them and keeps its handler.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::vcpu::{StopReason, VmStop};

/// How long an orderly stop after a signal may take before the VMM exits
/// anyway.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGINT, libc::SIGTERM];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own;
    // the signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the stop signals in the calling thread and in every thread it
/// creates afterwards. Call first thing in `main`.
pub fn block() -> io::Result<()> {
    let set = stop_set();
    // SAFETY: `set` is an initialised sigset_t; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Starts the thread that turns the stop signals into a stop of the VM.
pub fn watch(stop: Arc<VmStop>) -> io::Result<JoinHandle<()>> {
    watch_with(stop, STOP_GRACE)
}

/// [`watch`] with another grace period for the orderly stop.
pub fn watch_with(stop: Arc<VmStop>, grace: std::time::Duration) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Helper);
            // sigwait needs the signals blocked here too (they are when
            // `block` ran before this thread was made).
            let _ = block();
            let set = stop_set();
            let mut first: Option<libc::c_int> = None;
            loop {
                let sig = match first {
                    None => wait(&set, None),
                    Some(_) => wait(&set, Some(grace)),
                };
                match (first, sig) {
                    (None, Ok(Some(sig))) => {
                        log::warn!("got signal {sig}; stopping the VM");
                        first = Some(sig);
                        stop.stop(StopReason::Signal(sig));
                    }
                    (Some(first), Ok(None)) => {
                        eprintln!(
                            "error: the VM did not stop within {} s of signal {first}; exiting now",
                            grace.as_secs()
                        );
                        forced_exit(crate::exit_status::for_signal(first));
                    }
                    (Some(_), Ok(Some(sig))) => {
                        eprintln!("error: second stop signal ({sig}) while stopping; exiting now");
                        forced_exit(crate::exit_status::for_signal(sig));
                    }
                    (None, Ok(None)) => {}
                    (_, Err(e)) => {
                        log::error!("waiting for signals: {e}");
                        return;
                    }
                }
            }
        })
}

/// Files to remove when the VMM leaves without its orderly stop (the API
/// socket).
static REMOVE_ON_EXIT: std::sync::Mutex<Vec<std::path::PathBuf>> =
    std::sync::Mutex::new(Vec::new());

/// Removes `path` if the VMM exits through [`forced_exit`].
pub fn remove_on_forced_exit(path: &std::path::Path) {
    REMOVE_ON_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_owned());
}

/// Leaves at once (a stop that cannot finish: a second signal, the grace
/// period over, the stall watchdog): puts the terminal back, removes the
/// registered files, exits with `status`.
pub fn forced_exit(status: i32) -> ! {
    crate::serial_input::restore_terminal();
    let paths = std::mem::take(&mut *REMOVE_ON_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(status)
}

/// Waits for one of `set` (for at most `timeout`); `None` on timeout.
fn wait(
    set: &libc::sigset_t,
    timeout: Option<std::time::Duration>,
) -> io::Result<Option<libc::c_int>> {
    loop {
        let r = match timeout {
            None => {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out
                // pointer for the duration of the call.
                let r = unsafe { libc::sigwait(set, &mut sig) };
                if r != 0 {
                    return Err(io::Error::from_raw_os_error(r));
                }
                return Ok(Some(sig));
            }
            Some(t) => {
                let ts = libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
                };
                // SAFETY: `set` and `ts` are initialised and outlive the
                // call; no siginfo is asked for.
                unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) }
            }
        };
        if r >= 0 {
            return Ok(Some(r));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::time::{Duration, Instant};

    #[test]
    fn a_stop_signal_stops_the_vm_with_its_reason() {
        // Blocked here, so blocked in the watcher from its first instruction
        // (a thread inherits its creator's mask); then one SIGHUP sent to
        // the watcher alone (the test's other threads do not block it).
        block().unwrap();
        let stop = VmStop::new().unwrap();
        // A grace period longer than any test run: this thread must never
        // end the test process.
        let t = watch_with(stop.clone(), Duration::from_secs(1 << 30)).unwrap();
        // SAFETY: the thread runs until the process ends (it waits for
        // signals forever), so its id stays valid.
        unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while stop.reason().is_none() {
            std::thread::sleep(Duration::from_millis(20));
            assert!(Instant::now() < deadline, "no stop after SIGHUP");
        }
        assert_eq!(stop.reason(), Some(StopReason::Signal(libc::SIGHUP)));
        assert!(stop.is_stopping());
    }
}
