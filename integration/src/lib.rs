//! Nested end-to-end harness.
//!
//! The L2 guest (Debian kernel + scenario initramfs from `guest-image`) is
//! booted by our VMM inside an L1 QEMU TCG guest whose emulated AMD CPU has
//! SVM, so `kvm_amd` gives L1 a real `/dev/kvm` ([`Mode::Nested`]). On a
//! host with an ordinary KVM the VMM runs directly ([`Mode::Direct`]).
//! [`Mode::NestedQemu`] boots the same L2 with QEMU inside the same L1 (the
//! benchmark peer) and [`Mode::QemuTcg`] boots it under host QEMU TCG
//! (checks the guest images and the harness without our VMM).
//!
//! ```no_run
//! use integration::{GuestRun, Harness, Mode, Verdict};
//! use guest_image::Scenario;
//! let h = Harness::new()?;
//! let run = GuestRun::new(Scenario::load("boot")?)
//!     .cpus(2)
//!     .param("expect_cpus", 2)
//!     .param("expect_mem_mib", 512);
//! let r = h.run(&run, Mode::auto()?)?;
//! assert_eq!(r.verdict, Verdict::Pass, "{}", r.console);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod density_bench;
pub mod disk;
pub mod harness;
pub mod host;
pub mod l1;
pub mod monitor;
pub mod pager_bench;
pub mod process;
pub mod rootfs;
pub mod testing;
pub mod usb;
pub mod usb_bench;
pub mod usb_pm_bench;
pub mod verdict;
pub mod wedge;

pub use harness::{GuestRun, Harness, HarnessError, KernelForm, Mode, RunResult, ScriptPaths};
pub use verdict::Verdict;
