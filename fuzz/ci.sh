#!/usr/bin/env bash
# Bounded fuzzing for CI: each cargo-fuzz target for SECONDS (30 by default),
# starting from the committed corpus fuzz/corpus/<target>/ (read, never written:
# what a run finds goes to a scratch folder). A crash fails the run; its input is in
# fuzz/artifacts/<target>/. Keep it: copy it to fuzz/regressions/<target>/
# (tests/fuzz_corpus.rs replays it in every cargo test) and add a unit test beside
# the parser it broke.
# cargo-fuzz needs a nightly toolchain (sanitizer flags): installed through rustup
# if missing, and cargo-fuzz from crates.io.
# Usage: fuzz/ci.sh [SECONDS]
set -euo pipefail
seconds=${1:-30}
fuzz=$(cd "$(dirname "$0")" && pwd)
cd "$fuzz"
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install --locked cargo-fuzz
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build -O
status=0
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    if cargo +nightly fuzz run -O "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        echo "fuzz: $target: ${runs:-?} executions in $seconds s, no crash"
    else
        status=1
        tail -n 40 "$log"
        echo "fuzz: $target CRASHED; input in fuzz/artifacts/$target/ (see the top of fuzz/ci.sh)" >&2
    fi
done
exit $status
