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

/// `(rc, value)` from the first console line holding `MARK NAME rc=RC KEY=VALUE`
/// (the per-case lines the L1 scripts of the exit-status and bad-input tests print).
pub fn case_result(console: &str, mark: &str, name: &str, key: &str) -> Option<(i32, String)> {
    let prefix = format!("{mark} {name} rc=");
    let sep = format!(" {key}=");
    console.lines().find_map(|l| {
        let rest = &l[l.find(&prefix)? + prefix.len()..];
        let (rc, value) = rest.split_once(sep.as_str())?;
        Some((rc.trim().parse().ok()?, value.trim().to_string()))
    })
}

/// Whether this host runs the nested L1 harness; tests that drive L1
/// scripts say so and skip themselves elsewhere.
pub fn nested() -> bool {
    let mode = mode();
    if mode != Mode::Nested {
        eprintln!("this test drives the nested L1 harness; skipped in {mode:?} mode");
        return false;
    }
    true
}

/// Asserts `ok`, with the run's summary and whole console in the message
/// (and the consoles of earlier attempts whose L1 wedged).
pub fn check(ok: bool, what: &str, r: &RunResult) {
    let first: String = r
        .wedged_attempts
        .iter()
        .enumerate()
        .map(|(i, c)| format!("----- attempt {} (L1 wedged) -----\n{c}\n", i + 1))
        .collect();
    assert!(
        ok,
        "{what}: {}\n{first}----- console -----\n{}\n----- end console -----",
        r.summary(),
        r.console
    );
}
