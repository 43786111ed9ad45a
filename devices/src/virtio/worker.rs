//! Where device workers run: an event-manager event loop on its own thread.
//!
//! The transport starts a device's worker on DRIVER_OK and stops it on reset
//! through [`WorkerHost`]. Stopping is synchronous: it returns only after the
//! event loop has removed the worker (any `process` call in progress has
//! finished) and dropped it, so no used-ring write can follow a reset.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, RemoteEndpoint, SubscriberId, SubscriberOps};
use thiserror::Error;

use super::Worker;

/// Identifies a started worker.
pub type WorkerId = SubscriberId;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("event manager")]
    EventManager(#[from] event_manager::Error),
    #[error("cannot spawn the event loop thread")]
    Spawn(#[source] std::io::Error),
}

/// Runs device workers off the vCPU threads.
pub trait WorkerHost: Send + Sync {
    /// Starts `worker` (its `init` registers its eventfds).
    fn start(&self, worker: Worker) -> Result<WorkerId, WorkerError>;
    /// Removes and drops the worker; returns once it can no longer run.
    /// Must not be called from the event loop thread itself.
    fn stop(&self, id: WorkerId) -> Result<(), WorkerError>;

    /// NOIO lent to the thread that runs the workers, for a NOIO path that
    /// is about to wait for it (see `crate::noio::lend_noio`).
    fn lend_noio(&self) -> Option<crate::noio::NoioLoan> {
        None
    }
}

/// An event-manager loop on a dedicated thread.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Worker>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The loop thread's kernel thread id.
    tid: crate::noio::Tid,
}

impl EventLoop {
    /// Spawns the loop thread named `name`.
    pub fn spawn(name: &str) -> Result<Arc<Self>, WorkerError> {
        let mut manager = EventManager::<Worker>::new()?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // Before anything else (the VMM's seccomp filter).
                crate::thread_start();
                // Device threads register so the pager can read their NOIO flag.
                let _noio = crate::noio::register_current_thread();
                let _ = tid_tx.send(crate::noio::gettid());
                while !stop_flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("event loop: {e}");
                        // Do not spin on a persistent epoll error.
                        thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            })
            .map_err(WorkerError::Spawn)?;
        let tid = tid_rx.recv().unwrap_or(-1);
        Ok(Arc::new(Self {
            endpoint,
            stop,
            thread: Mutex::new(Some(thread)),
            tid,
        }))
    }

    /// The endpoint, for the VMM to add its own subscribers.
    pub fn endpoint(&self) -> &RemoteEndpoint<Worker> {
        &self.endpoint
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl WorkerHost for EventLoop {
    fn start(&self, worker: Worker) -> Result<WorkerId, WorkerError> {
        self.endpoint
            .call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Worker>| {
                Ok::<_, WorkerError>(ops.add_subscriber(worker))
            })
    }

    fn lend_noio(&self) -> Option<crate::noio::NoioLoan> {
        Some(crate::noio::lend_noio(self.tid))
    }

    fn stop(&self, id: WorkerId) -> Result<(), WorkerError> {
        self.endpoint
            .call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Worker>| {
                ops.remove_subscriber(id)
                    .map(drop)
                    .map_err(WorkerError::from)
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;
    use std::time::Duration;

    use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    /// A batch that runs until its thread is NOIO (or 5 s pass), recording
    /// 1 (NOIO came) or 2 (it never did).
    struct SlowBatch {
        kick: EventFd,
        started: Arc<AtomicBool>,
        outcome: Arc<AtomicU8>,
    }

    impl MutEventSubscriber for SlowBatch {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.kick.read();
            self.started.store(true, Ordering::SeqCst);
            let me = crate::noio::gettid();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !crate::noio::is_thread_noio(me) && std::time::Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            let noio = crate::noio::is_thread_noio(me);
            self.outcome
                .store(if noio { 1 } else { 2 }, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_stop_that_lends_noio_makes_the_running_batch_noio() {
        let lp = EventLoop::spawn("test-loop").unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let started = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(AtomicU8::new(0));
        let id = lp
            .start(Box::new(SlowBatch {
                kick: kick.try_clone().unwrap(),
                started: started.clone(),
                outcome: outcome.clone(),
            }))
            .unwrap();
        kick.write(1).unwrap();
        while !started.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!crate::noio::is_thread_noio(lp.tid));
        // What the virtio-pci reset does: lend NOIO, then wait for the worker.
        let loan = lp.lend_noio();
        lp.stop(id).unwrap();
        drop(loan);
        assert_eq!(
            outcome.load(Ordering::SeqCst),
            1,
            "the batch the stop waited for was not NOIO"
        );
        assert!(
            !crate::noio::is_thread_noio(lp.tid),
            "the loan outlived the stop"
        );
    }
}
