#!/usr/bin/env bash
# Where the server's threads spend a closed-loop kluis-bench scenario: per thread name (the
# runtime's workers, the audit appender, sqlx's SQLite threads, ...) the milliseconds per second it
# ran and waited for a core, and how often it was scheduled, from /proc/<pid>/task/*/schedstat over
# 4 s of the measured window. A thread on a request's path that waits long for a core delays
# every request behind it.
#
#   scripts/bench-threads.sh get     # or health, find, create; needs target/release/kluis-bench
#   KLUIS_BIN_DIR=/tmp/other-build scripts/bench-threads.sh get
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scenario=${1:?usage: scripts/bench-threads.sh SCENARIO}
# shellcheck source=scripts/bench-start.sh
source scripts/bench-start.sh
# One line per thread: id, name, nanoseconds run, nanoseconds waited on a run queue, times scheduled.
snapshot() {
    for task in /proc/"$server"/task/*; do
        printf '%s %s %s\n' "${task##*/}" "$(tr ' ' '_' <"$task/comm")" "$(cat "$task/schedstat")"
    done 2>/dev/null
}
before=$(snapshot)
sleep 4
after=$(snapshot)
wait "$bench"
grep -E "^$scenario +closed" "$log"
# A thread that started within the window counts from zero; one that ended is left out.
awk -v secs=4 'NR == FNR { run0[$1] = $3; wait0[$1] = $4; slices0[$1] = $5; next } {
    run[$2] += $3 - run0[$1]; wait[$2] += $4 - wait0[$1]; slices[$2] += $5 - slices0[$1]
} END {
    for (name in run)
        printf "%-18s ran %5.0f ms/s, waited for a core %5.0f ms/s, scheduled %6.0f times/s\n",
            name, run[name] / secs / 1e6, wait[name] / secs / 1e6, slices[name] / secs
}' <(echo "$before") <(echo "$after") | sort
