#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 540: 7 targets, 63 min).
#   fuzz/run.sh [SECONDS]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable toolchain is told
# to allow the nightly flags with RUSTC_BOOTSTRAP=1. Corpora stay in
# fuzz/corpus/, crashes in fuzz/artifacts/ (each becomes a regression test in
# tests/integration/fuzz_regressions.rs). A summary goes to fuzz/last-run.txt.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-540}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo fuzz build
out=last-run.txt
echo "fuzz run $(date -u +%FT%TZ), ${secs} s per target, $(nproc) cores" > "$out"
status=0
for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    if [ "$rc" = 0 ]; then res=ok; else res="CRASH (see fuzz/artifacts/$t)"; status=1; tail -40 "$log" > "crash-$t.log"; fi
    printf '%-18s %-8s runs=%-10s cov=%s\n' "$t" "$res" "${runs:-?}" "${cov:-?}" | tee -a "$out"
    rm -f "$log"
done
exit $status
