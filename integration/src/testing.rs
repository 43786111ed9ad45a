//! Helpers shared by the end-to-end test files.

use std::sync::OnceLock;

use crate::{Harness, Mode, RunResult};

/// The process-wide harness (guest assets fetched once).
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| Harness::new().unwrap_or_else(|e| panic!("guest assets: {e}")))
}

/// Nested on hosts without an ordinary KVM, direct otherwise (or `$VMM_TEST_MODE`).
pub fn mode() -> Mode {
    Mode::auto().unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts `ok`, with the run's summary and whole console in the message.
pub fn check(ok: bool, what: &str, r: &RunResult) {
    assert!(
        ok,
        "{what}: {}\n----- console -----\n{}\n----- end console -----",
        r.summary(),
        r.console
    );
}
