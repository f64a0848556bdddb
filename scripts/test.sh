#!/usr/bin/env bash
# Runs the whole ckptd test suite: formatting, clippy, the Rust tests against a
# real loopback S3 server (moto), and a short cargo-fuzz smoke run of every
# fuzz target. CI runs this through `.ci/run`; developers run it directly.
#
# It installs what it needs itself (a Python venv with moto at .venv-test/,
# cargo-fuzz), so it works on a fresh Debian machine with rustup stable,
# python3 and gcc.
#
# Environment:
#   CKPTD_FUZZ_SECONDS      seconds to run each fuzz target (default 20);
#                           0 skips the fuzz stage (quick local loops)
#   CKPTD_CRASH_ITERATIONS  SIGKILLs of the engine's file:// crash test (default 150)
#
# At the end it prints one reliability line per class (SIGKILLs survived, corruptions detected,
# store faults survived, hostile inputs refused), summed from what the tests themselves recorded
# in CKPTD_RELIABILITY_LOG, and one line per recovery drill (python-bindings/tests/test_drill.py:
# a torch.distributed job recovering from an XID, a hang and a local fault) with its time from
# fault to first resumed step.
set -euo pipefail

cd "$(dirname "$0")/.."

# A test run is a clean build on CI: incremental state and full debug info only cost time there
# (CI has 2 cores). Callers may override either.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
export CARGO_PROFILE_TEST_DEBUG="${CARGO_PROFILE_TEST_DEBUG:-line-tables-only}"
REPO_ROOT="$(pwd)"
VENV="$REPO_ROOT/.venv-test"
FUZZ_SECONDS="${CKPTD_FUZZ_SECONDS:-20}"
[[ "$FUZZ_SECONDS" =~ ^[0-9]+$ ]] || { echo "test.sh: CKPTD_FUZZ_SECONDS must be a whole number of seconds, got '$FUZZ_SECONDS'" >&2; exit 64; }
S3_BUCKET="ckptd-test"
SCRIPT_START=$SECONDS
STAGES_RUN=()
RELIABILITY_LOG="$(mktemp -t ckptd-reliability.XXXXXX)"
export CKPTD_RELIABILITY_LOG="$RELIABILITY_LOG"
DRILL_LOG="$(mktemp -t ckptd-drill.XXXXXX)"
export CKPTD_DRILL_RESULTS="$DRILL_LOG"

section() {
    printf '\n==> %s\n' "$*"
}

die() {
    printf 'test.sh: %s\n' "$*" >&2
    exit 1
}

# Runs "$@" and records the stage name ($1) with its duration for the summary.
stage() {
    local name="$1"
    shift
    local start=$SECONDS
    "$@"
    STAGES_RUN+=("$name $((SECONDS - start))s")
}

# ---------------------------------------------------------------- prerequisites

check_toolchain() {
    section "toolchain"
    command -v cargo >/dev/null || die "cargo not found: install rustup stable"
    cargo --version
    cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
    command -v python3 >/dev/null || die "python3 not found"
    python3 --version
}

# Creates .venv-test with moto[server] (the loopback S3 server) and kmock (the
# Kubernetes API emulator the isolator tests run against); a venv that already
# imports both is reused so repeat runs skip pip entirely.
setup_venv() {
    section "python venv ($VENV)"
    if [[ -x "$VENV/bin/moto_server" ]] && "$VENV/bin/python" -c 'import moto.server, boto3, kmock, pytest_asyncio' 2>/dev/null; then
        echo "moto already installed: $("$VENV/bin/python" -c 'import moto; print(moto.__version__)'); kmock too"
        return
    fi
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "python3 venv/ensurepip missing: installing python3-venv with apt-get"
        [[ $(id -u) -eq 0 ]] || die "python3-venv is missing and this is not root: apt-get install python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # kmock registers a pytest plugin that imports pytest_asyncio: install it too, or
    # every pytest run in this venv fails at start-up.
    "$VENV/bin/python" -m pip install --quiet 'moto[server]' kmock pytest-asyncio
    "$VENV/bin/python" -c 'import moto, kmock; print("installed moto", moto.__version__, "and kmock")'
}

setup_cargo_fuzz() {
    section "cargo-fuzz"
    if cargo fuzz --version >/dev/null 2>&1; then
        cargo fuzz --version
        return
    fi
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
    cargo fuzz --version
}

# ------------------------------------------------------------ loopback S3 server

S3_PID=""
S3_LOG=""

