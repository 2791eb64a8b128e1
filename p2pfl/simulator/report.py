"""``report.png``: accuracy vs steps, accuracy vs bytes and traffic over time, one line per
protocol."""

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
