#!/usr/bin/env bash
# A community on 127.0.0.1: a founder signs examples/community/manifest.toml, invites two
# nodes (alice, bob), they join with the token and the founder as bootstrap peer, all three
# train on their own skewed slice of digits and share only the hidden layer (fc1.*); bob
# leaves while running. Prints each node's status (accuracies, bytes per community) and stops
# every process by its PID. Usage: examples/community/run.sh [WORKDIR]
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-$(mktemp -d -t p2pfl-community-XXXXXX)}
NAMES=(founder alice bob)
SYNCS_BEFORE_LEAVE=3
TRAIN_AFTER_LEAVE_S=10
source "$HERE/../daemons.sh"

status() {  # status HOME [EXPR]: the value of a Python expression over the node's status
    # (`s`; `summary(s)` for a readable one); exits 1 if it is falsy or the node is not up
    local reply
    reply=$("$P2PFL" node status --home "$1" --json) || return 1
    "$PYTHON" - "${2:-s}" "$reply" <<'PY'
import json, sys

def summary(s):
    lines = [
        f"step {s['step']}, {s['train_samples']} training samples, accuracy on its own labels "
        f"{s['local_accuracy']:.3f}, on all digits {s['test_accuracy']:.3f}; bytes sent "
        f"{s['bytes_sent']:,}, received {s['bytes_received']:,}, frames refused {s['rejected']}"
    ]
    for c in s["communities"]:
        lines.append(
            f"community {c['name']} ({c['id'][:12]}): {len(c['members'])} other members, "
            f"{c['syncs']} syncs, sent {c['bytes_sent']:,} B, received {c['bytes_received']:,} B"
        )
    return "\n".join(lines if s["communities"] else lines + ["in no community"])

s = json.loads(sys.argv[2])
value = eval(sys.argv[1])
print(value)
sys.exit(0 if value else 1)
PY
}

start_node() {  # start_node INDEX: run the node in the background
    local home="$WORK/${NAMES[$1]}"
    "$P2PFL" node start --home "$home" --protocol none --model mlp:hidden=64 \
        --data "digits:part=$1/${#NAMES[@]},alpha=0.5,seed=1" --seed "$1" \
        --json >"$home/started.json" 2>"$home/stderr" &
    PIDS+=($!)
}

mkdir -p "$WORK"
echo "work directory: $WORK"
for name in "${NAMES[@]}"; do
    "$P2PFL" node init --home "$WORK/$name" --json >"$WORK/$name.init" &
done
wait
peer_id() { json_field 'j["peer_id"]' <"$WORK/$1.init"; }
address() { json_field 'j["listen_addrs"][0]' <"$WORK/$1/started.json"; }

echo "--- the founder signs the manifest and starts its node"
community=$("$P2PFL" community create --home "$WORK/founder" "$HERE/manifest.toml" --json \
    2>/dev/null | json_field 'j["id"]')
echo "community id: $community"
start_node 0

echo "--- it invites alice and bob (each invite names the peer it admits)"
for name in alice bob; do
    "$P2PFL" community invite --home "$WORK/founder" "$community" \
        --for "$(peer_id "$name")" --expires 1h --json >"$WORK/$name.invite" &
done
wait_for 60 test -s "$WORK/founder/started.json"
founder_addr=$(address founder)
echo "founder: $founder_addr"
wait_for 60 test -s "$WORK/alice.invite" -a -s "$WORK/bob.invite"

echo "--- alice and bob join with their token and the founder as bootstrap peer, and start"
JOINS=()
for name in alice bob; do
    "$P2PFL" community join --home "$WORK/$name" "$(json_field 'j["token"]' <"$WORK/$name.invite")" \
        --bootstrap "$founder_addr" >"$WORK/$name.joined" 2>/dev/null &
    JOINS+=($!)
done
wait "${JOINS[@]}"
cat "$WORK/alice.joined" "$WORK/bob.joined"
start_node 1
start_node 2
for name in alice bob; do
    wait_for 60 test -s "$WORK/$name/started.json"
    echo "$name: $(address "$name")"
done

echo "--- training together; alice and bob find each other through announcements"
for name in "${NAMES[@]}"; do
    wait_for 90 status "$WORK/$name" \
        "s['communities'] and s['communities'][0]['syncs'] >= $SYNCS_BEFORE_LEAVE \
         and len(s['communities'][0]['members']) == 2"
done

echo "--- bob leaves while running"
"$P2PFL" community leave --home "$WORK/bob" "$community" 2>&1
bob_at_leave=$(status "$WORK/bob" 's["bytes_sent"]')
sleep "$TRAIN_AFTER_LEAVE_S"

for name in "${NAMES[@]}"; do
    echo "--- $name"
    status "$WORK/$name" 'summary(s)'
done
bob_after=$(status "$WORK/bob" 's["bytes_sent"]')
echo "bob's bytes sent: $bob_at_leave once it had left, $bob_after ${TRAIN_AFTER_LEAVE_S} s later"

cleanup
PIDS=()
echo "all nodes stopped by PID; logs and checkpoints in $WORK/*/"