# Stops the S3 server on every exit path, and prints its log when the run failed.
cleanup() {
    local rc=$?
    if [[ -n "$S3_PID" ]] && kill -0 "$S3_PID" 2>/dev/null; then
        kill "$S3_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$S3_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
    fi
    if [[ -n "$S3_LOG" && -f "$S3_LOG" ]]; then
        if [[ $rc -ne 0 ]]; then
            printf '\n==> moto server log (last 200 lines of %s)\n' "$S3_LOG" >&2
            tail -n 200 "$S3_LOG" >&2 || true
        fi
        rm -f "$S3_LOG"
    fi
    rm -f "$RELIABILITY_LOG" "$DRILL_LOG"
    if [[ $rc -ne 0 ]]; then
        printf '\ntest.sh: FAILED (exit %d) after %ds\n' "$rc" "$((SECONDS - SCRIPT_START))" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_s3() {
    section "loopback S3 server (moto)"
    local port
    port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    S3_LOG="$(mktemp -t ckptd-moto.XXXXXX.log)"
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$S3_LOG" 2>&1 </dev/null &
    S3_PID=$!
    local endpoint="http://127.0.0.1:$port"

    # Wait until it answers HTTP (any status), then create the bucket with a
    # plain PUT: moto does not check request signatures.
    "$VENV/bin/python" - "$endpoint" "$S3_BUCKET" "$S3_PID" <<'EOF'
import os, sys, time, urllib.error, urllib.request

endpoint, bucket, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 60
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("moto server exited during startup")
    try:
        urllib.request.urlopen(endpoint + "/", timeout=2).close()
        break
    except urllib.error.HTTPError:
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("moto server did not answer within 60s")
        time.sleep(0.2)
req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
with urllib.request.urlopen(req, timeout=10) as resp:
    if resp.status != 200:
        sys.exit(f"creating bucket {bucket}: HTTP {resp.status}")
print(f"moto at {endpoint}, bucket {bucket} created")
EOF

    export CKPTD_TEST_S3_ENDPOINT="$endpoint"
    export CKPTD_TEST_S3_BUCKET="$S3_BUCKET"
    export AWS_ACCESS_KEY_ID=test
    export AWS_SECRET_ACCESS_KEY=test
    export AWS_REGION=us-east-1
    export AWS_ENDPOINT_URL="$CKPTD_TEST_S3_ENDPOINT"
    export AWS_ALLOW_HTTP=true
}

# ------------------------------------------------------------------ Rust stages

run_fmt() {
    section "cargo fmt --check"
    cargo fmt --all -- --check
}

run_clippy() {
    section "cargo clippy"
    cargo clippy --workspace --all-targets --locked -- -D warnings
    # The trainer-side client alone, as the Python extension builds it.
    cargo clippy -p ckptd --no-default-features --locked -- -D warnings
}

run_cargo_test() {
    section "cargo test"
    # The isolator and system tests start kmock with this interpreter, and must
    # not skip here.
    CKPTD_TEST_PYTHON="$VENV/bin/python" CKPTD_REQUIRE_KMOCK=1 cargo test --workspace --locked
}

# Builds every target in ckpt-core/fuzz and runs each for FUZZ_SECONDS, starting
# from the committed seeds (fuzz/seeds/<target>) plus whatever a previous run
# left in fuzz/corpus/<target> (not committed).
#
# The fuzz crate is its own workspace with its own target dir
# (ckpt-core/fuzz/target), so it never disturbs the main workspace's cache.
#
# `--dev --sanitizer none` keeps this on plain stable rustc: every flag
# cargo-fuzz then passes (-Cpasses=sancov-module, -Cllvm-args=..., --cfg
# fuzzing, -Cdebug-assertions) is a stable -C flag. Only AddressSanitizer
# (-Zsanitizer) and -Zbuild-std need nightly, or RUSTC_BOOTSTRAP=1 on stable.
# The parsers under test are safe Rust, so ASan would add little, and this
# build takes about a fifth of the CPU of cargo-fuzz's default (release, one
# codegen unit, ASan on every dependency). It keeps overflow checks and debug
# assertions. `build` and `run` get the same flags, or `run` would rebuild
# everything.
FUZZ_BUILD_FLAGS=(--dev --sanitizer none)

run_fuzz() {
    section "fuzz smoke (${FUZZ_SECONDS}s per target)"
    local targets
    targets="$(cd ckpt-core && cargo fuzz list)"
    [[ -n "$targets" ]] || die "no fuzz targets found in ckpt-core/fuzz"
    echo "targets:" $targets
    (cd ckpt-core && cargo fuzz build "${FUZZ_BUILD_FLAGS[@]}")
    local t corpora args
    for t in $targets; do
        section "fuzz $t"
        mkdir -p "ckpt-core/fuzz/corpus/$t"
        corpora=("fuzz/corpus/$t")
        if [[ -d "ckpt-core/fuzz/seeds/$t" ]]; then
            corpora+=("fuzz/seeds/$t")
        fi
        args=(-max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1)
        if [[ -f "ckpt-core/fuzz/dicts/$t.dict" ]]; then
            args+=(-dict="fuzz/dicts/$t.dict")
        fi
        local out
        out="$(mktemp -t ckptd-fuzz.XXXXXX)"
        (cd ckpt-core && cargo fuzz run "${FUZZ_BUILD_FLAGS[@]}" "$t" "${corpora[@]}" -- "${args[@]}") 2>&1 | tee "$out"
        local execs
        execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$out" | tail -n 1)"
        rm -f "$out"
        [[ -n "$execs" ]] || die "fuzz $t printed no executed-units count"
        printf 'hostile\tfuzz %s: random inputs to the parser\t%s\n' "$t" "$execs" >>"$RELIABILITY_LOG"
    done
}

# ---------------------------------------------------------------- Python stages

# Builds the extension (debug, with the test-hooks feature that the fence tests need) into the
# test venv and runs the pytest suite, which also checks the .pyi stubs (mypy stubtest). PyPI's
# torch is the CUDA build (~5 GB); pip skips it when the venv already has it.
run_python_tests() {
    section "python: install maturin, numpy, torch, pytest, mypy"
    "$VENV/bin/python" -m pip install --quiet 'maturin>=1.16,<2' 'numpy>=1.24' pytest mypy boto3 torch
    section "python: build the extension (maturin develop --features test-hooks)"
    (cd python-bindings && VIRTUAL_ENV="$VENV" "$VENV/bin/maturin" develop --quiet --features test-hooks)
    section "python: pytest"
    local rc=0
    CKPTD_REQUIRE_KMOCK=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider python-bindings/tests || rc=$?
    # pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
    [[ $rc -ne 5 ]] || die "pytest collected no tests"
    [[ $rc -eq 0 ]] || die "pytest failed (exit $rc)"
}

# ------------------------------------------------------------------ reliability

# One line per class from what the tests recorded, with the kinds behind each total.
reliability_summary() {
    section "reliability"
    local class label
    for class in sigkill corruption store-fault hostile; do
        case "$class" in
            sigkill) label="SIGKILLs survived" ;;
            corruption) label="corruptions detected" ;;
            store-fault) label="store faults survived" ;;
            hostile) label="hostile inputs refused" ;;
        esac
        awk -F '\t' -v c="$class" -v label="$label" '
            $1 == c { total += $3; by[$2] += $3 }
            END {
                detail = ""
                for (k in by) detail = detail (detail == "" ? "" : ", ") k " " by[k]
                printf "reliability: %s: %d (%s)\n", label, total, detail == "" ? "none recorded" : detail
            }' "$RELIABILITY_LOG"
    done
    # The crash loop's restarts: spawn of a killed trainer's successor to its loaded step.
    sort -t $'\t' -k3,3n "$RELIABILITY_LOG" | awk -F '\t' '
        $1 == "restart-ms" { ms[n++] = $3; if (!($2 in slowest) || $3 > slowest[$2]) slowest[$2] = $3 }
        END {
            if (n == 0) { print "reliability: restarts after a kill: none recorded"; exit }
            detail = ""
            for (k in slowest) detail = detail (detail == "" ? "" : ", ") k " " slowest[k] " ms"
            printf "reliability: restarts after a kill: %d loaded their step; median %d ms, slowest %d ms (slowest by configuration: %s)\n", n, ms[int(n / 2)], ms[n - 1], detail
        }'
}

