#!/usr/bin/env bash
# Interop test: the Python peer (written from SPEC.md alone) against the Rust relay binary.
#
#   RELAY_BIN=target/debug/relay PYTHON=python3 federation-spec/python/interop_test.sh
#
# Starts the relay in a temporary data dir (its first start writes the demo set-up, then it
# is restarted on free ports with the config of `probe_relay.py prepare-config`), then:
#   - Python alpha sends to bob@beta, Python beta receives and acknowledges it;
#   - a refused message gives the error code and exit 1;
#   - Rust relayctl <-> Python, both ways, if target/debug/relayctl works (skipped if not);
#   - probe_relay.py's checks of what SPEC.md requires of the relay;
#   - the relay's Goaway on SIGTERM.
# The last line is `interop: N passed, M failed[, K skipped]`; the exit code is non-zero if
# anything failed. KEEP_WORK=1 keeps the temporary directory (logs) for a look.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RELAY_BIN=${RELAY_BIN:-target/debug/relay}
RELAYCTL_BIN=${RELAYCTL_BIN:-target/debug/relayctl}
case $RELAY_BIN in /*) ;; *) RELAY_BIN=$ROOT/$RELAY_BIN ;; esac
case $RELAYCTL_BIN in /*) ;; *) RELAYCTL_BIN=$ROOT/$RELAYCTL_BIN ;; esac
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/relay-interop.XXXXXX")
DATA=$WORK/data
RELAY_PID=
BG_PIDS=()
passed=0 failed=0 skipped=0

ok() { echo "ok $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
skip() { echo "skip $*"; skipped=$((skipped + 1)); }
say() { echo "# $*"; }

stop_relay() {
    if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
        kill -TERM "$RELAY_PID" 2>/dev/null
        for _ in $(seq 1 150); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$RELAY_PID" 2>/dev/null
    fi
    [ -n "$RELAY_PID" ] && wait "$RELAY_PID" 2>/dev/null
    RELAY_PID=
}

cleanup() {
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    stop_relay
    if [ "${KEEP_WORK:-}" = 1 ]; then echo "# kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts the relay with "$@" and waits for its banner; sets RELAY_PID and WS_URL.
start_relay() {
    local out=$1; shift
    "$RELAY_BIN" "$@" >"$out" 2>"$out.err" &
    RELAY_PID=$!
    WS_URL=
    for _ in $(seq 1 300); do
        WS_URL=$(sed -n 's/^  websocket \(ws:\/\/[0-9.:]*\).*/\1/p' "$out" | head -1)
        [ -n "$WS_URL" ] && return 0
        kill -0 "$RELAY_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Waits until file $1 contains $2 (at most $3 seconds).
