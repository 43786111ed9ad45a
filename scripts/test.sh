#!/usr/bin/env bash
# Runs every test: rustfmt and clippy (warnings are errors), host packages,
# a short pass of every fuzz target,
# the static VMM, the guest kernel, busybox and the Debian root disk
# (fetched here so their progress shows), then the whole workspace: unit tests and the nested end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Formatting and lints first: cheap, and a failure here needs no guest
# (clippy after setup.sh: building the workspace needs libclang-dev).
command -v rustfmt >/dev/null && command -v cargo-clippy >/dev/null ||
    rustup component add rustfmt clippy
cargo fmt --all -- --check
scripts/setup.sh
cargo clippy --workspace --all-targets -- -D warnings
# The fuzz crate lives outside the workspace (libFuzzer stays out of the
# builds above): its format and lints, then every target for 15 s; a
# crash, hang or out-of-memory fails the run (see scripts/fuzz.sh).
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
scripts/fuzz.sh --seconds 15
scripts/build-vmm-static.sh
cargo run -q -p guest-image -- kernel
cargo run -q -p guest-image -- busybox
# The Debian root disk for tests/rootfs.rs (debootstrap on the first run).
cargo run -q -p guest-image -- rootfs
cargo test --workspace "$@"
