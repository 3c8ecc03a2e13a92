#!/usr/bin/env bash
# CPU per call of one closed-loop kluis-bench scenario, split between the server and the load
# generator: reads both processes' user+system time from /proc over 6 s of the measured window.
#
#   scripts/bench-cpu.sh get        # or health, find, create; needs target/release/kluis-bench
#   KLUIS_BIN_DIR=/tmp/other-build scripts/bench-cpu.sh get   # another build's binaries
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scenario=${1:?usage: scripts/bench-cpu.sh SCENARIO}
# shellcheck source=scripts/bench-start.sh
source scripts/bench-start.sh
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
s0=$(ticks "$server"); b0=$(ticks "$bench"); t0=$(date +%s.%N)
sleep 6
s1=$(ticks "$server"); b1=$(ticks "$bench"); t1=$(date +%s.%N)
wait "$bench"
rate=$(awk -v s="$scenario" '$1 == s && $2 == "closed" {print $4}' "$log")
awk -v s="$scenario" -v r="$rate" -v hz="$hz" -v ds=$((s1 - s0)) -v db=$((b1 - b0)) -v t0="$t0" -v t1="$t1" 'BEGIN {
    wall = t1 - t0
    printf "%s: %.0f calls/s; cores used: server %.2f, load generator %.2f\n", s, r, ds / hz / wall, db / hz / wall
    printf "CPU per call: server %.1f us, load generator %.1f us\n", ds / hz / (r * wall) * 1e6, db / hz / (r * wall) * 1e6
}'
