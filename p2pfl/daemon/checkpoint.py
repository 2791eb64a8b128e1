"""Checkpoints of a node: written atomically, verified on load, one previous copy kept.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is a
``torch.save`` of plain tensors, numbers, strings, lists and dicts (loaded back with
``weights_only=True``). Saving writes a temporary file, fsyncs it, moves the current ``ckpt``
to ``ckpt.prev`` and the new file into place, then fsyncs the directory
(``files.write_private_atomically``). Loading takes the newest
file that verifies; one that does not is logged, renamed ``*.corrupt`` (so it is never rotated
over the good previous copy) and skipped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from p2pfl.errors import P2pflError
from p2pfl.files import write_private_atomically

log = logging.getLogger("p2pfl.daemon")

MAGIC = b"P2PFLCK1"
CURRENT = "ckpt"
PREVIOUS = "ckpt.prev"


class CheckpointError(P2pflError):
    """No usable checkpoint although some exist; the message lists each file's problem."""


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """Serialize ``state`` (plain tensors and containers) with its checksum."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode_checkpoint(data: bytes) -> dict[str, Any]:
    """Verify and load checkpoint bytes; raise ValueError saying what is wrong."""
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise ValueError("not a p2pfl checkpoint (bad header; truncated or overwritten?)")
    digest, payload = data[len(MAGIC) : head], data[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (the file is truncated or damaged)")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError("payload is not a dict")
    return state


def write_atomically(home: Path, data: bytes) -> None:
    """Replace ``home/ckpt`` by ``data``, keeping the current one as ``ckpt.prev``."""
    write_private_atomically(home / CURRENT, data, previous=home / PREVIOUS)


def load_newest(home: Path) -> dict[str, Any] | None:
    """The newest checkpoint that verifies, None if there is none at all.

    Raises CheckpointError if checkpoints exist but none is usable.
    """
    problems: list[str] = []
    for name in (CURRENT, PREVIOUS):
        path = home / name
        if not path.exists():
            continue
        try:
            state = decode_checkpoint(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("checkpoint %s is unusable: %s; moved to %s.corrupt", path, exc, name)
            os.replace(path, home / f"{name}.corrupt")
            problems.append(f"{path}: {exc}")
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s", path)
        return state
    if problems:
        raise CheckpointError(
            "no usable checkpoint: " + "; ".join(problems) + ". The damaged files were "
            "renamed *.corrupt; start again to begin from step 0"
        )
    return None
