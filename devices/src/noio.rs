//! The per-thread NOIO scope: the VMM twin of Linux's `PF_MEMALLOC_NOIO`.
//!
//! A thread inside a NOIO scope must never wait for I/O to obtain memory: the
//! guest-memory pager serves its page faults only from sources that need no
//! I/O (free budget, clean pages, discarded pages, a reserve, then a counted
//! overshoot of the limit). Code that may run while a volume is quiesced —
//! a device's suspend/resume or reset path — enters a NOIO scope before it
//! touches guest memory.
//!
//! The flag has save/restore semantics, like `memalloc_noio_save()` /
//! `memalloc_noio_restore()`, so scopes nest:
//!
//! ```
//! use devices::noio::{is_noio, noio_restore, noio_save, NoioScope};
//! let old = noio_save();
//! {
//!     let _inner = NoioScope::enter();
//!     assert!(is_noio());
//! }
//! assert!(is_noio(), "inner scope must not clear the outer one");
//! noio_restore(old);
//! assert!(!is_noio());
//! ```
//!
//! The fault handler runs on another thread and learns the faulting thread's
//! id from userfaultfd, so every thread that can touch guest memory (vCPUs,
//! device workers) registers its flag in a process-wide registry with
//! [`register_current_thread`] and keeps the returned guard alive until it
//! exits. An unregistered thread counts as not NOIO.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Instant;

/// A kernel thread id, as `gettid(2)` returns it and userfaultfd reports it.
pub type Tid = i32;

thread_local! {
    static FLAG: Arc<AtomicBool> = Arc::new(AtomicBool::new(false));
    /// Set while a vCPU thread is inside KVM_RUN (running guest code).
    static IN_GUEST: Arc<AtomicBool> = Arc::new(AtomicBool::new(false));
}

/// A registered thread's NOIO flag, its in-guest flag, NOIO lent to it by
/// other threads ([`lend_noio`]) and how many of its registrations are live.
type Registered = (Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicU32>, u32);

static REGISTRY: LazyLock<RwLock<HashMap<Tid, Registered>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// The test aid `--unsafe-disable-noio`: scopes are entered and recorded
/// but set no flag, so resume and reset paths wait like any other thread.
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the NOIO flag off for every scope from now on (`true`) or back on.
/// UNSAFE by design: it exists to show the deadlock NOIO prevents (the
/// watchdog then reports it); never use it outside such a test.
pub fn set_unsafe_disabled(disabled: bool) {
    DISABLED.store(disabled, Ordering::SeqCst);
    if disabled {
        log::warn!("NOIO disabled (--unsafe-disable-noio): resume and reset paths may deadlock");
    }
}

/// Whether [`set_unsafe_disabled`] turned NOIO off.
pub fn unsafe_disabled() -> bool {
    DISABLED.load(Ordering::SeqCst)
}

/// The calling thread's kernel thread id.
pub fn gettid() -> Tid {
    // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::gettid() }
}

/// Enters NOIO on the calling thread and returns the previous state, to be
/// handed back to [`noio_restore`]. (With NOIO disabled, see
/// [`set_unsafe_disabled`], the flag is left as it is.)
pub fn noio_save() -> bool {
    if unsafe_disabled() {
        return is_noio();
    }
    FLAG.with(|f| f.swap(true, Ordering::SeqCst))
}

/// Restores the state returned by the matching [`noio_save`].
pub fn noio_restore(old: bool) {
    FLAG.with(|f| f.store(old, Ordering::SeqCst));
}

/// Whether the calling thread is inside a NOIO scope.
pub fn is_noio() -> bool {
    FLAG.with(|f| f.load(Ordering::SeqCst))
}

/// Whether the registered thread `tid` is inside a NOIO scope right now;
/// `false` for a thread that never registered.
pub fn is_thread_noio(tid: Tid) -> bool {
    REGISTRY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&tid)
        .is_some_and(|(f, _, lent, _)| f.load(Ordering::SeqCst) || lent.load(Ordering::SeqCst) > 0)
}

/// NOIO lent to another thread: while a NOIO path waits for work another
/// thread does for it (a device reset waiting for its worker's current
/// batch), that thread counts as NOIO too, so its faults take the NOIO
/// sources and a fault it already waits on is re-served that way. Dropping
/// the loan ends it.
#[must_use = "the loan ends when the guard is dropped"]
pub struct NoioLoan {
    lent: Option<Arc<AtomicU32>>,
}

