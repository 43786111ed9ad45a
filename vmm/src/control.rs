//! The VMM thread's side of the control API: commands arrive from the API
//! threads over a bounded channel plus an eventfd, and the main thread —
//! which otherwise only waits for the VM to stop — polls both the stop
//! eventfd and that eventfd, runs each command and replies.
//!
//! Commands run on this one thread, so they never race each other; the
//! xHCI controller they touch is shared with the vCPU threads through its
//! mutex.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::protocol::event;
use crate::api::{
    ApiError, ApiServer, Command, Dispatch, ErrorCode, EventBus, EvictTarget, Responder,
    ServerError,
};
use crate::balloon::BalloonControl;
use crate::config::UsbStorageConfig;
use crate::memory::PagerProbe;
use crate::usb::{UsbManager, USB2_PORTS, USB3_PORTS};
use crate::vcpu::{StopReason, VmStop};

/// Commands waiting for the VMM thread before clients are told `busy`.
const QUEUE_DEPTH: usize = 32;
/// How long `vm.info` waits for the xHCI controller before reporting it
/// busy (a doorbell's disk I/O holds it for milliseconds).
const CONTROLLER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot create the control eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// What `vm.info` reports that only the VM knows.
#[derive(Debug, Clone)]
pub struct VmFacts {
    pub cpus: u8,
    pub memory_bytes: u64,
}

/// Runs commands against the VM (on the VMM thread).
pub struct VmHandler {
    usb: Option<UsbManager>,
    balloon: Option<BalloonControl>,
    stop: Arc<VmStop>,
    facts: VmFacts,
    /// The pager's counters and the evict test aid, when RAM has a limit.
    pager: Option<PagerProbe>,
    started: Instant,
    events: Option<EventBus>,
}

fn usb_err(e: crate::usb::UsbError) -> ApiError {
    ApiError::from_error(e.code(), &e)
}

impl VmHandler {
    pub fn new(
        usb: Option<UsbManager>,
        stop: Arc<VmStop>,
        facts: VmFacts,
        pager: Option<PagerProbe>,
    ) -> Self {
        Self {
            usb,
            balloon: None,
            stop,
            facts,
            pager,
            started: Instant::now(),
            events: None,
        }
    }

    /// Adds the balloon (`balloon.*` commands, `balloon` in `vm.info`).
    pub fn with_balloon(mut self, balloon: Option<BalloonControl>) -> Self {
        self.balloon = balloon;
        self
    }

    fn balloon(&self) -> Result<&BalloonControl, ApiError> {
        self.balloon.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidState,
                "this VM has no balloon (start it with --balloon)",
            )
        })
    }

    fn usb(&mut self) -> Result<&mut UsbManager, ApiError> {
        self.usb
            .as_mut()
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidState, "this VM has no USB controller"))
    }

    fn emit(&self, name: &str, data: Value) {
        if let Some(bus) = &self.events {
            bus.emit(name, data);
        }
    }

    pub fn handle(&mut self, command: Command) -> Result<Value, ApiError> {
        match command {
            Command::VmInfo => Ok(self.info()),
            Command::VmShutdown => {
                log::info!("shutdown requested over the control API");
                self.stop.stop(StopReason::Guest(0));
                Ok(json!({}))
            }
            Command::UsbAttach(a) => {
                let cfg = UsbStorageConfig {
                    path: a.path,
                    port: a.port,
                    readonly: a.readonly.unwrap_or(false),
                    id: a.id,
                };
                let info = self.usb()?.attach(&cfg).map_err(usb_err)?;
                let v = json!(info);
                self.emit(event::USB_ATTACHED, v.clone());
                Ok(v)
            }
            Command::UsbDetach(target) => {
                let info = self.usb()?.detach(&target).map_err(usb_err)?;
                let v = json!(info);
                self.emit(event::USB_DETACHED, v.clone());
                Ok(v)
            }
            Command::DebugEvict(target) => self.evict(target),
            Command::UsbWake(target) => {
                let info = self.usb()?.wake(&target).map_err(usb_err)?;
                Ok(json!(info))
            }
            Command::BalloonSet { size } => {
                let b = self.balloon()?;
                let size = b
                    .handle
                    .set_size(size)
                    .map_err(|e| ApiError::from_error(ErrorCode::BadRequest, &e))?;
                log::info!(
                    "balloon size set to {} MiB over the control API",
                    size >> 20
                );
                Ok(json!(b.report()))
            }
            Command::BalloonStats => Ok(json!(self.balloon()?.stats())),
            Command::UsbList => {
                let usb = self.usb()?;
                Ok(json!({"devices": usb.list(), "free_ports": usb.free_ports()}))
            }
        }
    }

    /// The `debug.evict` test aid: pushes guest pages out to swap.
    fn evict(&mut self, target: EvictTarget) -> Result<Value, ApiError> {
        let pager = self.pager.clone().ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidState,
                "debug.evict needs a pager (--memory ...,limit=,swap=)",
            )
        })?;
        let ranges = match target {
            EvictTarget::Range { gpa, len } => vec![(gpa, len)],
            EvictTarget::Xhci => self.usb()?.controller_structures(),
        };
        let mut pages = 0;
        for &(gpa, len) in &ranges {
            pages += pager
                .evict(vm_memory::GuestAddress(gpa), len)
                .map_err(|e| ApiError::from_error(ErrorCode::BadRequest, &e))?;
        }
        log::info!(
            "debug.evict: {pages} pages in {} ranges pushed to swap",
            ranges.len()
        );
        Ok(json!({ "ranges": ranges.len(), "pages": pages }))
    }

    fn info(&self) -> Value {
        let usb = self.usb.as_ref().map(|u| {
            json!({
                "pci_address": format!("0000:00:{:02x}.0", u.pci_device()),
                "usb2_ports": (1..=USB2_PORTS).collect::<Vec<_>>(),
                "usb3_ports": (USB2_PORTS + 1..=USB2_PORTS + USB3_PORTS).collect::<Vec<_>>(),
                "attached": u.list().len(),
                "controller": u.controller_state(CONTROLLER_WAIT),
            })
        });
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "state": if self.stop.is_stopping() { "stopping" } else { "running" },
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "cpus": self.facts.cpus,
            "memory_bytes": self.facts.memory_bytes,
            "usb": usb,
            "balloon": self.balloon.as_ref().map(|b| b.report()),
            "pager": self.pager.as_ref().map(|p| p.stats()),
            "volumes": devices::block::all_volumes().iter().map(|v| v.info()).collect::<Vec<_>>(),
            "noio_disabled": devices::noio::unsafe_disabled(),
            "pm_paths": devices::noio::path_times(),
        })
    }
}