# One line per recovery drill the suite ran: where the job resumed and how long each phase took.
drill_summary() {
    section "recovery drills (seconds after the fault)"
    [[ -s "$DRILL_LOG" ]] || { echo "drill: none ran"; return; }
    "$VENV/bin/python" - "$DRILL_LOG" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    p = r["since_fault_s"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in p.items() if k not in ("fault", "done"))
    print(f"drill: {r['scenario']}: resumed step {r['resumed_step']} bitwise; first step {r['mttr_s']:.1f} s ({phases})")
PY
}

# ------------------------------------------------------------------------ main

main() {
    check_toolchain
    stage venv setup_venv
    if [[ "$FUZZ_SECONDS" != 0 ]]; then
        stage cargo-fuzz-install setup_cargo_fuzz
    fi
    stage s3 start_s3
    stage fmt run_fmt
    stage clippy run_clippy
    stage cargo-test run_cargo_test
    stage python run_python_tests
    if [[ "$FUZZ_SECONDS" == 0 ]]; then
        section "fuzz smoke skipped (CKPTD_FUZZ_SECONDS=0)"
    else
        stage fuzz run_fuzz
    fi
    reliability_summary
    drill_summary
    section "summary"
    local IFS=,
    echo "test.sh: all stages ok in $((SECONDS - SCRIPT_START))s (${STAGES_RUN[*]})"
}

main "$@"
