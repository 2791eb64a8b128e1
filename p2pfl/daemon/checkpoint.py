"""Checkpoints of a node: written atomically, verified on load, one previous copy kept.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is a
``torch.save`` of plain tensors, numbers, strings, lists and dicts (loaded back with
``weights_only=True``). Saving writes a temporary file, fsyncs it, moves the current ``ckpt``
to ``ckpt.prev`` and the new file into place, then fsyncs the directory
(``files.write_private_atomically``); a write that fails (disk full, read-only home) leaves
both files as they were and no temporary file. Restoring takes the newest file that verifies
and can be applied; one that does not is logged, renamed ``*.corrupt`` or ``*.unusable`` (so
it is never rotated over the good previous copy) and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from p2pfl.errors import P2pflError
from p2pfl.files import write_private_atomically

log = logging.getLogger("p2pfl.daemon")

MAGIC = b"P2PFLCK1"
CURRENT = "ckpt"
PREVIOUS = "ckpt.prev"
T = TypeVar("T")
SET_ASIDE = ("corrupt", "unusable")


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
    """Replace ``home/ckpt`` by ``data``, keeping the current one as ``ckpt.prev``. On failure
    (disk full, read-only home: ``OSError``) both stay as they were and no temporary file is
    left."""
    write_private_atomically(home / CURRENT, data, previous=home / PREVIOUS)


def restore_newest(home: Path, apply: Callable[[dict[str, Any]], T]) -> T | None:
    """``apply`` the newest checkpoint that verifies and can be applied; None if there is none
    at all. A file that does not verify is renamed ``*.corrupt``; one that verifies but that
    ``apply`` refuses (KeyError, TypeError, ValueError, RuntimeError: a missing key, another
    model) is renamed ``*.unusable``; either way the previous one is tried next, and neither is
    ever rotated over a good copy. ``apply`` must overwrite everything it sets, so a partly
    applied refused checkpoint leaves no trace once the next one is applied.

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
            problems.append(_set_aside(path, f"{name}.corrupt", exc))
            continue
        try:
            result = apply(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            problems.append(_set_aside(path, f"{name}.unusable", reason))
            continue
        if problems:
            log.warning("resumed from the previous checkpoint %s", path)
        return result
    if problems:
        raise CheckpointError(
            "no usable checkpoint: " + "; ".join(problems) + ". They were renamed "
            "*.corrupt / *.unusable; start again to begin from step 0"
        )
    return None


def _set_aside(path: Path, new_name: str, problem: object) -> str:
    """Rename an unusable checkpoint out of the rotation; return the problem for the user."""
    log.error("checkpoint %s is unusable: %s; moved to %s", path, problem, new_name)
    try:
        os.replace(path, path.with_name(new_name))
    except OSError as exc:
        log.error("could not rename %s: %s", path, exc)
    return f"{path}: {problem}"


def load_newest(home: Path) -> dict[str, Any] | None:
    """The newest checkpoint that verifies (see ``restore_newest``), None if there is none."""
    return restore_newest(home, lambda state: state)


def checkpoint_files(home: Path) -> list[dict[str, Any]]:
    """The checkpoint files in ``home`` (current, previous, set-aside corrupt ones): name,
    size in bytes and unix time of the last write."""
    files = []
    for name in (CURRENT, PREVIOUS) + tuple(
        f"{n}.{k}" for k in SET_ASIDE for n in (CURRENT, PREVIOUS)
    ):
        try:
            info = (home / name).stat()
        except OSError:
            continue
        files.append({"name": name, "bytes": info.st_size, "written": info.st_mtime})
    return files