wait_for() {
    for _ in $(seq 1 $(($3 * 10))); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# Field $2 of the first JSON line of file $1.
json_field() {
    "$PYTHON" -c 'import json,sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        print(json.loads(line).get(sys.argv[2])); break' "$1" "$2"
}

finish() {
    echo "interop: $passed passed, $failed failed$([ "$skipped" -gt 0 ] && echo ", $skipped skipped")"
    [ "$failed" -eq 0 ]
    exit $?
}

if [ ! -x "$RELAY_BIN" ]; then
    fail "relay binary $RELAY_BIN not found (cargo build -p relay)"
    finish
fi
cd "$HERE"
if ! "$PYTHON" -c 'import relayfed' 2>"$WORK/import.err"; then
    cat "$WORK/import.err"
    fail "python modules (pip install -r federation-spec/python/requirements.txt)"
    finish
fi

# --- set-up --------------------------------------------------------------------------------
# First start writes the demo set-up (it binds the default ports if they are free, or fails
# to bind if not: either way the files are there); it is stopped at once.
say "first start in $DATA"
start_relay "$WORK/first.out" --data-dir "$DATA"
stop_relay
if [ ! -f "$DATA/relay.toml" ] || [ ! -f "$DATA/keys/alpha.key" ]; then
    cat "$WORK/first.out" "$WORK/first.out.err" 2>/dev/null | tail -20
    fail "relay first start wrote no demo set-up"
    finish
fi
"$PYTHON" probe_relay.py prepare-config "$DATA" || { fail "prepare-config"; finish; }
if ! start_relay "$WORK/relay.out" --config "$DATA/relay-probe.toml"; then
    tail -20 "$WORK/relay.out.err"
    fail "relay did not start"
    finish
fi
say "relay pid $RELAY_PID at $WS_URL"
KEYS=$DATA/keys

# --- Python -> Python ----------------------------------------------------------------------
"$PYTHON" peer.py listen --url "$WS_URL" --key "$KEYS/beta.key" --count 1 --timeout 30 \
    >"$WORK/listen1.out" 2>"$WORK/listen1.err" &
LISTEN=$!; BG_PIDS+=("$LISTEN")
wait_for "$WORK/listen1.err" "session " 15
if ID=$("$PYTHON" peer.py send --url "$WS_URL" --key "$KEYS/alpha.key" --from alice \
        --to bob@beta "hello from python" 2>"$WORK/send1.err"); then
    wait "$LISTEN"; rc=$?
    got_id=$(json_field "$WORK/listen1.out" id)
    got_text=$(json_field "$WORK/listen1.out" text)
    got_from=$(json_field "$WORK/listen1.out" from)
    if [ $rc -eq 0 ] && [ "$got_id" = "$ID" ] && [ "$got_text" = "hello from python" ] \
        && [ "$got_from" = "alice@alpha" ]; then
        ok "python alpha -> relay -> python beta (id $ID)"
    else
        cat "$WORK/listen1.out" "$WORK/listen1.err"
        fail "python beta did not print message $ID (listener exit $rc)"
    fi
else
    cat "$WORK/send1.err"
    fail "python alpha send"
fi

out=$("$PYTHON" peer.py send --url "$WS_URL" --key "$KEYS/alpha.key" --from alice \
      --to bob@zeta "to nowhere" 2>"$WORK/send2.err"); rc=$?
if [ $rc -eq 1 ] && [ "$out" = ERROR_CODE_UNKNOWN_DESTINATION ]; then
    ok "python send to an unknown platform: exit 1, $out"
else
    cat "$WORK/send2.err"
    fail "python send to bob@zeta: exit $rc, printed '$out'"
fi

# --- Rust <-> Python -----------------------------------------------------------------------
if [ ! -x "$RELAYCTL_BIN" ] || ! "$RELAYCTL_BIN" --help >/dev/null 2>&1; then
    skip "rust relayctl <-> python: $RELAYCTL_BIN is not there or does not run"
else
    # Rust relayctl (alpha) -> Python (beta).
    "$PYTHON" peer.py listen --url "$WS_URL" --key "$KEYS/beta.key" --count 1 --timeout 30 \
        >"$WORK/listen2.out" 2>"$WORK/listen2.err" &
    LISTEN=$!; BG_PIDS+=("$LISTEN")
    wait_for "$WORK/listen2.err" "session " 15
    if ID=$(timeout 40 "$RELAYCTL_BIN" send --relay "$WS_URL" --key "$KEYS/alpha.key" \
            --from carol --to bob@beta --timeout 20 "hello from rust" 2>"$WORK/ctl1.err") \
            && [ -n "$ID" ]; then
        ID=$(echo "$ID" | tail -1 | tr -d '[:space:]')
        wait "$LISTEN"; rc=$?
        got_id=$(json_field "$WORK/listen2.out" id)
        got_text=$(json_field "$WORK/listen2.out" text)
        if [ $rc -eq 0 ] && [ "$got_id" = "$ID" ] && [ "$got_text" = "hello from rust" ]; then
            ok "rust relayctl alpha -> relay -> python beta (id $ID)"
        else
            cat "$WORK/listen2.out" "$WORK/listen2.err"
            fail "python beta did not print relayctl's message $ID (listener exit $rc)"
        fi
    else
        tail -5 "$WORK/ctl1.err"
        kill "$LISTEN" 2>/dev/null; wait "$LISTEN" 2>/dev/null
        skip "rust relayctl -> python: relayctl send did not work (see above)"
    fi

    # Python (alpha) -> Rust relayctl (beta).
    timeout 40 "$RELAYCTL_BIN" listen --relay "$WS_URL" --key "$KEYS/beta.key" --count 1 \
        >"$WORK/ctl2.out" 2>"$WORK/ctl2.err" &
    CTL=$!; BG_PIDS+=("$CTL")
    sleep 2  # relayctl prints nothing until a message arrives: give it time to connect
    if ! kill -0 "$CTL" 2>/dev/null; then
        wait "$CTL"
        tail -5 "$WORK/ctl2.err"
        skip "python -> rust relayctl: relayctl listen exited early (see above)"
    elif ID=$("$PYTHON" peer.py send --url "$WS_URL" --key "$KEYS/alpha.key" --from dave \
              --to bob@beta "hello to rust" 2>"$WORK/send3.err"); then
        wait "$CTL"; rc=$?
        got_id=$(json_field "$WORK/ctl2.out" id)
        got_text=$(json_field "$WORK/ctl2.out" text)
        if [ $rc -eq 0 ] && [ "$got_id" = "$ID" ] && [ "$got_text" = "hello to rust" ]; then
            ok "python alpha -> relay -> rust relayctl beta (id $ID)"
        elif [ $rc -ne 0 ] && [ -z "$got_id" ]; then
            tail -5 "$WORK/ctl2.err"
            skip "python -> rust relayctl: relayctl listen failed (exit $rc, see above)"
        else
            cat "$WORK/ctl2.out"; tail -5 "$WORK/ctl2.err"
            fail "relayctl listen printed '$got_id' / '$got_text', expected $ID (exit $rc)"
        fi
    else
        cat "$WORK/send3.err"
        fail "python alpha send (to relayctl)"
    fi
fi

# --- What SPEC.md requires of the relay -----------------------------------------------------
"$PYTHON" probe_relay.py run --url "$WS_URL" --data-dir "$DATA" >"$WORK/probe.out" 2>&1
while IFS= read -r line; do
    case $line in
        "ok "*) ok "probe: ${line#ok }" ;;
        "FAIL "*) fail "probe: ${line#FAIL }" ;;
        "skip "*) skip "probe: ${line#skip }" ;;
        *) echo "  $line" ;;
    esac
done <"$WORK/probe.out"

# --- Shutdown: Goaway{SHUTTING_DOWN} and close code 4018 (sections 2.3.3, 8.7) --------------
"$PYTHON" probe_relay.py hold --url "$WS_URL" --key "$KEYS/gamma.key" >"$WORK/hold.out" 2>&1 &
HOLD=$!; BG_PIDS+=("$HOLD")
if wait_for "$WORK/hold.out" ready 15; then
    kill -TERM "$RELAY_PID"
    wait "$HOLD"; rc=$?
    if [ $rc -eq 0 ]; then
        ok "relay shutdown: $(tail -1 "$WORK/hold.out")"
        if grep -q "close=4018" "$WORK/hold.out"; then
            ok "relay shutdown: WebSocket Close status 4018"
        else
            fail "relay shutdown: Close status is not 4018 (SPEC.md 2.3.3 SHOULD)"
        fi
    else
        fail "relay shutdown: $(tail -3 "$WORK/hold.out" | tr '\n' ' ')"
    fi
else
    fail "relay shutdown: no session ($(tail -3 "$WORK/hold.out" | tr '\n' ' '))"
fi
stop_relay

finish