/// Forwards commands from the API threads to the VMM thread.
struct ChannelDispatch {
    tx: SyncSender<(Command, Responder)>,
    wake: EventFd,
}

impl Dispatch for ChannelDispatch {
    fn dispatch(&self, command: Command, responder: Responder) {
        match self.tx.try_send((command, responder)) {
            Ok(()) => {
                if let Err(e) = self.wake.write(1) {
                    log::error!("api: cannot wake the VMM thread: {e}");
                }
            }
            Err(TrySendError::Full((_, r))) => {
                r.error(ErrorCode::Busy, "too many requests in flight; retry")
            }
            Err(TrySendError::Disconnected((_, r))) => {
                r.error(ErrorCode::InvalidState, "the VMM is stopping")
            }
        }
    }
}

/// The API server and the VMM thread's end of its command channel.
struct ApiSide {
    server: ApiServer,
    rx: Receiver<(Command, Responder)>,
    wake: EventFd,
}

/// The main thread's wait for the end of the VM, serving API commands.
pub struct Control {
    handler: VmHandler,
    api: Option<ApiSide>,
}

impl Control {
    /// Starts the API server on `socket` when given.
    pub fn new(socket: Option<&Path>, mut handler: VmHandler) -> Result<Self, ControlError> {
        let api = match socket {
            None => None,
            Some(path) => {
                let wake = EventFd::new(EFD_NONBLOCK).map_err(ControlError::EventFd)?;
                let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
                let dispatch = ChannelDispatch {
                    tx,
                    wake: wake.try_clone().map_err(ControlError::EventFd)?,
                };
                let server = ApiServer::start(path, Arc::new(dispatch))?;
                handler.events = Some(server.events());
                Some(ApiSide { server, rx, wake })
            }
        };
        Ok(Self { handler, api })
    }

    /// Blocks until `stop` is requested, running API commands meanwhile;
    /// then lets the last replies out and closes the API.
    pub fn run_until_stopped(mut self, stop: &VmStop) {
        while !stop.is_stopping() {
            let mut fds = vec![libc::pollfd {
                fd: stop.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(ApiSide { wake, .. }) = &self.api {
                fds.push(libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs
            // that outlives the call; poll only writes their revents.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("waiting for the VM to stop: {e}");
                    stop.stop(StopReason::Error);
                }
                continue;
            }
            if fds[0].revents != 0 {
                // The counter only says "look at is_stopping"; the read
                // cannot block after POLLIN.
                let _ = stop.event().read();
            }
            if fds.get(1).is_some_and(|f| f.revents != 0) {
                self.serve_api();
            }
        }
        if let Some(ApiSide { server, rx, .. }) = self.api.take() {
            // Commands still queued are answered with an error by their
            // dropped Responders, then every queued line goes out.
            drop(rx);
            server.shutdown();
        }
    }

    fn serve_api(&mut self) {
        let Some(ApiSide { rx, wake, .. }) = &self.api else {
            return;
        };
        let _ = wake.read();
        // Bounded work per wakeup; a full batch re-arms the eventfd so the
        // rest is served after the stop eventfd has been looked at again.
        let batch: Vec<_> = rx.try_iter().take(QUEUE_DEPTH).collect();
        if batch.len() == QUEUE_DEPTH {
            let _ = wake.write(1);
        }
        for (command, responder) in batch {
            let result = self.handler.handle(command);
            responder.reply(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{UsbAttachArgs, UsbTarget};

    fn handler() -> VmHandler {
        VmHandler::new(
            None,
            VmStop::new().unwrap(),
            VmFacts {
                cpus: 2,
                memory_bytes: 256 << 20,
            },
            None,
        )
    }

    #[test]
    fn info_shutdown_and_usb_without_controller() {
        let mut h = handler();
        let v = h.handle(Command::VmInfo).unwrap();
        assert_eq!(v["cpus"], json!(2));
        assert_eq!(v["memory_bytes"], json!(256u64 << 20));
        assert_eq!(v["state"], json!("running"));
        assert_eq!(v["usb"], Value::Null);
        assert_eq!(v["balloon"], Value::Null);
        let e = h.handle(Command::BalloonStats).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        let e = h.handle(Command::BalloonSet { size: 0 }).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        let e = h
            .handle(Command::UsbAttach(UsbAttachArgs {
                path: "/x".into(),
                port: None,
                readonly: None,
                id: None,
            }))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        let e = h
            .handle(Command::UsbDetach(UsbTarget::Port(1)))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        assert!(!h.stop.is_stopping());
        h.handle(Command::VmShutdown).unwrap();
        assert!(h.stop.is_stopping());
        assert_eq!(h.stop.reason(), Some(StopReason::Guest(0)));
        assert_eq!(
            h.handle(Command::VmInfo).unwrap()["state"],
            json!("stopping")
        );
    }
}
