//! x86_64 machine setup: guest physical layout, boot parameters, MP table,
//! CPUID and the register state for the 64-bit Linux boot protocol.

pub mod bootparams;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
