#!/usr/bin/env bash
# Four p2pfl node daemons on 127.0.0.1, each training on its own skewed slice of digits.
# Waits (at most 120 s) until every node has synced with its peers, prints their status,
# then stops them gracefully. Usage: examples/local_network.sh [WORKDIR]
set -euo pipefail

NODES=4
P2PFL=${P2PFL:-p2pfl}
WORK=${1:-$(mktemp -d -t p2pfl-local-XXXXXX)}
source "$(dirname "$0")/daemons.sh"

synced() {  # synced HOME: the node has completed a sync
    "$P2PFL" node status --home "$1" --json |
        python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["syncs"] > 0 else 1)'
}

echo "work directory: $WORK"
BOOTSTRAP=()
for i in $(seq 0 $((NODES - 1))); do
    home="$WORK/node$i"
    "$P2PFL" node init --home "$home" >/dev/null
    "$P2PFL" node start --home "$home" --data "digits:part=$i/$NODES,alpha=0.5,seed=1" \
        --protocol dynamic "${BOOTSTRAP[@]}" >"$home/address" 2>"$home/stderr" &
    PIDS+=($!)
    wait_for 60 test -s "$home/address"
    addr=$(head -n 1 "$home/address")
    echo "node$i: $addr"
    BOOTSTRAP+=(--bootstrap "$addr")
done

for i in $(seq 0 $((NODES - 1))); do
    wait_for 120 synced "$WORK/node$i"
done

for i in $(seq 0 $((NODES - 1))); do
    echo "--- node$i"
    "$P2PFL" node status --home "$WORK/node$i"
done

for i in $(seq 0 $((NODES - 1))); do
    "$P2PFL" node stop --home "$WORK/node$i" >/dev/null
done
echo "all nodes stopped; logs and checkpoints in $WORK/node*/"
