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
