
pub mod memory;
