//! The VMM library: configuration, host checks, x86_64 boot, the VM and its
//! vCPU threads, devices wiring and the guest memory pager. The binary in
//! `main.rs` is a thin CLI over [`vm::run`].

pub mod api;
pub mod arch;
pub mod balloon;
pub mod balloon_policy;
pub mod boot;
pub mod coalesced;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod exit_status;
pub mod fd_wait;
pub mod guest_ram;
pub mod halt;
pub mod host;
pub mod irq;
pub mod memory;
pub mod paging;
pub mod preflight;
pub mod read_slot;
pub mod seccomp;
pub mod serial_input;
pub mod signals;
pub mod swapfile;
pub mod usb;
pub mod vcpu;
pub mod vm;
pub mod watchdog;
