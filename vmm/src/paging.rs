//! Starting the pager for a VM from `--memory ...,limit=,swap=` and tying its
//! fate to the VM: a fatal pager error stops the VM loudly, and its counters
//! are printed as JSON on exit.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::block::Volume;
use vm_memory::GuestMemoryMmap;

use crate::config::MemoryConfig;
use crate::memory::{Pager, PagerConfig, PagerError};
use crate::vcpu::{StopReason, VmStop};

/// Starts the pager when `cfg` has a limit; `volume_of` finds a disk's
/// volume for `swap_volume=ID`.
pub fn start(
    cfg: &MemoryConfig,
    mem: &GuestMemoryMmap,
    volume_of: impl Fn(&str) -> Option<Arc<Volume>>,
    stop: &Arc<VmStop>,
) -> Result<Option<Pager>, PagerError> {
    let (Some(limit), Some(swap)) = (cfg.limit, cfg.swap.as_ref()) else {
        return Ok(None);
    };
    let volume = match &cfg.swap_volume {
        Some(id) => volume_of(id)
            .ok_or_else(|| PagerError::Config(format!("swap_volume={id}: no disk has that id")))?,
        None => {
            let v = Volume::new("swap");
            v.set_owner("the swap file alone");
            v
        }
    };
    let mut pc = PagerConfig::new(limit, swap, volume.clone());
    pc.reserve_pages = cfg.reserve_pages.map(|r| r as usize);
    pc.huge_pages = cfg.huge_pages.unwrap_or(true);
    let pager = Pager::start(&pc, mem)?;
    watch_fatal(&pager, stop.clone())?;
    log::info!(
        "pager: guest RAM {} MiB, resident limit {} MiB, swap {} on volume {}",
        cfg.size >> 20,
        limit >> 20,
        swap.display(),
        volume.name()
    );
    Ok(Some(pager))
}

/// A detached thread that stops the VM when the pager reports a fatal error,
/// so no vCPU is left waiting on a fault nobody will serve.
fn watch_fatal(pager: &Pager, stop: Arc<VmStop>) -> Result<(), PagerError> {
    let fd = pager.fatal_eventfd().try_clone().map_err(PagerError::Sys)?;
    std::thread::Builder::new()
        .name("pager-watch".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Helper);
            // The eventfd is non-blocking (the pager's own threads poll it):
            // wait for it to be readable before each read.
            loop {
                if crate::fd_wait::readable(fd.as_raw_fd(), None).is_err() {
                    return;
                }
                match fd.read() {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
            log::error!("pager failed; stopping the VM");
            stop.stop(StopReason::Error);
        })
        .map_err(PagerError::Sys)?;
    Ok(())
}

/// Stops the pager after the VM, printing its counters; a fatal error is
/// reported instead (stopping a failed pager could wait on a dead thread).
pub fn finish(pager: Pager) -> Option<String> {
    if let Some(err) = pager.fatal_error() {
        eprintln!("pager-stats {}", pager.stats().to_json());
        // Leak rather than join threads that may be stuck behind the failure.
        std::mem::forget(pager);
        return Some(err);
    }
    let stats = pager.stop();
    eprintln!("pager-stats {}", stats.to_json());
    None
}
