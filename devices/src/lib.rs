//! Device models. Nothing here depends on KVM or on the `vmm` crate: each
//! model is driven through [`bus::BusDevice`] and guest memory, so it can be
//! tested the way a guest driver drives it.

pub mod block;
pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod noio;
pub mod pci;
#[cfg(test)]
mod test_rng;
pub mod usb;
pub mod virtio;
pub mod xhci;

/// What a thread the device crate creates runs first (the VMM installs its
/// seccomp filter there, see `vmm::seccomp`); set once, before any such thread.
static THREAD_START_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the hook [`thread_start`] runs; later calls are ignored.
pub fn set_thread_start_hook(hook: fn()) {
    let _ = THREAD_START_HOOK.set(hook);
}

/// Runs the hook, if any: the first thing a device thread does.
pub fn thread_start() {
    if let Some(hook) = THREAD_START_HOOK.get() {
        hook();
    }
}
