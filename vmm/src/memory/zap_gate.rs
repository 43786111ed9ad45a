//! The handshake between the pager's own zaps of guest RAM and the fault
//! handler's retries.
//!
//! Every `madvise(MADV_DONTNEED)` on registered memory sends a REMOVE event
//! and marks the address space as changing until the zapping thread runs
//! again after the handler has read the event; meanwhile every `UFFDIO_COPY`
//! fails with `EAGAIN` and the fault waits for a retry. Reclaim drops clean
//! pages in many short runs. Without a handshake, on a host CPU shared with
//! the handler (the nested L1 has one), reclaim could start its next zap
//! before the handler's retry ran, over and over, and the handler, which
//! cannot tell when the zapper has run, yielded and then slept a timer tick
//! per round: a vCPU's fault once waited 218 ms, and 1256 faults over 10 ms,
//! in one round of the nested usb-pm benchmark.
//!
//! So both sides say what they do: a zap first waits (bounded) until the
//! handler has no fault left to retry, and signals an eventfd when it is
//! done; the handler, with retries pending and a zap in flight, polls that
//! eventfd along with the userfaultfd instead of sleeping blind.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Default)]
struct State {
    /// Faults the handler holds for a retry.
    retries: usize,
    /// The pager's own zaps between their `madvise` call and its return.
    zaps: usize,
    /// Handler work that must not meet a zap midway (a block brought back
    /// and then write-protected).
    holds: usize,
}

impl State {
    fn zaps_wait(&self) -> bool {
        self.retries > 0 || self.holds > 0
    }
}

/// See the module comment.
#[derive(Debug)]
pub struct ZapGate {
    state: Mutex<State>,
    retries_done: Condvar,
    /// Written when a zap returns: the handler polls it.
    zap_done: EventFd,
}

impl ZapGate {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(State::default()),
            retries_done: Condvar::new(),
            zap_done: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handler: `n` faults wait for a retry now.
    pub fn set_retries(&self, n: usize) {
        let mut s = self.lock();
        s.retries = n;
        if !s.zaps_wait() {
            self.retries_done.notify_all();
        }
    }

    /// The handler: zaps that have not started wait (bounded, as for
    /// retries) until the guard drops.
    pub fn hold(&self) -> ZapHold<'_> {
        self.lock().holds += 1;
        ZapHold { gate: self }
    }

    /// The handler: whether a zap is between its call and its return.
    pub fn zap_in_flight(&self) -> bool {
        self.lock().zaps > 0
    }

    /// The eventfd written when a zap returns (the handler polls and then
    /// drains it).
    pub fn zap_done_fd(&self) -> &EventFd {
        &self.zap_done
    }

    /// A zapping thread, before its `madvise`: waits up to `hold` until no
    /// fault waits for a retry, then counts the zap in flight until the
    /// guard drops. The guard says whether it had to wait.
    pub fn begin_zap(&self, hold: Duration) -> ZapGuard<'_> {
        let s = self.lock();
        let held = s.zaps_wait();
        let mut s = if held {
            self.retries_done
                .wait_timeout_while(s, hold, |s| s.zaps_wait())
                .unwrap_or_else(|e| e.into_inner())
                .0
        } else {
            s
        };
        s.zaps += 1;
        ZapGuard { gate: self, held }
    }
}

/// Zaps held off by the handler ([`ZapGate::hold`]).
pub struct ZapHold<'a> {
    gate: &'a ZapGate,
}

impl Drop for ZapHold<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.holds -= 1;
        if !s.zaps_wait() {
            self.gate.retries_done.notify_all();
        }
    }
}

/// A zap in flight; dropping it (after the `madvise`) tells the handler.
pub struct ZapGuard<'a> {
    gate: &'a ZapGate,
    /// Whether the zap waited for the handler's retries first.
    pub held: bool,
}

impl Drop for ZapGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.zaps -= 1;
        drop(s);
        if let Err(e) = self.gate.zap_done.write(1) {
            log::warn!("pager: cannot signal a finished zap: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_zap_goes_at_once_when_nothing_waits_for_a_retry() {
        let g = ZapGate::new().unwrap();
        let z = g.begin_zap(Duration::from_secs(5));
        assert!(!z.held);
        assert!(g.zap_in_flight());
        drop(z);
        assert!(!g.zap_in_flight());
        assert_eq!(g.zap_done_fd().read().unwrap(), 1, "the handler is told");
        g.set_retries(2);
        g.set_retries(0);
        assert!(!g.begin_zap(Duration::from_secs(5)).held);
    }

    #[test]
    fn a_zap_waits_until_the_retries_are_done() {
        let g = Arc::new(ZapGate::new().unwrap());
        g.set_retries(3);
        let g2 = g.clone();
        let t0 = Instant::now();
        let handler = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            g2.set_retries(1);
            std::thread::sleep(Duration::from_millis(100));
            g2.set_retries(0);
        });
        let z = g.begin_zap(Duration::from_secs(30));
        let waited = t0.elapsed();
        handler.join().unwrap();
        assert!(z.held);
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
    }

    #[test]
    fn a_zap_waits_while_the_handler_holds_zaps() {
        let g = Arc::new(ZapGate::new().unwrap());
        let h = g.hold();
        let g2 = g.clone();
        let t0 = Instant::now();
        let zapper = std::thread::spawn(move || g2.begin_zap(Duration::from_secs(30)).held);
        std::thread::sleep(Duration::from_millis(100));
        drop(h);
        assert!(zapper.join().unwrap());
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
        assert!(!g.begin_zap(Duration::from_secs(5)).held, "released");
    }

    #[test]
    fn a_zap_waits_no_longer_than_its_bound() {
        let g = ZapGate::new().unwrap();
        g.set_retries(1);
        let t0 = Instant::now();
        let z = g.begin_zap(Duration::from_millis(50));
        let waited = t0.elapsed();
        assert!(z.held && g.zap_in_flight());
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }
}
