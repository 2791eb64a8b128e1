# Shared by the example scripts (source it): start daemons into PIDS, stop them all by PID on
# exit, and wait for a condition with a deadline.
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
