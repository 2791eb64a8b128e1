"""The value of joining communities: per node, accuracy on its own objective with its
communities against training alone (same data, batches, seeds and initial model), and the
gain summed up for data-poor and data-rich members."""

from __future__ import annotations

from typing import Any

from p2pfl.simulator.engine import Prepared
from p2pfl.simulator.objectives import objective_classes


def compare_joining(
    prepared: Prepared, alone: dict[str, Any], together: dict[str, Any]
) -> dict[str, Any]:
    """Per-node rows and group aggregates from the "alone" and "communities" run summaries."""
    threshold = prepared.scenario.data_poor_max
    rows = []
    for i, node in enumerate(prepared.nodes):
        before = alone["own_accuracy_nodes"][i]
        after = together["own_accuracy_nodes"][i]
        rows.append(
            {
                "node": i,
                "train_samples": len(node.y_train),
                "classes": objective_classes(node),
                "member_of": [c.name for c in prepared.communities if i in c.graph],
                "accuracy_alone": before,
                "accuracy_communities": after,
                "gain": after - before,
            }
        )
    members = [r for r in rows if r["member_of"]]
    return {
        "data_poor_max": threshold,
        "groups": {
            "data_poor": aggregate([r for r in members if r["train_samples"] <= threshold]),
            "data_rich": aggregate([r for r in members if r["train_samples"] > threshold]),
            "members": aggregate(members),
        },
        "not_members": len(rows) - len(members),
        "communities": [
            {k: c[k] for k in ("name", "protocol", "shared", "shared_params", "bytes_sent")}
            | {"members": len(c["members"]), "messages": c["messages"], "syncs": c["syncs"]}
            for c in together["channels"]
        ],
        "nodes": rows,
    }


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, worst and best gain, the share of nodes that gain and that lose, and the mean
    accuracies behind them (``nodes`` 0 and nothing else for an empty group)."""
    if not rows:
        return {"nodes": 0}
    gains = [r["gain"] for r in rows]
    n = len(rows)
    return {
        "nodes": n,
        "mean_gain": sum(gains) / n,
        "worst_gain": min(gains),
        "best_gain": max(gains),
        "share_gaining": sum(g > 0 for g in gains) / n,
        "share_losing": sum(g < 0 for g in gains) / n,
        "mean_accuracy_alone": sum(r["accuracy_alone"] for r in rows) / n,
        "mean_accuracy_communities": sum(r["accuracy_communities"] for r in rows) / n,
    }
