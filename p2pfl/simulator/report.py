"""``report.png``: accuracy vs steps, accuracy vs bytes and traffic over time, one line per
protocol; for a scenario with communities, the value of joining (gain per node against its
data size, and own-objective accuracy over time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_report(runs: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw the three panels for ``runs`` (each with its ``metrics`` list) into ``path``."""
    fig, (ax_acc, ax_bytes, ax_rate) = plt.subplots(1, 3, figsize=(16, 4.8))
    for run in runs:
        m = run["metrics"]
        label = run["protocol"]
        steps = [r["step"] for r in m]
        acc = [r["accuracy"] for r in m]
        ax_acc.plot(steps, acc, label=label)
        mb = [max(r["bytes"], 1) / 1e6 for r in m]
        ax_bytes.plot(mb, acc, label=label, marker=".", markersize=3)
        rate = [0.0] + [
            (b["bytes"] - a["bytes"]) / 1e6 / max(b["step"] - a["step"], 1)
            for a, b in zip(m, m[1:], strict=False)
        ]
        ax_rate.plot(steps, rate, label=label)
    ax_acc.set(xlabel="step", ylabel="mean accuracy (global test set)", title="accuracy")
    ax_bytes.set(xlabel="MB sent (log)", ylabel="mean accuracy", title="accuracy vs traffic")
    ax_bytes.set_xscale("log")
    ax_rate.set(xlabel="step", ylabel="MB per step", title="traffic over time")
    for ax in (ax_acc, ax_bytes, ax_rate):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
