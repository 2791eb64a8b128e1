# Shared by the example scripts (source it): start daemons into PIDS, stop them all by PID on
# exit, and wait for a condition with a deadline.

# The p2pfl command: $P2PFL if set, else the one `make demo` installs in the repository's
# .venv, else `p2pfl` on PATH. PYTHON (for reading JSON) is the interpreter beside it.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${P2PFL:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/p2pfl" ]]; then P2PFL="$REPO/.venv/bin/p2pfl"; else P2PFL=p2pfl; fi
fi
if ! command -v "$P2PFL" >/dev/null; then
    echo "error: $P2PFL not found; run \`make demo\` (it installs .venv/bin/p2pfl) or set" \
        "P2PFL=/path/to/p2pfl" >&2
    exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(dirname "$(command -v "$P2PFL")")/python
    [[ -x "$PYTHON" ]] || PYTHON=python3
fi

json_field() {  # json_field EXPR: evaluate a Python expression over the JSON on stdin (`j`)
    "$PYTHON" -c 'import json, sys; j = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}
export OMP_NUM_THREADS=1  # small models: one thread per daemon is faster
PIDS=()

cleanup() {  # stop every daemon by its PID (SIGTERM: each writes a final checkpoint)
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND every 0.5 s
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "timed out waiting for: $*" >&2
            return 1
        fi
        sleep 0.5
    done
}
