#!/usr/bin/env bash
# Runs every test: host packages, the static VMM, then the whole workspace
# (unit tests and the nested end-to-end boot tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-vmm-static.sh
cargo test --workspace "$@"
