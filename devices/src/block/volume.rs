//! A volume: the host I/O queue of one storage backend, which can be quiesced.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Debug, Default)]
struct State {
    quiesced: bool,
    in_flight: u64,
}

/// The host-side I/O queue of one storage backend.
///
/// While quiesced, [`Volume::begin_io`] waits and [`Volume::try_begin_io`]
/// returns `None`; [`Volume::quiesce`] itself waits for in-flight I/O to drain,
/// as Linux freezes a block queue.
#[derive(Debug)]
pub struct Volume {
    name: String,
    state: Mutex<State>,
    changed: Condvar,
}

/// Proof that one I/O is in flight on a volume; dropping it completes the I/O.
#[must_use]
pub struct IoGuard {
    volume: Arc<Volume>,
}

impl Volume {
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_quiesced(&self) -> bool {
        self.lock().quiesced
    }

    /// Stops new I/O and waits until the I/O already in flight has finished.
    pub fn quiesce(&self) {
        let mut st = self.lock();
        st.quiesced = true;
        while st.in_flight > 0 {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        log::debug!("volume {}: quiesced", self.name);
    }

    /// Lets I/O flow again and wakes every waiter.
    pub fn resume(&self) {
        self.lock().quiesced = false;
        self.changed.notify_all();
        log::debug!("volume {}: resumed", self.name);
    }

    /// Starts one I/O, waiting while the volume is quiesced.
    pub fn begin_io(self: &Arc<Self>) -> IoGuard {
        let mut st = self.lock();
        while st.quiesced {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.in_flight += 1;
        IoGuard {
            volume: self.clone(),
        }
    }

    /// Like [`Volume::begin_io`] but gives up after `timeout`.
    pub fn begin_io_timeout(self: &Arc<Self>, timeout: Duration) -> Option<IoGuard> {
        let st = self.lock();
        let (mut st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| s.quiesced)
            .unwrap_or_else(|e| e.into_inner());
        if st.quiesced {
            return None;
        }
        st.in_flight += 1;
        Some(IoGuard {
            volume: self.clone(),
        })
    }

    /// Starts one I/O only if that needs no waiting: the entry for NOIO callers.
    pub fn try_begin_io(self: &Arc<Self>) -> Option<IoGuard> {
        let mut st = self.lock();
        if st.quiesced {
            return None;
        }
        st.in_flight += 1;
        Some(IoGuard {
            volume: self.clone(),
        })
    }
}

impl Drop for IoGuard {
    fn drop(&mut self) {
        let mut st = self.volume.lock();
        st.in_flight -= 1;
        if st.in_flight == 0 {
            self.volume.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    #[test]
    fn io_waits_while_quiesced_and_flows_after_resume() {
        let vol = Volume::new("t");
        vol.quiesce();
        assert!(vol.try_begin_io().is_none());
        assert!(vol.begin_io_timeout(Duration::from_millis(20)).is_none());
        let done = Arc::new(AtomicBool::new(false));
        let (v, d) = (vol.clone(), done.clone());
        let t = thread::spawn(move || {
            let _g = v.begin_io();
            d.store(true, Ordering::SeqCst);
        });
        thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "I/O ran on a quiesced volume");
        vol.resume();
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert!(vol.try_begin_io().is_some());
    }

    #[test]
    fn quiesce_waits_for_in_flight_io() {
        let vol = Volume::new("t");
        let guard = vol.begin_io();
        let v = vol.clone();
        let t = thread::spawn(move || v.quiesce());
        thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "quiesce returned with I/O in flight");
        drop(guard);
        t.join().unwrap();
        assert!(vol.is_quiesced());
    }
}
