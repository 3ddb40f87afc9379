#!/usr/bin/env bash
# Run every cargo-fuzz target in turn for SECONDS each (default 600) and print
# one summary line per target: executions, seconds, and the crash file if any.
#
#   scripts/fuzz_all.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain and `cargo +nightly install cargo-fuzz`. Logs go
# to fuzz/logs/<target>.log (git-ignored); a crash stops only its own target.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
cargo +nightly fuzz build >/dev/null
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="logs/$t.log"
    status=ok
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1 || status=failed
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    crash=$(grep -o 'Test unit written to [^ ]*' "$log" | sed 's/Test unit written to //' | tail -1 || true)
    printf '%-24s %-7s executions %-12s %s\n' "$t" "$status" "${runs:-?}" "${crash:-}"
done
