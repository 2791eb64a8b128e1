"""Torch for the commands that train: imported on first use, single-threaded by default.

Only ``sim``, ``demo`` and ``node start`` need torch, so the other commands (and ``--help``)
start without importing it.
"""

from __future__ import annotations

import os

from p2pfl.errors import P2pflError

THREADS_VARIABLE = "P2PFL_THREADS"


def use_torch() -> None:
    """Import torch and set its intra-op threads to ``P2PFL_THREADS`` (default 1).

    Our models are small, so intra-op threads only add spinning (measured 6-10x slower with
    2 threads on a loaded 2-core machine). A value that is not a positive whole number exits
    with code 2 (``P2pflError``) and says so."""
    text = os.environ.get(THREADS_VARIABLE, "1")
    if not text.strip().isdecimal() or int(text) < 1:
        raise P2pflError(
            f"{THREADS_VARIABLE}={text!r}: write a positive whole number of torch threads "
            "(1 is fastest for our small models)"
        )
    import torch

    torch.set_num_threads(int(text))
