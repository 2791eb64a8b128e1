"""What the simulator benchmarks (``bench_sim.py``, ``bench_scale.py``) share: the
``--threads`` option and a prepared scenario that evaluates only at the end.

Imported by those scripts from their own directory (``python sim/bench_sim.py``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from p2pfl.simulator.engine import Prepared, prepare
from p2pfl.simulator.scenario import load_scenario


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads, default 1 (0 keeps torch's default)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small models on a shared machine; "
        "0 keeps torch's default)",
    )


def set_threads(threads: int) -> None:
    """Apply ``--threads`` (0 leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def prepared_scenario(
    nodes: int, steps: int, protocol: str, learner: str, **overrides: Any
) -> Prepared:
    """Data, model and graph of a benchmark run of one protocol, evaluated only at the end
    (``eval_every`` = ``steps``, plus the engine's few final evaluations)."""
    settings = {
        "nodes": nodes,
        "steps": steps,
        "protocols": (protocol,),
        "eval_every": steps,
        "learner": learner,
        **overrides,
    }
    return prepare(load_scenario(None, settings))
