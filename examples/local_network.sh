#!/usr/bin/env bash
# Four p2pfl node daemons on 127.0.0.1, each training on its own skewed slice of digits.
# Waits (at most 120 s) until every node has synced with its peers, prints their status,
# then stops them gracefully. Usage: examples/local_network.sh [WORKDIR]
set -euo pipefail

NODES=4
WORK=${1:-$(mktemp -d -t p2pfl-local-XXXXXX)}
source "$(dirname "$0")/daemons.sh"

synced() {  # synced HOME: the node has completed a sync
    [[ $("$P2PFL" node status --home "$1" --json | json_field 'j["syncs"] > 0') == True ]]
}

echo "work directory: $WORK"
BOOTSTRAP=()
for i in $(seq 0 $((NODES - 1))); do
    home="$WORK/node$i"
    "$P2PFL" node init --home "$home" --json >/dev/null
    "$P2PFL" node start --home "$home" --data "digits:part=$i/$NODES,alpha=0.5,seed=1" \
        --protocol dynamic "${BOOTSTRAP[@]}" --json >"$home/started.json" 2>"$home/stderr" &
    PIDS+=($!)
    wait_for 60 test -s "$home/started.json"
    addr=$(json_field 'j["listen_addrs"][0]' <"$home/started.json")
    echo "node$i: $addr"
    echo "node$i dashboard: $(json_field 'j["dashboard_url"]' <"$home/started.json")"
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
