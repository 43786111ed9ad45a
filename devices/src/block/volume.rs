//! A volume: the host I/O queue of one storage backend, which can be quiesced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Default)]
struct State {
    quiesced: bool,
    in_flight: u64,
    /// When the current quiesce began.
    quiesced_since: Option<Instant>,
    quiesces: u64,
    resumes: u64,
    /// Time spent quiesced, not counting the current stretch.
    quiesced_total: Duration,
    /// Threads waiting for the volume to flow: (wait id, thread, since).
    waiters: Vec<(u64, String, Instant)>,
    /// Who sits on the volume, e.g. "USB disk 'pm' on port 5".
    owner: Option<String>,
    /// Asked once per quiesce to wake the sleeping device (see `set_waker`).
    waker: Option<Waker>,
    /// Whether the waker ran during the current quiesce.
    woken: bool,
    wake_requests: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("quiesced", &self.quiesced)
            .field("in_flight", &self.in_flight)
            .field("waiters", &self.waiters.len())
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// How the device sitting on a volume is asked to wake up.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// How long an I/O waits on a quiesced volume before the waker is asked.
pub const WAKE_AFTER: Duration = Duration::from_millis(100);

/// A thread waiting for a quiesced volume, as diagnostics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeWaiter {
    pub thread: String,
    pub waited_ms: u64,
}

/// A volume's state and counters, as diagnostics and the control API show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub quiesced: bool,
    pub in_flight: u64,
    /// Times the volume was quiesced / resumed since it was created.
    pub quiesces: u64,
    pub resumes: u64,
    /// Total time spent quiesced, the current stretch included.
    pub quiesced_ms: u64,
    /// How long the current quiesce has lasted (0 when flowing).
    pub quiesced_for_ms: u64,
    pub owner: Option<String>,
    /// Threads waiting for the volume to flow again, longest first.
    pub waiters: Vec<VolumeWaiter>,
    /// Times an I/O that waited on the quiesced volume asked its device to
    /// wake (remote wakeup of a suspended USB disk).
    pub wake_requests: u64,
}

static NEXT_WAIT: AtomicU64 = AtomicU64::new(0);

/// Every volume alive in the process, for the stall watchdog.
static VOLUMES: LazyLock<Mutex<Vec<Weak<Volume>>>> = LazyLock::new(|| Mutex::new(Vec::new()));

