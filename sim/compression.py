"""Bytes to reach 99 % of continuous averaging, for each protocol x codec, on one scenario.

    .venv/bin/python sim/compression.py sim/pareto-dirichlet01.toml --out runs/compression

Runs ``continuous`` (the reference), ``periodic:b=B`` for every B in ``--periods`` without a
codec (the fair baseline: periodic gets every mechanism ``dynamic`` gets; only the codec
differs), then each codec of ``--codecs`` on the best such period and on ``dynamic``
(defaults), and with ``--with-continuous`` on ``continuous``. A run reaches the target when
its final accuracy (mean of the evaluations at prime steps in the last tenth) is at least
99 % of continuous's; its cost is all the bytes it sent. Prints the table, writes
``compression.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario

PERIODS = (10, 20, 50, 100, 200)
CODECS = ("codec=fp16", "codec=int8", "codec=topk,topk=0.05")
TARGET = 0.99


def with_codec(protocol: str, codec: str) -> str:
    """``protocol`` with the codec keys appended (``codec`` empty: unchanged)."""
    if not codec:
        return protocol
    return f"{protocol}{',' if ':' in protocol else ':'}{codec}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument("--periods", default=",".join(map(str, PERIODS)))
    parser.add_argument("--codecs", default=";".join(CODECS), help="';'-separated codec keys")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--with-continuous", action="store_true", help="also run continuous with each codec"
    )
    args = parser.parse_args()
    overrides = {} if args.steps is None else {"steps": args.steps}
    prepared = prepare(load_scenario(args.scenario, overrides))
    runs: dict[str, dict[str, Any]] = {}

    def run(protocol: str) -> dict[str, Any]:
        summary = Simulation(prepared, protocol).run()
        runs[protocol] = {k: v for k, v in summary.items() if k != "metrics"}
        print(
            f"{protocol:44s} accuracy {summary['final_accuracy']:.4f}  "
            f"{summary['bytes_sent'] / 1e6:10.2f} MB  refused {summary['refused_codec']}",
            flush=True,
        )
        return runs[protocol]

    target = TARGET * run("continuous")["final_accuracy"]
    periodic = [run(f"periodic:b={b}") for b in map(int, args.periods.split(","))]
    reaching = [r for r in periodic if r["final_accuracy"] >= target]
    best = (
        min(reaching, key=lambda r: r["bytes_sent"])
        if reaching
        else max(periodic, key=lambda r: r["final_accuracy"])
    )
    baseline = best["protocol"]
    codecs = [""] + [c for c in args.codecs.split(";") if c]
    for codec in codecs:
        run(with_codec("dynamic", codec))
        if codec:
            run(with_codec(baseline, codec))
            if args.with_continuous:
                run(with_codec("continuous", codec))
    rows = []
    for codec in codecs:
        for protocol in ("continuous", baseline, "dynamic"):
            if with_codec(protocol, codec) not in runs:
                continue
            r = runs[with_codec(protocol, codec)]
            rows.append(
                {
                    "protocol": protocol,
                    "codec": codec.removeprefix("codec=") or "float32",
                    "accuracy": r["final_accuracy"],
                    "bytes": r["bytes_sent"],
                    "reaches": r["final_accuracy"] >= target,
                    "loss_points": 100 * (runs[protocol]["final_accuracy"] - r["final_accuracy"]),
                    "vs_best_periodic": best["bytes_sent"] / r["bytes_sent"],
                }
            )
    print(f"\ntarget {target:.4f} (99 % of continuous); best periodic without codec: {baseline}")
    print("| protocol | codec | accuracy | MB | reaches | points lost | best periodic / this |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['protocol']} | {row['codec']} | {row['accuracy']:.3f} | "
            f"{row['bytes'] / 1e6:,.1f} | {'yes' if row['reaches'] else 'no'} | "
            f"{row['loss_points']:+.1f} | {row['vs_best_periodic']:.1f}x |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"target": target, "best_periodic": baseline, "rows": rows, "runs": runs}
    (args.out / "compression.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
