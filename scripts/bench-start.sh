# Sourced by scripts/bench-*.sh: starts `kluis-bench` on one closed-loop scenario ($scenario) over
# 20,000 seeded subjects, from $KLUIS_BIN_DIR (default target/release; it starts the `kluis` beside
# it), and returns 4 s into the measured window. Sets $log (its output, removed on exit), $bench
# (its pid) and $server (the spawned server's pid).
bin=${KLUIS_BIN_DIR:-target/release}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$bin/kluis-bench" --seed 20000 --scenarios "$scenario" --mode closed --duration 12 --warmup 2 >"$log" 2>&1 &
bench=$!
for _ in $(seq 240); do grep -q "$scenario: closed" "$log" && break; sleep 0.5; done
sleep 4 # past the warm-up, into the measured window
server=$(sed -n 's/^started .* (pid \([0-9]*\)).*/\1/p' "$log")
[[ -n "$server" ]] || { echo "no server pid in the bench output" >&2; exit 1; }
