#!/usr/bin/env bash
# The one test command of kluis:  bash scripts/test.sh [extra cargo test args, e.g. a test-name filter]
#
#   phase 1  SQLite      KLUIS_TEST_BACKEND=sqlite cargo test --workspace --all-targets      (unit + integration)
#   phase 2  PostgreSQL  KLUIS_TEST_BACKEND=postgres cargo test --test api       (integration, on PG)
#   phase 3  README      bash scripts/readme-check.sh   (the README's grpcurl walkthrough and Python client,
#                        and the grpcurl recipes of docs/operations.md, live)
#
# PostgreSQL comes from KLUIS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres);
# each integration test creates its own fresh database there. When it is not reachable the
# PostgreSQL half is skipped and the summary says so loudly; with CI=true that is an error.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_URL="${KLUIS_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

phase_sqlite="not run"
phase_postgres="not run"
phase_readme="not run"
pg_skipped=""
current=""
logdir=$(mktemp -d)

say() { printf '\n==== test.sh: %s ====\n' "$*"; }

# "passed failed ignored" summed over the "test result:" lines of a cargo test log.
count_tests() {
    [[ -f "$1" ]] || { echo "0 0 0"; return; }
    sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$1" \
        | awk '{p+=$1; f+=$2; i+=$3} END {printf "%d %d %d\n", p, f, i}'
}

summary() {
    local rc=$?
    if [[ -n "$current" && $rc -ne 0 ]]; then
        printf -v "$current" 'FAILED (exit %s)' "$rc"
    fi
    local p1 f1 i1 p2 f2 i2
    read -r p1 f1 i1 < <(count_tests "$logdir/sqlite.log")
    read -r p2 f2 i2 < <(count_tests "$logdir/postgres.log")
    rm -rf "$logdir"
    printf '\n==== test.sh summary ====\n'
    printf '  phase 1 SQLite     (cargo test --workspace --all-targets): %s  [%d passed, %d failed, %d ignored]\n' \
        "$phase_sqlite" "$p1" "$f1" "$i1"
    printf '  phase 2 PostgreSQL (cargo test --test api)   : %s  [%d passed, %d failed, %d ignored]\n' \
        "$phase_postgres" "$p2" "$f2" "$i2"
    printf '  phase 3 README     (scripts/readme-check.sh) : %s  [README.md, docs/operations.md]\n' "$phase_readme"
    if [[ $rc -eq 0 ]]; then
        printf '  result: OK\n'
    else
        printf '  result: FAILED (exit %s)\n' "$rc"
    fi
    printf 'tests: %d passed, %d failed, %d skipped\n' $((p1 + p2)) $((f1 + f2)) $((i1 + i2))
    if [[ -n "$pg_skipped" ]]; then
        printf '\n!! PostgreSQL half DID NOT RUN: start PostgreSQL (or set KLUIS_TEST_PG_URL=postgres://user@host:port/db) and run again\n'
        printf '!! reason: %s\n' "$pg_skipped"
    fi
    exit "$rc"
}
trap summary EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Host and port of a postgres:// URL, postgres://[user[:password]@]host[:port][/db][?params], into
# PG_HOST and PG_PORT. PG_HOST is empty for a URL without a host (libpq's default Unix socket).
pg_host_port() {
    local url=$1 auth hostport
    auth=${url#*://}
    auth=${auth%%/*}
    auth=${auth%%\?*}
    hostport=${auth##*@}
    if [[ $hostport == \[* ]]; then           # [IPv6]:port
        PG_HOST=${hostport#[}
        PG_HOST=${PG_HOST%%]*}
        PG_PORT=${hostport##*]}
        PG_PORT=${PG_PORT#:}
    elif [[ $hostport == *:* ]]; then
        PG_HOST=${hostport%%:*}
        PG_PORT=${hostport##*:}
    else
        PG_HOST=$hostport
        PG_PORT=""
    fi
    PG_PORT=${PG_PORT:-5432}
}

# True when something accepts connections at PG_HOST:PG_PORT (bash /dev/tcp: no psql needed).
pg_reachable() {
    if [[ -z "$PG_HOST" ]]; then
        [[ -S "/var/run/postgresql/.s.PGSQL.$PG_PORT" ]]
        return
    fi
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$PG_HOST" "$PG_PORT" 2>/dev/null
}

pg_host_port "$PG_URL"
pg_where="${PG_HOST:-<unix socket>}:$PG_PORT"

# CI must run the PostgreSQL half: say so before the long SQLite phase, not after it.
if [[ "${CI:-}" == "true" ]] && ! pg_reachable; then
    pg_skipped="nothing accepts connections at $pg_where, the address in KLUIS_TEST_PG_URL or its default"
    phase_postgres="FAILED: PostgreSQL not reachable at $pg_where"
    printf '\nerror: CI=true and PostgreSQL is not reachable at %s; the PostgreSQL half must run in CI.\n' \
        "$pg_where" >&2
    exit 1
fi

# ---- phase 1: SQLite ---------------------------------------------------------------------------
say "phase 1: SQLite — KLUIS_TEST_BACKEND=sqlite cargo test --workspace --all-targets $*"
current=phase_sqlite
KLUIS_TEST_BACKEND=sqlite cargo test --workspace --all-targets "$@" | tee "$logdir/sqlite.log"
phase_sqlite="passed"
current=""

# ---- phase 2: PostgreSQL -----------------------------------------------------------------------
if pg_reachable; then
    say "phase 2: PostgreSQL at $pg_where — KLUIS_TEST_BACKEND=postgres cargo test --test api $*"
    current=phase_postgres
    KLUIS_TEST_BACKEND=postgres KLUIS_TEST_PG_URL="$PG_URL" cargo test --test api "$@" | tee "$logdir/postgres.log"
    phase_postgres="passed"
    current=""
else
    pg_skipped="nothing accepts connections at $pg_where, the address in KLUIS_TEST_PG_URL or its default"
    if [[ "${CI:-}" == "true" ]]; then
        phase_postgres="FAILED: PostgreSQL not reachable at $pg_where"
        printf '\nerror: CI=true and PostgreSQL is not reachable at %s; the PostgreSQL half must run in CI.\n' \
            "$pg_where" >&2
        exit 1
    fi
    phase_postgres="SKIPPED — PostgreSQL not reachable at $pg_where"
    say "phase 2: SKIPPED — PostgreSQL not reachable at $pg_where (reported again in the summary)"
fi

# ---- phase 3: README walkthrough ---------------------------------------------------------------
say "phase 3: README and docs/operations.md — bash scripts/readme-check.sh (each)"
current=phase_readme
bash scripts/readme-check.sh README.md
bash scripts/readme-check.sh docs/operations.md
phase_readme="passed"
current=""
