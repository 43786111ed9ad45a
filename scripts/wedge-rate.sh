#!/usr/bin/env bash
# How often the nested harness's L1 wedges (see HARNESS.md): runs the
# wedge-prone nested scenarios round-robin under one or more L1 QEMUs, with
# no retry of a wedged L1, and prints WEDGE-RUN lines and the tables.
# Usage: scripts/wedge-rate.sh [--qemu PATH]... [--runs N]
#            [--scenarios boot,blk,usb,pager] [--log FILE] [--keep DIR]
#        scripts/wedge-rate.sh --table LOG...   (tables of saved logs)
# Exits non-zero when any run did not pass (a wedge or another failure).
# The VMM is $VMM_BIN (default: the static release build); this script does
# not build it, so a measurement can use a fixed copy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p integration --bin wedge-rate
exec "${CARGO_TARGET_DIR:-target}/release/wedge-rate" "$@"