/// Lends NOIO to registered thread `tid` (nothing happens for a thread that
/// is not registered).
pub fn lend_noio(tid: Tid) -> NoioLoan {
    let lent = REGISTRY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&tid)
        .map(|(_, _, lent, _)| lent.clone());
    if unsafe_disabled() {
        return NoioLoan { lent: None };
    }
    if let Some(l) = &lent {
        l.fetch_add(1, Ordering::SeqCst);
    }
    NoioLoan { lent }
}

impl Drop for NoioLoan {
    fn drop(&mut self) {
        if let Some(l) = &self.lent {
            l.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Whether `tid` registered (a vCPU or device thread of this VMM).
pub fn is_registered(tid: Tid) -> bool {
    REGISTRY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&tid)
}

/// Marks the calling (vCPU) thread as running guest code (`true`, just
/// before KVM_RUN) or emulating a device (`false`, once KVM_RUN returned).
pub fn set_running_guest(running: bool) {
    IN_GUEST.with(|f| f.store(running, Ordering::SeqCst));
}

/// Whether registered thread `tid` runs guest code right now: a fault of
/// it is the guest's own memory access, not device emulation, and nothing
/// but the host can resolve it (the guest cannot resume a device while
/// that vCPU is stuck).
pub fn is_thread_running_guest(tid: Tid) -> bool {
    REGISTRY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&tid)
        .is_some_and(|(_, g, _, _)| g.load(Ordering::SeqCst))
}

/// Number of threads currently registered (for diagnostics and tests).
pub fn registered_threads() -> usize {
    REGISTRY.read().unwrap_or_else(|e| e.into_inner()).len()
}

/// RAII NOIO scope: entered on creation, the previous state restored on drop.
/// Not `Send`: it must be dropped on the thread that entered it.
#[must_use = "the scope ends when the guard is dropped"]
pub struct NoioScope {
    old: bool,
    _not_send: PhantomData<*const ()>,
}

impl NoioScope {
    pub fn enter() -> Self {
        Self {
            old: noio_save(),
            _not_send: PhantomData,
        }
    }
}

impl Drop for NoioScope {
    fn drop(&mut self) {
        noio_restore(self.old);
    }
}

/// Keeps the calling thread's flag visible to other threads by its tid;
/// unregisters on drop. Not `Send`: drop it on the thread that registered.
#[must_use = "the thread is unregistered when the guard is dropped"]
pub struct ThreadRegistration {
    tid: Tid,
    _not_send: PhantomData<*const ()>,
}

impl ThreadRegistration {
    pub fn tid(&self) -> Tid {
        self.tid
    }
}

/// Publishes the calling thread's NOIO flag under its tid. Call at the start
/// of every vCPU and device thread; keep the guard until the thread exits.
/// Registrations nest: the thread stays registered until every guard of
/// it is dropped.
pub fn register_current_thread() -> ThreadRegistration {
    let tid = gettid();
    let flag = FLAG.with(Arc::clone);
    let in_guest = IN_GUEST.with(Arc::clone);
    REGISTRY
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(tid)
        .or_insert((flag, in_guest, Arc::new(AtomicU32::new(0)), 0))
        .3 += 1;
    ThreadRegistration {
        tid,
        _not_send: PhantomData,
    }
}

impl Drop for ThreadRegistration {
    fn drop(&mut self) {
        let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = reg.get_mut(&self.tid) {
            entry.3 -= 1;
            if entry.3 == 0 {
                reg.remove(&self.tid);
            }
        }
    }
}

/// A resume or reset path in progress, as the watchdog sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivePath {
    pub tid: Tid,
    /// The thread's name (vcpu0, xhci, ...).
    pub thread: String,
    /// What it is doing, e.g. "xhci port 5 resume (U3 -> U0)".
    pub what: Cow<'static, str>,
    pub since: Instant,
}

/// How long the runs of one resume or reset path took, on the thread that ran
/// it (guard entered to guard dropped): the device's own share of a resume
/// the guest waits for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PathTimes {
    /// What the path does, as [`PmPath::enter`] named it.
    pub path: String,
    pub count: u64,
    pub total_us: u64,
    pub max_us: u64,
}

