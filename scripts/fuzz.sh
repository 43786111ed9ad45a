#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ and runs each one.
#
#   scripts/fuzz.sh --seconds 15            every target, 15 s each (CI's pass)
#   scripts/fuzz.sh --runs 10000000 xhci    one target, 10^7 executions
#   scripts/fuzz.sh --list                  the targets
#
# Stable Rust only: no cargo-fuzz, no sanitizer (-Z flags); the coverage
# instrumentation libFuzzer needs is LLVM's sanitizer-coverage pass, which
# stable rustc runs through -C passes / -C llvm-args. Integer overflow and
# debug assertions are on (fuzz/Cargo.toml's release profile), so they
# crash a run like a panic does.
#
# Each target keeps a corpus in fuzz/corpus/TARGET (seeded from
# fuzz/seeds/TARGET when it exists) and writes a crashing input to
# fuzz/artifacts/TARGET/; reproduce one with
#   scripts/fuzz.sh --repro fuzz/artifacts/TARGET/crash-... TARGET
# Exits non-zero when any target crashed, timed out or ran out of memory.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=""
runs=""
repro=""
list=0
targets=()
# One input taking longer than this is a hang.
timeout_s=10
# A run over this (MB of RSS) is an out-of-memory failure.
rss_mb=2048
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --repro) repro="$2"; shift 2 ;;
    --list) list=1; shift ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
    esac
done

all=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^vmm-fuzz$')
if [ "$list" = 1 ]; then
    echo "$all"
    exit 0
fi
[ ${#targets[@]} -gt 0 ] || mapfile -t targets <<<"$all"
for t in "${targets[@]}"; do
    grep -qx -- "$t" <<<"$all" || { echo "fuzz.sh: no target $t (have: $(echo $all))" >&2; exit 2; }
done
if [ -z "$seconds" ] && [ -z "$runs" ] && [ -z "$repro" ]; then
    seconds=20
fi

# libFuzzer's runtime is C++, built by libfuzzer-sys's build script.
command -v c++ >/dev/null || {
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q g++
}

host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
target_dir="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "fuzz: building ${targets[*]}"
CARGO_TARGET_DIR="$target_dir" cargo build -q --release --locked \
    --manifest-path fuzz/Cargo.toml --target "$host" "${bins[@]}"

if [ -n "$repro" ]; then
    [ ${#targets[@]} -eq 1 ] || { echo "fuzz.sh: --repro needs one TARGET" >&2; exit 2; }
    exec "$target_dir/$host/release/${targets[0]}" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" "$repro"
fi

failed=0
summary=()
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    log="fuzz/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" fuzz/logs
    dirs=("$corpus")
    [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
    if [ -n "$runs" ]; then limit=(-runs="$runs"); else limit=(-max_total_time="$seconds"); fi
    echo "fuzz: $t (${limit[*]}), log in $log"
    start=$(date +%s%N)
    set +e
    "$target_dir/$host/release/$t" "${limit[@]}" -timeout="$timeout_s" \
        -rss_limit_mb="$rss_mb" -malloc_limit_mb="$rss_mb" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${dirs[@]}" >"$log" 2>&1
    rc=$?
    set -e
    secs=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        failed=1
        if grep -q 'ERROR: libFuzzer: timeout' "$log"; then
            result=TIMEOUT
        elif grep -q -e 'ERROR: libFuzzer: out-of-memory' -e 'malloc(.*) exceeds limit' "$log"; then
            result=OOM
        else
            result=CRASH
        fi
        result="$result (exit $rc; input in $artifacts/, log $log)"
        tail -40 "$log" >&2
    fi
    line=$(printf '%-16s %12s execs %8s s  %s' "$t" "${execs:-?}" "$secs" "$result")
    echo "fuzz: $line"
    summary+=("$line")
done
echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
exit "$failed"
