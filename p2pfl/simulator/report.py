"""``report.png``: test accuracy (local models and the average model) and prequential
accuracy over steps, accuracy vs bytes and traffic over time, one line per protocol, with
concept drifts marked; for a scenario with communities, the value of joining (gain per node
against its data size, and own-objective accuracy over time)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_report(
    runs: list[dict[str, Any]],
    path: Path,
    title: str = "",
    drift_events: Sequence[dict[str, int]] = (),
) -> None:
    """Draw four panels for ``runs`` (each with its ``metrics`` list) into ``path``: test
    accuracy of the local models (solid) and of the network's average model (dotted), the
    prequential accuracy, accuracy vs bytes, and traffic over time; concept drifts are marked
    (a line for a sudden drift, a band for a gradual one)."""
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    (ax_acc, ax_preq), (ax_bytes, ax_rate) = axes
    for k, run in enumerate(runs):
        m = run["metrics"]
        style = {"color": f"C{k % 10}", "label": run["protocol"]}
        steps = [r["step"] for r in m]
        acc = [r["accuracy"] for r in m]
        ax_acc.plot(steps, acc, **style)
        if "average_model_accuracy" in m[0]:
            ax_acc.plot(steps, [r["average_model_accuracy"] for r in m], ":", color=style["color"])
        preq = [(r["step"], r["prequential_accuracy"]) for r in m if r.get("prequential_accuracy")]
        if preq:
            ax_preq.plot(*zip(*preq, strict=True), **style)
        mb = [max(r["bytes"], 1) / 1e6 for r in m]
        ax_bytes.plot(mb, acc, marker=".", markersize=3, **style)
        # Traffic per step over the regular evaluation windows (the extra final evaluations
        # are a few steps apart: a sync inside one would look like a spike).
        grid = [r for r in m if r["step"] % m[0]["step"] == 0]
        rate = [
            (b["bytes"] - a["bytes"]) / 1e6 / (b["step"] - a["step"])
            for a, b in zip([{"step": 0, "bytes": 0}, *grid], grid, strict=False)
        ]
        ax_rate.stairs(rate, [0] + [r["step"] for r in grid], **style)
    ax_acc.set(
        xlabel="step",
        ylabel="accuracy (global test set)",
        title="test accuracy: mean of local models (solid), average model (dotted)",
    )
    ax_preq.set(
        xlabel="step",
        ylabel="accuracy on the next batch, before training on it",
        title="prequential accuracy (mean over nodes, per evaluation window)",
    )
    ax_bytes.set(xlabel="MB sent (log)", ylabel="mean accuracy", title="accuracy vs traffic")
    ax_bytes.set_xscale("log")
    ax_rate.set(xlabel="step", ylabel="MB per step", title="traffic over time")
    for ax in (ax_acc, ax_preq, ax_rate):
        mark_drifts(ax, drift_events)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    if drift_events:
        ax_preq.legend(
            handles=[
                plt.Line2D([], [], color="red", ls="--", lw=1, label="sudden drift"),
                plt.Rectangle((0, 0), 1, 1, color="red", alpha=0.15, label="gradual drift"),
            ],
            fontsize=8,
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mark_drifts(ax: Any, drift_events: Sequence[dict[str, int]]) -> None:
    """A dashed line at each sudden drift, a band over each gradual one."""
    for event in drift_events:
        if event["width"]:
            ax.axvspan(event["step"], event["step"] + event["width"], color="red", alpha=0.15)
        else:
            ax.axvline(event["step"], color="red", ls="--", lw=1)


def draw_joining(
    joining: dict[str, Any], runs: list[dict[str, Any]], path: Path, title: str = ""
) -> None:
    """The value of joining: each node's own-objective gain against its train samples (log x),
    coloured by the communities it is in, with the data-poor mean and worst gain marked; and
    the own-objective accuracy of data-poor and data-rich members over time, alone and with
    communities."""
    fig, (ax_gain, ax_time) = plt.subplots(1, 2, figsize=(14, 5.2))
    rows = joining["nodes"]
    poor_max = joining["data_poor_max"]
    memberships = sorted({"+".join(r["member_of"]) or "no community" for r in rows})
    colours = plt.get_cmap("tab10")
    for k, membership in enumerate(memberships):
        mine = [r for r in rows if ("+".join(r["member_of"]) or "no community") == membership]
        ax_gain.scatter(
            [r["train_samples"] for r in mine],
            [100 * r["gain"] for r in mine],
            label=membership,
            color=colours(k % 10),
            s=36,
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
        )
    ax_gain.axhline(0, color="black", linewidth=0.8)
    ax_gain.axvline(
        poor_max, color="grey", linestyle=":", linewidth=1, label=f"data-poor: <= {poor_max}"
    )
    poor = joining["groups"]["data_poor"]
    if poor["nodes"]:
        low = min(r["train_samples"] for r in rows)
        for value, style, name in (
            (poor["mean_gain"], "-", "mean"),
            (poor["worst_gain"], "--", "worst"),
        ):
            ax_gain.hlines(100 * value, low * 0.9, poor_max, colors="crimson", linestyles=style)
            ax_gain.annotate(
                f"data-poor {name}: {100 * value:+.1f} pts",
                (poor_max, 100 * value),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="crimson",
            )
    ax_gain.set_xscale("log")
    ax_gain.set(
        xlabel="train samples of the node (log)",
        ylabel="gain in own-objective accuracy (points)",
        title=f"joining vs training alone (data-poor: <= {poor_max} samples)",
    )
    ax_gain.legend(fontsize=8, title="member of", title_fontsize=8)
    by_node = {r["node"]: r for r in rows if r["member_of"]}
    groups = {
        "data-poor": [n for n, r in by_node.items() if r["train_samples"] <= poor_max],
        "data-rich": [n for n, r in by_node.items() if r["train_samples"] > poor_max],
    }
    for run, style in zip(runs, ("--", "-"), strict=False):
        m = run["metrics"]
        for (group, nodes), colour in zip(groups.items(), ("crimson", "navy"), strict=True):
            if not nodes:
                continue
            acc = [sum(r["own_accuracy_nodes"][n] for n in nodes) / len(nodes) for r in m]
            ax_time.plot(
                [r["step"] for r in m],
                acc,
                style,
                color=colour,
                label=f"{group} ({len(nodes)}), {run['protocol']}",
            )
    ax_time.set(
        xlabel="step",
        ylabel="mean own-objective accuracy",
        title="own-objective accuracy over time",
    )
    ax_time.legend(fontsize=8)
    for ax in (ax_gain, ax_time):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