static NEXT_PATH: AtomicU64 = AtomicU64::new(0);
/// Paths running now, and when the last one ended (ns after [`EPOCH`]).
static PATHS_RUNNING: AtomicU64 = AtomicU64::new(0);
static LAST_PATH_END_NS: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Whether a resume or reset path runs now or ended less than `window`
/// ago: the guest is then most likely running its own side of a device's
/// resume or reset (its driver between two register accesses).
pub fn pm_path_within(window: std::time::Duration) -> bool {
    if PATHS_RUNNING.load(Ordering::Relaxed) > 0 {
        return true;
    }
    let end = LAST_PATH_END_NS.load(Ordering::Relaxed);
    end != 0 && (EPOCH.elapsed().as_nanos() as u64).saturating_sub(end) < window.as_nanos() as u64
}
static TIMES: Mutex<BTreeMap<String, PathTimes>> = Mutex::new(BTreeMap::new());

/// The durations of every resume and reset path run so far, by path name.
pub fn path_times() -> Vec<PathTimes> {
    let times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    times.values().cloned().collect()
}

fn record_time(path: &str, us: u64) {
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let t = times.entry(path.to_string()).or_insert_with(|| PathTimes {
        path: path.to_string(),
        ..PathTimes::default()
    });
    t.count += 1;
    t.total_us += us;
    t.max_us = t.max_us.max(us);
}
static PATHS: LazyLock<Mutex<HashMap<u64, ActivePath>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The resume and reset paths running right now, oldest first.
pub fn active_paths() -> Vec<ActivePath> {
    let mut v: Vec<ActivePath> = PATHS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    v.sort_by_key(|p| p.since);
    v
}

/// A resume or reset path: a NOIO scope that is also on record (with what
/// it does and since when) for the stall watchdog, so a path that waits too
/// long can be named. Enter it before the path touches guest memory;
/// dropping it ends both. Not `Send`.
#[must_use = "the path ends when the guard is dropped"]
pub struct PmPath {
    id: u64,
    _noio: NoioScope,
}

impl PmPath {
    pub fn enter(what: impl Into<Cow<'static, str>>) -> Self {
        let id = NEXT_PATH.fetch_add(1, Ordering::Relaxed);
        let path = ActivePath {
            tid: gettid(),
            thread: std::thread::current().name().unwrap_or("?").to_string(),
            what: what.into(),
            since: Instant::now(),
        };
        PATHS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, path);
        LazyLock::force(&EPOCH);
        PATHS_RUNNING.fetch_add(1, Ordering::Relaxed);
        Self {
            id,
            _noio: NoioScope::enter(),
        }
    }
}

