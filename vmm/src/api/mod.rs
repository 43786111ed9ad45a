//! The control API: newline-delimited JSON over a Unix stream socket
//! (`--api-socket PATH`, documented in `docs/api.md`).
//!
//! [`protocol`] parses and formats lines, [`server`] runs the socket on its
//! own threads and hands commands to a [`server::Dispatch`]; the VMM's
//! dispatcher and command handling live in `crate::control`.

pub mod protocol;
pub mod server;

#[cfg(test)]
mod tests;

pub use protocol::{ApiError, Command, ErrorCode, EvictTarget, UsbAttachArgs, UsbTarget};
pub use server::{ApiServer, Dispatch, EventBus, Responder, ServerError};