/// The volumes alive right now.
pub fn all_volumes() -> Vec<Arc<Volume>> {
    let mut list = VOLUMES.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.iter().filter_map(Weak::upgrade).collect()
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
        let v = Arc::new(Self {
            name: name.into(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        VOLUMES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&v));
        v
    }

    /// How to wake the device that sits on the volume when host I/O (swap
    /// writeback, a swap-in) has waited [`WAKE_AFTER`] on it while it is
    /// quiesced: as I/O to a runtime-suspended disk resumes it in Linux.
    /// Called once per quiesce, on the waiting thread, without locks held.
    pub fn set_waker(&self, waker: Waker) {
        self.lock().waker = Some(waker);
    }

    /// Forgets the waker (the device left the volume).
    pub fn clear_waker(&self) {
        self.lock().waker = None;
    }

    /// Says who sits on the volume (diagnostics: the watchdog names it).
    pub fn set_owner(&self, owner: impl Into<String>) {
        self.lock().owner = Some(owner.into());
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

    /// State and counters right now.
    pub fn info(&self) -> VolumeInfo {
        let st = self.lock();
        let current = st.quiesced_since.map_or(Duration::ZERO, |t| t.elapsed());
        VolumeInfo {
            name: self.name.clone(),
            quiesced: st.quiesced,
            in_flight: st.in_flight,
            quiesces: st.quiesces,
            resumes: st.resumes,
            quiesced_ms: (st.quiesced_total + current).as_millis() as u64,
            quiesced_for_ms: current.as_millis() as u64,
            owner: st.owner.clone(),
            wake_requests: st.wake_requests,
            waiters: st
                .waiters
                .iter()
                .map(|(_, thread, since)| VolumeWaiter {
                    thread: thread.clone(),
                    waited_ms: since.elapsed().as_millis() as u64,
                })
                .collect(),
        }
    }

    /// Stops new I/O and waits until the I/O already in flight has finished.
    /// Quiescing a quiesced volume only waits for the drain.
    pub fn quiesce(&self) {
        let mut st = self.lock();
        if !st.quiesced {
            st.quiesced = true;
            st.woken = false;
            st.quiesces += 1;
            st.quiesced_since = Some(Instant::now());
        }
        while st.in_flight > 0 {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        log::debug!("volume {}: quiesced", self.name);
    }

    /// Lets I/O flow again and wakes every waiter (nothing to do when the
    /// volume is not quiesced).
    pub fn resume(&self) {
        {
            let mut st = self.lock();
            if !st.quiesced {
                return;
            }
            st.quiesced = false;
            st.resumes += 1;
            if let Some(t) = st.quiesced_since.take() {
                st.quiesced_total += t.elapsed();
            }
        }
        self.changed.notify_all();
        log::debug!("volume {}: resumed", self.name);
    }

    /// Starts one I/O, waiting while the volume is quiesced (on record for
    /// diagnostics while it waits).
    pub fn begin_io(self: &Arc<Self>) -> IoGuard {
        self.begin_io_unless(Duration::from_secs(3600), || false)
            .unwrap_or_else(|| unreachable!("a wait that never gives up returned none"))
    }

    /// Starts one I/O, waiting while the volume is quiesced, but gives up
    /// (`None`) once `give_up` returns true; it is checked every `poll`.
    /// The waiting thread is on record ([`VolumeInfo::waiters`]) for the
    /// whole wait.
    pub fn begin_io_unless(
        self: &Arc<Self>,
        poll: Duration,
        give_up: impl Fn() -> bool,
    ) -> Option<IoGuard> {
        let mut st = self.lock();
        if st.quiesced {
            let id = NEXT_WAIT.fetch_add(1, Ordering::Relaxed);
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            let since = Instant::now();
            st.waiters.push((id, thread, since));
            while st.quiesced {
                if give_up() {
                    st.waiters.retain(|w| w.0 != id);
                    return None;
                }
                if !st.woken && since.elapsed() >= WAKE_AFTER {
                    if let Some(wake) = st.waker.clone() {
                        st.woken = true;
                        st.wake_requests += 1;
                        drop(st);
                        log::debug!(
                            "volume {}: host I/O waits on a sleeping device: waking it",
                            self.name
                        );
                        wake();
                        st = self.lock();
                        continue;
                    }
                }
                st = self
                    .changed
                    .wait_timeout(st, poll.min(WAKE_AFTER))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            st.waiters.retain(|w| w.0 != id);
        }
        st.in_flight += 1;
        Some(IoGuard {
            volume: self.clone(),
        })
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
    fn info_counts_quiesces_resumes_and_time_quiesced() {
        let vol = Volume::new("c");
        let i = vol.info();
        assert_eq!((i.quiesced, i.quiesces, i.resumes), (false, 0, 0));
        vol.resume(); // not quiesced: not counted
        vol.quiesce();
        vol.quiesce(); // already quiesced: one stretch
        thread::sleep(Duration::from_millis(20));
        let i = vol.info();
        assert!(i.quiesced && i.quiesces == 1 && i.resumes == 0, "{i:?}");
        assert!(i.quiesced_ms >= 20, "{i:?}");
        vol.resume();
        let g = vol.try_begin_io().unwrap();
        let i = vol.info();
        assert_eq!(
            (i.quiesced, i.quiesces, i.resumes, i.in_flight),
            (false, 1, 1, 1)
        );
        assert!(i.quiesced_ms >= 20, "{i:?}");
        drop(g);
        assert_eq!(vol.info().in_flight, 0);
    }

    #[test]
    fn waiters_are_on_record_while_they_wait_and_can_give_up() {
        let vol = Volume::new("w");
        vol.set_owner("test disk");
        vol.quiesce();
        let stop = Arc::new(AtomicBool::new(false));
        let (v, st) = (vol.clone(), stop.clone());
        let t = thread::Builder::new()
            .name("waiter".into())
            .spawn(move || {
                v.begin_io_unless(Duration::from_millis(5), || st.load(Ordering::SeqCst))
                    .is_some()
            })
            .unwrap();
        thread::sleep(Duration::from_millis(50));
        let i = vol.info();
        assert_eq!(i.owner.as_deref(), Some("test disk"));
        assert_eq!(i.waiters.len(), 1, "{i:?}");
        assert_eq!(i.waiters[0].thread, "waiter");
        assert!(i.waiters[0].waited_ms >= 40, "{i:?}");
        assert!(i.quiesced_for_ms >= 40, "{i:?}");
        stop.store(true, Ordering::SeqCst);
        assert!(!t.join().unwrap(), "gave up while quiesced");
        assert!(vol.info().waiters.is_empty());
        assert!(all_volumes().iter().any(|v| Arc::ptr_eq(v, &vol)));
    }

    #[test]
    fn io_waiting_on_a_quiesced_volume_wakes_its_device_once() {
        let vol = Volume::new("wake");
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (v, c) = (Arc::downgrade(&vol), calls.clone());
        vol.set_waker(Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            // The device resumes (as a guest answering a remote wake does).
            if let Some(v) = v.upgrade() {
                v.resume();
            }
        }));
        vol.quiesce();
        let (a, b) = (vol.clone(), vol.clone());
        let t1 = thread::spawn(move || a.begin_io().volume.name().len());
        let t2 = thread::spawn(move || b.begin_io().volume.name().len());
        t1.join().unwrap();
        t2.join().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one wake per quiesce");
        assert_eq!(vol.info().wake_requests, 1);
        // A new quiesce may wake again; I/O that does not wait does not.
        assert!(vol.try_begin_io().is_some());
        vol.quiesce();
        let g = vol.begin_io();
        drop(g);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
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
