#!/usr/bin/env bash
# Benchmarks (not tests) against QEMU in the same nested L1; results go into
# BENCHMARKS.md. Usage: scripts/bench.sh boot [--reps 5] [--cpus 1] [--memory 256]
#        scripts/bench.sh disk [--reps 3] [--cpus 1] [--image-mib 128] [--runtime 10]
#        scripts/bench.sh usb [--reps 3] [--runtime 10] [--image-mib 128]
#        scripts/bench.sh pager [--reps 1] [--memory 1024] [--touch 700] [--only ours,qemu]
#        scripts/bench.sh usb-pm [--reps 1] [--cycles 100] [--idle 60] [--only ours,ours-pressure] [--trace-ms 300]
#        scripts/bench.sh density [--guests 2,4,8] [--reps 1] [--memory 256] [--ws 48]
#                                 [--seconds 30] [--budget 512] [--allowance 8] [--no-balloon]
# density: N guests at once on one L1, ours (pager limits) vs QEMU (one cgroup
# with memory.max + zram swap), each N also without a limit; per-guest
# throughput, host memory used, guest RAM : host memory (issue 16).
# Builds use $CARGO_TARGET_DIR when set (the harness finds the VMM there).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-vmm-static.sh
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --release -p integration --bin l1-bench --target x86_64-unknown-linux-gnu
cargo run -q --release -p integration --bin bench -- "$@" --write BENCHMARKS.md