impl Drop for PmPath {
    fn drop(&mut self) {
        LAST_PATH_END_NS.store(
            (EPOCH.elapsed().as_nanos() as u64).max(1),
            Ordering::Relaxed,
        );
        PATHS_RUNNING.fetch_sub(1, Ordering::Relaxed);
        let done = PATHS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if let Some(p) = done {
            record_time(&p.what, p.since.elapsed().as_micros() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    #[test]
    fn each_path_run_is_timed_under_its_name() {
        let name = "timed test path";
        for _ in 0..2 {
            let _p = PmPath::enter(name);
            thread::sleep(std::time::Duration::from_millis(5));
        }
        let t = path_times().into_iter().find(|t| t.path == name).unwrap();
        assert_eq!(t.count, 2);
        assert!(t.max_us >= 5_000 && t.total_us >= 10_000, "{t:?}");
        assert!(t.total_us >= t.max_us);
    }

    #[test]
    fn the_pm_window_is_open_while_a_path_runs_and_shortly_after() {
        use std::time::Duration;
        {
            let _p = PmPath::enter("window test path");
            assert!(pm_path_within(Duration::ZERO));
        }
        assert!(pm_path_within(Duration::from_secs(60)), "just ended");
    }

    #[test]
    fn save_restore_nests() {
        assert!(!is_noio());
        let outer = noio_save();
        assert!(!outer);
        assert!(is_noio());
        let inner = noio_save();
        assert!(inner, "inner save must report the outer NOIO state");
        noio_restore(inner);
        assert!(is_noio(), "inner restore cleared the outer scope");
        noio_restore(outer);
        assert!(!is_noio());
    }

    #[test]
    fn guard_nests_and_restores() {
        {
            let _a = NoioScope::enter();
            {
                let _b = NoioScope::enter();
                assert!(is_noio());
            }
            assert!(is_noio(), "inner guard cleared the outer scope");
        }
        assert!(!is_noio());
    }

    #[test]
    fn flag_is_per_thread() {
        let _s = NoioScope::enter();
        let other = thread::spawn(is_noio).join().unwrap();
        assert!(!other, "NOIO leaked to another thread");
    }

    #[test]
    fn registry_reports_other_threads_flag() {
        let (to_worker, worker_rx) = mpsc::channel::<bool>();
        let (to_main, main_rx) = mpsc::channel::<Tid>();
        let worker = thread::spawn(move || {
            let reg = register_current_thread();
            assert_eq!(reg.tid(), gettid());
            to_main.send(reg.tid()).unwrap();
            // Enter NOIO on request, then leave it on the next request.
            let _ = worker_rx.recv();
            let scope = NoioScope::enter();
            to_main.send(0).unwrap();
            let _ = worker_rx.recv();
            drop(scope);
            to_main.send(0).unwrap();
            let _ = worker_rx.recv();
        });
        let tid = main_rx.recv().unwrap();
        assert_ne!(tid, gettid());
        assert!(!is_thread_noio(tid));
        to_worker.send(true).unwrap();
        main_rx.recv().unwrap();
        assert!(is_thread_noio(tid), "registry does not see the NOIO scope");
        to_worker.send(true).unwrap();
        main_rx.recv().unwrap();
        assert!(!is_thread_noio(tid));
        to_worker.send(true).unwrap();
        worker.join().unwrap();
        assert!(!is_thread_noio(tid), "exited thread still registered");
    }

    #[test]
    fn registering_twice_keeps_the_thread_until_both_guards_drop() {
        let first = register_current_thread();
        let second = register_current_thread();
        let _s = NoioScope::enter();
        drop(second);
        assert!(
            is_thread_noio(gettid()),
            "one guard dropped unregistered the thread"
        );
        drop(first);
        assert!(!is_thread_noio(gettid()));
    }

    #[test]
    fn lent_noio_makes_another_thread_noio_until_the_loan_ends() {
        let (tx, rx) = mpsc::channel::<Tid>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let worker = thread::spawn(move || {
            let _reg = register_current_thread();
            tx.send(gettid()).unwrap();
            let _ = done_rx.recv();
            assert!(!is_noio(), "a loan does not touch the thread's own flag");
        });
        let tid = rx.recv().unwrap();
        assert!(!is_thread_noio(tid));
        let a = lend_noio(tid);
        let b = lend_noio(tid);
        assert!(is_thread_noio(tid));
        drop(a);
        assert!(is_thread_noio(tid), "loans nest");
        drop(b);
        assert!(!is_thread_noio(tid));
        done_tx.send(()).unwrap();
        worker.join().unwrap();
        // Lending to an unknown thread is harmless.
        drop(lend_noio(-1));
    }

    #[test]
    fn running_guest_is_seen_by_tid() {
        let _r = register_current_thread();
        assert!(!is_thread_running_guest(gettid()));
        set_running_guest(true);
        assert!(is_thread_running_guest(gettid()));
        set_running_guest(false);
        assert!(!is_thread_running_guest(gettid()));
    }

    #[test]
    fn pm_path_is_noio_and_on_record_until_dropped() {
        let tid = gettid();
        let mine = |v: Vec<ActivePath>| v.into_iter().filter(|p| p.tid == tid).count();
        {
            let _p = PmPath::enter("test resume");
            assert!(is_noio());
            let paths = active_paths();
            let p = paths.iter().find(|p| p.tid == tid).expect("on record");
            assert_eq!(p.what, "test resume");
            {
                let _inner = PmPath::enter(format!("nested {}", 1));
                assert_eq!(mine(active_paths()), 2);
            }
            assert!(is_noio());
        }
        assert!(!is_noio());
        assert_eq!(mine(active_paths()), 0);
    }

    #[test]
    fn unregistered_thread_is_not_noio() {
        let _s = NoioScope::enter();
        // This thread is NOIO but never registered: others cannot see it.
        assert!(!is_thread_noio(gettid()));
        let reg = register_current_thread();
        assert!(is_thread_noio(gettid()));
        drop(reg);
        assert!(!is_thread_noio(gettid()));
    }
}
